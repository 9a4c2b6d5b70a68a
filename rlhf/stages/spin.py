"""SPIN, self-play fine-tuning (Chen et al. 2024): the model learns to tell the real response
from its opponent's, and the opponent is its own previous iterate.

One stage is one iteration. The opponent is the stage's starting weights, frozen. Its
optimizer steps are split into rounds of `steps_per_round` steps; at the first step of round r:
  1. `batch_size * steps_per_round` SFT examples: the built-in task's `sft_example(rng)`
     seeded by (seed, r), or rows of `data` (JSONL {prompt, response}) in a seeded order;
  2. the opponent answers each prompt (`temperature`, 1 by default: its own distribution); an
     answer cut off at `max_new_tokens` is unfinished and is trained without an EOS;
  3. an answer identical to the real response teaches nothing (the loss's gradient is zero)
     and is dropped and counted; with `drop_verified` so is an answer the task's verifier
     scores 1.0 (not in the paper: where a prompt has many right answers, as arrange does,
     the data holds one, and SPIN would teach the model to unlearn the others);
  4. the opponent's log-probs of real and generated responses are computed once;
  5. with `mix_previous`, as many rows again come from the previous SPIN iteration's
     generations (slot `previous_slot`), rescored by this stage's opponent;
  6. everything goes to `rounds/round_<r>.jsonl` (rank 0, atomically); at the end all of it
     also to `generations.jsonl`, which the next iteration's `mix_previous` reads.
The round's steps then make about one pass over its rows with
  loss = -logsigmoid(lam * ((log p(real) - log p_opp(real)) - (log p(gen) - log p_opp(gen))))
on summed response log-probs (rlhf.losses.preference.spin_loss; the paper's lam is 0.1),
plus `nll_weight` times the per-token NLL of the real response (0, as in the paper, by default).

Resume and DDP work as in the self-reward stage: a resumed run reloads round r's file instead
of generating again; each rank generates its share and the rows are all-gathered.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from rlhf import files
from rlhf.config import StageConfig
from rlhf.data.examples import PreferencePair, SFTExample
from rlhf.errors import ConfigError, DataError
from rlhf.losses.preference import chosen_nll, preference_accuracy, spin_loss
from rlhf.models import shard_in
from rlhf.preference_batch import log_now, pair_logprobs, starting_reference
from rlhf.sampling import SamplingConfig, generate_responses
from rlhf.rounds import (
    RoundPairs,
    all_round_rows,
    attach_reference,
    gather_rows,
    load_or_make,
    new_round_rows,
    read_round_rows,
    recent_means,
    round_batches,
    round_path,
    round_training_step,
    row_pair,
)
from rlhf.stage_context import StageContext, StageResult
from rlhf.training import EpochSampler, adamw_with_schedule, mix_seed

KIND = "spin"
log = logging.getLogger("rlhf")


@dataclass
class Config(StageConfig):
    kind: str = KIND
    max_steps: int = 24  # rounds = ceil(max_steps / steps_per_round)
    steps_per_round: int = 8
    batch_size: int = 32  # examples per step: a round generates batch_size * steps_per_round responses
    lr: float = 2e-5
    warmup_steps: int = 4
    lam: float = 0.1  # the paper's lambda (beta in DPO terms)
    nll_weight: float = 0.0  # per-token NLL on the real response; not in the paper
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 24
    generation_batch_size: int = 256
    data: Optional[Any] = None  # JSONL {prompt, response}; None uses the built-in task
    drop_verified: bool = False  # drop generations the task's verifier scores 1.0, like identical ones
    mix_previous: bool = False  # also train on the previous SPIN iteration's generations
    previous_slot: Optional[str] = None  # that iteration's slot
    eval_prompts: int = 64  # held-out prompts evaluated at the start of every round; 0: off

    def __post_init__(self):
        if self.steps_per_round < 1 or self.lam <= 0 or self.nll_weight < 0:
            raise ConfigError("steps_per_round must be >= 1, lam > 0 and nll_weight >= 0")
        if self.mix_previous and not self.previous_slot:
            raise ConfigError("mix_previous needs previous_slot (the earlier spin slot)")


def spin_step_loss(policy, tokens: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor, lam: float, nll_weight: float):
    """Loss of B (real, generated) rows collated as one (2B, T) batch, real first; ref is (B, 2)
    opponent log-probs (real, generated). Returns (loss, detached metrics)."""
    sums, lengths = pair_logprobs(policy, tokens, mask)
    b = sums.shape[0] // 2
    ref = ref.to(sums.dtype)
    out = spin_loss(sums[:b], sums[b:], ref[:, 0], ref[:, 1], lam)
    nll = chosen_nll(sums[:b], lengths[:b]).mean()
    loss = out.losses.mean() + nll_weight * nll
    metrics = {
        "spin_loss": out.losses.mean().detach(),
        "nll": nll.detach(),
        "rewards/real": out.chosen_rewards.mean(),
        "rewards/generated": out.rejected_rewards.mean(),
        "rewards/accuracy": preference_accuracy(out.chosen_rewards, out.rejected_rewards),
        "logps/real": sums[:b].detach().mean(),
        "logps/generated": sums[b:].detach().mean(),
    }
    return loss, metrics


class SpinModule(L.LightningModule):
    def __init__(self, ctx: StageContext, opponent: torch.nn.Module, previous: list[dict]):
        super().__init__()
        self.policy, self.cfg, self.ctx = ctx.policy, ctx.cfg, ctx
        object.__setattr__(self, "opponent", opponent)  # not a submodule: out of optimizer, DDP, checkpoints
        self.previous = previous
        self.per_round = ctx.cfg.batch_size * ctx.cfg.steps_per_round
        self.examples = None
        if ctx.cfg.data is not None:
            from rlhf.data.chat import renderer_for
            from rlhf.data.jsonl import read_sft_examples

            self.examples = ctx.training_rows(read_sft_examples(ctx.cfg.data, chat=renderer_for(ctx.tokenizer)))
            self.sampler = EpochSampler(len(self.examples), self.per_round, ctx.seed)
        self.round = -1
        self.data: Optional[RoundPairs] = None
        self.recent: deque = deque(maxlen=20)
        self.last_round: dict[str, float] = {}

    def configure_model(self):
        shard_in(self, self.policy)  # trainer.strategy=fsdp (rlhf/models/fsdp.py); SPIN's opponent stays whole

    def on_train_start(self):
        self.opponent.to(self.device)

    def on_train_batch_start(self, batch, batch_idx):
        r = int(batch[0])
        if r != self.round:
            self._start_round(r)

    def _round_examples(self, r: int) -> list[SFTExample]:
        if self.examples is not None:
            return [self.examples[i] for i in self.sampler.batch(r)]
        rng = random.Random(mix_seed(self.ctx.seed, "examples", r))
        return [self.ctx.task.sft_example(rng) for _ in range(self.per_round)]

    def _start_round(self, r: int) -> None:
        rows, reloaded = load_or_make(round_path(self.ctx.stage_dir, r), lambda: new_round_rows(self, r, self._make_rows, self.cfg.eval_prompts), self.trainer.is_global_zero)
        if reloaded:  # resumed mid-round: reload, never regenerate
            log.info("%s round %d: reloaded", self.ctx.slot, r)
        used = [row for row in rows if row["status"] == "pair"]
        # every answer already the real one: one stand-in pair, steps run with a zero loss
        self.data = RoundPairs.build(
            [row_pair(row, chosen="real", rejected="generated") for row in used],
            [row["ref"] for row in used],
            PreferencePair(rows[0]["prompt"], rows[0]["real"], rows[0]["real"]),
            self.ctx.tokenizer, self.ctx.policy.max_seq_len, self.ctx.seed, r,
        )
        self.round = r
        new = [row for row in rows if row["source"] == "new"]
        stats = {
            "round/examples": float(len(new)),
            "round/pairs": float(len(used)),
            "round/identical": float(sum(row["status"] == "identical" for row in rows)),
            "round/verified": float(sum(row["status"] == "verified" for row in rows)),
            "round/truncated": float(sum(not row.get("generated_finished", True) for row in new)),
            "round/previous": float(len(rows) - len(new)),
            "round/mean_response_length": sum(len(row["generated"]) for row in new) / max(1, len(new)),
        }
        scores = [row["score"] for row in new if row.get("score") is not None]
        if scores:  # how good the opponent's answers are (the task's verifier; diagnostic only)
            stats["round/generated_score"] = sum(scores) / len(scores)
        self.last_round.update(stats)
        log_now(self, stats)
        log.info("%s round %d: %s", self.ctx.slot, r, {k: round(v, 4) for k, v in stats.items()})

    def _make_rows(self, r: int) -> list[dict]:
        """This rank's share of round r: the opponent's answers, plus previous generations; gathered."""
        cfg, tok = self.cfg, self.ctx.tokenizer
        rank, world = self.trainer.global_rank, self.trainer.world_size
        examples = self._round_examples(r)
        mine = list(range(len(examples)))[rank::world]
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(self.ctx.seed, "sample", r, rank))
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        generated, finished = generate_responses(self.opponent, tok, [examples[i].prompt for i in mine], sampling, cfg.generation_batch_size, generator)
        rows = []
        for i, gen, done in zip(mine, generated, finished):
            ex = examples[i]
            score = self.ctx.task.score(ex.prompt, gen) if hasattr(self.ctx.task, "score") else None
            # a generation cut off at max_new_tokens is trained without an EOS (unfinished)
            rows.append({"index": i, "round": r, "source": "new", "prompt": ex.prompt, "real": ex.response, "generated": gen, "generated_finished": done, "score": score})
        if self.previous:  # as many again from the previous iteration, in the same rank split
            n = len(self.previous)
            for i in mine:
                old = self.previous[(r * len(examples) + i) % n]
                rows.append({"index": len(examples) + i, "round": r, "source": "previous", "prompt": old["prompt"], "real": old["real"], "generated": old["generated"], "generated_finished": old.get("generated_finished", True)})
        for row in rows:
            if row["generated"] == row["real"] and row["generated_finished"]:
                row["status"] = "identical"
            elif cfg.drop_verified and row["generated_finished"] and self.ctx.task.score(row["prompt"], row["generated"]) == 1.0:
                row["status"] = "verified"  # another right answer: as good as the real one
            else:
                row["status"] = "pair"
        attach_reference(rows, self.opponent, tok, self.ctx.policy.max_seq_len, 4 * cfg.batch_size, self.device, chosen="real", rejected="generated")
        return gather_rows(rows, world)

    def training_step(self, batch, batch_idx):
        return round_training_step(self, batch, lambda tokens, mask, ref: spin_step_loss(self.policy, tokens, mask, ref, self.cfg.lam, self.cfg.nll_weight))

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.cfg)

    def final_metrics(self) -> dict[str, float]:
        return {**recent_means(self.recent), **self.last_round}


def load_previous(ctx: StageContext) -> list[dict]:
    """The previous SPIN iteration's (prompt, real, generated) rows, from its generations.jsonl."""
    cfg = ctx.cfg
    if not cfg.mix_previous:
        return []
    path = ctx.stage_dir_of(cfg.previous_slot) / "generations.jsonl"
    if not path.exists():
        raise ConfigError(f"stages.{ctx.slot}.previous_slot={cfg.previous_slot!r}: {path} not found (is it a spin slot?)")
    return [row for row in read_round_rows(path) if row["source"] == "new"]


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    if cfg.data is None and not hasattr(ctx.task, "sft_example"):
        raise ConfigError(f"stages.{ctx.slot}: set `data` (this task makes no SFT examples)")
    if cfg.drop_verified and ctx.task.score(ctx.task.eval_prompts()[0], "") is None:
        raise ConfigError(f"stages.{ctx.slot}.drop_verified=true needs a task with a verifier (task.name={ctx.run_cfg.task.name!r} has none)")
    previous = load_previous(ctx)
    opponent = starting_reference(ctx)  # the stage's starting weights, frozen (LoRA-aware)
    module = SpinModule(ctx, opponent, previous)
    ctx.fit(module, round_batches(cfg.steps_per_round * cfg.accumulate_grad_batches))
    metrics = module.final_metrics()
    rows = all_round_rows(ctx.stage_dir)  # every rank: all of them raise, none waits for the others
    if not any(row["status"] == "pair" for row in rows):  # the stage trained on nothing: never mark it complete
        raise DataError(f"stages.{ctx.slot}: no usable pair, nothing was trained: all {len(rows)} generations equal the real response or, with drop_verified, score 1.0 (the model already reproduces the data)")
    if ctx.is_global_zero:
        files.write_jsonl(Path(ctx.stage_dir) / "generations.jsonl", rows)
        new = [row for row in rows if row["source"] == "new"]
        metrics["pairs_total"] = float(sum(row["status"] == "pair" for row in rows))
        metrics["identical_total"] = float(sum(row["status"] == "identical" for row in new))
        metrics["verified_total"] = float(sum(row["status"] == "verified" for row in new))
    return StageResult(ctx.policy, metrics)
