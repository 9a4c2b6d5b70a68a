"""DPO stage throughput, MFU and peak memory at 3.2 M and 20 M parameters, against TRL's DPOTrainer in the same run.

    python -m benchmarks.bench_dpo                        # both sizes, writes benchmarks/results/dpo.json
    python -m benchmarks.bench_dpo --sizes 20m            # one size; the other size's runs are kept
    python -m benchmarks.bench_dpo --wait-idle 1500       # first wait up to 25 min for 1-minute load < 0.7

Ours is measured through the stage's own code: rlhf.stages.dpo's PairSource and DPOModule
trained by ctx.fit (the Lightning Trainer every stage uses) on the x-transformers char model,
on synthetic pairs read from a JSONL file, so data loading, collation, the single
chosen+rejected forward pass, the loss, backward, AdamW and gradient clipping are all in the
timed steps. RPO's NLL term is off (nll_weight=0) and beta is 0.1, TRL's plain DPO loss.

TRL (benchmarks/trl_dpo.py, as bench_hf_dpo runs it) trains, in the same run and alternating
with ours, a GPT-2 of the same shape (layers, width, heads, context = the sequence length)
whose byte-level tokenizer has no merges, so every letter is one token on both sides: the SAME
JSONL pairs give the same token counts per row (prompt L/2, each response L/2 with its EOS).
Same batch (8 pairs), same learning rate (constant), gradient clipping 1.0, no gradient
checkpointing, dropout off. Settings, each run by both: fp32 with the reference model run on
every batch; fp32 with the reference log-probs precomputed once before training (TRL:
precompute_ref_log_probs); bf16 mixed precision with the reference precomputed.
What is NOT matched: the architectures (x-transformers: rotary positions, no attention biases,
a 98-symbol char vocabulary, untied output layer; GPT-2: learned positions, biases, 257-symbol
byte vocabulary, tied output layer; parameter counts are in the JSON), and the work per pair:
our stage runs each pair's prompt once (share_prompt: rows prompt | chosen | rejected, 3/4 of
the pair tokens), TRL runs chosen and rejected as two full rows. That is a difference in the
implementations, which tokens/s is meant to show, so tokens/s counts the same pair tokens on
both sides and MFU the FLOPs each actually ran.

Timing, the same on both sides: the wall-clock time from the end of the last warm-up step to
the end of the last step, over the measured steps (data fetching included, reference
precompute and setup excluded). tokens/s = chosen + rejected tokens per step (prompt
included, no padding: 2 x 8 x L) x steps/s.

MFU: model FLOPs per step / step time / peak. Model FLOPs per token: 6 N (policy forward
and backward, N = parameters that do matmuls: everything but the token and position
embeddings, the output layer included) + 12 n_layer d T (attention scores and values,
forward and backward, T the row length; PaLM's appendix B formula), plus 2 N + 4 n_layer d T
when the reference runs live. The peak is measured in this script with a large matmul of the
same dtype.

Each configuration runs in its own process, so peak RSS (ru_maxrss) is that configuration's.
Other processes on the machine slow everything down: the 1-minute load average before and
after each run, and at the start and end of the whole benchmark, is recorded.
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

# the targets: tokens/s over TRL's DPOTrainer at each size
SIZES = {
    "3m": {"dim": 256, "depth": 4, "heads": 4, "length": 128, "target_x": 3.0},
    "20m": {"dim": 512, "depth": 6, "heads": 8, "length": 256, "target_x": 2.0},
}
BATCH_PAIRS = 8
LR = 1e-5
# (reference precomputed, precision) run by both sides, in this order, ours then TRL's
SETTINGS = ((False, "32-true"), (True, "32-true"), (True, "bf16-mixed"))


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
    """Letters only: one token per letter for our char tokenizer and the no-merge byte-level one."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    half = length // 2

    def text(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n))

    with open(path, "w") as f:
        for _ in range(count):
            f.write(json.dumps({"prompt": text(half), "chosen": text(half - 1), "rejected": text(half - 1)}) + "\n")


def make_trl_checkpoint(folder: Path, size: str) -> Path:
    """A GPT-2 of the size's shape with a byte-level tokenizer of no merges (256 bytes + EOS)."""
    from rlhf.models import make_tiny_checkpoint

    spec = SIZES[size]
    return make_tiny_checkpoint(folder, [], n_layer=spec["depth"], n_embd=spec["dim"], n_head=spec["heads"], vocab_size=257,
                                max_positions=spec["length"])


