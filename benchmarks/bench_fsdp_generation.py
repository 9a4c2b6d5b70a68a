"""Sampling a rollout under FSDP: the whole weights gathered once, against decoding from the shards (issue #16 item 2).

    python -m benchmarks.bench_fsdp_generation [--model medium] [--prompts 64] [--new-tokens 24] [--repeats 5] [--quick] [--out NAME]

Writes benchmarks/results/NAME.json (default `fsdp_generation`; `--quick`: model=tiny, 16
prompts, 8 new tokens, 1 repeat, not written). Two CPU processes (gloo, one torch thread
each) build the same policy (`model=NAME`, the built-in task's tokenizer), shard it with
`rlhf.models.fsdp.shard_policy` as `trainer.strategy=fsdp` does, and sample rollouts as GRPO
does: `rlhf.rollout.rollout_prompts` (each process its share), `rollout_generator`,
temperature 1, the KV cache (`rlhf.sampling.generate` over the policy's `decode_step`).

  - `gathered` (what the online stages do): `gather_policy` (every process all-gathers the
    whole weights into a freshly built plain model), then sampling from that model.
  - `sharded`: sampling from the sharded policy itself, each decoding step all-gathering every
    block's weights in turn (in lockstep across the processes) and freeing them after the block.
    `decode_step` does not run sharded as it is (see `probe`): FSDP2 gathers a group only around
    `forward` and methods registered with `register_fsdp_forward_method`, and decode_step calls
    the embedding and each attention layer's own linears. Here (benchmark only) decode_step is
    registered on the root (the embedding, head and norms, gathered once per rollout: the root
    group is not freed after forward), a pre-hook on each attention layer's `to_q` gathers its
    block (the feed-forward layer's forward frees it after), and the cache's fused q/k/v weight
    (`_stacked_qkv`, read once for the whole rollout) is off so that no block stays gathered.
    `generate` stops when this process's own rows have all ended: sharded, the processes must
    also agree on when to stop (here no process's rows all ended before the last step; one
    that stopped early would leave the other in an all-gather, and the 120 s gloo timeout
    would fail the run).

Each variant is timed per rollout (both processes between barriers; the slower process's time
is the rollout's), after one warm-up rollout each, the two alternating in every repeat so load
from other processes falls on both alike; medians over repeats. One further rollout of each,
untimed, under a TorchDispatchMode counts the all-gathers and the bytes they assemble (the
gathered full tensors, on each process), and records resident memory: VmRSS before, and the
peak (VmHWM, reset through /proc/self/clear_refs) above it. Those RSS figures do not
separate the two: the allocator reuses memory freed earlier (the model built whole before
sharding, earlier rollouts), and the KV cache (84 MB at the defaults: 6 layers, keys and
values, 32 rows x 8 heads x 85 positions x 64) is the same in both. The exact figures are the
bytes held whole: `whole_model_bytes`, and the root group plus the largest block
(`most_gathered_at_once_bytes`). The sampled tokens and log-probs of the two variants are
compared for the same prompts and generator seed, every repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MIB = 2**20


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


class _AllGathers:
    """A TorchDispatchMode counting all-gathers and the bytes of the full tensors they assemble:
    FSDP2's per-group `c10d._allgather_base_` (output first) and DTensor.full_tensor's
    `_c10d_functional.all_gather_into_tensor` (output returned), which gather_policy uses."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.count, self.bytes = 0, 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = str(func)
                if name.startswith("c10d._allgather_base_"):
                    full = args[0]
                elif name.startswith("_c10d_functional.all_gather_into_tensor"):
                    full = out
                elif "gather" in name and ("c10d" in name):
                    raise RuntimeError(f"an all-gather this benchmark does not count: {name}")
                else:
                    return out
                self.count += 1
                self.bytes += full.numel() * full.element_size()
                return out

        return Mode()


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _gather_blocks_for_decoding(policy) -> None:
    """What decode_step needs besides being registered, to run on the sharded policy (this
    benchmark only): each block's group (attention + feed-forward) is gathered before its first
    linear runs; the feed-forward layer's own FSDP post-forward hook frees it after."""
    from rlhf.models.fsdp import transformer_blocks

    for attention, _ in transformer_blocks(policy):
        attention.to_q.register_forward_pre_hook(lambda module, args, attention=attention: attention.unshard())


class _UnfusedQKV:
    """decode_cached reads each attention layer's q/k/v weights once per rollout into one
    stacked weight kept in the cache: from sharded parameters that cannot work, and it would
    keep every block's q/k/v gathered. Off while sampling sharded (the arithmetic is the same)."""

    def __enter__(self):
        import rlhf.models.xtransformers as xt

        self.saved = xt._stacked_qkv
        xt._stacked_qkv = lambda block: None

    def __exit__(self, *exc):
        import rlhf.models.xtransformers as xt

        xt._stacked_qkv = self.saved


