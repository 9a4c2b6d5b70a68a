"""KTO, Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired thumbs up / down.

Data: `data`, JSONL rows `{"prompt", "response", "rating": "up" | "down"}` (what `python -m
rlhf feedback export` writes from the page's thumbs mode; TRL's `{"prompt", "completion",
"label": true | false}` too), or None: the built-in task's preference pairs taken apart, the
right answer a thumbs up and the near miss a thumbs down, each a row of its own (the paper's use
of paired data, sec. 4.3). Star ratings are refused (KTO needs a desirable / undesirable label).

Loss (`rlhf.losses.preference.kto_loss`): desirable rows pushed above the reference point z_ref,
undesirable ones below it, z_ref estimated on mismatched rows: prompt i with the response of
row i + 1 of the same batch on the same process (TRL's KTOTrainer shifts completions by one; the
built-in rows are shuffled first, so a pair's two halves rarely meet), averaged over every
process, clamped at 0, not backpropagated. Reference: a frozen copy of the stage's starting
weights, run on each batch (under FSDP it stays whole, as DPO's). A batch of one row has no
mismatched row: z_ref is 0.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch

from rlhf.config import StageConfig
from rlhf.errors import ConfigError, DataError
from rlhf.logprobs import sequence_logprobs
from rlhf.losses.preference import kto_loss, kto_reference_point
from rlhf.models import shard_in
from rlhf.preference_batch import starting_reference
from rlhf.sampling import encode_prompt, join_fitted
from rlhf.stage_context import StageContext, StageResult
from rlhf.training import EpochSampler, adamw_with_schedule, check_finite, step_rng

KIND = "kto"
log = logging.getLogger("rlhf")


@dataclass
class Config(StageConfig):
    kind: str = KIND
    max_steps: int = 150
    batch_size: int = 32  # rated responses per batch
    lr: float = 1e-4
    beta: float = 0.1
    desirable_weight: float = 1.0  # lambda_D
    undesirable_weight: float = 1.0  # lambda_U; the paper: keep w_D * n_D / (w_U * n_U) in [1, 4/3]
    data: Optional[Any] = None  # JSONL path, glob or list of thumbs ratings; None: the built-in task's pairs
    skip_bad_rows: bool = False
    max_length: Optional[int] = None  # tokens per sequence; None: the model's max_seq_len


def check_config(cfg: Config, slot: str) -> None:
    """Read by rlhf.config when the run's config is read: fails before any stage trains."""
    if cfg.beta <= 0:
        raise ConfigError(f"stages.{slot}.beta must be > 0, got {cfg.beta}")
    if cfg.desirable_weight < 0 or cfg.undesirable_weight < 0:
        raise ConfigError(f"stages.{slot}: desirable_weight and undesirable_weight must be >= 0")
    if cfg.batch_size < 1:
        raise ConfigError(f"stages.{slot}.batch_size must be >= 1, got {cfg.batch_size}")


