"""The x-transformers backend: a decoder-only LM behind the one small interface every stage uses.

`CausalLM` (and the Hugging Face backend's `rlhf.models.hf.HFCausalLM`) exposes:
  forward(tokens) -> logits (B, T, V)
  forward_hidden(tokens) -> (logits, hidden (B, T, D))   for value heads on the policy's trunk
  hidden(tokens) -> hidden (B, T, D)                      for reward models and separate critics
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

from rlhf.models.config import ModelConfig


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
        self.decode_fn = decode_cached
        if cfg.compile:
            check_can_compile()
            self.net.compile(dynamic=True)  # in place: the state dict keeps its keys
            self.decode_fn = compiled_decode()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def forward_hidden(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, hidden = self.net(tokens, return_logits_and_embeddings=True)
        return logits, hidden

    def forward_packed(self, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Logits for rows holding several sequences: rotary `positions` (B, T) and `allowed`
        (B, 1, T, T), which keys each query may see on top of the causal mask (preference
        pairs share their prompt this way: rlhf.preference_batch.pack_pairs)."""
        return self.net(tokens, pos=positions, attn_mask=allowed)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, T, D) without the LM head: reward models and critics need no logits."""
        return self.net(tokens, return_embeddings=True)

    def decode_step(self, tokens: torch.Tensor, cache=None, seq_start_pos: Optional[torch.Tensor] = None):
        """Logits for the next token after `tokens` (left-padded; real tokens start at seq_start_pos).

        With a cache from the previous call only the tokens after the cached ones (usually
        the last one) are run through the network. This is a lean re-statement of the
        x-transformers decoder's forward for this configuration (pre-norm LayerNorm, rotary
        attention, GELU feed-forward), calling the model's own submodules (so LoRA layers
        work): x-transformers' general cached path costs ~3x more Python per token, which
        dominates small-batch sampling. tests/test_sampling.py holds it to the full forward.
        """
        if self.training and self.net.emb_dropout.p > 0:  # dropout: the library's own path
            logits, cache = self.net(tokens, cache=cache, seq_start_pos=seq_start_pos, return_intermediates=True)
            return logits[:, -1], cache
        return self.decode_fn(self.net, tokens, cache, seq_start_pos)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.net.token_emb.emb.weight.numel()
        return n


def check_can_compile() -> None:
    """torch.compile's CPU code generator needs a C++ compiler: say so before anything trains."""
    import shutil

    from rlhf.errors import ConfigError

    if not torch.cuda.is_available() and not (shutil.which("g++") or shutil.which("c++")):
        raise ConfigError("model.compile=true needs a C++ compiler (g++) on the PATH for torch.compile on CPU")


_COMPILED_DECODE = None


def compiled_decode():
    """decode_cached under torch.compile, built once per process: every model shares its graphs
    (shapes are dynamic, so batch sizes and cache lengths do not recompile)."""
    global _COMPILED_DECODE
    if _COMPILED_DECODE is None:
        _COMPILED_DECODE = torch.compile(decode_cached, dynamic=True)
    return _COMPILED_DECODE


CACHE_HEADROOM = 64  # positions a new cache reserves past the prompt; it doubles when they run out


@dataclass
class DecodeCache:
    """Per attention layer: keys (rotated) and values in preallocated (B, heads, capacity,
    dim_head) buffers, the first `length` positions filled; and, when the layer's q/k/v are
    plain linears (no LoRA), their weights stacked for one matmul instead of three (the
    weights do not change while sampling)."""

    keys: list
    values: list
    length: int
    qkv_weights: list

    def reserve(self, total: int) -> None:
        """Make room for `total` positions (growing is rare: the buffers start with headroom)."""
        capacity = self.keys[0].shape[2]
        if total <= capacity:
            return
        grown = max(total, 2 * capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(*old.shape[:2], grown, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                buffers[i] = new


def _stacked_qkv(block) -> Optional[torch.Tensor]:
    linears = (block.to_q, block.to_k, block.to_v)
    if all(type(m) is nn.Linear and m.bias is None for m in linears):
        return torch.cat([m.weight for m in linears])
    return None  # LoRA-wrapped (or biased) projections: called one by one


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x-transformers' apply_rotary_pos_emb (partial, interleaved pairs) with cos/sin computed
    once per step and its einops rotate_half as views: the same arithmetic, less Python."""
    rot_dim = cos.shape[-1]
    rotated, rest = t[..., :rot_dim], t[..., rot_dim:]
    even, odd = rotated.unflatten(-1, (-1, 2)).unbind(-1)
    half_turned = torch.stack((-odd, even), dim=-1).flatten(-2)
    return torch.cat((rotated * cos + half_turned * sin, rest), dim=-1)


def decode_cached(net, tokens: torch.Tensor, cache: Optional[DecodeCache], seq_start_pos: Optional[torch.Tensor]):
    """(logits of the last position, cache) for an x-transformers TransformerWrapper built by CausalLM.

    The cache is updated in place and returned: only the latest cache of a sequence is valid."""
    layers = net.attn_layers
    past = cache.length if cache is not None else 0
    new = tokens[:, past:]
    batch, n, total = new.shape[0], new.shape[1], tokens.shape[1]
    x = net.project_emb(net.emb_dropout(net.post_emb_norm(net.token_emb(new))))
    freqs, _ = layers.rotary_pos_emb(torch.arange(past, total, device=tokens.device))
    cos, sin = freqs.cos(), freqs.sin()  # (1, n, rot_dim), once for every layer
    # keys a query may see: not left padding, and not in its future; a position always sees
    # itself, so a padding row never attends to nothing (its output is unused either way)
    key_pos = torch.arange(total, device=tokens.device)
    query_pos = torch.arange(past, total, device=tokens.device)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]  # (1, 1, n, total)
    if seq_start_pos is not None:
        allowed = allowed & (key_pos[None, None, None, :] >= seq_start_pos[:, None, None, None])
        allowed = allowed | (key_pos[None, :] == query_pos[:, None])[None, None]
    if cache is None:
        attention = [block for (_, block, _), kind in zip(layers.layers, layers.layer_types) if kind == "a"]
        shape = (batch, attention[0].heads, total + CACHE_HEADROOM, attention[0].to_k.out_features // attention[0].heads)
        cache = DecodeCache(
            keys=[x.new_empty(shape) for _ in attention], values=[x.new_empty(shape) for _ in attention],
            length=0, qkv_weights=[_stacked_qkv(block) for block in attention],
        )
    cache.reserve(total)
    attn_index = 0
    for (norms, block, residual), kind in zip(layers.layers, layers.layer_types):
        y = norms[0](x)
        if kind == "a":
            fused = cache.qkv_weights[attn_index]
            projected = torch.nn.functional.linear(y, fused).chunk(3, dim=-1) if fused is not None else (block.to_q(y), block.to_k(y), block.to_v(y))
            q, k, v = (t.view(batch, n, block.heads, -1).transpose(1, 2) for t in projected)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys, values = cache.keys[attn_index], cache.values[attn_index]
            keys[:, :, past:total] = k
            values[:, :, past:total] = v
            out = torch.nn.functional.scaled_dot_product_attention(q, keys[:, :, :total], values[:, :, :total], attn_mask=allowed)
            y = block.to_out(out.transpose(1, 2).reshape(batch, n, -1))
            attn_index += 1
        else:
            y = block(y)
        x = residual(y, x)
    cache.length = total
    logits = net.to_logits(layers.final_norm(x[:, -1]))
    return logits, cache
