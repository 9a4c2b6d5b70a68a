"""Supervised fine-tuning: next-token loss on response tokens only (the prompt is masked out).

Data: the built-in task's solved examples (optionally mixed with judging examples, so the
model can later judge its own answers), or `{prompt, response}` JSONL files given as `data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from rlhf.config import StageConfig
from rlhf.stage_context import StageContext, StageResult
from rlhf.sampling import count_truncated_ids, encode_examples, example_store, join_fitted
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
        from rlhf.data.jsonl import stream_sft_examples

        # encoded as they stream in; only the compact ids stay (example_store; issue #17 item 9)
        examples = example_store(ctx.iter_training_rows(stream_sft_examples(cfg.data, chat=renderer_for(tok))), tok)
        truncated = count_truncated_ids(examples, max_len, ctx.slot)
        sampler = EpochSampler(len(examples), cfg.batch_size, ctx.seed)
        draw = lambda step: [examples[i] for i in sampler.batch(step)]  # noqa: E731
        encode = lambda shard: join_fitted([p for p, _ in shard], [r for _, r in shard], tok.pad_id, max_len)  # noqa: E731
    else:
        def draw(step):
            rng = step_rng(ctx.seed, step)
            return [
                task.judge_example(rng) if rng.random() < cfg.judge_fraction else task.sft_example(rng)
                for _ in range(cfg.batch_size)
            ]

        encode = lambda shard: encode_examples(tok, shard, max_len=max_len)  # noqa: E731

    def make_batch(step: int, rank: int, world: int):
        return encode(draw(step)[rank::world])

    ctx.fit(NLLModule(ctx.policy, cfg, ctx.slot), make_batch)
    return StageResult(ctx.policy, {"data/truncated_rows": float(truncated)})
