"""Policy-gradient losses and helpers against hand-computed numbers."""

import math

import pytest
import torch

from rlhf.losses.policy_gradient import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    GROUP_ADVANTAGE_KINDS,
    group_advantages,
    grpo_policy_loss,
    kl_estimate,
    masked_mean,
    masked_sum,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    spread_vanishes,
)

ATOL = 1e-6
NAN = float("nan")
LN = math.log


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------- masking


def test_masked_sum_and_mean_ignore_padding_even_nan():
    x = t([1.0, 2.0, 3.0], [4.0, NAN, NAN])
    mask = t([1, 1, 1], [1, 0, 0])
    # all valid: 1 + 2 + 3 + 4 = 10 over 4 -> 2.5 ; per row: [6, 4] and [6/3, 4/1] = [2, 4]
    assert masked_sum(x, mask).item() == pytest.approx(10.0)
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert torch.allclose(masked_sum(x, mask, dim=1), torch.tensor([6.0, 4.0]))
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.0]))
    # a bool mask gives the same
    assert masked_mean(x, mask.bool()).item() == pytest.approx(2.5)


def test_masked_mean_of_empty_row_is_zero():
    x = t([1.0, 2.0], [5.0, 7.0])
    mask = t([1, 1], [0, 0])
    assert torch.equal(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0]))


def test_masked_whiten_hand_computed():
    # valid 1, 3, 5: mean 3, population var (4 + 0 + 4)/3 = 8/3, std = 1.632993
    # whitened = (x - 3) / 1.632993 = [-1.224745, 0, 1.224745], padding -> 0
    x = t([1.0, 3.0], [5.0, 999.0])
    mask = t([1, 1], [1, 0])
    assert torch.allclose(masked_whiten(x, mask), t([-1.224745, 0.0], [1.224745, 0.0]), atol=ATOL)
    # shift_mean=False adds the mean back: [1.775255, 3, 4.224745], padding still 0
    assert torch.allclose(
        masked_whiten(x, mask, shift_mean=False), t([1.775255, 3.0], [4.224745, 0.0]), atol=ATOL
    )


# ----------------------------------------------------------------------- KL


def test_kl_estimators_hand_computed():
    # pi(x) = 0.5, ref(x) = 0.25: logp - ref_logp = ln 2 = 0.693147
    logp, ref = t(LN(0.5)), t(LN(0.25))
    # k1 = ln 2 = 0.693147 ; k2 = 0.5 * 0.693147^2 = 0.5 * 0.480453 = 0.240227
    # k3: r = ref/pi = 0.5 -> r - 1 - ln r = 0.5 - 1 + 0.693147 = 0.193147
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.693147, abs=ATOL)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.240227, abs=ATOL)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.193147, abs=ATOL)


def test_k3_expectation_is_exact_kl():
    # pi = [0.5, 0.5], ref = [0.25, 0.75]
    # KL(pi||ref) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 (0.693147 - 0.405465) = 0.143841
    # k3 per token: r = 0.5 -> 0.193147 ; r = 1.5 -> 0.5 - ln 1.5 = 0.5 - 0.405465 = 0.094535
    # E_pi[k3] = 0.5 * 0.193147 + 0.5 * 0.094535 = 0.143841
    k3 = kl_estimate(t(LN(0.5), LN(0.5)), t(LN(0.25), LN(0.75)), "k3")
    assert torch.allclose(k3, t(0.193147, 0.094535), atol=ATOL)
    assert k3.mean().item() == pytest.approx(0.143841, abs=ATOL)


def test_k3_and_k2_are_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 32, generator=g) * 3
    ref = torch.randn(64, 32, generator=g) * 3
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()  # k1 alone can be negative
    # tiny differences too (where exp(d) - 1 - d would cancel badly)
    assert (kl_estimate(logp, logp + 1e-7, "k3") >= 0).all()
    assert torch.equal(kl_estimate(logp, logp, "k3"), torch.zeros_like(logp))


def test_kl_estimate_unknown_kind():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(t(0.0), t(0.0), "k4")


# ---------------------------------------------------------------------- GAE


