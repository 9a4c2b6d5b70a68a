"""DPO training speed on a Hugging Face checkpoint: this project's DPO stage vs TRL's DPOTrainer.

    python -m benchmarks.bench_hf_dpo [--steps 6] [--rounds 4] [--quick]

Writes benchmarks/results/hf_dpo.json. Both sides train the SAME local GPT-2 checkpoint
(4 layers, 256 wide, 512-token BPE vocabulary: ~3.3 M parameters, the size of the TRL
figure in the engineering notes) on the SAME pairs: batch 8 pairs, every sequence exactly
128 tokens (64 prompt + 63 response + EOS), so neither side pads. Tokens/s counts the
prompt and response tokens of both chosen and rejected sequences (2 x 8 x 128 per step).

Variants, each timed per optimizer step (forward, backward, optimizer; data loading and
setup excluded) with the first steps dropped as warm-up. TRL 1.16's DPOConfig defaults to
bf16 mixed precision (also on CPU) and gradient checkpointing; our trainer defaults to fp32
and the DPO stage to a reference precomputed once before the first step. So:
  (Our stage shares each pair's prompt on the HF backend too: rlhf.preference_batch.pack_pairs.)
  - `rlhf_fp32` / `trl_fp32`: fp32, the reference model run on every batch, no gradient
    checkpointing on either side: like for like.
  - `rlhf_bf16` / `trl_bf16`: the same in bf16 mixed precision (`trainer.precision=bf16-mixed`).
  - `rlhf_default` (fp32, precomputed reference) / `trl_default` (bf16, gradient
    checkpointing, reference every step): what each gives out of the box.
  - `rlhf_bf16_precompute`: our fastest setting (bf16, precomputed reference).
  - `*_eager`: the same with transformers' eager attention kernel (`model.attn_implementation=eager`
    for us, `attn_implementation="eager"` in from_pretrained for TRL); the rest use its default, sdpa.
End-to-end figures run from the start of training to the last step, so they include a
reference precompute.
Many short rounds alternate the variants so load from other processes falls on all of them
alike. Per variant: tokens/s of the best step (closest to an idle machine), of the median
step, per CPU-second of this process (median), and end to end; every step's time is kept.

After the timed rounds, each like-for-like pair (fp32, bf16) runs `--profile-rounds` more
times under the torch profiler, alternating; the least disturbed run of each counts. `kernels`
holds the self time per step of its matrix products (aten::mm / addmm / bmm) and fused
attention kernels and their share of its mean step. TRL's step over ours is then (TRL's kernel
time / ours) x (our share / TRL's): `kernel_share` gives those, and the share our step would
need for 2x (the rest is layer norms, GELU, bias adds, softmax, casts, the optimizer and the loop). The profiler slows small ops more than large ones, so shares under it
are a little lower than without it, on both sides.

Our stage runs through its real code path: `rlhf.stages.dpo.run(ctx)` with a context whose
`fit` adds a timing callback. RPO's NLL term is off (nll_weight=0) to match TRL's plain loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from benchmarks.common import machine, write_result
from benchmarks.trl_dpo import run_trl_dpo
from rlhf.config import EvalConfig, TrainerConfig
from rlhf.models import ModelConfig, load_hf_model, load_hf_tokenizer, make_tiny_checkpoint
from rlhf.stage_context import StageContext
from rlhf.tasks.builtin import solved_texts

BATCH, PROMPT_LEN, RESPONSE_LEN = 8, 64, 64  # RESPONSE_LEN includes the EOS
SEQ_LEN = PROMPT_LEN + RESPONSE_LEN
TOKENS_PER_STEP = 2 * BATCH * SEQ_LEN
LR = 1e-5


# --------------------------------------------------------------------------- data


def _text_with_tokens(tok, n: int, rng: random.Random, suffix: str = "") -> str:
    """Random lowercase words whose encoding (with `suffix`) is exactly n tokens."""
    while True:
        chars = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz    ") for _ in range(8 * n)).strip()
        for k in range(1, len(chars)):
            text = chars[:k].rstrip() + suffix
            count = len(tok.encode(text))
            if count == n:
                return text
            if count > n:
                break


def make_pairs(tok, count: int, seed: int = 0) -> list[dict]:
    """Pairs whose prompt+response tokenise as the prompt's tokens then the response's (the prompt
    ends with a newline, which byte-level BPE never merges with what follows)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        prompt = _text_with_tokens(tok, PROMPT_LEN, rng, suffix="\n")
        chosen, rejected = (_text_with_tokens(tok, RESPONSE_LEN - 1, rng) for _ in range(2))
        if all(tok.encode(prompt + r) == tok.encode(prompt) + tok.encode(r) for r in (chosen, rejected)):
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# --------------------------------------------------------------------------- timing


