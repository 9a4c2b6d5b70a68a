"""Per-token and per-sequence log-probs: the one place where shifting and masking happen.

Convention for every stage: `tokens` (B, T) holds prompt + response, right-padded;
`response_mask` (B, T) is 1 on response tokens (including the closing EOS) and 0 on
the prompt and padding. Logits at position t predict token t + 1, so the log-prob of
token t comes from logits[:, t - 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits, without materialising a second (B, T, V) tensor."""
    return -F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")


def response_logprobs(logits: torch.Tensor, tokens: torch.Tensor, response_mask: torch.Tensor):
    """Shifted per-token log-probs of the response.

    Returns (logprobs, mask), both (B, T - 1): entry t is log p(tokens[:, t + 1]); logprobs
    are 0 wherever mask is 0.
    """
    mask = response_mask[:, 1:].to(logits.dtype if logits.is_floating_point() else torch.float32)
    logprobs = token_logprobs(logits[:, :-1], tokens[:, 1:]) * mask
    return logprobs, mask


def sequence_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, response_mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Sum (or, with average=True, the per-token mean) of response log-probs: shape (B,)."""
    logprobs, mask = response_logprobs(logits, tokens, response_mask)
    total = logprobs.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def response_nll(logits: torch.Tensor, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over all response tokens of the batch (the SFT loss)."""
    logprobs, mask = response_logprobs(logits, tokens, response_mask)
    return -logprobs.sum() / mask.sum().clamp(min=1)