def test_gae_three_steps_hand_computed():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 0.9, lam 0.8 (gamma*lam = 0.72), V after the end = 0
    # delta_2 = 1 + 0.9*0   - 0.7 = 0.3
    # delta_1 = 0 + 0.9*0.7 - 0.6 = 0.03
    # delta_0 = 0 + 0.9*0.6 - 0.5 = 0.04
    # A_2 = 0.3 ; A_1 = 0.03 + 0.72*0.3 = 0.246 ; A_0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    adv, ret = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, t([0.21712, 0.246, 0.3]), atol=ATOL)
    assert torch.allclose(ret, t([0.71712, 0.846, 1.0]), atol=ATOL)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    # gamma = lam = 1: A_t = sum_{s>=t} r_s - V_t = 1 - V_t = [0.5, 0.4, 0.3], returns all 1
    adv, ret = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t([0.5, 0.4, 0.3]), atol=ATOL)
    assert torch.allclose(ret, t([1.0, 1.0, 1.0]), atol=ATOL)


def test_gae_padding_does_not_change_valid_entries():
    # row 0 is the 3-step example padded with junk to T = 5; row 1 is a 1-token response
    rewards = t([0.0, 0.0, 1.0, 5.0, NAN], [2.0, 9.0, 9.0, 9.0, 9.0])
    values = t([0.5, 0.6, 0.7, -3.0, NAN], [0.5, 9.0, 9.0, 9.0, 9.0])
    mask = t([1, 1, 1, 0, 0], [1, 0, 0, 0, 0]).bool()
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: delta_0 = 2 + 0.9*0 - 0.5 = 1.5 (the value after its only token is 0, not the padded 9)
    assert torch.allclose(adv, t([0.21712, 0.246, 0.3, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0, 0.0]), atol=ATOL)
    assert torch.allclose(ret, t([0.71712, 0.846, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]), atol=ATOL)


# ---------------------------------------------------------------------- PPO

# four valid tokens (two per row, one padded token each), old_logp = 0, clip_eps = 0.2
#   ratio 1.5, A =  1: unclipped -1.5, clipped -1.2 -> max -1.2   (clip active)
#   ratio 0.5, A =  1: unclipped -0.5, clipped -0.8 -> max -0.5
#   ratio 1.1, A = -1: both 1.1                     -> 1.1
#   ratio 0.9, A =  2: both -1.8                    -> -1.8
PPO_LOGP = t([LN(1.5), LN(0.5), 3.0], [LN(1.1), LN(0.9), -3.0])
PPO_ADV = t([1.0, 1.0, 50.0], [-1.0, 2.0, 50.0])
PPO_MASK = t([1, 1, 0], [1, 1, 0])


def test_ppo_policy_loss_hand_computed():
    loss, clip_fraction, approx_kl = ppo_policy_loss(PPO_LOGP, torch.zeros(2, 3), PPO_ADV, PPO_MASK, clip_eps=0.2)
    # (-1.2 - 0.5 + 1.1 - 1.8) / 4 = -2.4 / 4 = -0.6
    assert loss.item() == pytest.approx(-0.6, abs=ATOL)
    # one of four valid tokens clipped
    assert clip_fraction.item() == pytest.approx(0.25)
    # k3 of KL(old||new), r = new/old: r - 1 - ln r
    # 1.5: 0.5 - 0.405465 = 0.094535 ; 0.5: -0.5 + 0.693147 = 0.193147
    # 1.1: 0.1 - 0.095310 = 0.004690 ; 0.9: -0.1 + 0.105361 = 0.005361
    # mean = 0.297733 / 4 = 0.074433
    assert approx_kl.item() == pytest.approx(0.074433, abs=ATOL)


def test_ppo_policy_loss_gradient():
    logp = PPO_LOGP.clone().requires_grad_()
    loss, _, _ = ppo_policy_loss(logp, torch.zeros(2, 3), PPO_ADV, PPO_MASK, clip_eps=0.2)
    loss.backward()
    # d/d logp of -A * ratio / 4 = -A * ratio / 4 where unclipped; 0 where clipped or padded
    # [0 (clipped), -1*0.5/4 = -0.125, 0 (pad)], [1*1.1/4 = 0.275, -2*0.9/4 = -0.45, 0 (pad)]
    assert torch.allclose(logp.grad, t([0.0, -0.125, 0.0], [0.275, -0.45, 0.0]), atol=ATOL)


