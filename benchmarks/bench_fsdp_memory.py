"""Memory per process, DDP against FSDP, 2 CPU processes (issue #16 item 5).

    python -m benchmarks.bench_fsdp_memory [--model medium] [--steps 3] [--quick] [--out NAME]

Writes benchmarks/results/NAME.json (default `fsdp_memory`; `--quick`: model=tiny, 2 steps,
not written). For SFT and for offline DPO (the DPO stage alone, from the model's initial
weights, its reference log-probs precomputed and the reference freed, as by default), each
under `trainer=ddp_cpu` and `trainer=fsdp_cpu`, in a fresh `python -m rlhf run` per case.

Per process (rank), from a Lightning callback in that process:
  - `params_mib`, `grads_mib`, `optimizer_mib`: bytes of the tensors this process holds for
    the policy's parameters, their gradients (just before the optimizer step) and AdamW's
    state (after a step); under FSDP the local shards (`DTensor.to_local()`), under DDP the
    whole tensors every process keeps. `train_state_mib` is their sum: the figure the issue's
    target is on (FSDP about half of DDP's per process with 2 processes).
  - `peak_rss_mib`: `resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end of training: the
    whole process (Python, torch, Lightning, activations, the data, and the model as built).
    Under FSDP the model is still built whole on every process before it is sharded, and DDP
    keeps its gradient buckets; both show here and not in `train_state_mib`.
The ratio of each figure FSDP/DDP is written per stage (rank 0's; both ranks are listed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV_OUT = "RLHF_MEMORY_OUT"
MIB = 2**20


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def _child(argv: list[str]) -> int:
    """`python -m rlhf run ...` with a callback that records this process's memory to $RLHF_MEMORY_OUT.rank<r>.json."""
    import torch
    from lightning.pytorch.callbacks import Callback

    import rlhf.stage_context
    from rlhf.cli import main

    class Memory(Callback):
        def __init__(self):
            self.out = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            params = list(pl_module.policy.parameters())
            self.out["params_mib"] = _local_bytes(params) / MIB
            self.out["grads_mib"] = _local_bytes(p.grad for p in params) / MIB

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            states = trainer.optimizers[0].state.values()
            self.out["optimizer_mib"] = _local_bytes(v for s in states for v in s.values() if torch.is_tensor(v) and v.dim() > 0) / MIB

        def on_train_end(self, trainer, pl_module):
            out = dict(self.out, rank=trainer.global_rank, world_size=trainer.world_size)
            out["train_state_mib"] = out["params_mib"] + out["grads_mib"] + out["optimizer_mib"]
            out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out["sharded"] = type(pl_module.policy).__name__.startswith("FSDP")
            Path(f"{os.environ[ENV_OUT]}.rank{trainer.global_rank}.json").write_text(json.dumps(out))

    fit = rlhf.stage_context.fit

    def fit_with_memory(module, make_batch, *, callbacks=None, **kwargs):
        return fit(module, make_batch, callbacks=[*(callbacks or []), Memory()], **kwargs)

    rlhf.stage_context.fit = fit_with_memory
    return main(argv)


def _case(stage: str, trainer: str, model: str, steps: int, work: Path) -> list[dict]:
    run = work / f"{stage}-{trainer}"
    recipe = ["recipe=sft"] if stage == "sft" else ["recipe=dpo", "order=[dpo]", "stages.dpo.eval_every=0"]
    args = [*recipe, f"model={model}", f"trainer={trainer}", "logger=none", "trainer.progress_bar=false",
            "trainer.num_threads=1", "eval.num_prompts=8", "eval.samples_per_prompt=0",
            f"stages.{stage}.max_steps={steps}", f"stages.{stage}.batch_size=8", f"stages.{stage}.warmup_steps=1",
            f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", ENV_OUT: str(run)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_fsdp_memory", "--child", "run", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} under {trainer} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{run}.rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    # a case's process; Lightning's launcher starts rank 1 as `python -m THIS_MODULE OVERRIDES...`
    # (Hydra's overrides only), which rlhf.cli.main reads as `run`
    if ENV_OUT in os.environ:
        sys.exit(_child([a for a in sys.argv[1:] if a != "--child"]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medium")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="fsdp_memory")
    args = parser.parse_args()
    model, steps = ("tiny", 2) if args.quick else (args.model, args.steps)

    from benchmarks.common import machine, write_result

    result = {"benchmark": "fsdp_memory", "model": model, "steps": steps, "processes": 2, "machine": machine(), "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("sft", "dpo"):
            ranks = {trainer: _case(stage, trainer, model, steps, Path(tmp)) for trainer in ("ddp_cpu", "fsdp_cpu")}
            ddp, fsdp = ranks["ddp_cpu"][0], ranks["fsdp_cpu"][0]
            ratio = {key: round(fsdp[key] / ddp[key], 3) for key in ("params_mib", "grads_mib", "optimizer_mib", "train_state_mib", "peak_rss_mib")}
            result["stages"][stage] = {"ddp": ranks["ddp_cpu"], "fsdp": ranks["fsdp_cpu"], "fsdp_over_ddp": ratio}
            print(stage, json.dumps(ratio))
    if args.quick:
        print(json.dumps(result, indent=2))
    else:
        print("wrote", write_result(args.out, result))


if __name__ == "__main__":
    main()
