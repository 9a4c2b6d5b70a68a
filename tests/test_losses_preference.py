"""Preference losses against hand-computed numbers.

Identities used in the comments: -logsigmoid(x) = log(1 + exp(-x)), and
-logsigmoid(-x) = -logsigmoid(x) + x.
"""

import math

import pytest
import torch

from rlhf.losses.preference import (
    reward_centering_penalty,
    DPOOutput,
    binned_rating_loss,
    bradley_terry_loss,
    chosen_nll,
    dpo_loss,
    expected_rating,
    kto_loss,
    kto_reference_point,
    preference_accuracy,
    rrhf_ranking_loss,
    simpo_loss,
    spin_loss,
)

ATOL = 1e-6


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# A pair whose DPO margin is h = (pc - rc) - (pr - rr) = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2.
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)


# ---------------------------------------------------------------- reward models


def test_bradley_terry_hand_computed():
    # pair 1: -log(sigmoid(2 - 1)) = log(1 + e^-1) = log(1.367879) = 0.313262
    # pair 2: -log(sigmoid(0 - 0)) = log(2) = 0.693147
    # mean = (0.313262 + 0.693147) / 2 = 0.503204
    loss = bradley_terry_loss(t(2.0, 0.0), t(1.0, 0.0))
    assert loss.item() == pytest.approx(0.503204, abs=ATOL)


def test_bradley_terry_gradient_separates_rewards():
    rc, rr = t(0.5).requires_grad_(), t(0.5).requires_grad_()
    bradley_terry_loss(rc, rr).backward()
    # d/d rc of -logsig(rc - rr) = -sigmoid(rr - rc) = -0.5 at a tie
    assert rc.grad.item() == pytest.approx(-0.5, abs=ATOL)
    assert rr.grad.item() == pytest.approx(0.5, abs=ATOL)


def test_reward_centering_penalty_hand_computed():
    # sums: 1 + (-1) = 0 and 2 + 0.5 = 2.5; mean of squares = (0 + 6.25) / 2 = 3.125
    rc, rr = t(1.0, 2.0).requires_grad_(), t(-1.0, 0.5).requires_grad_()
    penalty = reward_centering_penalty(rc, rr)
    assert penalty.item() == pytest.approx(3.125, abs=ATOL)
    # d/d r of mean((rc + rr)^2) = 2 (rc + rr) / B: 0 for the centred pair, 2.5 for the other, both sides alike;
    # the difference rc - rr, what Bradley-Terry ranks by, gets no gradient from it
    penalty.backward()
    assert rc.grad.tolist() == pytest.approx([0.0, 2.5], abs=ATOL) and rr.grad.tolist() == pytest.approx([0.0, 2.5], abs=ATOL)


def test_binned_rating_loss_hand_computed():
    # row 1: -log(e^3 / (e^1 + e^2 + e^3)) = log(1 + e^-1 + e^-2) = log(1.503214) = 0.407606
    # row 2: uniform over 3 bins, -log(1/3) = 1.098612
    # mean = (0.407606 + 1.098612) / 2 = 0.753109
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    loss = binned_rating_loss(logits, torch.tensor([2, 0]))
    assert loss.item() == pytest.approx(0.753109, abs=ATOL)


def test_expected_rating_default_bins():
    # default bins for K=3: [0, 0.5, 1]
    # row 1: uniform -> (0 + 0.5 + 1) / 3 = 0.5
    # row 2: softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2] -> 0.25*0 + 0.25*0.5 + 0.5*1 = 0.625
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0)]])
    assert torch.allclose(expected_rating(logits), t(0.5, 0.625), atol=ATOL)


def test_expected_rating_custom_bins():
    # probs [1/4, 1/4, 1/2] on values [1, 2, 3]: 0.25 + 0.5 + 1.5 = 2.25
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)]])
    assert expected_rating(logits, t(1.0, 2.0, 3.0)).item() == pytest.approx(2.25, abs=ATOL)


def test_expected_rating_rejects_bad_bins():
    with pytest.raises(ValueError, match="shape"):
        expected_rating(torch.zeros(1, 3), t(1.0, 2.0))
    with pytest.raises(ValueError, match="at least 2 bins"):
        expected_rating(torch.zeros(1, 1))