def test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage():
    loss, clip_fraction, approx_kl = ppo_policy_loss(
        torch.zeros(1, 3), torch.zeros(1, 3), t([1.0, 3.0, NAN]), t([1, 1, 0]), clip_eps=0.2
    )
    # -(1 + 3) / 2 = -2, nothing clipped, no KL
    assert loss.item() == pytest.approx(-2.0)
    assert clip_fraction.item() == 0.0 and approx_kl.item() == 0.0


def test_ppo_value_loss_hand_computed():
    values, old = t([1.0, 2.0, 7.0]), t([0.5, 2.0, -7.0])
    returns, mask = t([2.0, 1.0, 0.0]), t([1, 1, 0])
    # token 0: (1 - 2)^2 = 1 ; clipped v = 0.5 + clip(0.5, -0.2, 0.2) = 0.7 -> (0.7 - 2)^2 = 1.69 ; max 1.69
    # token 1: v == old -> (2 - 1)^2 = 1 both
    # 0.5 * (1.69 + 1) / 2 = 0.6725 ; the padded token (which would give 0.5*49) is ignored
    assert ppo_value_loss(values, old, returns, mask, clip_eps=0.2).item() == pytest.approx(0.6725, abs=ATOL)


def test_entropy_from_logits_hand_computed():
    # [0, 0]: uniform over 2 -> ln 2 = 0.693147
    # [0, ln 3]: probs [1/4, 3/4] -> 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335
    logits = torch.tensor([[[0.0, 0.0], [0.0, LN(3.0)]]])
    assert torch.allclose(entropy_from_logits(logits), t([0.693147, 0.562335]), atol=ATOL)


def test_explained_variance_hand_computed():
    returns, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    # perfect values -> 1
    assert explained_variance(t([1.0, 2.0, 3.0, -50.0]), returns, mask).item() == pytest.approx(1.0)
    # constant 2: Var[R - v] = Var[-1, 0, 1] = 2/3 = Var[R] -> 0
    assert explained_variance(t([2.0, 2.0, 2.0, 0.0]), returns, mask).item() == pytest.approx(0.0, abs=ATOL)
    # v = [1, 2, 4]: R - v = [0, 0, -1], mean -1/3, var (1/9 + 1/9 + 4/9)/3 = 2/9 ; 1 - (2/9)/(2/3) = 2/3
    assert explained_variance(t([1.0, 2.0, 4.0, 0.0]), returns, mask).item() == pytest.approx(0.666667, abs=ATOL)
    # constant returns: undefined
    assert math.isnan(explained_variance(t(1.0, 2.0), t(3.0, 3.0), t(1, 1)).item())


# ----------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_hand_computed():
    # init 0.2, target 6, horizon 10000, n_steps 256
    # KL 12: error = clip(12/6 - 1, -0.2, 0.2) = 0.2 -> 0.2 * (1 + 0.2 * 256/10000) = 0.2 * 1.00512 = 0.201024
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024)
    # KL 3: error = clip(-0.5) = -0.2 -> 0.2 * (1 - 0.00512) = 0.198976
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(3.0, n_steps=256)
    assert ctl.value == pytest.approx(0.198976)
    # KL 6.6: error = 0.1 (not clipped) -> 0.2 * (1 + 0.00256) = 0.200512
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(torch.tensor(6.6), n_steps=256)
    assert ctl.value == pytest.approx(0.200512)


def test_adaptive_kl_controller_moves_toward_target():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    for _ in range(10):
        ctl.update(5.0, n_steps=10)  # KL above target: penalise more
    assert ctl.value > 0.1
    high = ctl.value
    ctl.update(0.1, n_steps=10)  # KL below target: penalise less
    assert ctl.value < high
    ctl.update(1.0, n_steps=10)  # on target: unchanged
    assert ctl.value == pytest.approx(high * (1 - 0.2 * 10 / 100))


def test_kl_controllers_round_trip_state():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=256)
    resumed = AdaptiveKLController(1.0, target=1.0, horizon=1)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.state_dict() == ctl.state_dict()
    ctl.update(1.0, n_steps=5)
    resumed.update(1.0, n_steps=5)
    assert resumed.value == ctl.value

    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


