"""The task's config schema (`task=` in the run config): which task, its difficulty and its data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


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