# ------------------------------------------------------------------------- DPO


def test_dpo_sigmoid_hand_computed():
    # h = 2, beta = 0.1: -log(sigmoid(0.2)) = log(1 + e^-0.2) = log(1.818731) = 0.598139
    out = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert isinstance(out, DPOOutput)
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx(0.598139, abs=ATOL)
    # rewards: 0.1 * (-1 - -2) = 0.1 ; 0.1 * (-3 - -2) = -0.1
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=ATOL)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=ATOL)


def test_cdpo_label_smoothing_hand_computed():
    # eps = 0.1, beta*h = 0.2:
    # 0.9 * 0.598139 + 0.1 * (-logsig(-0.2) = 0.598139 + 0.2 = 0.798139)
    # = 0.538325 + 0.079814 = 0.618139
    out = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.618139, abs=ATOL)


def test_robust_dpo_hand_computed():
    # (0.9 * 0.598139 - 0.1 * 0.798139) / (1 - 0.2) = (0.538325 - 0.079814) / 0.8 = 0.573139
    out = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust", label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.573139, abs=ATOL)


def test_robust_equals_sigmoid_without_label_smoothing():
    pc, pr, rc, rr = t(-1.0, -5.0, 2.0), t(-3.0, -1.0, 2.5), t(-2.0, -4.0, 1.0), t(-2.0, -2.0, 3.0)
    sigmoid = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="sigmoid").losses
    robust = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="robust").losses
    assert torch.allclose(sigmoid, robust, atol=ATOL)


def test_ipo_hand_computed():
    # beta = 0.1: (h - 1/(2*0.1))^2 = (2 - 5)^2 = 9
    assert dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo").losses.item() == pytest.approx(9.0, abs=1e-5)
    # beta = 1: (2 - 0.5)^2 = 2.25
    assert dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="ipo").losses.item() == pytest.approx(2.25, abs=ATOL)


def test_hinge_hand_computed():
    # beta = 0.1: relu(1 - 0.1*2) = 0.8 ; beta = 1: relu(1 - 2) = 0
    assert dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge").losses.item() == pytest.approx(0.8, abs=ATOL)
    assert dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge").losses.item() == pytest.approx(0.0, abs=ATOL)


def test_dpo_policy_equal_to_reference():
    # h = 0: sigmoid -> -log(sigmoid(0)) = log 2 = 0.693147 ; ipo -> (1/(2 beta))^2 = 1/(4 beta^2) = 25 at beta 0.1
    pc, pr = t(-4.0, -7.0), t(-9.0, -2.0)
    sigmoid = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1).losses
    ipo = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, loss_type="ipo").losses
    assert torch.allclose(sigmoid, t(0.693147, 0.693147), atol=ATOL)
    assert torch.allclose(ipo, t(25.0, 25.0), atol=1e-4)


def test_dpo_gradient_raises_chosen_lowers_rejected():
    # d/d pc of -logsig(beta*h) = -beta * sigmoid(-beta*h) = -0.1 * sigmoid(-0.2) = -0.1 * 0.450166 = -0.045017
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, beta=0.1).losses.sum().backward()
    assert pc.grad.item() < 0 and pr.grad.item() > 0
    assert pc.grad.item() == pytest.approx(-0.045017, abs=ATOL)
    assert pr.grad.item() == pytest.approx(0.045017, abs=ATOL)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge"])
def test_every_dpo_variant_pushes_chosen_up(loss_type):
    # at h = 0 every variant still has a positive loss and a gradient that raises the chosen log-prob
    pc, pr = t(-2.0).requires_grad_(), t(-2.0).requires_grad_()
    dpo_loss(pc, pr, t(-2.0), t(-2.0), beta=0.1, loss_type=loss_type).losses.sum().backward()
    assert pc.grad.item() < 0 and pr.grad.item() > 0


def test_dpo_rewards_are_detached():
    pc = PC.clone().requires_grad_()
    out = dpo_loss(pc, PR, RC, RR, beta=0.1)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sigmoid, robust, ipo, hinge"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)


# ------------------------------------------------------------ reference-free