# ---------------------------------------------------------- group advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])


def test_group_advantages_grpo_hand_computed():
    # group 1 [1, 0, 0, 1]: mean 0.5, population std 0.5 -> +-0.5 / (0.5 + 1e-6) = +-0.999998
    # group 2 [1, 1, 1, 0]: mean 0.75, var (3 * 0.25^2 + 0.75^2)/4 = 0.75/4 = 0.1875, std 0.433013
    #   0.25 / 0.433013 = 0.577350 ; -0.75 / 0.433013 = -1.732051
    adv = group_advantages(REWARDS, group_size=4, kind="grpo")
    expected = [0.999998, -0.999998, -0.999998, 0.999998, 0.577350, 0.577350, 0.577350, -1.732051]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-5)


def test_group_advantages_dr_grpo_hand_computed():
    # r - group mean: group 1 mean 0.5, group 2 mean 0.75
    adv = group_advantages(REWARDS, group_size=4, kind="dr_grpo")
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))


def test_group_advantages_rloo_hand_computed():
    # r - mean of the other three:
    # group 1: 1 - (0+0+1)/3 = 2/3 ; 0 - (1+0+1)/3 = -2/3
    # group 2: 1 - (1+1+0)/3 = 1/3 ; 0 - (1+1+1)/3 = -1
    adv = group_advantages(REWARDS, group_size=4, kind="rloo")
    expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0]
    assert torch.allclose(adv, torch.tensor(expected), atol=ATOL)


def test_group_advantages_rloo_identity_leave_one_out():
    # G/(G-1) * (r - mean) must equal r - mean(others), computed here by literally leaving one out
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(1))
    adv = group_advantages(rewards, group_size=3, kind="rloo")
    for i in range(12):
        start = i - i % 3
        others = [rewards[j] for j in range(start, start + 3) if j != i]
        assert adv[i].item() == pytest.approx((rewards[i] - sum(others) / 2).item(), abs=1e-5)


def test_group_advantages_constant_group_is_zero():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), group_size=2, kind="grpo")
    assert torch.equal(adv, torch.zeros(4))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(6), group_size=4, kind="grpo")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), group_size=1, kind="rloo")
    with pytest.raises(ValueError, match="grpo, dr_grpo, rloo"):
        group_advantages(torch.zeros(4), group_size=2, kind="ppo")


# ----------------------------------------------------------------- GRPO loss

# row 0: 1 valid token, row 1: 2 valid tokens, T = 3; old_logp = 0
#   row 0 token 0: ratio 1.5, A = 2: unclipped -3, clipped -2.4 -> -2.4 (clip active)
#   row 1 token 0: ratio 1,   A = 1: -1
#   row 1 token 1: ratio 0.5, A = 1: unclipped -0.5, clipped -0.8 -> -0.5
G_LOGP = t([LN(1.5), 4.0, 4.0], [0.0, LN(0.5), -4.0])
G_ADV = torch.tensor([2.0, 1.0])
G_MASK = t([1, 0, 0], [1, 1, 0])


@pytest.mark.parametrize("kind", ["grpo", "reinforce"])
def test_grpo_loss_sequence_mean_hand_computed(kind):
    loss, metrics = grpo_policy_loss(G_LOGP, torch.zeros(2, 3), G_ADV, G_MASK, clip_eps=0.2, kind=kind)
    # per-sequence means: -2.4 and (-1 - 0.5)/2 = -0.75 ; mean = -1.575
    # (a flat token mean would give (-2.4 - 1 - 0.5)/3 = -1.3)
    assert loss.item() == pytest.approx(-1.575, abs=ATOL)
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 3, abs=ATOL)
    assert "kl" not in metrics


def test_rloo_loss_is_reinforce_on_the_whole_sequence():
    # per-sequence sums: -2.4 and -1 - 0.5 = -1.5 ; mean = -1.95
    loss, _ = grpo_policy_loss(G_LOGP, torch.zeros(2, 3), G_ADV, G_MASK, clip_eps=0.2, kind="rloo")
    assert loss.item() == pytest.approx(-1.95, abs=ATOL)
    # on-policy, every valid token's gradient is -A / B whatever the sequence's length
    # (a per-token mean would give -A / (B * length): -0.5 for the 2-token row)
    logp = torch.zeros(2, 3, requires_grad=True)
    grpo_policy_loss(logp, logp.detach(), G_ADV, G_MASK, clip_eps=0.2, kind="rloo")[0].backward()
    assert torch.allclose(logp.grad, t([-1.0, 0.0, 0.0], [-0.5, -0.5, 0.0]))


