"""What a stage module receives (`StageContext`) and returns (`StageResult`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig
from torch import nn

from rlhf.errors import ConfigError
from rlhf.models import build_model, prepare_trainable
from rlhf.training import fit, global_rank


@dataclass
class StageResult:
    policy: nn.Module
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StageContext:
    """What a stage gets: its config, the incoming policy, the task, and where to write."""

    slot: str
    cfg: Any  # the stage's typed config (a dataclass instance)
    run_cfg: DictConfig
    stage_dir: Path
    policy: nn.Module
    task: Any
    tokenizer: Any
    seed: int
    logger: Any
    completed: dict[str, Path]  # earlier slots -> their complete stage dirs

    @property
    def is_global_zero(self) -> bool:
        return global_rank() == 0

    def fit(self, module, make_batch, callbacks: Optional[list] = None):
        """Train a LightningModule on step-indexed batches (see rlhf.training.fit)."""
        return fit(
            module,
            make_batch,
            stage_cfg=self.cfg,
            trainer_cfg=self.run_cfg.trainer,
            stage_dir=self.stage_dir,
            seed=self.seed,
            logger=self.logger,
            callbacks=callbacks,
        )

    def stage_dir_of(self, slot: str) -> Path:
        """The complete stage dir of an earlier slot (a reward model, say)."""
        if slot not in self.completed:
            raise ConfigError(f"stages.{self.slot}: needs slot {slot!r}, which does not run before it in `order`")
        return self.completed[slot]

    def training_rows(self, rows: list, what: str = "data") -> list:
        """The rows of the stage's own data file(s) (anything with a .prompt) it may train on:
        never a prompt the task holds out for evaluation (task=text on the same files), so the
        held-out score stays held out. On a task that evaluates its own prompts (the built-in
        task) say plainly that the evaluation is not of this data. Raises DataError if no row
        is left."""
        return list(self.iter_training_rows(rows, what))

    def iter_training_rows(self, rows: Iterable, what: str = "data") -> Iterator:
        """`training_rows` one row at a time, for stages that keep less than the rows (their
        encoded tokens, rlhf.data.token_store): the count is logged, or the DataError raised,
        when `rows` is exhausted."""
        import logging

        log = logging.getLogger("rlhf")
        if not hasattr(self.task, "is_held_out"):
            log.warning(
                "stages.%s.%s: the stage trains on your data, but the run evaluates on the %s task's own prompts, not on it; "
                "for held-out prompts of your data set task=text task.data=YOUR_FILES", self.slot, what, self.run_cfg.task.name,
            )
            return iter(rows)
        return self._kept_rows(rows, what, log)

    def _kept_rows(self, rows: Iterable, what: str, log) -> Iterator:
        from rlhf.errors import DataError

        total = kept = 0
        for row in rows:
            total += 1
            if not self.task.is_held_out(row.prompt):
                kept += 1
                yield row
        if kept < total:
            log.info("stages.%s.%s: %d of %d rows have a prompt held out for evaluation and are left out of training", self.slot, what, total - kept, total)
        if not kept:
            raise DataError(f"stages.{self.slot}.{what}: every row's prompt is held out for evaluation (task.num_eval_prompts); nothing is left to train on")

    def new_model(self) -> nn.Module:
        """A fresh model of the run's architecture (for reward models, critics, references)."""
        return build_model(self.run_cfg.model, self.tokenizer.vocab_size)

    def new_policy(self) -> nn.Module:
        """A fresh model shaped like this stage's policy, its LoRA adapters included: what
        `gather_policy` fills with a sharded policy's whole weights."""
        return prepare_trainable(self.new_model(), self.cfg)
