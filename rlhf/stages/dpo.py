"""Offline DPO and its variants on fixed preference pairs.

Losses (`loss`): sigmoid (DPO; cDPO with label_smoothing), robust, ipo, hinge (SLiC), and
the reference-free simpo and rrhf. Every loss can add an RPO-style NLL term on the chosen
response (`nll_weight`); see rlhf/preference_batch.py for the shared fields.

Data: `data` (JSONL `{prompt, chosen, rejected}` rows or hh-rlhf `{chosen, rejected}`
transcripts), or None for the built-in task's pairs (the correct answer over a near miss),
which for step i are a pure function of (seed, i).

Reference: a frozen copy of the stage's starting weights. With `precompute_reference`
its log-probs for every pair this rank will train on are computed once before the first
step (length-sorted, no gradients) and the copy is freed: training then runs the policy
only. Otherwise the reference runs on each batch.

Batches: with `share_prompt` (default) a pair is one row, prompt | chosen | rejected, so the
prompt runs once (rlhf.preference_batch.pack_pairs; same log-probs as two rows). Models
that cannot run such rows (HF architectures other than the tested GPT-2 and Llama) get the
plain two rows per pair.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from rlhf.config import StageConfig
from rlhf.models import shard_in
from rlhf.preference_batch import (
    EncodedPair,
    PreferenceLossConfig,
    can_share_prompt,
    check_loss_config,
    collate_pairs,
    encode_pair,
    fit_pair,
    heldout_eval,
    log_now,
    needs_reference,
    pack_pairs,
    pair_logprobs,
    pair_store,
    preference_loss,
    reference_logprobs,
    shared_prompt_forward,
    starting_reference,
)
from rlhf.sampling import count_truncated_ids
from rlhf.stage_context import StageContext, StageResult
from rlhf.training import EpochSampler, adamw_with_schedule, check_finite, step_rng

KIND = "dpo"
log = logging.getLogger("rlhf")


@dataclass
class Config(PreferenceLossConfig, StageConfig):
    kind: str = KIND
    max_steps: int = 150
    batch_size: int = 32  # pairs per batch (each pair is two sequences)
    # measured on the built-in task (docs/results_dpo.md): a long warmup keeps the fresh
    # AdamW from knocking the SFT policy over; NLL weight 1 as in RPO
    lr: float = 3e-4
    warmup_steps: int = 30
    nll_weight: float = 1.0
    data: Optional[Any] = None  # JSONL path, glob or list; None uses the built-in task
    skip_bad_rows: bool = False
    max_length: Optional[int] = None  # tokens per sequence; None: the model's max_seq_len
    precompute_reference: bool = True
    # run each pair's prompt once, chosen and rejected packed behind it in one row (models that
    # cannot fall back to two rows per pair): the same log-probs, fewer tokens
    share_prompt: bool = True
    eval_every: int = 50  # optimizer steps between held-out evaluations; 0: off
    eval_prompts: int = 64  # how many held-out prompts those evaluations use


class PairSource:
    """The pairs of batch i as (key, encoded pair); a key names one pair for the reference cache."""

    def __init__(self, ctx: StageContext):
        cfg = ctx.cfg
        self.task, self.tok, self.batch_size, self.seed = ctx.task, ctx.tokenizer, cfg.batch_size, ctx.seed
        self.max_length = cfg.max_length or ctx.policy.max_seq_len
        self.share_prompt = cfg.share_prompt and can_share_prompt(ctx.policy)
        self.pairs = None  # file data: a TokenStore of untruncated (prompt, chosen, rejected) ids
        self.truncated = 0  # pairs longer than max_length, cut by the shared rule (encode_pair)
        if cfg.data is not None:
            from rlhf.data.chat import renderer_for
            from rlhf.data.jsonl import stream_preference_pairs

            # encoded as they stream in; only the compact ids stay (pair_store; issue #17 item 9)
            rows = ctx.iter_training_rows(stream_preference_pairs(cfg.data, skip_bad_rows=cfg.skip_bad_rows, chat=renderer_for(self.tok)))
            self.pairs = pair_store(rows, self.tok)
            self.truncated = count_truncated_ids(self.pairs, self.max_length, ctx.slot)
            self.sampler = EpochSampler(len(self.pairs), cfg.batch_size, ctx.seed)
            log.info("dpo: %d preference pairs from %s", len(self.pairs), cfg.data)
        elif not hasattr(ctx.task, "preference_pair"):
            from rlhf.errors import ConfigError

            raise ConfigError(f"stages.{ctx.slot}: set `data` (this task makes no preference pairs)")

    def items(self, i: int) -> list[tuple[int, EncodedPair]]:
        if self.pairs is not None:
            return [(k, fit_pair(self.pairs[k], self.max_length)) for k in self.sampler.batch(i)]
        rng = step_rng(self.seed, i)
        pairs = [self.task.preference_pair(rng) for _ in range(self.batch_size)]
        return [(i * self.batch_size + j, encode_pair(p, self.tok, self.max_length)) for j, p in enumerate(pairs)]

    def make_batch(self, i: int, rank: int, world: int):
        """(keys, *pair tensors): pack_pairs' five tensors when sharing the prompt, else collate_pairs' two."""
        items = self.items(i)[rank::world]
        pairs = [pair for _, pair in items]
        tensors = pack_pairs(pairs, self.tok.pad_id) if self.share_prompt else collate_pairs(pairs, self.tok.pad_id)
        return (torch.tensor([key for key, _ in items], dtype=torch.long), *tensors)


class DPOModule(L.LightningModule):
    def __init__(self, ctx: StageContext, source: PairSource, reference: Optional[torch.nn.Module]):
        super().__init__()
        self.policy, self.cfg, self.slot, self.source = ctx.policy, ctx.cfg, ctx.slot, source
        self.task, self.tok, self.eval_cfg, self.stage_dir = ctx.task, ctx.tokenizer, ctx.run_cfg.eval, Path(ctx.stage_dir)
        # not a submodule: the reference stays out of the optimizer, DDP and checkpoints
        object.__setattr__(self, "reference", reference)
        self.ref_cache: Optional[dict[int, torch.Tensor]] = None
        self.recent: deque = deque(maxlen=20)
        self.precompute_seconds = 0.0
        self._evaluated_at = -1

    def configure_model(self):
        shard_in(self, self.policy)  # trainer.strategy=fsdp (rlhf/models/fsdp.py)

    def on_train_start(self):
        if self.reference is None:
            return
        self.reference.to(self.device)
        if self.cfg.precompute_reference:
            self._precompute()

    def _precompute(self) -> None:
        """Reference log-probs of every pair this rank trains on from the restored step to the end."""
        start = time.perf_counter()
        acc, rank, world = self.trainer.accumulate_grad_batches, self.trainer.global_rank, self.trainer.world_size
        items: dict[int, EncodedPair] = {}
        for i in range(self.trainer.global_step * acc, self.cfg.max_steps * acc):
            items.update(self.source.items(i)[rank::world])
        keys = list(items)
        with self.trainer.precision_plugin.forward_context():
            ref = reference_logprobs(self.reference, [items[k] for k in keys], self.tok.pad_id, self.cfg.batch_size, self.device)
        self.ref_cache = dict(zip(keys, ref))
        object.__setattr__(self, "reference", None)  # never needed again: free its memory
        self.precompute_seconds = time.perf_counter() - start
        log.info("%s: reference log-probs of %d pairs precomputed in %.1fs", self.slot, len(keys), self.precompute_seconds)

    def training_step(self, batch, batch_idx):
        keys, *tensors = batch
        forward = shared_prompt_forward if self.source.share_prompt else pair_logprobs
        sums, lengths = forward(self.policy, *tensors)
        reference = None
        if needs_reference(self.cfg):
            if self.ref_cache is not None:
                reference = torch.stack([self.ref_cache[k] for k in keys.tolist()]).to(sums.device)
            else:
                with torch.no_grad():
                    reference = forward(self.reference, *tensors)[0].view(2, -1).T
        loss, metrics = preference_loss(self.cfg, sums, lengths, reference)
        check_finite(loss, self.slot, self.global_step)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if k != "loss"})
        self.recent.append({f"train/{k}": float(v) for k, v in metrics.items()})
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        # the orchestrator evaluates after the last step
        if not self.cfg.eval_every or step % self.cfg.eval_every or step in (self._evaluated_at, self.cfg.max_steps):
            return
        if self.device_mesh is not None:  # sharded: rank 0 cannot sample alone (rlhf/models/fsdp.py)
            return
        self._evaluated_at = step
        if self.trainer.is_global_zero:
            metrics = heldout_eval(self.policy, self.task, self.tok, self.eval_cfg, self.cfg.eval_prompts)
            log_now(self, metrics)
            log.info("%s step %d: %s", self.slot, step, {k: round(v, 4) for k, v in metrics.items()})
            with open(self.stage_dir / "eval_during.jsonl", "a") as f:  # appended: survives a resume
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def final_metrics(self) -> dict[str, float]:
        """Train metrics averaged over the last steps (one batch is noisy)."""
        out = {k: sum(r[k] for r in self.recent) / len(self.recent) for k in (self.recent[0] if self.recent else {})}
        if self.precompute_seconds:
            out["train/reference_precompute_s"] = self.precompute_seconds
        return {**out, "data/truncated_rows": float(self.source.truncated)}

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.cfg)


# read by rlhf.config when the run's config is read, so a wrong loss setting fails before any stage trains
check_config = check_loss_config


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    check_loss_config(cfg, ctx.slot)
    source = PairSource(ctx)
    # no local name for the reference: once precomputed, the module drops the last one
    module = DPOModule(ctx, source, starting_reference(ctx) if needs_reference(cfg) else None)
    ctx.fit(module, source.make_batch)
    return StageResult(ctx.policy, module.final_metrics())
