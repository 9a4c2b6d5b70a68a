"""Tasks: where prompts, training examples, held-out evaluation prompts and verifiers come from.

A task object has:
  tokenizer                 the tokenizer a model of this task uses by default
  eval_prompts() -> list    held-out prompts every stage is evaluated on
  score(prompt, response)   a verifier score in [0, 1], or None when the task has no verifier
The built-in task (rlhf/tasks/builtin.py) also makes SFT examples, preference pairs,
judging examples and raw text from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlhf.errors import ConfigError


@dataclass
class TaskConfig:
    name: str = "builtin"  # builtin | text
    # built-in task: which families and how long (the difficulty knobs)
    families: list[str] = field(default_factory=lambda: ["sort", "add"])
    sort_min_len: int = 8
    sort_max_len: int = 14
    add_min_digits: int = 3
    add_max_digits: int = 6
    # path: a star of branches chains from the start, each hops edges long
    path_min_branches: int = 2
    path_max_branches: int = 3
    path_min_hops: int = 2
    path_max_hops: int = 3
    # arrange: order n distinct letters (from a window of 1.5 n) so no alphabet neighbours touch;
    # the prompt writes them in capitals, the answer in lower case
    arrange_min_len: int = 5
    arrange_max_len: int = 8
    # climb: n letters from a start to a goal, each step 1 to 3 places along a..zA..Z
    climb_min_len: int = 5
    climb_max_len: int = 12
    # the share of SFT demonstrations written by a careless demonstrator (`careless_answer`:
    # add without carrying, sort in reverse order); preference pairs then set
    # the right answer against the careless one. 0: every demonstration is right
    careless_demo_rate: float = 0.0
    num_eval_prompts: int = 200
    # the task's own seed: fixes the held-out prompts whatever the run's seed
    seed: int = 20240601
    # text task: JSONL files (prompt/response, pairs or transcripts) that give held-out
    # prompts and the text a BPE tokenizer is trained on
    data: Optional[Any] = None
    vocab_size: int = 4096


def build_task(cfg, run_dir: Path):
    """The task named by cfg.name; run_dir is where a task keeps what it trains (a tokenizer)."""
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
        return TextTask(cfg, Path(run_dir))
    raise ConfigError(f"task.name={cfg.name!r} is not a known task; known: builtin, text")
