"""Supervised fine-tuning: next-token loss on response tokens only (the prompt is masked out).

Data: the built-in task's solved examples (optionally mixed with judging examples, so the
model can later judge its own answers), or `{prompt, response}` JSONL files given as `data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from rlhf.config import StageConfig
from rlhf.stage_context import StageContext, StageResult
from rlhf.sampling import count_truncated, encode_examples
from rlhf.training import EpochSampler, NLLModule, step_rng

KIND = "sft"


@dataclass
class Config(StageConfig):
    kind: str = KIND
    max_steps: int = 1200
    data: Optional[Any] = None  # JSONL path, glob or list; None uses the built-in task
    judge_fraction: float = 0.0  # share of built-in examples that teach judging


def run(ctx: StageContext) -> StageResult:
    cfg, task, tok = ctx.cfg, ctx.task, ctx.tokenizer
    max_len, truncated = ctx.policy.max_seq_len, 0  # rows longer than the context are cut, one rule for every stage
    if cfg.data is not None:
        from rlhf.data.chat import renderer_for
        from rlhf.data.jsonl import read_sft_examples

        examples = ctx.training_rows(read_sft_examples(cfg.data, chat=renderer_for(tok)))
        truncated = count_truncated(tok, [(e.prompt, [e.response]) for e in examples], max_len, ctx.slot)
        sampler = EpochSampler(len(examples), cfg.batch_size, ctx.seed)
        draw = lambda step: [examples[i] for i in sampler.batch(step)]  # noqa: E731
    else:
        def draw(step):
            rng = step_rng(ctx.seed, step)
            return [
                task.judge_example(rng) if rng.random() < cfg.judge_fraction else task.sft_example(rng)
                for _ in range(cfg.batch_size)
            ]

    def make_batch(step: int, rank: int, world: int):
        shard = draw(step)[rank::world]
        return encode_examples(tok, shard, max_len=max_len)

    ctx.fit(NLLModule(ctx.policy, cfg, ctx.slot), make_batch)
    return StageResult(ctx.policy, {"data/truncated_rows": float(truncated)})
