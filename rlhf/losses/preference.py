"""Preference losses: reward models, the DPO family, SimPO, RRHF, SPIN, KTO.

Every function is pure: tensors in, tensors out, no state. Unless stated, inputs
are per-sequence SUMMED log-probs of shape (B,), computed by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


@dataclass
class DPOOutput:
    """Per-example losses and the implicit rewards (detached) of a DPO-style loss.

    losses: (B,), reduce with `.mean()`.
    chosen_rewards / rejected_rewards: (B,), `beta * (policy - ref)` (or `beta * avg`
    for reference-free losses), detached, for logging and accuracy.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Pairwise reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT).

    loss = mean_b[ -log sigmoid(r_chosen_b - r_rejected_b) ]

    Args:
        reward_chosen: (B,) scalar rewards of the preferred responses.
        reward_rejected: (B,) scalar rewards of the dispreferred responses.

    Returns:
        Scalar tensor.
    """
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def reward_centering_penalty(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Auxiliary loss pulling each pair's rewards toward a zero mean (Eisenstein et al. 2023,
    "Helping or Herding?"; TRL's RewardTrainer `center_rewards_coefficient` adds this times the
    coefficient to the Bradley-Terry loss).

    penalty = mean_b[ (r_chosen_b + r_rejected_b)^2 ]

    Bradley-Terry fixes only differences within a pair, so each prompt's rewards may sit at
    their own offset; a policy-gradient stage then needs a critic that learns every offset
    before the differences between answers show through.

    Args:
        reward_chosen: (B,) scalar rewards of the preferred responses.
        reward_rejected: (B,) scalar rewards of the dispreferred responses.

    Returns:
        Scalar tensor.
    """
    return ((reward_chosen + reward_rejected) ** 2).mean()


def binned_rating_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross entropy over K rating bins (PaLM-rlhf-pytorch's `num_binned_output`).

    loss = mean_b[ -log softmax(logits_b)[labels_b] ]

    Args:
        logits: (B, K) unnormalised scores per bin.
        labels: (B,) long, the bin index of each example's rating.

    Returns:
        Scalar tensor.
    """
    return F.cross_entropy(logits, labels)


def expected_rating(logits: Tensor, bin_values: Tensor | None = None) -> Tensor:
    """Expected bin value under softmax(logits): sum_k softmax(logits)_k * v_k.

    Args:
        logits: (B, K) unnormalised scores per bin, K >= 2.
        bin_values: (K,) value of each bin; default `arange(K) / (K - 1)`, i.e.
            K evenly spaced values from 0 to 1.

    Returns:
        (B,) expected rating.
    """
    num_bins = logits.shape[-1]
    if bin_values is None:
        if num_bins < 2:
            raise ValueError(f"expected_rating needs at least 2 bins, got {num_bins}")
        bin_values = torch.arange(num_bins, dtype=logits.dtype, device=logits.device) / (num_bins - 1)
    if bin_values.shape != (num_bins,):
        raise ValueError(f"bin_values has shape {tuple(bin_values.shape)}, expected ({num_bins},)")
    return logits.softmax(dim=-1) @ bin_values.to(logits.dtype)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """DPO and variants, from summed log-probs of policy and reference.

    With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected) and
    eps = label_smoothing:

    - "sigmoid": DPO (Rafailov et al. 2023, "Direct Preference Optimization");
      with eps > 0 it is conservative DPO (cDPO, Mitchell 2023):
      loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    - "robust": robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"),
      an unbiased loss under label-flip rate eps:
      loss = (-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps)
    - "ipo": IPO (Azar et al. 2023, "A General Theoretical Paradigm ..."):
      loss = (h - 1 / (2 * beta)) ** 2
    - "hinge": SLiC (Zhao et al. 2023, "SLiC-HF"): loss = relu(1 - beta * h)

    label_smoothing is used by "sigmoid" and "robust" only; a non-zero value with
    "ipo" or "hinge" is an error rather than silently ignored.

    Returns:
        DPOOutput with per-example losses (B,) and detached implicit rewards
        beta * (policy - ref) for chosen and rejected.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing != 0.0 and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing is only used by 'sigmoid' and 'robust', not {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")

    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)

    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratio).detach(),
        rejected_rewards=(beta * rejected_logratio).detach(),
    )


