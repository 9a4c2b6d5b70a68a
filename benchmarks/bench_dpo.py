"""DPO stage throughput, MFU and peak memory at the two sizes the GUIDE's TRL numbers use.

    python benchmarks/bench_dpo.py                 # both sizes, writes benchmarks/results/dpo.json
    python benchmarks/bench_dpo.py --sizes 20m        # one size; the other size's runs are kept

Measured through the stage's own code: rlhf.stages.dpo's PairSource and DPOModule trained
by ctx.fit (the Lightning Trainer every stage uses), on synthetic pairs read from a JSONL
file, so data loading, collation, the single chosen+rejected forward pass, the loss,
backward, AdamW and gradient clipping are all in the timed steps.

Tokens: every pair is a prompt of L/2 tokens and two responses of L/2 tokens (EOS
included), so each of the 2 x batch sequences is exactly L tokens and nothing is padding.
tokens/s = (chosen + rejected tokens, prompt included, per step) x steps/s, i.e. the
non-pad tokens of the concatenated chosen+rejected batch (the GUIDE's TRL figures count
chosen + rejected tokens processed per second).

The stage shares each pair's prompt (share_prompt, its default): a row is prompt |
chosen | rejected, so 3/4 of those tokens are run through the model; tokens/s still counts
the pairs' chosen + rejected tokens (the work TRL does for the same pairs), MFU the FLOPs run.

MFU: model FLOPs per step / step time / peak. Model FLOPs per token: 6 N (policy forward
and backward, N = parameters that do matmuls: everything but the token embedding) +
12 n_layer d L (attention scores and values, forward and backward; PaLM's appendix B
formula), plus 2 N + 4 n_layer d L when the reference runs live. The peak is measured in
this script with a large matmul of the same dtype.

Each configuration runs in its own process, so peak RSS (ru_maxrss) is that configuration's.
Other processes on the machine slow everything down: the 1-minute load average before
and after each run is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the GUIDE's peers on this machine class: TRL 1.16 DPOTrainer, batch 8 pairs
SIZES = {
    "3m": {"dim": 256, "depth": 4, "heads": 4, "length": 128, "trl_tokens_per_s": 2500, "trl_steps_per_s": 4.0, "target_x": 3.0},
    "20m": {"dim": 512, "depth": 6, "heads": 8, "length": 256, "trl_tokens_per_s": 490, "trl_steps_per_s": 0.17, "target_x": 2.0},
}
BATCH_PAIRS = 8


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """Measured GFLOP/s of a large square matmul (the MFU denominator)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def write_pairs(path: Path, length: int, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    half = length // 2

    def text(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n))

    with open(path, "w") as f:
        for _ in range(count):
            f.write(json.dumps({"prompt": text(half), "chosen": text(half - 1), "rejected": text(half - 1)}) + "\n")


