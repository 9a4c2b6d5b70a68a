"""Shared by the preference stages (dpo, external_reward_dpo): pairs -> one batch -> log-probs -> loss.

A batch of B pairs is ONE (2B, T) tensor: the B chosen sequences first, then the B
rejected ones, right-padded, so a single forward pass gives both sides. Per-sequence
log-probs come from `rlhf.logprobs.sequence_logprobs` (summed); length-averaged values
are those sums divided by the response length, the same quantity `average=True` gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from rlhf.data.examples import PreferencePair
from rlhf.data.token_store import TokenStore, encode_texts, store_rows
from rlhf.errors import ConfigError
from rlhf.logprobs import sequence_logprobs, shared_prompt_logprobs
from rlhf.losses.preference import DPO_LOSS_TYPES, chosen_nll, dpo_loss, preference_accuracy, rrhf_ranking_loss, simpo_loss
from rlhf.sampling import join_prompt_response, open_prompt, truncate_to_fit

LOSS_TYPES = (*DPO_LOSS_TYPES, "simpo", "rrhf")
REFERENCE_FREE = ("simpo", "rrhf")


@dataclass
class PreferenceLossConfig:
    """The loss fields both preference stages share (their Config mixes this in)."""

    loss: str = "sigmoid"  # sigmoid (DPO) | robust | ipo | hinge | simpo | rrhf
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO (sigmoid) or the label-flip rate (robust)
    simpo_gamma: float = 0.5  # SimPO's target margin
    # RPO-style NLL on the chosen response, per token. Plain DPO lowers the chosen
    # response's log-prob too and collapses on small models (docs/results_dpo.md).
    nll_weight: float = 0.2
    # True: per-token averages of the response log-probs; False: their sums (DPO's definition).
    # None (default): averages for ipo (as TRL and the IPO authors' advice: the squared target
    # 1/(2 beta) is on the scale of one token), sums for the other DPO losses. simpo and rrhf
    # always use averages (their definition).
    average_logprobs: Optional[bool] = None


def check_loss_config(cfg: PreferenceLossConfig, slot: str) -> None:
    if cfg.loss not in LOSS_TYPES:
        raise ConfigError(f"stages.{slot}.loss={cfg.loss!r} is not one of: {', '.join(LOSS_TYPES)}")
    if cfg.beta <= 0:
        raise ConfigError(f"stages.{slot}.beta must be > 0, got {cfg.beta}")
    if cfg.label_smoothing and cfg.loss not in ("sigmoid", "robust"):
        raise ConfigError(f"stages.{slot}.label_smoothing is used by loss=sigmoid or robust only, not {cfg.loss!r}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"stages.{slot}.label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.nll_weight < 0:
        raise ConfigError(f"stages.{slot}.nll_weight must be >= 0, got {cfg.nll_weight}")


def uses_average_logprobs(cfg: PreferenceLossConfig) -> bool:
    """Whether the DPO-style losses see per-token averages of the response log-probs."""
    return cfg.loss == "ipo" if cfg.average_logprobs is None else cfg.average_logprobs


def needs_reference(cfg: PreferenceLossConfig) -> bool:
    return cfg.loss not in REFERENCE_FREE


def starting_reference(ctx):
    """A frozen copy of the stage's starting weights (`rlhf.models.frozen_copy`). With LoRA
    adapters injected into the policy it copies the base weights: fresh adapters are zero,
    so the function is the same, and the copy is a plain model."""
    from rlhf.models import base_state_dict, frozen_copy

    lora = getattr(ctx.cfg, "lora", None)
    if lora is not None and lora.enabled:
        ref = ctx.new_model()
        ref.load_state_dict(base_state_dict(ctx.policy))
        return ref.requires_grad_(False).eval()
    return frozen_copy(ctx.policy, ctx.run_cfg.model, ctx.tokenizer.vocab_size)


@dataclass(frozen=True)
class EncodedPair:
    prompt: list[int]
    chosen: list[int]  # ends with EOS unless cut off at the token limit
    rejected: list[int]  # ends with EOS unless cut off at the token limit


def encode_pair(pair: PreferencePair, tokenizer, max_length: int) -> EncodedPair:
    """Token ids of a pair; finished responses get the EOS (as in SFT), generations cut off at
    the token limit (`*_finished` False) do not. Too long: rlhf.sampling.truncate_to_fit, the
    rule every stage shares (the prompt keeps its end, each response its start)."""
    return fit_pair(pair_ids(pair, tokenizer, [tokenizer.encode(t) for t in (pair.prompt, pair.chosen, pair.rejected)]), max_length)


def pair_ids(pair: PreferencePair, tokenizer, ids: Sequence[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """A pair's (prompt, chosen, rejected) ids before truncation, from `ids`, the plain ids of
    its three texts (`tokenizer.encode`): the prompt opened if empty (encode_prompt), each
    finished response closed by EOS."""
    prompt, chosen, rejected = ids
    eos = [tokenizer.eos_id]
    return open_prompt(tokenizer, prompt), chosen + eos * pair.chosen_finished, rejected + eos * pair.rejected_finished


def fit_pair(ids: Sequence[list[int]], max_length: int) -> EncodedPair:
    """The EncodedPair of `pair_ids`' (prompt, chosen, rejected), cut by truncate_to_fit."""
    prompt, (chosen, rejected), _ = truncate_to_fit(ids[0], [ids[1], ids[2]], max_length)
    return EncodedPair(prompt, chosen, rejected)


