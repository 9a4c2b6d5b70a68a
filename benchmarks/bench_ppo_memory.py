"""Peak memory of PPO with LoRA vs the SFT stage, at the same model size.

    python -m benchmarks.bench_ppo_memory [--model medium] [--steps 3] [--quick]

Writes benchmarks/results/ppo_memory.json. Each configuration is a real `python -m rlhf run`
in its own process; its peak resident memory (RSS) is read from the operating system
(`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` in a small wrapper process that runs only
that command). RSS, not tracemalloc: torch allocates outside Python's allocator.

Configurations (same model, same evaluation, one thread):
  - `baseline`: the process with everything imported and the model built, no training
    (what any stage costs before it trains).
  - `sft`: full fine-tuning, batch 64: weights + gradients + AdamW's two moments.
  - `ppo_lora`: PPO with LoRA (rank 8 on every attention and feed-forward linear), shared
    critic (a value head on the policy's trunk), the reference = the same weights with the
    adapters off: one copy of the base weights, optimizer state for adapters only.
    Rollout 64 prompts, minibatch 16 (the stage's defaults).
  - `ppo_lora_mb64`: the same with minibatch 64, the SFT stage's batch size: updates on
    as many rows as SFT's, the like-for-like activation memory.
  - `ppo_lora_mb64_micro16`: minibatch 64 run as 4 micro-batches of 16 (the same update,
    token-weighted gradient accumulation; `micro_batch_size`).
  - `ppo_full`: PPO without LoRA, for contrast: a frozen reference copy and full optimizer state.
The target is ppo_lora <= 1.5x sft. Both the raw ratio and the ratio above the baseline
are reported, since at CPU-sized models the imported libraries are a large share of RSS.
"""

from __future__ import annotations

import argparse
import json
import resource  # noqa: F401  (used by the wrapper)
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, write_result

REPO = Path(__file__).resolve().parents[1]
WRAPPER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.stderr.write(r.stderr[-3000:] if r.returncode else '')\n"
    "sys.exit(r.returncode)\n"
)
BASELINE = (
    "import sys, torch, lightning, hydra\n"
    "from rlhf.models import ModelConfig, build_model\n"
    "import rlhf.orchestrator, rlhf.stages.ppo, rlhf.stages.sft\n"
    "from omegaconf import OmegaConf\n"
    "cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(sys.argv[1]))\n"
    "model = build_model(cfg, 99)\n"
)


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of `cmd` run in its own process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return int(proc.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", help="a conf/model choice")
    parser.add_argument("--steps", type=int, default=3, help="SFT steps / PPO rollouts per run")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 step, not written")
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps = "tiny", 1

    common = ["model=" + args.model, "logger=none", "eval.num_prompts=20", "trainer.progress_bar=false", "trainer.num_threads=1"]
    ppo_only = ["recipe=ppo", "~stage@stages.sft", "~stage@stages.rm", "order=[ppo]", "stages.ppo.reward_slot=null",
                f"stages.ppo.max_steps={args.steps}", "stages.ppo.eval_every=0"]
    cli = [sys.executable, "-m", "rlhf", "run"]
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            "baseline": [sys.executable, "-c", BASELINE, str(REPO / "conf" / "model" / f"{args.model}.yaml")],
            "sft": [*cli, "recipe=sft", *common, f"stages.sft.max_steps={args.steps}", f"hydra.run.dir={tmp}/sft"],
            "ppo_lora": [*cli, *ppo_only, *common, "stages.ppo.lora.enabled=true", f"hydra.run.dir={tmp}/ppo_lora"],
            "ppo_lora_mb64": [*cli, *ppo_only, *common, "stages.ppo.lora.enabled=true", "stages.ppo.minibatch_size=64", f"hydra.run.dir={tmp}/ppo_lora_mb64"],
            "ppo_lora_mb64_micro16": [*cli, *ppo_only, *common, "stages.ppo.lora.enabled=true", "stages.ppo.minibatch_size=64",
                                      "stages.ppo.micro_batch_size=16", f"hydra.run.dir={tmp}/ppo_lora_mb64_micro16"],
            "ppo_full": [*cli, *ppo_only, *common, f"hydra.run.dir={tmp}/ppo_full"],
        }
        start_load = machine()["load_average_1m"]
        results = {}
        for name, cmd in configs.items():
            rss, wall = peak_rss_mb(cmd)
            results[name] = {"peak_rss_mib": round(rss, 1), "wall_s": round(wall, 1)}
            print(name, results[name], flush=True)

    base = results["baseline"]["peak_rss_mib"]
    above = lambda name: results[name]["peak_rss_mib"] - base  # noqa: E731
    result = {
        "benchmark": "peak RSS: PPO with LoRA vs SFT at the same model size",
        "command": " ".join(["python -m benchmarks.bench_ppo_memory", *sys.argv[1:]]),
        "model": args.model,
        "steps": args.steps,
        "results": results,
        "ratio_ppo_lora_over_sft": results["ppo_lora"]["peak_rss_mib"] / results["sft"]["peak_rss_mib"],
        "ratio_ppo_lora_mb64_over_sft": results["ppo_lora_mb64"]["peak_rss_mib"] / results["sft"]["peak_rss_mib"],
        "ratio_ppo_lora_mb64_micro16_over_sft": results["ppo_lora_mb64_micro16"]["peak_rss_mib"] / results["sft"]["peak_rss_mib"],
        "ratio_ppo_full_over_sft": results["ppo_full"]["peak_rss_mib"] / results["sft"]["peak_rss_mib"],
        "ratio_above_baseline_ppo_lora_over_sft": above("ppo_lora") / above("sft"),
        "ratio_above_baseline_ppo_lora_mb64_over_sft": above("ppo_lora_mb64") / above("sft"),
        "ratio_above_baseline_ppo_full_over_sft": above("ppo_full") / above("sft"),
        "target": "ppo_lora <= 1.5 x sft",
        "machine": machine() | {"load_average_1m_at_start": start_load},
    }
    if args.quick:
        print(json.dumps(result, indent=2))
    else:
        write_result("ppo_memory", result)


if __name__ == "__main__":
    main()
