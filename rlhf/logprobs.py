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


def shared_prompt_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, prompt_last: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (chosen (B,), rejected (B,)) of rows packed as prompt | chosen | rejected.

    The shift is the usual one (logits at t predict token t + 1) except for the first rejected
    token, which follows the prompt, not the chosen response: its logits are the prompt's last
    position's (`prompt_last`, (B,)). The model must have been run so that rejected tokens see
    the prompt but not the chosen tokens (rlhf.preference_batch.pack_pairs).
    """
    logprobs = token_logprobs(logits[:, :-1], tokens[:, 1:])  # entry t - 1: log p(token t)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    first_rejected = rejected_mask.long().argmax(dim=1)  # packed index of each row's first rejected token
    after_prompt = token_logprobs(logits[rows, prompt_last][:, None, :], tokens[rows, first_rejected][:, None])[:, 0]
    is_first = torch.arange(logprobs.shape[1], device=tokens.device)[None, :] == (first_rejected - 1)[:, None]
    logprobs = torch.where(is_first, after_prompt[:, None], logprobs)
    chosen = (logprobs * chosen_mask[:, 1:].to(logprobs.dtype)).sum(-1)
    rejected = (logprobs * rejected_mask[:, 1:].to(logprobs.dtype)).sum(-1)
    return chosen, rejected
