"""Shared training machinery: the per-stage Lightning Trainer, step-indexed data, optimizer,
resumable checkpoints and per-step seeding.

Exact resume: a stage's batches and random numbers are pure functions of (seed, step),
so after a restart the data position and RNG follow from the restored global step; the
Lightning checkpoint restores model, optimizer and scheduler.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset

from rlhf.errors import TrainingError
from rlhf.models import fsdp


def mix_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (the same across processes and Python runs)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def step_rng(seed: int, step: int, rank: int = 0) -> random.Random:
    return random.Random(mix_seed(seed, step, rank))


def global_rank() -> int:
    return rank_zero_only.rank


class StepBatches(IterableDataset):
    """Yields make_batch(i, rank, world_size) for i from the restored position to the end of the stage.

    `make_batch` builds the global batch for step i from (seed, i) and returns this rank's shard.
    """

    def __init__(self, make_batch: Callable[[int, int, int], Any], num_batches: int, trainer: L.Trainer):
        self.make_batch, self.num_batches, self.trainer = make_batch, num_batches, trainer

    def __iter__(self):
        # read at iteration start, after Lightning restored the checkpoint's global step
        start = batch_index(self.trainer) * self.trainer.accumulate_grad_batches
        for i in range(start, self.num_batches):
            yield self.make_batch(i, self.trainer.global_rank, self.trainer.world_size)


def adamw_with_schedule(params, cfg):
    """AdamW with linear warmup then cosine decay to lr * min_lr_ratio at max_steps (per optimizer step).

    `params`: parameters, or param-group dicts (a group may set its own "lr"; the schedule scales each).
    """
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_finite(loss: torch.Tensor, slot: str, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingError(f"stage {slot!r}: loss is {loss.item()} at step {step}; lower the learning rate or check the data")


def steps_per_batch(module: L.LightningModule) -> int:
    """Optimizer steps one batch makes: 1, or K for a manual-optimization module (PPO: a rollout's
    epochs x minibatches) that declares `optimizer_steps_per_batch = K`."""
    return int(getattr(module, "optimizer_steps_per_batch", 1))


def batch_index(trainer: L.Trainer) -> int:
    """The stage's step as the data and seeds see it: Lightning's global_step counts optimizer
    steps, of which a manual-optimization module may take several per batch."""
    return trainer.global_step // steps_per_batch(trainer.lightning_module)


class StepSeed(Callback):
    """Seeds torch before every batch from (seed, step, rank): sampling and dropout replay exactly on resume."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(mix_seed(self.seed, batch_index(trainer), batch_idx % trainer.accumulate_grad_batches, trainer.global_rank))


class ResumableCheckpoint(Callback):
    """Every `every` optimizer steps and at the end, atomically replace `<dir>/last.ckpt`.

    Under trainer.strategy=fsdp the checkpoint is a directory (PyTorch distributed checkpoint:
    each process writes its own shards, rank 0 the rest): it is written beside as
    `last.ckpt.tmp`, then swapped in by two renames (`latest_checkpoint` finds it if a kill
    falls between them)."""

    def __init__(self, directory: Path, every: int):
        self.path = Path(directory) / "last.ckpt"
        self.every = every
        self._saved_at = -1

    def _save(self, trainer) -> None:
        if trainer.global_step == self._saved_at:
            return
        tmp = self.path.with_suffix(".ckpt.tmp")
        if trainer.is_global_zero:
            _remove(tmp)  # a save cut short by a kill: a stale shard must not mix into this one
        trainer.strategy.barrier()
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank calls; rank 0 (or, sharded, every rank) writes
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            if tmp.is_dir():
                old = self.path.with_suffix(".ckpt.old")
                _remove(old)
                if self.path.exists():
                    os.replace(self.path, old)
                os.replace(tmp, self.path)
                _remove(old)
            else:
                os.replace(tmp, self.path)
        trainer.strategy.barrier()
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = batch_index(trainer)  # only between batches: a multi-step batch is never cut in two
        if self.every > 0 and step % self.every == 0 and step > 0 and trainer.global_step % steps_per_batch(pl_module) == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """`<ckpt_dir>/last.ckpt` (a file, or a sharded checkpoint's directory), or None. A sharded
    checkpoint moved aside as `last.ckpt.old` when a kill fell between its two renames is used
    where it lies (read-only: every process must reach the same answer)."""
    last, old = Path(ckpt_dir) / "last.ckpt", Path(ckpt_dir) / "last.ckpt.old"
    if last.exists():
        return last
    return old if old.is_dir() else None