def test_simpo_hand_computed():
    # beta = 2, gamma = 0.5: 2 * (-1 - -2) - 0.5 = 1.5 ; -logsig(1.5) = log(1 + e^-1.5) = log(1.223130) = 0.201413
    out = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(0.201413, abs=ATOL)
    # rewards = beta * avg: 2 * -1 = -2 ; 2 * -2 = -4
    assert out.chosen_rewards.item() == pytest.approx(-2.0)
    assert out.rejected_rewards.item() == pytest.approx(-4.0)


def test_simpo_margin_raises_loss():
    # a tie gives log 2 without margin, and -logsig(-gamma) = log(1 + e^1) = 1.313262 with gamma = 1
    assert simpo_loss(t(-1.0), t(-1.0), beta=2.0, gamma=0.0).losses.item() == pytest.approx(0.693147, abs=ATOL)
    assert simpo_loss(t(-1.0), t(-1.0), beta=2.0, gamma=1.0).losses.item() == pytest.approx(1.313262, abs=ATOL)


def test_rrhf_ranking_hand_computed():
    # relu(-2 - -1) = relu(-1) = 0 ; relu(-1.5 - -2) = relu(0.5) = 0.5
    assert torch.allclose(rrhf_ranking_loss(t(-1.0, -2.0), t(-2.0, -1.5)), t(0.0, 0.5))


def test_chosen_nll_hand_computed():
    # -(-6)/3 = 2 ; -(-3)/4 = 0.75 ; integer lengths are accepted
    assert torch.allclose(chosen_nll(t(-6.0, -3.0), torch.tensor([3, 4])), t(2.0, 0.75))


def test_spin_hand_computed():
    # lam = 0.5, (p_real - r_real) - (p_gen - r_gen) = 2 ; -logsig(1) = log(1 + e^-1) = 0.313262
    out = spin_loss(PC, PR, RC, RR, lam=0.5)
    assert out.losses.item() == pytest.approx(0.313262, abs=ATOL)
    # rewards = lam * (policy - ref): 0.5 * 1 = 0.5 ; 0.5 * -1 = -0.5
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_preference_accuracy_ties_count_zero():
    # [1 > 0, 2 > 2 (tie), 3 > 4, 0 > -1] = [1, 0, 0, 1] -> 0.5
    assert preference_accuracy(t(1.0, 2.0, 3.0, 0.0), t(0.0, 2.0, 4.0, -1.0)).item() == pytest.approx(0.5)


def test_kto_hand_computed():
    # r = [0.5, -1.0]; desirable: 1 - sigmoid(0.1 * (0.5 - 0.2)) = 1 - sigmoid(0.03) = 0.4925006;
    # undesirable: 1 - sigmoid(0.1 * (0.2 + 1.0)) = 1 - sigmoid(0.12) = 0.4700359
    losses, rewards = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([True, False]), 0.2, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.4925006, 0.4700359]))
    torch.testing.assert_close(rewards, torch.tensor([0.05, -0.1]))
    weighted, _ = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([True, False]), 0.2, beta=0.1,
                           desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(weighted, torch.tensor([0.9850012, 0.2350180]))


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    policy = torch.tensor([-1.0, -1.0], requires_grad=True)
    losses, rewards = kto_loss(policy, torch.tensor([-1.0, -1.0]), torch.tensor([True, False]), 0.0, beta=0.5)
    losses.mean().backward()
    assert policy.grad[0] < 0 < policy.grad[1] and not rewards.requires_grad


def test_kto_reference_point_is_clamped_detached_and_safe_when_empty():
    policy = torch.tensor([-1.0, -3.0], requires_grad=True)
    z = kto_reference_point(policy, torch.tensor([-2.0, -2.5]))  # mean(1.0, -0.5) = 0.25
    assert float(z) == pytest.approx(0.25) and not z.requires_grad
    assert float(kto_reference_point(torch.tensor([-3.0]), torch.tensor([-1.0]))) == 0.0  # clamped
    assert float(kto_reference_point(torch.tensor([]), torch.tensor([]))) == 0.0
    with pytest.raises(ValueError, match="beta"):
        kto_loss(policy, policy, torch.tensor([True, False]), 0.0, beta=0.0)