class LightningStepTimer(L.Callback):
    def __init__(self):
        self.steps: list[float] = []
        self.cpu: list[float] = []

    def on_train_start(self, trainer, pl_module):
        # called before the module's own on_train_start, so the end-to-end time includes a reference precompute
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, *args):
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, *args):
        self.end = time.perf_counter()
        self.steps.append(self.end - self._t)
        self.cpu.append(time.process_time() - self._c)


@dataclasses.dataclass
class TimedContext(StageContext):
    """The stage's real context, with a timing callback added to its Trainer."""

    timer: LightningStepTimer = dataclasses.field(default_factory=LightningStepTimer)

    def fit(self, module, make_batch, callbacks=None):
        return super().fit(module, make_batch, callbacks=[*(callbacks or []), self.timer])


def summarize(runs: list[dict], warmup: int) -> dict:
    """Per-step figures over all rounds (warm-up steps dropped) and end to end over whole runs.

    On a shared machine one step's time varies 2-3x with other processes' load; the best
    step is the closest to what an idle machine gives, the median what this one gave.
    """
    timed = [s for run in runs for s in run["steps"][warmup:]]
    cpu = [s for run in runs for s in run["cpu"][warmup:]]
    total_steps = sum(len(run["steps"]) for run in runs)
    return {
        "tokens_per_s_median": TOKENS_PER_STEP / statistics.median(timed),
        "tokens_per_s_best": TOKENS_PER_STEP / min(timed),
        "tokens_per_cpu_s_median": TOKENS_PER_STEP / statistics.median(cpu),
        "end_to_end_tokens_per_s": TOKENS_PER_STEP * total_steps / sum(run["end_to_end_s"] for run in runs),
        "step_s": [round(t, 3) for t in timed],
    }


# --------------------------------------------------------------------------- the two trainers


def run_rlhf(checkpoint: Path, data: Path, steps: int, workdir: Path, precision: str, precompute: bool, attention: str | None = None) -> dict:
    from rlhf.stages import dpo
    from rlhf.tasks import TaskConfig
    from rlhf.tasks.builtin import BuiltinTask

    model_cfg = ModelConfig(backend="hf", path=str(checkpoint), attn_implementation=attention)
    trainer_cfg = TrainerConfig(accelerator="cpu", devices=1, precision=precision, progress_bar=False, checkpoint_every=0, log_every=10**6)
    run_cfg = OmegaConf.create(
        {"model": dataclasses.asdict(model_cfg), "trainer": dataclasses.asdict(trainer_cfg), "eval": dataclasses.asdict(EvalConfig())}
    )
    stage_cfg = dpo.Config(
        max_steps=steps, batch_size=BATCH, lr=LR, warmup_steps=0, min_lr_ratio=1.0, data=str(data), max_length=SEQ_LEN,
        precompute_reference=precompute, eval_every=0, nll_weight=0.0, beta=0.1,
    )
    stage_dir = Path(tempfile.mkdtemp(dir=workdir))
    ctx = TimedContext(
        slot="dpo", cfg=stage_cfg, run_cfg=run_cfg, stage_dir=stage_dir, policy=load_hf_model(model_cfg),
        task=BuiltinTask(TaskConfig()), tokenizer=load_hf_tokenizer(model_cfg), seed=0, logger=None, completed={},
    )
    dpo.run(ctx)
    timer = ctx.timer
    assert len(timer.steps) == steps
    return {"steps": timer.steps, "cpu": timer.cpu, "end_to_end_s": timer.end - timer.start}


