"""Domain pretraining: plain causal-LM loss on every token of raw text.

Data: `data` text files (`.txt`, or JSONL rows `{"text"}`) cut into windows of `seq_len`
tokens, or, by default, the built-in task's solved examples run together as raw text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlhf.config import StageConfig
from rlhf.stage_context import StageContext, StageResult
from rlhf.training import EpochSampler, NLLModule, step_rng

KIND = "pretrain"


@dataclass
class Config(StageConfig):
    kind: str = KIND
    max_steps: int = 300
    batch_size: int = 32
    seq_len: int = 128
    data: Optional[Any] = None  # text files; None uses the built-in task


def run(ctx: StageContext) -> StageResult:
    cfg, task, tok = ctx.cfg, ctx.task, ctx.tokenizer
    window = cfg.seq_len + 1
    if cfg.data is not None:
        from rlhf.data.jsonl import read_raw_text

        stream: list[int] = []
        for doc in read_raw_text(cfg.data):
            stream += tok.encode(doc) + [tok.eos_id]
        starts = list(range(0, max(1, len(stream) - window + 1), cfg.seq_len))
        sampler = EpochSampler(len(starts), cfg.batch_size, ctx.seed)
        draw = lambda step: [stream[starts[i] : starts[i] + window] for i in sampler.batch(step)]  # noqa: E731
    else:
        def draw(step):
            rng = step_rng(ctx.seed, step)
            rows = []
            for _ in range(cfg.batch_size):
                ids: list[int] = []
                while len(ids) < window:
                    ids += tok.encode(task.raw_text(rng))
                rows.append(ids[:window])
            return rows

    def make_batch(step: int, rank: int, world: int):
        rows = draw(step)[rank::world]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return tokens, mask

    ctx.fit(NLLModule(ctx.policy, cfg, ctx.slot), make_batch)
    return StageResult(ctx.policy)