def pair_store(pairs: Iterable[PreferencePair], tokenizer) -> TokenStore:
    """Every pair's `pair_ids` (an iterable, consumed once) in a `rlhf.data.token_store.TokenStore`
    of rows (prompt, chosen, rejected): `fit_pair(store[i], n) == encode_pair(pair_i, tokenizer, n)`,
    at 4 bytes a token instead of a Python list's ~36."""
    def encode(chunk):
        ids = encode_texts(tokenizer, [t for p in chunk for t in (p.prompt, p.chosen, p.rejected)])
        return [pair_ids(p, tokenizer, ids[3 * i : 3 * i + 3]) for i, p in enumerate(chunk)]

    return store_rows(pairs, encode, 3)


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> tuple[Tensor, Tensor]:
    """(2B, T) tokens and response mask: rows 0..B-1 chosen, rows B..2B-1 rejected."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return join_prompt_response(prompts, responses, pad_id)


def pair_logprobs(model, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """One forward pass over a collated batch -> (summed log-probs (2B,), response lengths (2B,))."""
    logits = model(tokens)
    sums = sequence_logprobs(logits, tokens, mask)
    # the lengths sequence_logprobs divides by with average=True (it drops position 0)
    lengths = mask[:, 1:].sum(-1).clamp(min=1).to(sums.dtype)
    return sums, lengths


def pack_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(B, T) rows packed as prompt | chosen | rejected | padding, so the prompt runs once per
    pair instead of twice (a quarter fewer tokens when the prompt is half of each sequence).

    Returns tokens, positions (the rejected response's positions restart where the prompt
    ends, as if it followed the prompt alone), chosen and rejected masks, and each row's
    prompt's last index. `shared_prompt_forward` runs them; `collate_pairs` is the plain layout.
    """
    if any(not p.prompt for p in pairs):  # the first response token is scored from the prompt's last
        raise ValueError("pack_pairs needs at least one prompt token per pair (encode_pair gives one)")
    width = max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    tokens = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(pairs), width), dtype=torch.long)
    chosen = torch.zeros((len(pairs), width), dtype=torch.bool)
    rejected = torch.zeros((len(pairs), width), dtype=torch.bool)
    for i, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt), len(p.chosen), len(p.rejected)
        tokens[i, : n_p + n_c + n_r] = torch.tensor(p.prompt + p.chosen + p.rejected, dtype=torch.long)
        positions[i, : n_p + n_c] = torch.arange(n_p + n_c)
        positions[i, n_p + n_c : n_p + n_c + n_r] = torch.arange(n_p, n_p + n_r)
        positions[i, n_p + n_c + n_r :] = torch.arange(n_p + n_r, n_p + n_r + width - (n_p + n_c + n_r))
        chosen[i, n_p : n_p + n_c] = True
        rejected[i, n_p + n_c : n_p + n_c + n_r] = True
    prompt_last = torch.tensor([len(p.prompt) - 1 for p in pairs], dtype=torch.long)
    return tokens, positions, chosen, rejected, prompt_last


def can_share_prompt(model) -> bool:
    """Whether the model runs pack_pairs rows (x-transformers always; HF: the tested architectures)."""
    return hasattr(model, "forward_packed") and getattr(model, "packs_pairs", True)


