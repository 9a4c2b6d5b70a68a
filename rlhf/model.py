"""The policy: a decoder-only LM behind one small interface that every stage uses.

`CausalLM` (x-transformers backend) exposes:
  forward(tokens) -> logits (B, T, V)
  forward_hidden(tokens) -> (logits, hidden (B, T, D))   for value and reward heads
  decode_step(tokens, cache, seq_start_pos) -> (last logits (B, V), cache)   for sampling
  hidden_size, vocab_size, max_seq_len
Stages never branch on the backend; they only call these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from x_transformers import Decoder, TransformerWrapper


@dataclass
class ModelConfig:
    backend: str = "xtransformers"
    dim: int = 192
    depth: int = 3
    heads: int = 4
    ff_mult: int = 4
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embedding: bool = False
    # Hugging Face backend: a local checkpoint folder (no hub downloads).
    path: Optional[str] = None


class CausalLM(nn.Module):
    """x-transformers decoder with rotary positions (cached decoding works past max_seq_len)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = cfg.dim
        self.max_seq_len = cfg.max_seq_len
        self.net = TransformerWrapper(
            num_tokens=vocab_size,
            max_seq_len=cfg.max_seq_len,
            use_abs_pos_emb=False,
            tie_embedding=cfg.tie_embedding,
            emb_dropout=cfg.dropout,
            attn_layers=Decoder(
                dim=cfg.dim,
                depth=cfg.depth,
                heads=cfg.heads,
                ff_mult=cfg.ff_mult,
                rotary_pos_emb=True,
                attn_flash=True,
                attn_dropout=cfg.dropout,
                ff_dropout=cfg.dropout,
            ),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def forward_hidden(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, hidden = self.net(tokens, return_logits_and_embeddings=True)
        return logits, hidden

    def decode_step(self, tokens: torch.Tensor, cache=None, seq_start_pos: Optional[torch.Tensor] = None):
        """Logits for the next token after `tokens` (left-padded; real tokens start at seq_start_pos).

        With a cache from the previous call only the last token is run through the network.
        """
        logits, cache = self.net(tokens, cache=cache, seq_start_pos=seq_start_pos, return_intermediates=True)
        return logits[:, -1], cache

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.net.token_emb.emb.weight.numel()
        return n


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    if cfg.backend == "xtransformers":
        return CausalLM(cfg, vocab_size)
    if cfg.backend == "hf":
        from rlhf.hf_backend import load_hf_model  # optional extra

        return load_hf_model(cfg)
    from rlhf.errors import ConfigError

    raise ConfigError(f"model.backend={cfg.backend!r} is not one of: xtransformers, hf")


def frozen_copy(model: nn.Module, cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """A reference model: built fresh and loaded, never deep-copied.

    deepcopy of a model with tied embeddings can leave the copy reading the policy's live
    weights; a fresh build shares nothing.
    """
    from rlhf.lora import base_state_dict  # a LoRA-injected policy: its base weights (fresh adapters are zero)

    ref = build_model(cfg, vocab_size)
    ref.load_state_dict(base_state_dict(model))
    ref.requires_grad_(False)
    return ref.eval()
