"""Sharded training: `trainer.strategy=fsdp` (trainer=fsdp_cpu, trainer=fsdp), issue #16.

The policy is sharded with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) through
Lightning's `ModelParallelStrategy`: Lightning's own `FSDPStrategy` (FSDP1) refuses a CPU
accelerator, so it could not be tested here. Every process holds 1/world of each parameter,
gradient and optimizer state. Each transformer block (its attention and feed-forward layers)
is one sharding group, all-gathered just before it runs and freed after; the embedding,
output head and the norms outside the blocks form the root group.

Every stage kind runs sharded: pretraining, SFT, EFT, the reward model (its trunk's blocks;
the rest, with its head, in the root group; gathered whole at the end like a policy), offline
DPO, KTO (its reference, like DPO's, whole), SPIN, self-rewarding and external-reward DPO, GRPO/RLOO and PPO (its value head a
sharding group of its own, a separate critic sharded like the policy). Every process starts
from rank 0's weights, broadcast before sharding as DDP does (a fresh reward head is drawn
from each process's own random state). DPO's frozen reference is not sharded: with
`precompute_reference` (the default) each process runs it whole once over its own pairs before
the first step and frees it; DPO's held-out evaluations during the stage are skipped (they
sample on rank 0 alone, and a sharded policy needs every rank), the end-of-stage one runs.
SPIN's opponent (the stage's starting weights, frozen) stays whole and samples as under DDP;
its round-start evaluations are skipped the same way. External-reward and self-rewarding DPO
sample (and judge) each round, EFT its answers, GRPO each rollout, with the policy's whole
weights, gathered once per round or rollout on every process (`gather_policy`); evaluations
during a stage are skipped when sharded, and self-rewarding DPO's end-of-stage judge
measurement gathers the weights first. PPO samples like GRPO.

Checkpoints within a stage are PyTorch distributed checkpoints written by Lightning's strategy
(a directory, each process its own shards; rlhf.training.ResumableCheckpoint swaps it in), so
`resume=DIR` continues a sharded stage exactly.

LoRA and last-N-layer training shard like the rest: FSDP2 shards parameter by parameter, so a
block's frozen base weights and its trainable adapters share one group; the gathered whole
model is built LoRA-shaped (`StageContext.new_policy`) and the adapters are merged (or dropped)
at the stage's end as under DDP.

What this does NOT do yet, and refuses at config time in one line (`check_config`): `model.compile`.
SFT's length buckets (rlhf.training.bucketed_response_nll) are off when sharded: every process
must run as many forward passes, since each all-gathers the blocks' weights.
At the end of a stage every process gathers the whole weights once (`gather_policy`) into a
fresh, unsharded model, so evaluation, `policy.safetensors` and the next stage see exactly what
they see after a one-process run. The model is built whole on every process before it is
sharded, so this saves training memory (gradients, optimizer state, activations of gathered
blocks), not the memory to build the model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from rlhf.errors import ConfigError

STRATEGY = "fsdp"
SUPPORTED_STAGE_KINDS = ("pretrain", "sft", "dpo", "reward_model", "spin", "external_reward_dpo", "grpo", "self_reward_dpo", "eft", "ppo", "kto")


def is_fsdp(trainer_cfg) -> bool:
    return str(trainer_cfg.strategy).lower() == STRATEGY


def check_config(trainer_cfg, model_cfg, order, stage_cfgs: dict) -> None:
    """What this slice cannot shard fails before anything trains, in one line."""
    if not is_fsdp(trainer_cfg):
        if trainer_cfg.fsdp_cpu_offload:
            raise ConfigError(f"trainer.fsdp_cpu_offload=true needs trainer.strategy=fsdp (trainer=fsdp or trainer=fsdp_cpu), got strategy={trainer_cfg.strategy!r}")
        return
    if str(trainer_cfg.accelerator).lower() not in ("cpu", "gpu", "cuda"):
        raise ConfigError(f"trainer.strategy=fsdp needs trainer.accelerator=cpu or gpu, got {trainer_cfg.accelerator!r} (use trainer=fsdp_cpu or trainer=fsdp)")
    for slot in order:
        stage = stage_cfgs[slot]
        if stage.kind not in SUPPORTED_STAGE_KINDS:
            raise ConfigError(f"stages.{slot}: stage kind {stage.kind!r} cannot run under trainer.strategy=fsdp yet (only {', '.join(SUPPORTED_STAGE_KINDS)}); use trainer=ddp_cpu or trainer=gpu")
    if model_cfg.backend == "xtransformers" and model_cfg.compile:
        raise ConfigError("model.compile=true cannot run under trainer.strategy=fsdp yet")


def make_strategy(trainer_cfg):
    """Lightning's ModelParallelStrategy with every process on the data-parallel (sharding) axis
    of its device mesh and no tensor parallelism."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
    from lightning.pytorch.strategies import ModelParallelStrategy

    accelerator = CPUAccelerator if str(trainer_cfg.accelerator).lower() == "cpu" else CUDAAccelerator
    devices = accelerator.parse_devices(trainer_cfg.devices)
    per_node = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    strategy = ModelParallelStrategy(data_parallel_size=per_node * trainer_cfg.num_nodes, tensor_parallel_size=1)
    strategy.cpu_offload = bool(trainer_cfg.fsdp_cpu_offload)  # read by shard_in
    return strategy