def run_trl(checkpoint: Path, rows: list[dict], steps: int, workdir: Path, bf16: bool, gradient_checkpointing: bool, attention: str | None = None) -> dict:
    # the same token counts as ours: TRL appends the EOS to each response
    run = run_trl_dpo(checkpoint, rows, steps, workdir, batch=BATCH, lr=LR, max_length=SEQ_LEN, lengths=(PROMPT_LEN, RESPONSE_LEN),
                      bf16=bf16, gradient_checkpointing=gradient_checkpointing, attention=attention)
    return {"steps": run["steps"], "cpu": run["cpu"], "end_to_end_s": run["end_to_end_s"]}


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def kernel_times(run, *args, **kwargs) -> dict:
    """Per step, the profiler's self time (ms) of a run's matrix products and fused attention kernels."""
    from torch.profiler import profile

    with profile() as prof:
        step_s = run(*args, **kwargs)["steps"]
    events = prof.key_averages()
    per_step = lambda keep: sum(e.self_cpu_time_total for e in events if keep(e.key)) / 1e3 / len(step_s)  # noqa: E731
    gemm, attention = per_step(lambda k: k in GEMM_OPS), per_step(lambda k: "scaled_dot_product" in k)
    step_ms = 1e3 * sum(step_s) / len(step_s)  # the profiler's overhead included, as in the kernels' times
    return {
        "gemm_ms": round(gemm, 1),
        "fused_attention_ms": round(attention, 1),
        "kernels_ms": round(gemm + attention, 1),
        "step_ms": round(step_ms, 1),
        "kernel_share": round((gemm + attention) / step_ms, 3),
    }


# the like-for-like pairs whose kernels are profiled after the timed rounds
PROFILED = {"fp32": ("rlhf_fp32", "trl_fp32"), "bf16": ("rlhf_bf16", "trl_bf16")}

