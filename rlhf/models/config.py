"""The model's config schema (`model=` in the run config): which backend, and its shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    backend: str = "xtransformers"
    dim: int = 192
    depth: int = 3
    heads: int = 4
    ff_mult: int = 4
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embedding: bool = False
    # torch.compile the network and its cached decode step (x-transformers backend). On this
    # project's 2-core CPU a 3 M model's GRPO step ran 1.3x faster (benchmarks/bench_grpo.py)
    # after about a minute of one-off compiling per process: for long runs only
    compile: bool = False
    # Hugging Face backend: a local checkpoint folder (no hub downloads).
    path: Optional[str] = None
    # Hugging Face backend: transformers' attention kernel ("sdpa", "eager", ...); None: its
    # default (sdpa). On CPU in bf16-mixed, "eager" ran a GPT-2 DPO step 1.04-1.21x faster
    # (docs/huggingface.md); sdpa keeps attention memory linear in length. Pairs share their
    # prompt only under sdpa or eager, whose custom 4D masks a test checks.
    attn_implementation: Optional[str] = None