def transformer_blocks(policy: nn.Module) -> list[list[nn.Module]]:
    """The policy's transformer blocks, each as the modules its forward calls (one sharding group).

    x-transformers: `Decoder.layers` holds one (norms, layer, residual) ModuleList per attention
    or feed-forward layer; the decoder calls their members, never the ModuleList, so the group
    is a block's [attention, feed-forward] (its pre-norms stay in the root group).
    Hugging Face: the modules of the classes the model names in `_no_split_modules` (its
    decoder layers)."""
    from x_transformers import TransformerWrapper

    nets = [m for m in policy.modules() if isinstance(m, TransformerWrapper)]
    if nets:
        layers = nets[0].attn_layers
        types, blocks = list(layers.layer_types), []
        for i, kind in enumerate(types):
            if kind == "a":
                blocks.append([])
            if blocks:
                blocks[-1].append(layers.layers[i][1])
        return blocks
    # the Hugging Face model's own `_no_split_modules` (on the policy, or on a reward model's trunk)
    names = next((set(m._no_split_modules) for m in policy.modules() if getattr(m, "_no_split_modules", None)), set())
    blocks = [[m] for m in policy.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"trainer.strategy=fsdp: found no transformer blocks to shard in {type(policy).__name__}")
    return blocks


def shard_in(module, *models: nn.Module, whole_group: bool = False) -> None:
    """A stage module's `configure_model`: under trainer.strategy=fsdp (Lightning's
    ModelParallelStrategy gives the module a device mesh) shard each of `models` per transformer
    block on it (`whole_group`: as one sharding group, for a small part such as a value head);
    under any other strategy nothing."""
    if module.device_mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    mesh, offload = module.device_mesh["data_parallel"], getattr(module.trainer.strategy, "cpu_offload", False)
    for model in models:
        if whole_group:
            fully_shard(model, mesh=mesh, offload_policy=offload_policy(offload))
        else:
            shard_policy(model, mesh, offload)


def offload_policy(cpu_offload: bool):
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    # pinned host memory needs CUDA; on a CPU-only machine the offload is a no-op anyway
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()


def shard_policy(policy: nn.Module, mesh, cpu_offload: bool = False) -> None:
    """fully_shard each transformer block, then the policy itself (in place; a no-op the second
    time). `cpu_offload`: the shards (and so gradients and optimizer state) live in CPU memory."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(policy, FSDPModule):
        return
    # every rank starts from rank 0's weights, as DDP does: a freshly initialised part (a reward
    # head) is drawn from each process's own random state, and fully_shard does not broadcast
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        for tensor in policy.state_dict().values():
            torch.distributed.broadcast(tensor, src=0, group=mesh.get_group())
    offload = offload_policy(cpu_offload)
    for block in transformer_blocks(policy):
        fully_shard(block, mesh=mesh, offload_policy=offload)
    fully_shard(policy, mesh=mesh, offload_policy=offload)
    from torch.distributed.fsdp import register_fsdp_forward_method

    # entry points other than forward gather the root group too: DPO's shared-prompt rows, a
    # reward model's head logits (rating bins), PPO's logits with the trunk's hidden states and a
    # separate critic's hidden states
    for method in ("forward_packed", "logits", "forward_hidden", "hidden"):
        if hasattr(policy, method):
            register_fsdp_forward_method(policy, method)


def gather_policy(policy: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A fresh unsharded model (from `build()`) holding the sharded policy's whole weights, on
    every process (a collective: every rank calls it). Returns `policy` itself if it is not sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(policy, FSDPModule):
        return policy
    state: dict[str, Any] = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    device = next(iter(state.values())).device
    with torch.random.fork_rng(devices=[]):  # the fresh model's initial draws must not move the run's random state
        whole = build().to(device)
    whole.load_state_dict(state)
    return whole
