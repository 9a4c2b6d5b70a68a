"""Evaluation fine-tuning (EFT) on the model's own answers: teach the judge the mistakes the
model makes now.

Yuan et al. 2024 (Self-Rewarding Language Models, section 2.2) fine-tune the seed model on
instructions AND evaluation (EFT) data: prompts, responses and the judgement a good judge
writes. Here the responses are the model's own: at the stage's start it samples
`num_candidates` answers (temperature / top-p as the self-reward iterations sample) to
`num_prompts` training prompts, the task's verifier scores them, and every step trains the
next-token loss on judging examples built from them (`rlhf.judge.own_judging_examples`: half
wrong answers, half right, each with the verdict `task.judging_example` writes), mixed with
`answer_fraction` of the task's own SFT examples so answering is not forgotten (judging only
collapsed the task score: docs/results_self_reward.md). The verifier labels the judge's
training data, as human labels do in the paper; it never picks a preference pair.

Resume: the sampled candidates are written to `candidates.jsonl` (rank 0, atomically) and
reloaded, so a resumed run trains on the same data. DDP: each rank samples a share of the
prompts; rows are all-gathered; each step's examples are a pure function of (seed, step, rank).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from rlhf.config import StageConfig
from rlhf.errors import ConfigError
from rlhf.judge import JudgeConfig, own_judging_examples, template_fields
from rlhf.logprobs import response_nll
from rlhf.models import gather_policy, shard_in
from rlhf.rounds import gather_rows, load_or_make
from rlhf.sampling import SamplingConfig, encode_examples, generate_text
from rlhf.stage_context import StageContext, StageResult
from rlhf.training import adamw_with_schedule, bucketed_response_nll, check_finite, mix_seed

KIND = "eft"
log = logging.getLogger("rlhf")


@dataclass
class Config(StageConfig):
    kind: str = KIND
    max_steps: int = 60
    lr: float = 5e-4
    warmup_steps: int = 5
    num_prompts: int = 512  # training prompts whose sampled answers make the EFT data
    num_candidates: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 24
    generation_batch_size: int = 256
    answer_fraction: float = 0.5  # share of each batch that is the task's SFT examples
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # its template frames the examples

    def __post_init__(self):
        if self.num_prompts < 1 or self.num_candidates < 1:
            raise ConfigError(f"num_prompts and num_candidates must be >= 1, got {self.num_prompts} and {self.num_candidates}")
        if not 0.0 <= self.answer_fraction < 1.0:
            raise ConfigError(f"answer_fraction={self.answer_fraction} must be in [0, 1)")


class EFTModule(L.LightningModule):
    def __init__(self, ctx: StageContext):
        super().__init__()
        self.policy, self.cfg, self.ctx = ctx.policy, ctx.cfg, ctx
        self.rows: Optional[list[dict]] = None

    def _rows(self) -> list[dict]:
        if self.rows is None:
            self.rows, reloaded = load_or_make(Path(self.ctx.stage_dir) / "candidates.jsonl", self._sample, self.trainer.is_global_zero)
            wrong = sum(c["verifier"] < 1.0 for row in self.rows for c in row["candidates"])
            total = sum(len(row["candidates"]) for row in self.rows)
            log.info("%s: %s %d candidates, %d of them wrong by the verifier", self.ctx.slot, "reloaded" if reloaded else "sampled", total, wrong)
            self.log("eft/wrong_share", wrong / max(total, 1))
        return self.rows

    def _sample(self) -> list[dict]:
        cfg, task = self.cfg, self.ctx.task
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rng = random.Random(mix_seed(self.ctx.seed, "eft_prompts"))
        prompts = [task.train_prompt(rng) for _ in range(cfg.num_prompts)]
        mine = list(range(len(prompts)))[rank::world]
        repeated = [prompts[i] for i in mine for _ in range(cfg.num_candidates)]
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(self.ctx.seed, "eft_sample", rank))
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        sampler = gather_policy(self.policy, self.ctx.new_policy)  # sharded: the whole weights, once (rlhf/models/fsdp.py)
        responses = generate_text(sampler, self.ctx.tokenizer, repeated, sampling, cfg.generation_batch_size, generator)
        k = cfg.num_candidates
        rows = [
            {"index": i, "prompt": prompts[i], "candidates": [{"response": r, "verifier": task.score(prompts[i], r)} for r in responses[j * k : (j + 1) * k]]}
            for j, i in enumerate(mine)
        ]
        return gather_rows(rows, world)

    def training_step(self, batch, batch_idx):
        cfg, task, tok = self.cfg, self.ctx.task, self.ctx.tokenizer
        step, rank, world = int(batch[0]), self.trainer.global_rank, self.trainer.world_size
        rng = random.Random(mix_seed(self.ctx.seed, "eft_batch", step))
        n_answer = round(cfg.batch_size * cfg.answer_fraction)
        examples = own_judging_examples(task, self._rows(), cfg.batch_size - n_answer, rng, cfg.judge.resolved_template())
        examples += [task.sft_example(rng) for _ in range(n_answer)]
        mine = examples[rank::world]
        tokens, mask = encode_examples(tok, mine, self.device)
        if self.device_mesh is not None:  # sharded: every rank must run as many forward passes (each all-gathers)
            loss = response_nll(self.policy(tokens), tokens, mask)
        else:
            loss = bucketed_response_nll(self.policy, tokens, mask)
        check_finite(loss, self.ctx.slot, self.global_step)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.cfg)

    def configure_model(self):
        shard_in(self, self.policy)  # trainer.strategy=fsdp (rlhf/models/fsdp.py)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    for method in ("judging_example", "sft_example", "score"):
        if not hasattr(ctx.task, method):
            raise ConfigError(f"stages.{ctx.slot}: task {ctx.run_cfg.task.name!r} has no {method}(); EFT needs the built-in task's judging examples and verifier")
    if "reference" in template_fields(cfg.judge.resolved_template()):
        raise ConfigError(f"stages.{ctx.slot}.judge.template: EFT examples have no {{reference}} answer to fill it with")
    ctx.fit(EFTModule(ctx), lambda step, rank, world: torch.tensor([step]))
    return StageResult(ctx.policy)