def fit(
    module: L.LightningModule,
    make_batch: Callable[[int, int, int], Any],
    *,
    stage_cfg,
    trainer_cfg,
    stage_dir: Path,
    seed: int,
    logger=None,
    callbacks: Optional[list] = None,
) -> L.Trainer:
    """Train `module` for stage_cfg.max_steps optimizer steps on make_batch(0, rank, world), make_batch(1, ...), ...

    Continues from `<stage_dir>/checkpoints/last.ckpt` if a previous attempt left one.
    A manual-optimization module with `optimizer_steps_per_batch = K` trains for
    stage_cfg.max_steps batches (K * max_steps optimizer steps); it clips its own gradients.
    """
    ckpt_dir = Path(stage_dir) / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    accumulate = stage_cfg.accumulate_grad_batches
    per_batch = steps_per_batch(module)
    sharded = fsdp.is_fsdp(trainer_cfg)
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=fsdp.make_strategy(trainer_cfg) if sharded else trainer_cfg.strategy,
        num_nodes=trainer_cfg.num_nodes,
        precision=trainer_cfg.precision,
        max_steps=stage_cfg.max_steps * per_batch,
        max_epochs=-1,
        logger=logger if logger is not None else False,
        callbacks=[StepSeed(seed), ResumableCheckpoint(ckpt_dir, trainer_cfg.checkpoint_every), *(callbacks or [])],
        enable_checkpointing=False,
        gradient_clip_val=(stage_cfg.grad_clip or None) if module.automatic_optimization else None,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=trainer_cfg.log_every,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        enable_progress_bar=trainer_cfg.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(stage_dir),
    )
    data = StepBatches(make_batch, stage_cfg.max_steps * accumulate, trainer)
    loader = DataLoader(data, batch_size=None, num_workers=0)
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if last is not None else None)
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1) after its shutdown: give the caller the
        # interrupt back, so the CLI can say how to continue
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    return trainer


class EpochSampler:
    """Indices of a finite dataset for global batch `step`: a fresh seeded permutation every epoch."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        if num_items == 0:
            raise ValueError("no training items")
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            perm = list(range(self.n))
            random.Random(mix_seed(self.seed, "epoch", epoch)).shuffle(perm)
            self._perms = {epoch: perm}  # keep one: batches only move forward
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self._perm(p // self.n)[p % self.n] for p in positions]


def length_buckets(lengths: list[int], min_saving: float = 0.25) -> list[list[int]]:
    """Row indices in one or two groups, each to be padded only to its own longest row.

    SFT batches that mix short answers with long judging examples pad every row to the longest:
    with half of each, a third of the compute is padding. The rows are sorted by length and cut
    where the padded area sum(rows x longest) is least; the cut is kept only if it saves at least
    `min_saving` of the area (a second forward has its own overhead). lengths: one per row, tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ranked = [lengths[i] for i in order]
    whole = len(ranked) * (ranked[-1] if ranked else 0)
    best, cut = whole, 0
    for s in range(1, len(ranked)):
        area = s * ranked[s - 1] + (len(ranked) - s) * ranked[-1]
        if area < best:
            best, cut = area, s
    if cut == 0 or best > (1 - min_saving) * whole:
        return [list(range(len(lengths)))]
    return [order[:cut], order[cut:]]


def bucketed_response_nll(policy: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`response_nll` of right-padded (B, T) rows, computed on `length_buckets` of the rows, each
    trimmed to its longest row: the same mean over all response tokens (a causal model's logits
    at a position do not depend on padding after it), with less padding. Returns a scalar."""
    from rlhf.logprobs import response_logprobs, response_nll

    lengths = (mask.long() * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(dim=1)  # last response token + 1
    groups = length_buckets(lengths.tolist())
    if len(groups) == 1:
        return response_nll(policy(tokens), tokens, mask)
    total = tokens.new_zeros((), dtype=torch.float32)
    for rows in groups:
        idx = torch.tensor(rows, device=tokens.device)
        width = int(lengths[idx].max())
        if width < 2:  # no response token in these rows: nothing to score
            continue
        sub_tokens, sub_mask = tokens[idx, :width], mask[idx, :width]
        logprobs, _ = response_logprobs(policy(sub_tokens), sub_tokens, sub_mask)
        total = total + logprobs.sum()
    return -total / mask.sum().clamp(min=1)


class NLLModule(L.LightningModule):
    """Next-token NLL on masked tokens: SFT (response tokens) and pretraining (all tokens) share it."""

    def __init__(self, policy: torch.nn.Module, stage_cfg, slot: str):
        super().__init__()
        self.policy, self.stage_cfg, self.slot = policy, stage_cfg, slot

    def configure_model(self):
        fsdp.shard_in(self, self.policy)  # trainer.strategy=fsdp (rlhf/models/fsdp.py)

    def training_step(self, batch, batch_idx):
        tokens, mask = batch
        if self.device_mesh is not None:  # sharded: every rank must run as many forward passes (each all-gathers)
            from rlhf.logprobs import response_nll

            loss = response_nll(self.policy(tokens), tokens, mask)
        else:
            loss = bucketed_response_nll(self.policy, tokens, mask)
        check_finite(loss, self.slot, self.global_step)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float(mask.sum()), reduce_fx="sum")
        return loss

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.stage_cfg)
