"""SFT throughput and MFU, and generation speed with and without the KV cache.

    python benchmarks/bench_sft.py [--quick]

Writes benchmarks/results/sft.json. For each model size it times
  - `stage`: the SFT stage's own code path (rlhf.training.fit + NLLModule: step-indexed
    data, Lightning Trainer, checkpoint callback, per-step seeding, logging), and
  - `bare`: a plain x-transformers forward/backward/AdamW loop on the same batches,
so the ratio stage/bare is the framework's overhead; `length_buckets`: one SFT batch of the
self_reward recipe (arrange answers and judging examples, half each) through the padded NLL
and through `bucketed_response_nll`, seconds per forward+backward. MFU = achieved FLOP/s over the
fp32 matmul peak measured in the same process. FLOPs per token = 6 * (matmul params)
+ 12 * layers * dim * seq_len (attention scores and values, forward + backward).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from benchmarks.common import machine, matmul_peak_gflops, write_result
from rlhf.config import StageConfig, TrainerConfig
from rlhf.logprobs import response_nll
from rlhf.models import CausalLM, ModelConfig
from rlhf.sampling import SamplingConfig, generate
from rlhf.training import NLLModule, adamw_with_schedule, bucketed_response_nll, fit

VOCAB = 98


@dataclass
class BenchStage(StageConfig):
    kind: str = "sft"


def flops_per_token(model: CausalLM, cfg: ModelConfig, seq_len: int) -> float:
    matmul_params = model.num_parameters(exclude_embedding=True)
    return 6 * matmul_params + 12 * cfg.depth * cfg.dim * seq_len


def make_batch_fn(batch: int, seq_len: int):
    def make_batch(step: int, rank: int, world: int):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(2, VOCAB, (batch, seq_len), generator=g)
        return tokens, torch.ones_like(tokens, dtype=torch.bool)

    return make_batch


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def bench_stage(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = CausalLM(cfg, VOCAB)
    stage = BenchStage(max_steps=steps + warmup, batch_size=batch, warmup_steps=2)
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        fit(NLLModule(model, stage, "bench"), make_batch_fn(batch, seq_len), stage_cfg=stage,
            trainer_cfg=TrainerConfig(progress_bar=False, checkpoint_every=0), stage_dir=Path(tmp), seed=0,
            callbacks=[timer])
    # wall time per step includes the between-batch work Lightning does (data, logging, callbacks)
    return sum(timer.times) / len(timer.times)


def bench_bare(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = CausalLM(cfg, VOCAB)
    stage = BenchStage(max_steps=steps + warmup, batch_size=batch, warmup_steps=2)
    opt = adamw_with_schedule(model.parameters(), stage)["optimizer"]
    make_batch = make_batch_fn(batch, seq_len)
    times = []
    for step in range(steps + warmup):
        start = time.perf_counter()
        tokens, mask = make_batch(step, 0, 1)
        loss = response_nll(model(tokens), tokens, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def bench_generation(cfg: ModelConfig, batch: int, lengths: list[int]) -> list[dict]:
    torch.manual_seed(0)
    model = CausalLM(cfg, VOCAB).eval()
    prompts = [[2 + (i % 50)] * 16 for i in range(batch)]
    rows = []
    for n in lengths:
        row = {"new_tokens": n, "batch": batch}
        for use_cache in (True, False):
            sampling = SamplingConfig(max_new_tokens=n, temperature=1.0, use_cache=use_cache)
            # eos_id=-1: never stop early, so every row generates exactly n tokens
            generate(model, prompts, SamplingConfig(max_new_tokens=4), eos_id=-1, pad_id=0)
            start = time.perf_counter()
            generate(model, prompts, sampling, eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(0))
            row["tokens_per_s_cache" if use_cache else "tokens_per_s_no_cache"] = batch * n / (time.perf_counter() - start)
        row["cache_speedup"] = row["tokens_per_s_cache"] / row["tokens_per_s_no_cache"]
        rows.append(row)
    return rows


def bench_length_buckets(steps: int, warmup: int) -> dict:
    import random

    from rlhf.sampling import join_prompt_response
    from rlhf.tasks import TaskConfig
    from rlhf.tasks.builtin import ALPHABET, BuiltinTask

    task = BuiltinTask(TaskConfig(families=["arrange"], arrange_min_len=7, arrange_max_len=10))
    encode = lambda text: [2 + ALPHABET.index(c) for c in text]  # noqa: E731
    rng = random.Random(0)
    examples = [task.judge_example(rng) if rng.random() < 0.5 else task.sft_example(rng) for _ in range(64)]
    tokens, mask = join_prompt_response([encode(e.prompt) for e in examples], [encode(e.response) + [1] for e in examples], 0)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(), VOCAB)
    result = {"batch": tokens.shape[0], "padded_width": tokens.shape[1]}
    for name, loss_fn in (("padded_s", lambda: response_nll(model(tokens), tokens, mask)), ("bucketed_s", lambda: bucketed_response_nll(model, tokens, mask))):
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            loss_fn().backward()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        result[name] = sum(times) / len(times)
    result["speedup"] = result["padded_s"] / result["bucketed_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke test, not a measurement)")
    parser.add_argument("--only-buckets", action="store_true", help="only the length-bucket comparison (writes sft_buckets.json)")
    args = parser.parse_args()
    steps, warmup = (2, 1) if args.quick else (8, 2)
    if args.only_buckets:
        write_result("sft_buckets", {"machine": machine(), "length_buckets": bench_length_buckets(steps, warmup)})
        return
    peak = matmul_peak_gflops()
    sizes = {
        "small (default, ~1.5M)": (ModelConfig(), 32, 256),
        "medium (~20M)": (ModelConfig(dim=512, depth=6, heads=8, max_seq_len=512), 16, 256),
    }
    training = []
    for name, (cfg, batch, seq_len) in sizes.items():
        model = CausalLM(cfg, VOCAB)
        fpt = flops_per_token(model, cfg, seq_len)
        stage_s = bench_stage(cfg, batch, seq_len, steps, warmup)
        bare_s = bench_bare(cfg, batch, seq_len, steps, warmup)
        tokens = batch * seq_len
        training.append({
            "model": name, "params": model.num_parameters(), "batch": batch, "seq_len": seq_len,
            "stage_tokens_per_s": tokens / stage_s, "bare_tokens_per_s": tokens / bare_s,
            "stage_mfu": tokens * fpt / stage_s / (peak * 1e9), "bare_mfu": tokens * fpt / bare_s / (peak * 1e9),
            "stage_over_bare": bare_s / stage_s,
        })
    generation = bench_generation(ModelConfig(), 16, [32, 64, 128] if args.quick else [32, 64, 128, 256])
    buckets = bench_length_buckets(steps, warmup)
    write_result("sft", {"machine": machine(), "fp32_matmul_peak_gflops": peak, "training": training, "generation": generation, "length_buckets": buckets})


if __name__ == "__main__":
    main()
