"""Which parameters a stage trains: all of them, only the last N transformer blocks, or LoRA adapters.

`prepare_trainable` and `finish_trainable` are the one place where a stage's `lora` and
`train_last_n_layers` settings take effect: the orchestrator calls the first on the
incoming policy before `run(ctx)` and the second on the returned policy, so every stage
kind gets both without code of its own. The optimizer (rlhf/training.py) already skips
parameters with requires_grad False.

`train_last_n_layers(model, n)` freezes everything except:
  - the last n transformer blocks (a block = one attention layer and the feed-forward
    layer after it; x-transformers keeps them as alternating entries of
    `attn_layers.layers`, types 'a', 'f'),
  - the final norm and the output head (`to_logits`; with tied embeddings the head IS the
    token embedding, which then trains too),
  - any parameter outside the transformer (a value or reward head beside the trunk),
which is PaLM-rlhf's "fine-tune only the last N layers". The token embedding stays frozen
even when n covers every block. Inside the trained part, parameters keep the flag they
have: on a plain model they train; on a LoRA model only the adapters in those blocks do
(LoRA on the last N layers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from rlhf.errors import ConfigError
from rlhf.files import atomic_path
from rlhf.models.lora import adapter_state_dict, apply_lora, has_lora, merge_lora, remove_lora


def _find_transformer(model: nn.Module) -> nn.Module:
    from x_transformers import TransformerWrapper

    for module in model.modules():
        if isinstance(module, TransformerWrapper):
            return module
    raise ConfigError(f"train_last_n_layers: no x-transformers TransformerWrapper in {type(model).__name__}; only the x-transformers backend supports it")


def block_starts(layer_types: tuple[str, ...]) -> list[int]:
    """Indices in attn_layers.layers where each transformer block begins (at its self-attention)."""
    return [i for i, t in enumerate(layer_types) if t == "a"]


def train_last_n_layers(model: nn.Module, n: int) -> nn.Module:
    """Freeze everything but the last n blocks, final norm, output head and non-transformer params (in place)."""
    if n < 0:
        raise ConfigError(f"train_last_n_layers must be >= 0, got {n}")
    net = _find_transformer(model)
    layers = net.attn_layers
    starts = block_starts(tuple(layers.layer_types))
    first_trained = len(layers.layers) if n == 0 else starts[max(0, len(starts) - n)]
    kept: set[int] = set()
    for layer in list(layers.layers)[first_trained:]:
        kept.update(id(p) for p in layer.parameters())
    for module in (layers.final_norm, net.to_logits if net.to_logits is not None else net.token_emb):
        if module is not None:
            kept.update(id(p) for p in module.parameters())
    in_transformer = {id(p) for p in net.parameters()}
    for p in model.parameters():
        if id(p) in in_transformer and id(p) not in kept:
            p.requires_grad_(False)
    return model


def prepare_trainable(policy: nn.Module, stage_cfg) -> nn.Module:
    """Apply the stage's LoRA and last-N settings to the incoming policy (before run(ctx))."""
    policy.requires_grad_(True)  # an earlier stage may have frozen part of the same object
    lora_cfg = getattr(stage_cfg, "lora", None)
    if lora_cfg is not None and lora_cfg.enabled:
        policy = apply_lora(policy, lora_cfg)
    n: Optional[int] = getattr(stage_cfg, "train_last_n_layers", None)
    if n is not None:
        train_last_n_layers(policy, n)
    return policy


def finish_trainable(policy: nn.Module, stage_cfg, stage_dir: Path, is_global_zero: bool) -> nn.Module:
    """After run(ctx): merge (or save and drop) LoRA adapters so later stages get a plain model."""
    lora_cfg = getattr(stage_cfg, "lora", None)
    if lora_cfg is not None and lora_cfg.enabled:
        from safetensors.torch import save_file

        if has_lora(policy):
            if is_global_zero:
                state = {k: v.contiguous() for k, v in adapter_state_dict(policy).items()}
                with atomic_path(Path(stage_dir) / "lora_adapter.safetensors") as tmp:
                    save_file(state, str(tmp))
            policy = merge_lora(policy) if lora_cfg.merge_at_end else remove_lora(policy)
    policy.requires_grad_(True)
    return policy