def run_one(size: str, steps: int, warmup: int, precompute: bool, precision: str, out: Path) -> None:
    """One configuration in this process; writes its result as JSON to `out`."""
    import tempfile

    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from rlhf.config import typed_run_config, typed_stage_config
    from rlhf.models import build_model
    from rlhf.preference_batch import starting_reference
    from rlhf.stage_context import StageContext
    from rlhf.stages import dpo
    from rlhf.tasks import build_task

    spec = SIZES[size]
    length = spec["length"]
    work = Path(tempfile.mkdtemp(prefix=f"bench_dpo_{size}_"))
    total = steps + warmup
    write_pairs(work / "pairs.jsonl", length, BATCH_PAIRS * total)
    run_cfg = typed_run_config(
        OmegaConf.create(
            {
                "order": ["dpo"],
                "stages": {"dpo": {"kind": "dpo", "data": str(work / "pairs.jsonl"), "batch_size": BATCH_PAIRS, "max_steps": total,
                                   "max_length": length, "precompute_reference": precompute, "eval_every": 0}},
                "model": {"dim": spec["dim"], "depth": spec["depth"], "heads": spec["heads"], "max_seq_len": length},
                "logger": {"kind": "none"},
                "trainer": {"accelerator": "cpu", "progress_bar": False, "checkpoint_every": 0, "precision": precision},
            }
        )
    )
    task = build_task(run_cfg.task, work)
    torch.manual_seed(0)
    policy = build_model(run_cfg.model, task.tokenizer.vocab_size)
    ctx = StageContext(slot="dpo", cfg=typed_stage_config("dpo", run_cfg.stages.dpo), run_cfg=run_cfg, stage_dir=work / "stage",
                       policy=policy, task=task, tokenizer=task.tokenizer, seed=0, logger=None, completed={})

    class StepTimes(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter())

    timer = StepTimes()
    load_before = os.getloadavg()[0]
    source = dpo.PairSource(ctx)
    module = dpo.DPOModule(ctx, source, starting_reference(ctx))
    start = time.perf_counter()
    ctx.fit(module, source.make_batch, callbacks=[timer])
    wall = time.perf_counter() - start
    measured = timer.times[warmup:]
    step_s = (measured[-1] - timer.times[warmup - 1]) / len(measured)  # from the end of the last warmup step
    tokens_per_step = BATCH_PAIRS * 2 * length
    # with share_prompt (the stage's default) each row is prompt | chosen | rejected: the prompt
    # (half of each sequence here) runs once, so 3/4 of the pair tokens go through the model,
    # in rows 1.5x as long; MFU counts the FLOPs actually run, tokens/s the pairs' tokens
    row_length = length * 3 // 2 if source.share_prompt else length
    tokens_run = BATCH_PAIRS * (row_length if source.share_prompt else 2 * length)
    n_matmul = policy.num_parameters(exclude_embedding=True)
    attn = 12 * spec["depth"] * spec["dim"] * row_length
    flops_per_token = 6 * n_matmul + attn + (0 if precompute else 2 * n_matmul + attn // 3)
    result = {
        "size": size,
        "params": policy.num_parameters(),
        "params_matmul": n_matmul,
        "dim": spec["dim"],
        "depth": spec["depth"],
        "length": length,
        "batch_pairs": BATCH_PAIRS,
        "precompute_reference": precompute,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "steps_measured": len(measured),
        "warmup_steps": warmup,
        "step_s": step_s,
        "steps_per_s": 1 / step_s,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / step_s,
        "share_prompt": source.share_prompt,
        "tokens_run_per_step": tokens_run,
        "model_gflop_per_step": flops_per_token * tokens_run / 1e9,
        "reference_precompute_s": module.precompute_seconds,
        "reference_precompute_s_per_step": module.precompute_seconds / total,
        "stage_wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
    }
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=0, help="measured steps (0: 20 at 3m, 6 at 20m)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dpo.json")
    parser.add_argument("--one", nargs=5, metavar=("SIZE", "STEPS", "WARMUP", "PRECOMPUTE", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--one-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, steps, warmup, precompute, precision = args.one
        run_one(size, int(steps), int(warmup), precompute == "1", precision, args.one_out)
        return

    import tempfile

    import torch

    started = time.time()
    peaks = {"fp32": matmul_peak("fp32"), "bf16": matmul_peak("bf16")}
    runs = []
    for size in args.sizes:
        steps = args.steps or {"3m": 20, "20m": 6}[size]
        for precompute, precision in ((False, "32-true"), (True, "32-true"), (True, "bf16-mixed")):
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                cmd = [sys.executable, __file__, "--one", size, str(steps), str(args.warmup), str(int(precompute)), precision, "--one-out", tmp.name]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"benchmark run failed: {size} precompute={precompute} {precision}")
                result = json.loads(Path(tmp.name).read_text())
            spec = SIZES[size]
            peak = peaks["bf16" if precision.startswith("bf16") else "fp32"]
            result["mfu"] = result["model_gflop_per_step"] * result["steps_per_s"] / peak
            result["mfu_peak_gflops"] = peak
            result["matmul_peak_gflops_fp32_bf16"] = [peaks["fp32"], peaks["bf16"]]
            result["trl_tokens_per_s"] = spec["trl_tokens_per_s"]
            result["trl_steps_per_s"] = spec["trl_steps_per_s"]
            result["x_trl_tokens"] = result["tokens_per_s"] / spec["trl_tokens_per_s"]
            result["target_x"] = spec["target_x"]
            runs.append(result)
            print(f"{size} precompute={precompute!s:5} {precision:10} {result['tokens_per_s']:8.0f} tok/s {result['steps_per_s']:6.2f} steps/s "
                  f"MFU {result['mfu']:.0%} peak RSS {result['peak_rss_mb']:.0f} MB  x{result['x_trl_tokens']:.1f} TRL  load {result['loadavg_1m_before']:.1f}")
    if args.out.exists():  # measuring some sizes again keeps the others' runs
        kept = [r for r in json.loads(args.out.read_text()).get("runs", []) if r["size"] not in args.sizes]
        runs = kept + runs
    report = {
        "benchmark": "dpo stage training throughput (rlhf.stages.dpo via ctx.fit)",
        "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute() else sys.argv[0], *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "matmul_peak_gflops": peaks,  # this invocation's; each run keeps the peak its MFU used
        "token_definition": "chosen + rejected tokens (prompt included, no padding) processed per second; every sequence is exactly `length` tokens",
        "loadavg_at_start": os.getloadavg(),
        "wall_s": time.time() - started,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