class RatedRows:
    """The rows of batch i as (prompt, response, desirable) triples, a pure function of (seed, i)."""

    def __init__(self, ctx: StageContext):
        cfg = ctx.cfg
        self.task, self.tok, self.batch_size, self.seed = ctx.task, ctx.tokenizer, cfg.batch_size, ctx.seed
        self.max_length = cfg.max_length or ctx.policy.max_seq_len
        self.rows: Optional[list[tuple[str, str, bool]]] = None
        if cfg.data is not None:
            from rlhf.data.chat import renderer_for
            from rlhf.data.jsonl import stream_ratings

            ratings = ctx.training_rows(list(stream_ratings(cfg.data, skip_bad_rows=cfg.skip_bad_rows, chat=renderer_for(self.tok))))
            if any(r.num_levels != 2 for r in ratings):
                raise DataError(f"stages.{ctx.slot}.data={cfg.data}: KTO needs thumbs up / down ratings, these are 1-5 stars (train a reward model on them instead)")
            self.rows = [(r.prompt, r.response, r.label == 1) for r in ratings]
            self.sampler = EpochSampler(len(self.rows), cfg.batch_size, ctx.seed)
            up = sum(d for _, _, d in self.rows)
            log.info("%s: %d rated responses from %s (%d up, %d down)", ctx.slot, len(self.rows), cfg.data, up, len(self.rows) - up)
        elif not hasattr(ctx.task, "preference_pair"):
            raise ConfigError(f"stages.{ctx.slot}: set `data` (this task makes no preference pairs to take apart)")

    def items(self, i: int) -> list[tuple[str, str, bool]]:
        if self.rows is not None:
            return [self.rows[k] for k in self.sampler.batch(i)]
        rng = step_rng(self.seed, i)
        pairs = [self.task.preference_pair(rng) for _ in range((self.batch_size + 1) // 2)]
        rows = [row for p in pairs for row in ((p.prompt, p.chosen, True), (p.prompt, p.rejected, False))][: self.batch_size]
        random.Random(rng.random()).shuffle(rows)  # so that row i + 1 is another prompt's, mostly
        return rows

    def make_batch(self, i: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        rows = self.items(i)[rank::world]
        prompts = [encode_prompt(self.tok, p) for p, _, _ in rows]
        responses = [self.tok.encode(r) + [self.tok.eos_id] for _, r, _ in rows]
        tokens, mask = join_fitted(prompts, responses, self.tok.pad_id, self.max_length)
        shifted = responses[1:] + responses[:1] if len(rows) > 1 else []  # mismatched: prompt i, response i + 1
        batch = {"tokens": tokens, "mask": mask, "desirable": torch.tensor([d for _, _, d in rows], dtype=torch.bool)}
        if shifted:
            batch["mismatched_tokens"], batch["mismatched_mask"] = join_fitted(prompts, shifted, self.tok.pad_id, self.max_length)
        return batch


class KTOModule(L.LightningModule):
    def __init__(self, ctx: StageContext, source: RatedRows, reference: torch.nn.Module):
        super().__init__()
        self.policy, self.cfg, self.slot, self.source = ctx.policy, ctx.cfg, ctx.slot, source
        object.__setattr__(self, "reference", reference)  # not a submodule: out of the optimizer and checkpoints
        self.recent: deque = deque(maxlen=20)

    def configure_model(self):
        shard_in(self, self.policy)  # trainer.strategy=fsdp (rlhf/models/fsdp.py)

    def on_train_start(self):
        if self.cfg.batch_size % self.trainer.world_size:  # equal shards: the reference point gathers them
            raise ConfigError(f"stages.{self.slot}.batch_size={self.cfg.batch_size} must be a multiple of the {self.trainer.world_size} processes")
        self.reference.to(self.device)

    def reference_point(self, batch) -> torch.Tensor:
        """z_ref over every process's mismatched rows (0 when a process's shard is one row: then
        every process's is, since batch_size is a multiple of the processes)."""
        if "mismatched_tokens" not in batch:
            return torch.zeros((), device=self.device)
        tokens, mask = batch["mismatched_tokens"], batch["mismatched_mask"]
        with torch.no_grad():
            diff = sequence_logprobs(self.policy(tokens), tokens, mask) - sequence_logprobs(self.reference(tokens), tokens, mask)
        if self.trainer.world_size > 1:
            diff = self.all_gather(diff).flatten()  # equal shard sizes (make_batch splits rank::world)
        return kto_reference_point(diff, torch.zeros_like(diff))

    def training_step(self, batch, batch_idx):
        cfg = self.cfg
        tokens, mask, desirable = batch["tokens"], batch["mask"], batch["desirable"]
        z = self.reference_point(batch)
        policy = sequence_logprobs(self.policy(tokens), tokens, mask)
        with torch.no_grad():
            reference = sequence_logprobs(self.reference(tokens), tokens, mask)
        losses, rewards = kto_loss(policy, reference, desirable, z, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        loss = losses.mean()
        check_finite(loss, self.slot, self.global_step)
        metrics = {"train/loss": float(loss.detach()), "train/reference_point": float(z)}
        for name, rows in (("desirable", desirable), ("undesirable", ~desirable)):
            if rows.any():
                metrics[f"train/rewards_{name}"] = float(rewards[rows].mean())
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({k: v for k, v in metrics.items() if k != "train/loss"})
        self.recent.append(metrics)
        return loss

    def final_metrics(self) -> dict[str, float]:
        """Train metrics averaged over the last steps that logged them (one batch is noisy)."""
        keys = {k for r in self.recent for k in r}
        return {k: sum(r[k] for r in self.recent if k in r) / sum(k in r for r in self.recent) for k in sorted(keys)}

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.cfg)


def run(ctx: StageContext) -> StageResult:
    check_config(ctx.cfg, ctx.slot)
    source = RatedRows(ctx)
    module = KTOModule(ctx, source, starting_reference(ctx))
    ctx.fit(module, source.make_batch)
    return StageResult(ctx.policy, module.final_metrics())
