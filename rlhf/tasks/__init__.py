"""Tasks: where prompts, training examples, held-out evaluation prompts and verifiers come from.

A task object has:
  tokenizer                 the tokenizer a model of this task uses by default
  eval_prompts() -> list    held-out prompts every stage is evaluated on
  score(prompt, response)   a verifier score in [0, 1], or None when the task has no verifier
The built-in task (rlhf/tasks/builtin.py) also makes SFT examples, preference pairs,
judging examples and raw text from a seed.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.errors import ConfigError
from rlhf.tasks.config import TaskConfig

__all__ = ["TaskConfig", "build_task"]


def build_task(cfg, run_dir: Path, rank: int = 0):
    """The task named by cfg.name; run_dir is where a task keeps what it trains (a tokenizer),
    and only the process of global rank 0 trains it (the others wait for its file)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(cfg) if not isinstance(cfg, TaskConfig) else cfg
    if cfg.name == "builtin":
        from rlhf.tasks.builtin import BuiltinTask

        return BuiltinTask(cfg)
    if cfg.name == "text":
        try:
            from rlhf.tasks.text import TextTask
        except ModuleNotFoundError:
            raise ConfigError("task.name=text is not available in this version") from None
        return TextTask(cfg, Path(run_dir), rank)
    raise ConfigError(f"task.name={cfg.name!r} is not a known task; known: builtin, text")