def _attempt(policy, prompts, sampling, tok) -> str:
    """Whether sampling runs on the sharded policy; else the error (both processes fail at the
    same point, so they stay in step)."""
    from rlhf.sampling import generate

    try:
        generate(policy, prompts[:2], sampling, tok.eos_id, tok.pad_id, torch.Generator().manual_seed(0))
        return "works"
    except Exception as exc:  # noqa: BLE001 - the error is the finding
        if hasattr(policy._get_fsdp_state()._comm_ctx, "all_gather_state"):  # else FSDP never ran (not lazily initialised)
            policy.reset_iter_state()
        policy.reshard()
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0]}"


def _worker(rank: int, world: int, port: int, args: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datetime

    import torch.distributed as dist

    # a process that falls out of step (it stops decoding while the other all-gathers) fails here
    # rather than hanging the benchmark
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh

    from rlhf.models import ModelConfig, build_model
    from rlhf.models.fsdp import gather_policy, shard_policy, transformer_blocks
    from rlhf.rollout import rollout_generator, rollout_prompts
    from rlhf.sampling import SamplingConfig, encode_prompt, generate
    from rlhf.tasks import TaskConfig
    from rlhf.tasks.builtin import BuiltinTask

    repo = Path(__file__).resolve().parents[1]
    model_cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(repo / "conf" / "model" / f"{args['model']}.yaml")))
    task = BuiltinTask(TaskConfig())
    tok = task.tokenizer
    torch.manual_seed(0)

    def build():
        return build_model(model_cfg, tok.vocab_size)

    policy = build()
    num_params = sum(p.numel() for p in policy.parameters())
    shard_policy(policy, init_device_mesh("cpu", (world,)))
    sampling = SamplingConfig(max_new_tokens=args["new_tokens"], temperature=1.0, use_cache=True)

    def prompts_for(step: int) -> list[list[int]]:
        return [encode_prompt(tok, p) for p in rollout_prompts(task, 0, step, args["prompts"], rank, world)]

    def sample(model, step: int, prompts):
        return generate(model, prompts, sampling, tok.eos_id, tok.pad_id, rollout_generator(0, step, rank, "cpu"))

    from torch.distributed.fsdp import register_fsdp_forward_method

    probe = {"as_is": _attempt(policy, prompts_for(0), sampling, tok)}
    register_fsdp_forward_method(policy, "decode_step")
    probe["decode_step_registered"] = _attempt(policy, prompts_for(0), sampling, tok)
    _gather_blocks_for_decoding(policy)
    probe["and_blocks_gathered_by_hooks"] = _attempt(policy, prompts_for(0), sampling, tok)
    with _UnfusedQKV():
        probe["and_no_fused_qkv"] = _attempt(policy, prompts_for(0), sampling, tok)

    def gathered(step: int, prompts):
        dist.barrier()
        start = time.perf_counter()
        whole = gather_policy(policy, build)
        mid = time.perf_counter()
        gen = sample(whole, step, prompts)
        return gen, mid - start, time.perf_counter() - mid, whole

    def sharded(step: int, prompts):
        dist.barrier()
        start = time.perf_counter()
        with _UnfusedQKV():
            gen = sample(policy, step, prompts)
        policy.reshard()  # the root group stays gathered after a forward; free it as a sampler would
        return gen, time.perf_counter() - start

    # counting and memory: one untimed rollout of each (the dispatch mode slows every op)
    prompts = prompts_for(10**6)
    count = {}
    for name in ("gathered", "sharded"):
        dist.barrier()
        rss_before = _status_kib("VmRSS")
        _reset_peak_rss()
        with _AllGathers() as mode:
            if name == "gathered":
                gen, _, _, whole = gathered(10**6, prompts)
                whole_bytes = _nbytes(whole.state_dict().values())
                del whole
            else:
                gen = sharded(10**6, prompts)[0]
        count[name] = {
            "all_gathers": mode.count, "bytes_gathered": mode.bytes, "decoding_steps": gen.tokens.shape[1],
            "rss_before_mib": rss_before / 1024, "peak_rss_above_before_mib": (_status_kib("VmHWM") - rss_before) / 1024,
        }
    # the build inside gather_policy (a fresh model, its own random init) timed alone
    build_s = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            build()
        build_s.append(time.perf_counter() - start)

    local = [p.to_local() for p in policy.parameters()]
    blocks = [_nbytes(p for m in block for p in m.parameters()) for block in transformer_blocks(policy)]
    block_ids = {id(p) for block in transformer_blocks(policy) for m in block for p in m.parameters()}
    root_bytes = _nbytes(p for p in policy.parameters() if id(p) not in block_ids)

    timings = {"gather_s": [], "gathered_sample_s": [], "sharded_sample_s": []}
    identical, max_logprob_diff, lengths = [], 0.0, []
    for step in range(args["warmup"] + args["repeats"]):
        prompts = prompts_for(step)
        gen_a, gather_s, sample_s, whole = gathered(step, prompts)
        del whole
        gen_b, sharded_s = sharded(step, prompts)
        identical.append(bool(torch.equal(gen_a.tokens, gen_b.tokens) and torch.equal(gen_a.mask, gen_b.mask)))
        if identical[-1]:
            max_logprob_diff = max(max_logprob_diff, float((gen_a.logprobs - gen_b.logprobs).abs().max()))
        if step >= args["warmup"]:
            timings["gather_s"].append(gather_s)
            timings["gathered_sample_s"].append(sample_s)
            timings["sharded_sample_s"].append(sharded_s)
            lengths.append(float(gen_a.mask.sum(1).float().mean()))
    dist.barrier()
    out = {
        "rank": rank, "num_params": num_params, "probe": probe, "count": count, "timings": timings,
        "build_s": build_s, "identical_tokens": identical, "max_logprob_diff": max_logprob_diff,
        "mean_response_tokens": statistics.mean(lengths), "prompts_per_process": len(prompts),
        "whole_model_bytes": whole_bytes, "shard_bytes": _nbytes(local), "block_bytes": blocks, "root_bytes": root_bytes,
        "rss_end_mib": _status_kib("VmRSS") / 1024,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(ranks: list[dict]) -> dict:
    """Per rollout: the slower process's time, median over repeats; counts and bytes per process."""

    def per_rollout(key: str) -> list[float]:
        return [max(r["timings"][key][i] for r in ranks) for i in range(len(ranks[0]["timings"][key]))]

    gather, sample, sharded = per_rollout("gather_s"), per_rollout("gathered_sample_s"), per_rollout("sharded_sample_s")
    total = [g + s for g, s in zip(gather, sample)]
    r0 = ranks[0]
    steps = r0["count"]["sharded"]["decoding_steps"]
    sharded_gathers = r0["count"]["sharded"]["all_gathers"]
    med = statistics.median
    return {
        "gathered": {
            "gather_s": med(gather), "of_which_build_s": med(max(r["build_s"][i] for r in ranks) for i in range(len(r0["build_s"]))),
            "sample_s": med(sample), "rollout_s": med(total),
            "all_gathers_per_rollout": r0["count"]["gathered"]["all_gathers"],
            "bytes_gathered_per_rollout": r0["count"]["gathered"]["bytes_gathered"],
            "whole_model_bytes": r0["whole_model_bytes"],
            "peak_rss_above_start_mib": [r["count"]["gathered"]["peak_rss_above_before_mib"] for r in ranks],
        },
        "sharded": {
            "rollout_s": med(sharded),
            "all_gathers_per_rollout": sharded_gathers,
            "decoding_steps": steps,
            "all_gathers_per_decoding_step": (sharded_gathers - 1) / steps,  # every block each step; the root once
            "bytes_gathered_per_rollout": r0["count"]["sharded"]["bytes_gathered"],
            "bytes_gathered_per_decoding_step": sum(r0["block_bytes"]),
            "most_gathered_at_once_bytes": r0["root_bytes"] + max(r0["block_bytes"]),
            "peak_rss_above_start_mib": [r["count"]["sharded"]["peak_rss_above_before_mib"] for r in ranks],
        },
        "sharded_over_gathered_rollout_s": med(sharded) / med(total),
        "sharded_bytes_over_gathered_bytes": r0["count"]["sharded"]["bytes_gathered"] / r0["count"]["gathered"]["bytes_gathered"],
        "identical_tokens_every_rollout": all(all(r["identical_tokens"]) for r in ranks),
        "max_logprob_diff": max(r["max_logprob_diff"] for r in ranks),
        "shard_bytes_per_process": r0["shard_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medium")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per rollout, over both processes")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="fsdp_generation")
    args = parser.parse_args()
    world = 2
    settings = {"model": args.model, "prompts": args.prompts, "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup}
    if args.quick:
        settings.update(model="tiny", prompts=16, new_tokens=8, repeats=1)

    import torch.multiprocessing as mp

    from benchmarks.common import machine, write_result

    torch.set_num_threads(1)  # as in each process (the machine facts read it)
    facts = machine()  # before the run: its load average is other processes', not this run's two
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, _free_port(), settings, tmp), nprocs=world)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    result = {
        "benchmark": "fsdp_generation",
        "command": " ".join(["python -m benchmarks.bench_fsdp_generation", *sys.argv[1:]]),
        **settings, "processes": world, "temperature": 1.0, "num_params": ranks[0]["num_params"],
        "prompts_per_process": ranks[0]["prompts_per_process"], "mean_response_tokens": ranks[0]["mean_response_tokens"],
        "machine": facts, "wall_s": time.perf_counter() - start,
        "probe_decode_step_on_sharded_policy": ranks[0]["probe"],
        "summary": summarize(ranks), "ranks": ranks,
    }
    if args.quick:
        print(json.dumps(result, indent=2))
    else:
        print("wrote", write_result(args.out, result))


if __name__ == "__main__":
    main()