def shared_prompt_forward(model, tokens: Tensor, positions: Tensor, chosen: Tensor, rejected: Tensor, prompt_last: Tensor) -> tuple[Tensor, Tensor]:
    """pair_logprobs for a pack_pairs batch: (summed log-probs (2B,) chosen first, lengths (2B,))."""
    # a rejected token may see the prompt and earlier rejected tokens, never the chosen ones
    allowed = ~(rejected[:, None, :, None] & chosen[:, None, None, :])
    logits = model.forward_packed(tokens, positions, allowed)
    sums = torch.cat(shared_prompt_logprobs(logits, tokens, chosen, rejected, prompt_last))
    lengths = torch.cat([chosen.sum(-1), rejected.sum(-1)]).clamp(min=1).to(sums.dtype)
    return sums, lengths


@torch.no_grad()
def reference_logprobs(model, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int, device=None) -> Tensor:
    """(N, 2) summed log-probs (chosen, rejected) of every pair under a frozen model, in input order.

    Pairs are processed in length order so little of each batch is padding."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt) + max(len(pairs[i].chosen), len(pairs[i].rejected)))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [pairs[i] for i in idx]
        if can_share_prompt(model):  # the same log-probs, each prompt run once
            sums, _ = shared_prompt_forward(model, *(t.to(device) for t in pack_pairs(batch, pad_id)))
        else:
            sums, _ = pair_logprobs(model, *(t.to(device) for t in collate_pairs(batch, pad_id)))
        out[idx] = sums.float().view(2, -1).T.cpu()
    model.train(was_training)
    return out


def preference_loss(
    cfg: PreferenceLossConfig, sums: Tensor, lengths: Tensor, reference: Optional[Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """The configured loss for a batch of B pairs (policy sums/lengths are (2B,), chosen first;
    reference is (B, 2) summed log-probs or None for reference-free losses).

    Returns the scalar loss and detached metrics."""
    b = sums.shape[0] // 2
    chosen, rejected = sums[:b], sums[b:]
    chosen_avg, rejected_avg = chosen / lengths[:b], rejected / lengths[b:]
    if cfg.loss in REFERENCE_FREE:
        if cfg.loss == "simpo":
            out = simpo_loss(chosen_avg, rejected_avg, cfg.beta, cfg.simpo_gamma)
            losses, reward_c, reward_r = out.losses, out.chosen_rewards, out.rejected_rewards
        else:
            losses = rrhf_ranking_loss(chosen_avg, rejected_avg)
            reward_c, reward_r = chosen_avg.detach(), rejected_avg.detach()
    else:
        if reference is None:
            raise ValueError(f"loss {cfg.loss!r} needs reference log-probs")
        ref = reference.to(sums.dtype)
        ref_c, ref_r = ref[:, 0], ref[:, 1]
        if uses_average_logprobs(cfg):
            chosen, rejected = chosen_avg, rejected_avg
            ref_c, ref_r = ref_c / lengths[:b], ref_r / lengths[b:]
        out = dpo_loss(chosen, rejected, ref_c, ref_r, cfg.beta, cfg.loss, cfg.label_smoothing)
        losses, reward_c, reward_r = out.losses, out.chosen_rewards, out.rejected_rewards
    nll = chosen_nll(sums[:b], lengths[:b]).mean()
    loss = losses.mean() + cfg.nll_weight * nll
    metrics = {
        "loss": loss.detach(),
        "preference_loss": losses.mean().detach(),
        "nll": nll.detach(),
        "rewards/chosen": reward_c.mean(),
        "rewards/rejected": reward_r.mean(),
        "rewards/margin": (reward_c - reward_r).mean(),
        "rewards/accuracy": preference_accuracy(reward_c, reward_r),
        "logps/chosen": sums[:b].detach().mean(),
        "logps/rejected": sums[b:].detach().mean(),
    }
    return loss, metrics


def heldout_eval(policy, task, tokenizer, eval_cfg, num_prompts: int) -> dict[str, float]:
    """The orchestrator's held-out evaluation on the first `num_prompts` prompts: cheap enough
    to run during a stage, so a collapsing policy shows up before the stage ends."""
    from dataclasses import replace

    from rlhf.config import EvalConfig
    from rlhf.evaluation import evaluate_policy

    # greedy only: sampling for pass@k would make this k times dearer, the stage's end measures it
    base = EvalConfig(**{k: eval_cfg[k] for k in ("num_prompts", "max_new_tokens", "batch_size", "num_logged_samples")}, samples_per_prompt=0)
    metrics, _ = evaluate_policy(policy, task, tokenizer, replace(base, num_prompts=min(num_prompts, base.num_prompts)))
    return metrics


def log_now(module, metrics: dict[str, float]) -> None:
    """Log at the current step whatever the logging interval (for once-a-round values)."""
    if module.logger is not None and module.trainer.is_global_zero:
        module.logger.log_metrics(metrics, step=module.global_step)