# name -> (trainer, settings)
VARIANTS = {
    "rlhf_fp32": ("rlhf", {"precision": "32-true", "precompute": False}),
    "trl_fp32": ("trl", {"bf16": False, "gradient_checkpointing": False}),
    "rlhf_bf16": ("rlhf", {"precision": "bf16-mixed", "precompute": False}),
    "trl_bf16": ("trl", {"bf16": True, "gradient_checkpointing": False}),
    "rlhf_default": ("rlhf", {"precision": "32-true", "precompute": True}),
    "trl_default": ("trl", {"bf16": True, "gradient_checkpointing": True}),
    "rlhf_bf16_precompute": ("rlhf", {"precision": "bf16-mixed", "precompute": True}),
    "rlhf_bf16_eager": ("rlhf", {"precision": "bf16-mixed", "precompute": False, "attention": "eager"}),
    "trl_bf16_eager": ("trl", {"bf16": True, "gradient_checkpointing": False, "attention": "eager"}),
    "rlhf_bf16_eager_precompute": ("rlhf", {"precision": "bf16-mixed", "precompute": True, "attention": "eager"}),
}
# what the JSON's speedup_vs_trl reports: (ours, theirs, measure)
COMPARISONS = {
    "fp32 like for like": ("rlhf_fp32", "trl_fp32"),
    "bf16 like for like": ("rlhf_bf16", "trl_bf16"),
    "defaults of both": ("rlhf_default", "trl_default"),
    "rlhf bf16 + precomputed reference vs TRL default": ("rlhf_bf16_precompute", "trl_default"),
    "rlhf bf16 + precomputed reference vs TRL bf16 without checkpointing": ("rlhf_bf16_precompute", "trl_bf16"),
    "bf16 like for like, both with eager attention": ("rlhf_bf16_eager", "trl_bf16_eager"),
    "rlhf bf16 + eager attention vs TRL bf16 (sdpa)": ("rlhf_bf16_eager", "trl_bf16"),
    "rlhf bf16 + eager attention + precomputed reference vs TRL default": ("rlhf_bf16_eager_precompute", "trl_default"),
}
MEASURES = ("tokens_per_s_best", "tokens_per_s_median", "tokens_per_cpu_s_median", "end_to_end_tokens_per_s")
GUIDE_TRL_TOKENS_PER_S = 2500  # docs' TRL 1.16 figure at this size on an idle machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant per round")
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped from each run's timing")
    parser.add_argument("--rounds", type=int, default=4, help="short alternating rounds: load from other processes falls on every variant")
    parser.add_argument("--profile-rounds", type=int, default=2, help="profiled runs per like-for-like variant (kernel times)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 steps, 1 round, not written")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (not installed)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.warmup, args.profile_rounds = 5, 1, 1, 1
    import transformers
    transformers.utils.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = make_tiny_checkpoint(workdir / "gpt2", solved_texts(), n_layer=4, n_embd=256, n_head=4, vocab_size=512, max_positions=256)
        tok = load_hf_tokenizer(ModelConfig(backend="hf", path=str(checkpoint)))
        rows = make_pairs(tok, args.steps * BATCH)
        data = workdir / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        params = load_hf_model(ModelConfig(backend="hf", path=str(checkpoint))).num_parameters()

        variants = {k: v for k, v in VARIANTS.items() if not (args.no_trl and v[0] == "trl")}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        start_load = machine()["load_average_1m"]
        for r in range(args.rounds):
            for name, (side, settings) in variants.items():
                if side == "rlhf":
                    runs[name].append(run_rlhf(checkpoint, data, args.steps, workdir, **settings))
                else:
                    runs[name].append(run_trl(checkpoint, rows, args.steps, workdir, **settings))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        # kernel times: per variant the least disturbed (smallest) of `profile_rounds` alternating runs
        profiled: dict[str, list[dict]] = {}
        for _ in range(args.profile_rounds):
            for name in [] if args.no_trl else [n for pair in PROFILED.values() for n in pair]:
                side, settings = variants[name]
                run, data_arg = (run_rlhf, data) if side == "rlhf" else (run_trl, rows)
                profiled.setdefault(name, []).append(kernel_times(run, checkpoint, data_arg, args.steps, workdir, **settings))
        kernels = {name: min(runs_, key=lambda k: k["kernels_ms"]) for name, runs_ in profiled.items()}

    results = {name: summarize(rs, args.warmup) for name, rs in runs.items() if rs}
    result = {
        "benchmark": "DPO training step on a Hugging Face GPT-2 checkpoint: rlhf vs TRL DPOTrainer",
        "command": " ".join(["python -m benchmarks.bench_hf_dpo", *sys.argv[1:]]),
        "model": {"arch": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "vocab": tok.vocab_size, "parameters": params},
        "batch_pairs": BATCH,
        "sequence_tokens": SEQ_LEN,
        "tokens_per_step": TOKENS_PER_STEP,
        "steps_per_run": args.steps,
        "warmup_steps_dropped": args.warmup,
        "rounds": args.rounds,
        "results": results,
        "kernels": kernels,
        "machine": machine() | {"load_average_1m_at_start": start_load, "transformers": transformers.__version__},
    }
    if args.no_trl:
        result["speedup_vs_trl"] = {"rlhf_fp32 vs the docs' TRL figure (~2,500 tokens/s, idle machine)": results["rlhf_fp32"]["tokens_per_s_best"] / GUIDE_TRL_TOKENS_PER_S}
    else:
        import trl

        result["machine"]["trl"] = trl.__version__
        result["speedup_vs_trl"] = {
            label: {m: round(results[a][m] / results[b][m], 3) for m in MEASURES} for label, (a, b) in COMPARISONS.items()
        }
        # TRL's step / ours = kernel_ratio x our kernel share / TRL's (all from the profiled runs)
        result["kernel_share"] = {}
        for label, (ours, theirs) in PROFILED.items():
            k_ratio = kernels[theirs]["kernels_ms"] / kernels[ours]["kernels_ms"]
            result["kernel_share"][label] = {
                "trl_kernels_over_rlhf_kernels": round(k_ratio, 3),
                "rlhf": kernels[ours]["kernel_share"],
                "trl": kernels[theirs]["kernel_share"],
                "rlhf_needed_for_2x": round(2 * kernels[theirs]["kernel_share"] / k_ratio, 3),
            }
    if args.quick:
        print(json.dumps(result, indent=2))
    else:
        write_result("hf_dpo", result)


if __name__ == "__main__":
    main()