def test_dr_grpo_loss_constant_normaliser_hand_computed():
    old = torch.zeros(2, 3)
    # divide by T = 3: -2.4/3 = -0.8 ; -1.5/3 = -0.5 ; mean = -0.65
    loss, _ = grpo_policy_loss(G_LOGP, old, G_ADV, G_MASK, clip_eps=0.2, kind="dr_grpo")
    assert loss.item() == pytest.approx(-0.65, abs=ATOL)
    # max_len = 6: -2.4/6 = -0.4 ; -1.5/6 = -0.25 ; mean = -0.325
    loss, _ = grpo_policy_loss(G_LOGP, old, G_ADV, G_MASK, clip_eps=0.2, kind="dr_grpo", max_len=6)
    assert loss.item() == pytest.approx(-0.325, abs=ATOL)


def test_grpo_loss_kl_penalty_hand_computed():
    logp, mask = torch.zeros(2, 3), G_MASK
    ref = torch.full((2, 3), LN(0.5))
    # ratio 1 everywhere: per token -A -> row 0: -2 ; row 1: -1, -1
    # k3(logp=0, ref=ln 0.5) = 0.5 - 1 + ln 2 = 0.193147 per token ; 0.1 * 0.193147 = 0.019315
    # grpo: mean(-2 + 0.019315, -1 + 0.019315) = -1.5 + 0.019315 = -1.480685
    loss, metrics = grpo_policy_loss(logp, logp, G_ADV, mask, 0.2, "grpo", ref_logp=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(-1.480685, abs=ATOL)
    assert metrics["kl"].item() == pytest.approx(0.193147, abs=ATOL)
    # kl_coef = 0: no penalty, but the metric is still reported
    loss, metrics = grpo_policy_loss(logp, logp, G_ADV, mask, 0.2, "grpo", ref_logp=ref)
    assert loss.item() == pytest.approx(-1.5, abs=ATOL)
    assert metrics["kl"].item() == pytest.approx(0.193147, abs=ATOL)


def test_grpo_loss_gradient_follows_advantage_sign():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grpo_policy_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), t([1, 1, 0], [1, 1, 1]), 0.2, "grpo")
    loss.backward()
    # d/d logp = -A / (n_tokens * B): row 0: -1/(2*2) = -0.25 ; row 1: +1/(3*2) = 0.166667 ; pad 0
    assert torch.allclose(logp.grad, t([-0.25, -0.25, 0.0], [1 / 6, 1 / 6, 1 / 6]), atol=ATOL)


def test_grpo_loss_padding_does_not_change_result():
    old = torch.zeros(2, 3)
    base, _ = grpo_policy_loss(G_LOGP, old, G_ADV, G_MASK, 0.2, "grpo")
    junk = torch.where(G_MASK.bool(), G_LOGP, torch.full_like(G_LOGP, NAN))
    padded, _ = grpo_policy_loss(junk, old, G_ADV, G_MASK.bool(), 0.2, "grpo")
    assert padded.item() == pytest.approx(base.item(), abs=ATOL)


def test_grpo_loss_errors():
    with pytest.raises(ValueError, match="grpo, dr_grpo, rloo, reinforce"):
        grpo_policy_loss(G_LOGP, G_LOGP, G_ADV, G_MASK, 0.2, "ppo")
    with pytest.raises(ValueError, match="advantages must have shape"):
        grpo_policy_loss(G_LOGP, G_LOGP, torch.zeros(2, 3), G_MASK, 0.2, "grpo")