def flops_per_token(n_matmul: int, depth: int, dim: int, row_length: int, live_reference: bool) -> float:
    attn = 12 * depth * dim * row_length
    return 6 * n_matmul + attn + (2 * n_matmul + attn // 3 if live_reference else 0)


def step_seconds(step_ends: list[float], warmup: int) -> tuple[float, int]:
    """Mean seconds per step from the end of the last warm-up step to the end of the last step."""
    measured = len(step_ends) - warmup
    return (step_ends[-1] - step_ends[warmup - 1]) / measured, measured


def run_rlhf(size: str, steps: int, warmup: int, precompute: bool, precision: str, data: Path) -> dict:
    """Our DPO stage on the x-transformers char model, in this process."""
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
    run_cfg = typed_run_config(
        OmegaConf.create(
            {
                "order": ["dpo"],
                "stages": {"dpo": {"kind": "dpo", "data": str(data), "batch_size": BATCH_PAIRS, "max_steps": total, "max_length": length,
                                   "precompute_reference": precompute, "eval_every": 0, "nll_weight": 0.0, "beta": 0.1, "lr": LR,
                                   "warmup_steps": 0, "min_lr_ratio": 1.0}},
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
    source = dpo.PairSource(ctx)
    # every row is exactly L tokens: prompt L/2, response L/2 with its EOS
    assert tuple(map(len, source.pairs[0])) == (length // 2, length // 2, length // 2), tuple(map(len, source.pairs[0]))
    module = dpo.DPOModule(ctx, source, starting_reference(ctx))
    start = time.perf_counter()
    ctx.fit(module, source.make_batch, callbacks=[timer])
    wall = time.perf_counter() - start
    step_s, measured = step_seconds(timer.times, warmup)
    # with share_prompt (the stage's default) each row is prompt | chosen | rejected: the prompt
    # (half of each sequence here) runs once, so 3/4 of the pair tokens go through the model,
    # in rows 1.5x as long; MFU counts the FLOPs actually run, tokens/s the pairs' tokens
    row_length = length * 3 // 2 if source.share_prompt else length
    tokens_run = BATCH_PAIRS * (row_length if source.share_prompt else 2 * length)
    n_matmul = policy.num_parameters(exclude_embedding=True)
    return {
        "params": policy.num_parameters(),
        "params_matmul": n_matmul,
        "vocab": task.tokenizer.vocab_size,
        "share_prompt": source.share_prompt,
        "tokens_run_per_step": tokens_run,
        "model_gflop_per_step": flops_per_token(n_matmul, spec["depth"], spec["dim"], row_length, not precompute) * tokens_run / 1e9,
        "reference_precompute_s": module.precompute_seconds,
        "stage_wall_s": wall,
        "step_s": step_s,
        "steps_measured": measured,
    }


def run_trl(size: str, steps: int, warmup: int, precompute: bool, precision: str, data: Path, checkpoint: Path) -> dict:
    """TRL's DPOTrainer on the same-shape GPT-2, on the same pairs, in this process."""
    import tempfile

    from benchmarks.trl_dpo import run_trl_dpo

    spec = SIZES[size]
    length = spec["length"]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    work = Path(tempfile.mkdtemp(prefix=f"bench_dpo_trl_{size}_"))
    start = time.perf_counter()
    run = run_trl_dpo(checkpoint, rows, steps + warmup, work, batch=BATCH_PAIRS, lr=LR, max_length=length, lengths=(length // 2, length // 2),
                      bf16=precision.startswith("bf16"), gradient_checkpointing=False, precompute=precompute)
    wall = time.perf_counter() - start
    step_s, measured = step_seconds(run["step_ends"], warmup)
    n_matmul = run["parameters"] - run["position_parameters"]  # the tied output layer still does its matmul
    tokens_run = BATCH_PAIRS * 2 * length
    return {
        "params": run["parameters"],
        "params_matmul": n_matmul,
        "vocab": 257,
        "share_prompt": False,
        "tokens_run_per_step": tokens_run,
        "model_gflop_per_step": flops_per_token(n_matmul, spec["depth"], spec["dim"], length, not precompute) * tokens_run / 1e9,
        "reference_precompute_s": run["precompute_s"],
        "stage_wall_s": wall,
        "step_s": step_s,
        "steps_measured": measured,
    }


def run_one(spec: dict, out: Path) -> None:
    """One configuration in this process; writes its result as JSON to `out`."""
    import torch

    load_before = os.getloadavg()[0]
    args = (spec["size"], spec["steps"], spec["warmup"], spec["precompute"], spec["precision"], Path(spec["data"]))
    result = run_rlhf(*args) if spec["side"] == "rlhf" else run_trl(*args, Path(spec["checkpoint"]))
    size = SIZES[spec["size"]]
    tokens_per_step = BATCH_PAIRS * 2 * size["length"]
    result = {
        "side": spec["side"],
        "size": spec["size"],
        "dim": size["dim"],
        "depth": size["depth"],
        "heads": size["heads"],
        "length": size["length"],
        "batch_pairs": BATCH_PAIRS,
        "precompute_reference": spec["precompute"],
        "precision": spec["precision"],
        "threads": torch.get_num_threads(),
        "warmup_steps": spec["warmup"],
        **result,
        "steps_per_s": 1 / result["step_s"],
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / result["step_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
    }
    out.write_text(json.dumps(result))


def wait_for_idle(max_wait_s: float, threshold: float = 0.7, poll_s: float = 30.0) -> float:
    """Sleep until the 1-minute load average is under `threshold`, at most `max_wait_s`; returns the seconds waited."""
    start = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - start < max_wait_s:
        print(f"load {os.getloadavg()[0]:.2f} >= {threshold}: waiting", flush=True)
        time.sleep(poll_s)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=0, help="measured steps (0: 20 at 3m, 6 at 20m)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--wait-idle", type=float, default=0, help="seconds to wait at most for a 1-minute load under 0.7 first")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dpo.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(json.loads(args.one), args.one_out)
        return

    import tempfile

    import torch
    import transformers
    import trl

    waited = wait_for_idle(args.wait_idle)
    load_start = os.getloadavg()
    started = time.time()
    peaks = {"fp32": matmul_peak("fp32"), "bf16": matmul_peak("bf16")}
    runs, comparisons = [], []
    for size in args.sizes:
        steps = args.steps or {"3m": 20, "20m": 6}[size]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            data = work / "pairs.jsonl"
            write_pairs(data, SIZES[size]["length"], BATCH_PAIRS * (steps + args.warmup))
            checkpoint = make_trl_checkpoint(work / "gpt2", size)
            for precompute, precision in SETTINGS:
                pair = {}
                for side in ("rlhf", "trl"):  # alternating: load from other processes falls on both
                    spec = {"side": side, "size": size, "steps": steps, "warmup": args.warmup, "precompute": precompute,
                            "precision": precision, "data": str(data), "checkpoint": str(checkpoint)}
                    cmd = [sys.executable, "-m", "benchmarks.bench_dpo", "--one", json.dumps(spec), "--one-out", str(work / "one.json")]
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                    if proc.returncode != 0:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        raise SystemExit(f"benchmark run failed: {side} {size} precompute={precompute} {precision}")
                    result = json.loads((work / "one.json").read_text())
                    peak = peaks["bf16" if precision.startswith("bf16") else "fp32"]
                    result["mfu"] = result["model_gflop_per_step"] * result["steps_per_s"] / peak
                    result["mfu_peak_gflops"] = peak
                    runs.append(result)
                    pair[side] = result
                    print(f"{side:4} {size:3} precompute={precompute!s:5} {precision:10} {result['tokens_per_s']:8.0f} tok/s "
                          f"{result['steps_per_s']:6.2f} steps/s MFU {result['mfu']:.0%} peak RSS {result['peak_rss_mb']:.0f} MB "
                          f"load {result['loadavg_1m_before']:.1f}", flush=True)
                x = pair["rlhf"]["tokens_per_s"] / pair["trl"]["tokens_per_s"]
                comparisons.append({"size": size, "precompute_reference": precompute, "precision": precision,
                                    "rlhf_tokens_per_s": pair["rlhf"]["tokens_per_s"], "trl_tokens_per_s": pair["trl"]["tokens_per_s"],
                                    "x_trl_tokens": x, "target_x": SIZES[size]["target_x"]})
                print(f"     {size:3} precompute={precompute!s:5} {precision:10} x{x:.2f} TRL", flush=True)
    if args.out.exists():  # measuring some sizes again keeps the others' runs
        old = json.loads(args.out.read_text())
        runs = [r for r in old.get("runs", []) if r["size"] not in args.sizes and "side" in r] + runs
        comparisons = [c for c in old.get("comparisons", []) if c["size"] not in args.sizes] + comparisons
    report = {
        "benchmark": "dpo stage training throughput (rlhf.stages.dpo via ctx.fit) vs TRL's DPOTrainer in the same run",
        "command": "python -m benchmarks.bench_dpo " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "transformers": transformers.__version__,
                    "trl": trl.__version__},
        "matmul_peak_gflops": peaks,  # this invocation's; each run keeps the peak its MFU used
        "token_definition": "chosen + rejected tokens (prompt included, no padding) processed per second; every sequence is exactly `length` tokens",
        "trl_model": "GPT-2 of the same layers, width, heads and context, byte-level tokenizer without merges (one token per letter, as our char tokenizer)",
        "waited_for_idle_s": waited,
        "loadavg_at_start": load_start,
        "loadavg_at_end": os.getloadavg(),
        "wall_s": time.time() - started,
        "comparisons": comparisons,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
