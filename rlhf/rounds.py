"""Online rounds: the part shared by the stages that make their own pairs as they train
(external-reward DPO, self-rewarding DPO, SPIN).

A stage's optimizer steps are split into rounds of `steps_per_round` steps; batch i of the
stage is (round, step in round) = (i // per_round, i % per_round) (`round_batches`). At a
round's first step the stage makes the round's rows from its CURRENT weights (sample,
score, pair), and rank 0 writes them to `<stage dir>/rounds/round_<r>.jsonl`. A resumed
run reloads that file instead of sampling again from weights that are no longer the
round's starting weights (`load_or_make`), which is what makes resume exact. The round's
steps then make one pass over its pairs in an order fixed by (seed, round) (`RoundPairs`).
Under DDP every rank makes its share of the rows and all of them are gathered
(`gather_rows`), so each rank holds the whole round and trains on its shard of each step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from rlhf import files
from rlhf.data.examples import PreferencePair
from rlhf.preference_batch import collate_pairs, encode_pair, heldout_eval, log_now, reference_logprobs
from rlhf.training import check_finite, mix_seed

log = logging.getLogger("rlhf")


def round_batches(per_round: int) -> Callable[[int, int, int], torch.Tensor]:
    """The stage's make_batch: batch i is the tensor [round, step within the round]."""

    def make_batch(i: int, rank: int, world: int) -> torch.Tensor:
        return torch.tensor([i // per_round, i % per_round])

    return make_batch


def round_path(stage_dir: str | Path, r: int) -> Path:
    return Path(stage_dir) / "rounds" / f"round_{r:03d}.jsonl"


def read_round_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def all_round_rows(stage_dir: str | Path) -> list[dict]:
    """Every round's rows in round order (a resumed stage's earlier rounds included)."""
    return [row for path in sorted((Path(stage_dir) / "rounds").glob("round_*.jsonl")) for row in read_round_rows(path)]


def rank_zero_says(value: bool) -> bool:
    """Rank 0's value on every rank: ranks must agree whether to sample (a collective) or reload."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return bool(box[0])
    return value


def gather_rows(rows: list[dict], world: int) -> list[dict]:
    """Every rank's rows, sorted by their "index"."""
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
        return sorted((row for part in gathered for row in part), key=lambda row: row["index"])
    return rows


def load_or_make(path: Path, make_rows: Callable[[], list[dict]], is_global_zero: bool) -> tuple[list[dict], bool]:
    """(rows, reloaded): round r's saved rows, or new ones from make_rows(), written atomically by rank 0."""
    if rank_zero_says(path.exists()):
        return read_round_rows(path), True
    rows = make_rows()
    if is_global_zero:
        files.write_jsonl(path, rows)
    return rows, False


@dataclass
class RoundPairs:
    """One round's encoded pairs, their reference log-probs and the order the steps take them in.

    `empty`: the round made no pair at all; it holds one stand-in pair so every rank still
    runs its steps (the stage multiplies the loss by zero), keeping ranks and resume in step.
    """

    pairs: list
    ref: Optional[torch.Tensor]  # (pairs, 2) reference log-probs of (chosen, rejected), or None
    order: list[int]
    empty: bool

    @classmethod
    def build(
        cls,
        pairs: Sequence[PreferencePair],
        refs: Optional[Sequence[Sequence[float]]],
        stand_in: PreferencePair,
        tokenizer,
        max_length: int,
        seed: int,
        r: int,
    ) -> "RoundPairs":
        empty = not pairs
        if empty:
            pairs, refs = [stand_in], [[0.0, 0.0]]
        encoded = [encode_pair(pair, tokenizer, max_length) for pair in pairs]
        ref = torch.tensor([list(v) for v in refs]).view(-1, 2) if refs is not None else None
        order = list(range(len(encoded)))
        random.Random(mix_seed(seed, "order", r)).shuffle(order)
        return cls(encoded, ref, order, empty)

    @classmethod
    def best_vs_worst(cls, rows: list[dict], with_reference: bool, tokenizer, max_length: int, seed: int, r: int) -> "RoundPairs":
        """From rows of candidates where status "pair" rows name a chosen and a rejected response
        (and their reference log-probs "ref"); the stand-in is the first candidate against itself."""
        pair_rows = [row for row in rows if row["status"] == "pair"]
        first = rows[0]["candidates"][0]["response"]
        return cls.build(
            [row_pair(row) for row in pair_rows],
            [row["ref"] for row in pair_rows] if with_reference else None,
            PreferencePair(rows[0]["prompt"], first, first),
            tokenizer, max_length, seed, r,
        )

    def chunk(self, step: int, steps: int, rank: int, world: int) -> list[int]:
        """This rank's pair indices for step `step` of a round of `steps` steps: one pass over the pairs."""
        n = len(self.pairs)
        size = max(world, math.ceil(n / steps))  # wraps around only when pairs < steps * world
        return [self.order[(step * size + j) % n] for j in range(size)][rank::world]

    def step_batch(self, step: int, module, steps_per_round: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(tokens, mask, reference log-probs or None) on module's device: this rank's pairs for
        batch `step` of the round (a round is steps_per_round x accumulate_grad_batches batches)."""
        trainer = module.trainer
        chunk = self.chunk(step, steps_per_round * trainer.accumulate_grad_batches, trainer.global_rank, trainer.world_size)
        tokens, mask = collate_pairs([self.pairs[i] for i in chunk], module.ctx.tokenizer.pad_id)
        ref = self.ref[chunk].to(module.device) if self.ref is not None else None
        return tokens.to(module.device), mask.to(module.device), ref


def new_round_rows(module, r: int, make_rows: Callable[[int], list[dict]], eval_prompts: int) -> list[dict]:
    """Round r's rows from make_rows(r). First, on rank 0, the held-out task score of the round's
    starting weights (logged, and kept as `round/start_*` in module.last_round, with the time
    the rows took as `round/generate_s`)."""
    ctx = module.ctx
    # sharded (trainer.strategy=fsdp): rank 0 cannot sample alone, the round starts unevaluated
    if eval_prompts and module.trainer.is_global_zero and module.device_mesh is None:
        metrics = heldout_eval(module.policy, ctx.task, ctx.tokenizer, ctx.run_cfg.eval, eval_prompts)
        log_now(module, {**metrics, "round": float(r)})
        module.last_round.update({"round/start_" + k.split("/", 1)[-1]: v for k, v in metrics.items()})
        log.info("%s round %d start: %s", ctx.slot, r, {k: round(v, 4) for k, v in metrics.items()})
    start = time.perf_counter()
    rows = make_rows(r)
    module.last_round["round/generate_s"] = time.perf_counter() - start
    return rows


def row_pair(row: dict, chosen: str = "chosen", rejected: str = "rejected") -> PreferencePair:
    """The pair a round row names, with whether each side finished (`<key>_finished`; rows
    written before the flag existed count as finished)."""
    return PreferencePair(row["prompt"], row[chosen], row[rejected], row.get(f"{chosen}_finished", True), row.get(f"{rejected}_finished", True))


def mark_finished(row: dict, candidates: Sequence[dict]) -> None:
    """Set row["chosen_finished"] / row["rejected_finished"] from the candidates' "finished"
    flags: a text counts as finished if any candidate with that text ended with EOS."""
    for side in ("chosen", "rejected"):
        if row.get(side) is not None:
            row[f"{side}_finished"] = any(c["finished"] for c in candidates if c["response"] == row[side])


def attach_reference(rows: list[dict], model, tokenizer, max_length: int, batch_size: int, device, chosen: str = "chosen", rejected: str = "rejected") -> None:
    """Each "pair" row's reference log-probs of (row[chosen], row[rejected]) as row["ref"]:
    computed once per round and saved with it, never per step."""
    pair_rows = [row for row in rows if row["status"] == "pair"]
    if not pair_rows:
        return
    encoded = [encode_pair(row_pair(row, chosen, rejected), tokenizer, max_length) for row in pair_rows]
    for row, values in zip(pair_rows, reference_logprobs(model, encoded, tokenizer.pad_id, batch_size, device).tolist()):
        row["ref"] = values


def round_training_step(module, batch, loss_fn: Callable) -> torch.Tensor:
    """One step of a round for module (with .data: RoundPairs, .recent: a deque of metrics):
    loss_fn(tokens, mask, reference) -> (loss, metrics); an empty round's loss is zeroed."""
    data = module.data
    tokens, mask, reference = data.step_batch(int(batch[1]), module, module.cfg.steps_per_round)
    loss, metrics = loss_fn(tokens, mask, reference)
    if data.empty:
        loss = loss * 0.0
    check_finite(loss, module.ctx.slot, module.global_step)
    module.log("train/loss", loss, prog_bar=True)
    module.log_dict({f"train/{k}": v for k, v in metrics.items() if k != "loss"})
    if not data.empty:
        module.recent.append({f"train/{k}": float(v) for k, v in metrics.items()})
    return loss


def recent_means(recent) -> dict[str, float]:
    """The mean of each train metric over the last steps (one batch is noisy)."""
    keys = recent[0] if recent else {}
    return {k: sum(r[k] for r in recent) / len(recent) for k in keys}