def simpo_loss(policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, beta: float, gamma: float) -> DPOOutput:
    """SimPO, reference-free (Meng et al. 2024, "SimPO: Simple Preference Optimization ...").

    loss = -logsigmoid(beta * (c - r) - gamma)

    Args:
        policy_chosen_avg: (B,) LENGTH-AVERAGED log-prob of the chosen response (c).
        policy_rejected_avg: (B,) LENGTH-AVERAGED log-prob of the rejected response (r).
        beta: reward scale.
        gamma: target reward margin.

    Returns:
        DPOOutput; rewards are beta * avg log-prob, detached.
    """
    losses = -F.logsigmoid(beta * (policy_chosen_avg - policy_rejected_avg) - gamma)
    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * policy_chosen_avg).detach(),
        rejected_rewards=(beta * policy_rejected_avg).detach(),
    )


def rrhf_ranking_loss(chosen_avg: Tensor, rejected_avg: Tensor) -> Tensor:
    """RRHF ranking loss, pair form (Yuan et al. 2023, "RRHF: Rank Responses ...").

    loss = relu(rejected_avg - chosen_avg)

    Inputs are LENGTH-AVERAGED log-probs (B,). The paper's SFT term is added by
    the caller with `chosen_nll`.

    Returns:
        (B,) per-example loss.
    """
    return torch.relu(rejected_avg - chosen_avg)


def chosen_nll(policy_chosen_sum: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-token NLL of the chosen response, the SFT term of RPO (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization") and RRHF.

    nll = -policy_chosen_sum / chosen_lengths

    Args:
        policy_chosen_sum: (B,) summed log-prob of the chosen response.
        chosen_lengths: (B,) number of response tokens (int or float), > 0.

    Returns:
        (B,) per-token negative log-likelihood.
    """
    return -policy_chosen_sum / chosen_lengths.to(policy_chosen_sum.dtype)


def spin_loss(
    policy_real: Tensor,
    policy_generated: Tensor,
    ref_real: Tensor,
    ref_generated: Tensor,
    lam: float,
) -> DPOOutput:
    """SPIN, self-play fine-tuning (Chen et al. 2024, "Self-Play Fine-Tuning Converts
    Weak Language Models to Strong ...") with the logistic loss:

    loss = -logsigmoid(lam * ((p_real - r_real) - (p_gen - r_gen)))

    i.e. DPO with the ground-truth response as chosen, the previous iterate's
    generation as rejected, and the previous iterate as reference.

    Returns:
        DPOOutput; "chosen" = real, "rejected" = generated.
    """
    return dpo_loss(policy_real, policy_generated, ref_real, ref_generated, beta=lam, loss_type="sigmoid")


def kto_reference_point(policy_mismatched: Tensor, ref_mismatched: Tensor) -> Tensor:
    """KTO's reference point z_ref, estimated on mismatched (prompt, response) pairs of the batch
    (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", sec. 4;
    TRL's KTOTrainer): the batch mean of policy - reference summed log-probs, clamped at 0 and
    detached (the paper does not backpropagate through it).

    Args:
        policy_mismatched, ref_mismatched: (B,) summed log-probs of response j != i given prompt i.

    Returns:
        Scalar tensor >= 0 (0 for an empty batch).
    """
    if policy_mismatched.numel() == 0:
        return policy_mismatched.new_zeros(())
    return (policy_mismatched - ref_mismatched).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO for unpaired thumbs up / down (Ethayarajh et al. 2024, eq. 8; TRL's KTOTrainer, "kto"):

    r = policy_logps - ref_logps
    desirable:   w_D * (1 - sigmoid(beta * (r - z_ref)))
    undesirable: w_U * (1 - sigmoid(beta * (z_ref - r)))

    Args:
        policy_logps, ref_logps: (B,) summed log-probs of each response under policy / reference.
        desirable: (B,) bool, True for a thumbs-up response.
        reference_point: z_ref (scalar, detached; `kto_reference_point`).
        beta: > 0. desirable_weight, undesirable_weight: lambda_D, lambda_U (>= 0).

    Returns:
        (losses (B,), rewards (B,) = beta * r, detached). Reduce with `.mean()` (TRL averages the
        weighted losses of both kinds together).

    Raises:
        ValueError: beta <= 0 or a negative weight.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"KTO weights must be >= 0, got {desirable_weight}, {undesirable_weight}")
    logratios = policy_logps - ref_logps
    z = torch.as_tensor(reference_point, dtype=logratios.dtype, device=logratios.device)
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - logratios))),
    )
    return losses, beta * logratios.detach()


def preference_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Fraction of pairs where chosen_reward > rejected_reward; ties count as wrong.

    Returns:
        Scalar float tensor in [0, 1].
    """
    return (chosen_rewards > rejected_rewards).float().mean()
