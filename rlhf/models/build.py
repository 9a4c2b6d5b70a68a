"""Building a policy from its config, on either backend, and frozen copies of one."""

from __future__ import annotations

from torch import nn

from rlhf.errors import ConfigError
from rlhf.models.config import ModelConfig
from rlhf.models.hf import load_hf_model
from rlhf.models.lora import base_state_dict
from rlhf.models.xtransformers import CausalLM


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    if cfg.backend == "xtransformers":
        if getattr(cfg, "attn_implementation", None) is not None:
            raise ConfigError("model.attn_implementation is for the Hugging Face backend (model.backend=hf)")
        return CausalLM(cfg, vocab_size)
    if cfg.compile:
        raise ConfigError("model.compile=true is for the x-transformers backend (model.backend=xtransformers)")
    if cfg.backend == "hf":
        return load_hf_model(cfg)  # transformers itself is imported only here (the `hf` extra)
    raise ConfigError(f"model.backend={cfg.backend!r} is not one of: xtransformers, hf")


def frozen_copy(model: nn.Module, cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """A reference model: built fresh and loaded, never deep-copied.

    deepcopy of a model with tied embeddings can leave the copy reading the policy's live
    weights; a fresh build shares nothing. A LoRA-injected policy gives its base weights
    (fresh adapters are zero).
    """
    ref = build_model(cfg, vocab_size)
    ref.load_state_dict(base_state_dict(model))
    ref.requires_grad_(False)
    return ref.eval()