@pytest.mark.parametrize("kind", GROUP_ADVANTAGE_KINDS)
def test_group_advantages_equal_rewards_give_exactly_zero_for_every_k_over_n(kind):
    # float32 left r - mean ~ 1e-8 in an equal group, and (std + 1e-6) blew it up: eight rewards
    # of 0.6 gave |A| up to 0.056. Every k/n, n <= 12, must give exactly 0 now.
    for n in range(1, 13):
        for k in range(n + 1):
            adv = group_advantages(torch.full((8,), k / n), group_size=8, kind=kind)
            assert torch.equal(adv, torch.zeros(8)), (k, n)
    # a real difference, however small against the rewards' scale, is kept
    adv = group_advantages(torch.tensor([0.6, 0.6, 0.6, 0.61]), group_size=4, kind=kind)
    assert adv[3] > 0 and adv[0] < 0


def test_constant_group_gives_no_gradient_through_the_grpo_loss():
    rewards = torch.cat([torch.full((8,), 0.6), torch.full((8,), 0.3)])
    adv = group_advantages(rewards, group_size=8, kind="grpo")
    logp = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss, _ = grpo_policy_loss(logp, logp.detach() - 0.01, adv, torch.ones(16, 5), clip_eps=0.2, kind="grpo")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))


def test_whitening_equal_entries_gives_exactly_zero():
    x = torch.full((3, 4), 0.6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(masked_whiten(x, mask), torch.zeros_like(x))
    # shift_mean=False keeps the values (only the scale would change, and there is none)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False), torch.where(mask.bool(), x, torch.zeros_like(x)))
    assert spread_vanishes(1e-9, 0.6) and not spread_vanishes(1e-3, 0.6) and spread_vanishes(1e-4, 1e3)


def test_grpo_clip_higher_hand_computed():
    # DAPO clip-higher, eps_low 0.2, eps_high 0.28: ratio e^0.25 = 1.2840 with A = +1 is clipped
    # at 1.28 (not 1.2); ratio e^-0.3 = 0.7408 with A = -1 is clipped at 0.8
    logp = torch.tensor([[0.25], [-0.3]], requires_grad=True)
    old = torch.zeros(2, 1)
    loss, stats = grpo_policy_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), 0.2, "grpo", clip_eps_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2, abs=1e-6)
    assert stats["clip_fraction"].item() == 1.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))  # both clipped: no gradient
    # without clip_eps_high the upper clip is 1.2
    sym, _ = grpo_policy_loss(logp.detach(), old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), 0.2, "grpo")
    assert sym.item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)


def test_gspo_sequence_ratio_hand_computed():
    # sequence 1: log-ratios [0.1, 0.3] -> mean 0.2, s = e^0.2 = 1.221403, A = +1: clipped at 1.2 -> -1.2
    # sequence 2: log-ratio [-0.1] (second token padding), s = e^-0.1 = 0.904837, A = -1 -> +0.904837
    logp = torch.tensor([[0.1, 0.3], [-0.1, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = grpo_policy_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), mask, 0.2, "grpo", ratio_level="sequence")
    assert loss.item() == pytest.approx((-1.2 + math.exp(-0.1)) / 2, abs=1e-6)
    assert stats["clip_fraction"].item() == 0.5
    loss.backward()
    # d/dlogp of 0.5 * (-A * s) with s = exp(mean): 0.5 * s / |y| on sequence 2's one token; sequence 1 clipped
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0], [0.5 * math.exp(-0.1), 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="ratio_level"):
        grpo_policy_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), mask, 0.2, "grpo", ratio_level="sentence")
    with pytest.raises(ValueError, match="choose one"):  # token-level averaging has no meaning for one ratio per sequence
        grpo_policy_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), mask, 0.2, "dapo", ratio_level="sequence")


def test_dapo_token_level_loss_hand_computed():
    # ratio 1 everywhere, so each valid token's loss is -A: sequence 1 (2 tokens, A = +1) gives
    # -1, -1; sequence 2 (1 token, A = -1) gives +1. DAPO averages the 3 tokens: -1/3; GRPO
    # averages the sequences' means: (-1 + 1) / 2 = 0
    logp = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    dapo, _ = grpo_policy_loss(logp, logp, adv, mask, 0.2, "dapo")
    grpo, _ = grpo_policy_loss(logp, logp, adv, mask, 0.2, "grpo")
    assert dapo.item() == pytest.approx(-1 / 3) and grpo.item() == pytest.approx(0.0)
