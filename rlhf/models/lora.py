"""LoRA for any stage, through `peft`, on the x-transformers policy (or any nn.Module).

We use peft's `inject_adapter_in_model`, which swaps the targeted nn.Linear layers for
LoRA layers *inside* the model object, rather than `get_peft_model`, which wraps the
model in a PeftModel: the stages call `forward_hidden`, `decode_step`, `hidden_size`
on the policy, and those stay exactly where they were. Only adapters train (peft marks
every other parameter of the model frozen); heads a stage adds itself (a value head)
are separate modules and train as usual.

x-transformers names (2.31): attention `...layers.N.1.to_q|to_k|to_v|to_out`, feed-forward
`...layers.N.1.ff.0.0` (in) and `...ff.2` (out). peft matches each pattern in `target`
against the END of a module name ("to_q" matches "net.attn_layers.layers.0.1.to_q").
The output head `to_logits` and the embedding are not adapted by default.

Turning adapters off (`disabled_adapters`) gives back the exact starting model, which is
the PPO/GRPO reference at the cost of one extra forward pass, with no second copy of the
weights. `merge_lora` folds the adapters into the base weights and removes the LoRA
layers, leaving a plain model whose state dict loads into a model built without LoRA.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from rlhf.errors import ConfigError

ADAPTER_NAME = "default"


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 8
    alpha: int = 16  # scaling = alpha / rank
    dropout: float = 0.0
    # module-name suffixes of the linears to adapt: attention q/k/v/out and both feed-forward linears
    target: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out", "ff.0.0", "ff.2"])
    # fold adapters into the weights when the stage ends (later stages see a plain model);
    # False writes the adapter alone to <stage dir>/lora_adapter.safetensors and hands the
    # stage's STARTING weights on (to train adapters you ship separately)
    merge_at_end: bool = True


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    try:
        return bool(_lora_layers(model))
    except ImportError:
        return False


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject LoRA adapters into `model` in place (and return it); only adapters are left trainable."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("lora.enabled=true needs peft: pip install 'rlhf[lora]'") from None
    if cfg.rank <= 0:
        raise ConfigError(f"lora.rank must be > 0, got {cfg.rank}")
    target = list(cfg.target)
    # a Hugging Face model (rlhf.models.hf.HFCausalLM) names its layers its own way: the
    # x-transformers default becomes every linear layer of its blocks (q_proj..., c_attn...)
    if hasattr(model, "lora_targets") and target == LoRAConfig().target:
        target = model.lora_targets()
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target, bias="none")
    try:
        model = inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"lora.target={target}: {str(err).splitlines()[0]}") from None
    return model


@contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base weights: every LoRA layer bypassed inside the block, restored after."""
    layers = _lora_layers(model)
    was_disabled = [layer.disable_adapters for layer in layers]
    # peft's enable_adapters() also flips requires_grad on adapter weights; put back exactly what was there
    trainable = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for p, flag in trainable.items():
            p.requires_grad_(flag)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone (names as in the model's state dict)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def _replace_with_base(model: nn.Module, merge: bool) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        if merge:
            module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and remove the LoRA layers (in place; returns the model)."""
    return _replace_with_base(model, merge=True)


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop the adapters without merging: back to the base weights (in place; returns the model)."""
    return _replace_with_base(model, merge=False)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a LoRA-injected model under the names a plain model uses."""
    state = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v
    return state
