"""Policy-gradient losses and helpers: PPO, GRPO, Dr. GRPO, RLOO.

Token-level tensors are (B, T) over response tokens, right-padded, with a float
or bool `mask` (B, T) that is 1 on valid tokens. Masked positions may hold any
value (even nan/inf) in the forward pass: helpers select with `torch.where`, so
padding never leaks into a result. Keep padded inputs finite when you backprop
(a nan there still turns into a nan gradient through `where`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3")
GROUP_ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo")
GRPO_LOSS_KINDS = ("grpo", "dr_grpo", "rloo", "reinforce", "dapo")
RATIO_LEVELS = ("token", "sequence")  # one importance ratio per token (PPO, GRPO) or per sequence (GSPO)
# A spread this small relative to the values' magnitude is rounding, not signal: equal float32
# rewards leave r - mean ~ 1e-8, which a division by (std + eps) or rsqrt(var + eps) blows up to
# advantages of ~1e-2 and a gradient as large as a real step.
SPREAD_TOLERANCE = 1e-6


def spread_vanishes(spread: Tensor | float, scale: Tensor | float) -> Tensor | bool:
    """True where a spread (a std, or max - min) is rounding noise: spread <= 1e-6 * max(1, |scale|),
    scale being the values' mean (or largest magnitude). Works on floats and elementwise on tensors."""
    if isinstance(spread, Tensor) or isinstance(scale, Tensor):
        return torch.as_tensor(spread) <= SPREAD_TOLERANCE * torch.clamp(torch.as_tensor(scale).abs(), min=1.0)
    return spread <= SPREAD_TOLERANCE * max(1.0, abs(scale))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over entries where mask is 1 (all entries if dim is None, else along dim)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over entries where mask is 1: sum(x * m) / sum(m).

    A slice with no valid entry gives 0 (the count is clamped to 1) rather than nan,
    so an empty response cannot poison a batch mean.
    """
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten x over its masked entries: (x - mean) / sqrt(var + eps).

    mean and var are over ALL valid entries of the tensor, in float64; var is the population
    variance (divide by the count, not count - 1). With shift_mean=False the mean
    is added back (only the scale changes). Unmasked entries of the output are 0. Entries
    whose spread vanishes (`spread_vanishes`: all equal up to rounding) whiten to exactly 0
    (the mean with shift_mean=False).
    """
    x64 = x.double()  # float32 leaves x - mean ~ 1e-8 for equal entries
    mean = masked_mean(x64, mask)
    var = masked_mean((x64 - mean) ** 2, mask)
    whitened = (x64 - mean) * torch.rsqrt(var + eps)
    if spread_vanishes(var.sqrt(), mean):
        whitened = torch.zeros_like(whitened)  # equal entries: no signal, exactly 0 (not 1e-4 of noise)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened)).to(x.dtype)


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimator of KL(pi || ref) from tokens sampled from pi.

    From J. Schulman, "Approximating KL Divergence" (2020), with log r = ref_logp - logp:
    - "k1" = logp - ref_logp                      (unbiased, high variance, can be < 0)
    - "k2" = 0.5 * (logp - ref_logp) ** 2         (biased, low variance, >= 0)
    - "k3" = exp(log r) - 1 - log r               (unbiased, low variance, >= 0)

    k3 is computed as expm1(log r) - log r for accuracy near 0.

    Returns:
        (B, T) per-token estimates (mask them yourself).
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        log_ratio = ref_logp - logp
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_KINDS)}")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, "High-Dimensional
    Continuous Control Using Generalized Advantage Estimation").

    Over right-padded response tokens, backwards in t:
        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last valid token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}    (A after the last valid token is 0)
        returns = A + V

    Padded positions get 0 advantage and 0 return. Pass detached rewards/values.

    Args:
        rewards, values, mask: (B, T).

    Returns:
        (advantages, returns), both (B, T).
    """
    valid = mask.bool()
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    values = torch.where(valid, values, torch.zeros_like(values))
    num_steps = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(num_steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantage = torch.where(valid[:, t], advantage, torch.zeros_like(advantage))
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def _clipped_surrogate(log_ratio: Tensor, advantages: Tensor, clip_eps: float, clip_eps_high: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO surrogate max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)) of log_ratio = logp - old_logp
    (eps_high = eps unless given: DAPO's clip-higher), and where the clip is active."""
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + (clip_eps if clip_eps_high is None else clip_eps_high))
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization").

    ratio = exp(logp - old_logp)
    loss  = masked_mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )   over valid tokens

    Args:
        logp: (B, T) log-probs under the current policy (with grad).
        old_logp: (B, T) log-probs under the policy that sampled (detached).
        advantages: (B, T).
        mask: (B, T).
        clip_eps: clip range eps.

    Returns:
        (loss, clip_fraction, approx_kl), scalars. clip_fraction = fraction of
        valid tokens where the clipped term is strictly larger (active).
        approx_kl = masked mean of k3 estimating KL(old || new) from the old
        policy's samples: exp(logp - old_logp) - 1 - (logp - old_logp).
        The two metrics are detached.
    """
    per_token, clip_active = _clipped_surrogate(logp - old_logp, advantages, clip_eps)
    loss = masked_mean(per_token, mask)
    clip_fraction = masked_mean(clip_active.to(per_token.dtype), mask).detach()
    approx_kl = masked_mean(kl_estimate(old_logp, logp, "k3"), mask).detach()
    return loss, clip_fraction, approx_kl


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float) -> Tensor:
    """Clipped value loss (as in OpenAI baselines PPO2 / Ziegler et al. 2019).

    v_clip = old_v + clip(v - old_v, -eps, eps)
    loss   = 0.5 * masked_mean( max((v - R) ** 2, (v_clip - R) ** 2) )

    Args:
        values: (B, T) current value predictions (with grad).
        old_values: (B, T) values at rollout time (detached).
        returns: (B, T) targets (detached).
        mask: (B, T).

    Returns:
        Scalar tensor.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    per_token = torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)
    return 0.5 * masked_mean(per_token, mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last dim: logsumexp(z) - sum(softmax(z) * z).

    Args:
        logits: (B, T, V).

    Returns:
        (B, T) entropy in nats.
    """
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(dim=-1) * logits).sum(dim=-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - v] / Var[R] over valid tokens (population variances).

    1 = perfect value function, 0 = no better than a constant, < 0 = worse.
    nan when Var[R] vanishes (`spread_vanishes`: equal returns up to rounding; undefined).
    """
    def var(x: Tensor) -> Tensor:
        x = x.double()
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    var_returns = var(returns)
    ev = (1 - var(returns - values) / var_returns).to(returns.dtype)
    constant = spread_vanishes(var_returns.sqrt(), masked_mean(returns.double(), mask))
    return torch.where(constant, torch.full_like(ev, float("nan")), ev)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences"):

        proportional_error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + proportional_error * n_steps / horizon

    The coefficient rises when the KL is above target and falls when below.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface; update does nothing."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def group_advantages(rewards: Tensor, group_size: int, kind: str, eps: float = 1e-6) -> Tensor:
    """Per-sample advantages from groups of samples of the same prompt.

    rewards (N,) are laid out as N / G consecutive groups of G = group_size samples.
    With mean and std taken within each group:
    - "grpo" (Shao et al. 2024, DeepSeekMath): (r - mean) / (std + eps). std is the
      POPULATION std (unbiased=False, divide by G). TRL's GRPOTrainer uses the
      unbiased std (divide by G - 1), which gives advantages smaller by
      sqrt((G - 1) / G); the sign and ordering are the same.
    - "dr_grpo" (Liu et al. 2025, "Understanding R1-Zero-Like Training"): r - mean,
      no std division (removes the difficulty bias).
    - "rloo" (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE ..."):
      r - mean of the OTHER G - 1 samples = G / (G - 1) * (r - mean). Needs G >= 2.
    Computed in float64. A group whose rewards are all equal (max - min within
    `spread_vanishes`' rounding tolerance) gets advantages of exactly 0 under every kind:
    in float32, eight rewards of 0.6 gave |A| up to 0.056 and a full-sized gradient.

    Returns:
        (N,) advantages, same order as rewards.
    """
    if kind not in GROUP_ADVANTAGE_KINDS:
        raise ValueError(f"unknown group advantage kind {kind!r}; valid: {', '.join(GROUP_ADVANTAGE_KINDS)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if kind == "rloo" and group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (leave-one-out), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a length that is a multiple of group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.double().view(-1, group_size)  # float32 leaves r - mean ~ 1e-8 in an equal group
    mean = grouped.mean(dim=1, keepdim=True)
    centered = grouped - mean
    # a group whose rewards are equal (up to rounding) carries no signal: exactly 0, for every kind
    constant = spread_vanishes(grouped.amax(dim=1, keepdim=True) - grouped.amin(dim=1, keepdim=True), mean)
    centered = torch.where(constant, torch.zeros_like(centered), centered)
    if kind == "grpo":
        advantages = centered / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif kind == "dr_grpo":
        advantages = centered
    else:  # rloo
        advantages = centered * group_size / (group_size - 1)
    return advantages.reshape(-1).to(rewards.dtype)


def grpo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    kind: str,
    max_len: int | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    clip_eps_high: float | None = None,
    ratio_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level clipped surrogate with one advantage per sequence (GRPO family).

    Per token: l_t = max(-A * ratio_t, -A * clip(ratio_t, 1 - eps, 1 + eps))
                     [+ kl_coef * k3_t,  k3_t = exp(ref_logp - logp) - 1 - (ref_logp - logp)]
    where A = advantages[b] is broadcast over the sequence's tokens. Aggregation:
    - "grpo", "reinforce": mean over sequences of the per-sequence masked mean over
      tokens (Shao et al. 2024).
    - "rloo": mean over sequences of the per-sequence masked SUM over tokens: on-policy
      (ratio 1) each sequence contributes -A * log pi(y), REINFORCE on the whole sequence as in
      RLOO (Ahmadian et al. 2024), with no 1/length weight. The clip stays per token (TRL's
      former RLOOTrainer clipped one summed-log-prob ratio per sequence; the paper, one update
      per batch, clips nothing).
    - "dr_grpo": mean over sequences of the masked SUM over tokens divided by the
      constant max_len (T if None), removing the length bias (Liu et al. 2025).
    - "dapo": the masked mean over ALL valid tokens of the batch (DAPO's token-level loss,
      Yu et al. 2025; TRL's loss_type="dapo", which divides by the tokens of the whole global
      batch: under DDP ours divides by each process's tokens and averages the processes).
    clip_eps_high (DAPO's clip-higher, Yu et al. 2025; TRL's `epsilon_high`): the upper clip is
    1 + clip_eps_high instead of 1 + clip_eps (DAPO: 0.2 low, 0.28 high), so unlikely tokens
    with a positive advantage can grow. ratio_level="sequence" (GSPO, Zheng et al. 2025; TRL's
    `importance_sampling_level="sequence"`): one ratio per sequence,
    s = exp(masked mean over tokens of (logp - old_logp)), and the per-sequence loss
    max(-A * s, -A * clip(s, 1 - eps, 1 + eps_high)) [+ kl_coef * masked mean of k3],
    averaged over sequences whatever the kind (the kind still chooses the advantages).

    Args:
        logp, old_logp, mask: (B, T); ref_logp: (B, T) or None.
        advantages: (B,) one per sequence.
        max_len: the constant divisor of "dr_grpo" (ignored by the other kinds).
        kl_coef: weight of the k3 penalty, applied when ref_logp is given and kl_coef > 0.

    Returns:
        (loss, metrics) with detached metrics "clip_fraction" (over valid tokens; over
        sequences when ratio_level="sequence") and, when ref_logp is given, "kl" (masked
        mean of k3 over valid tokens).
    """
    if kind not in GRPO_LOSS_KINDS:
        raise ValueError(f"unknown GRPO loss kind {kind!r}; valid: {', '.join(GRPO_LOSS_KINDS)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must have shape ({logp.shape[0]},), got {tuple(advantages.shape)}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {', '.join(RATIO_LEVELS)}, got {ratio_level!r}")
    if ratio_level == "sequence" and kind == "dapo":
        raise ValueError("kind='dapo' averages over tokens and ratio_level='sequence' over sequences: choose one")
    metrics: dict[str, Tensor] = {}
    kl = kl_estimate(logp, ref_logp, "k3") if ref_logp is not None else None
    if kl is not None:
        metrics["kl"] = masked_mean(kl, mask).detach()
    if ratio_level == "sequence":
        # GSPO: the length-normalised sequence ratio, clipped once per sequence
        per_sequence, clip_active = _clipped_surrogate(masked_mean(logp - old_logp, mask, dim=1), advantages, clip_eps, clip_eps_high)
        if kl is not None and kl_coef > 0:
            per_sequence = per_sequence + kl_coef * masked_mean(kl, mask, dim=1)
        metrics["clip_fraction"] = clip_active.to(per_sequence.dtype).mean().detach()
        return per_sequence.mean(), metrics
    per_token, clip_active = _clipped_surrogate(logp - old_logp, advantages.unsqueeze(1), clip_eps, clip_eps_high)
    if kl is not None and kl_coef > 0:
        per_token = per_token + kl_coef * kl

    metrics["clip_fraction"] = masked_mean(clip_active.to(per_token.dtype), mask).detach()
    if kind == "dapo":  # every valid token of the batch weighs the same
        return masked_mean(per_token, mask), metrics
    if kind == "dr_grpo":
        divisor = logp.shape[1] if max_len is None else max_len
        if divisor <= 0:
            raise ValueError(f"max_len must be > 0, got {divisor}")
        per_sequence = masked_sum(per_token, mask, dim=1) / divisor
    elif kind == "rloo":
        per_sequence = masked_sum(per_token, mask, dim=1)
    else:
        per_sequence = masked_mean(per_token, mask, dim=1)
    return per_sequence.mean(), metrics
