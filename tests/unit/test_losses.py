"""The slow channel's losses and advantages, on tensors small enough to compute by hand."""

import math

import pytest
import torch

from fst.slow.advantages import group_advantages
from fst.slow.losses import cispo_loss, dapo_loss, grpo_loss


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    adv = group_advantages(r, eps=0.0)
    # Row 0: mean 0.5, sample std sqrt(1/3) -> ±0.5*sqrt(3)
    s = 0.5 * math.sqrt(3)
    assert adv[0].tolist() == pytest.approx([s, -s, -s, s], rel=1e-6)
    # Row 1: mean 0.75, sample std 0.5 -> (0.25/0.5, ..., -0.75/0.5)
    assert adv[1].tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5], rel=1e-6)


def test_advantage_is_normalised_per_problem_not_per_batch():
    # Same relative pattern at different reward scales: per-row normalisation makes them equal.
    r = torch.tensor([[0.0, 1.0, 0.0, 1.0], [10.0, 11.0, 10.0, 11.0]])
    adv = group_advantages(r)
    assert torch.allclose(adv[0], adv[1], atol=1e-5)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(2), atol=1e-6)


def test_zero_variance_group_gets_exactly_zero_advantage():
    r = torch.tensor([[0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 1.0, 0.0]])
    adv = group_advantages(r)
    assert adv[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv[1].abs().sum() > 0


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError, match="problems, G"):
        group_advantages(torch.tensor([1.0, 0.0]))


def _toy():
    # 2 sequences x 3 positions; the last position of sequence 1 is padding.
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -3.0, -0.5], [-2.0, -1.0, 0.0]])
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, adv, mask


def test_cispo_gradient_equals_formula():
    logp, old, adv, mask = _toy()
    eps_max, n = 5.0, 5
    out = cispo_loss(logp, old, adv, mask, eps_max, num_tokens=n)
    out.loss.backward()
    ratio = torch.exp(logp.detach() - old)
    w = ratio.clamp(max=eps_max)
    # d/dlogp of -w*A*logp/n with w held constant is -w*A/n, on real tokens only.
    expected = -(w * adv[:, None] * mask) / n
    assert torch.allclose(logp.grad, expected, atol=1e-7)
    expected_loss = float((-(w * adv[:, None] * logp.detach()) * mask).sum() / n)
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-6)


def test_cispo_truncates_at_eps_max_and_keeps_gradient():
    logp, old, adv, mask = _toy()
    # Position (1,0): ratio = e^{1.7} ≈ 5.47 > 5 -> weight 5, still has a gradient.
    out = cispo_loss(logp, old, adv, mask, eps_max=5.0, num_tokens=5)
    out.loss.backward()
    assert math.exp(1.7) > 5.0
    assert logp.grad[1, 0].item() == pytest.approx(-5.0 * -0.5 / 5, rel=1e-6)
    assert out.clipped_tokens.item() == 1.0
    # Position (0,1): ratio e^{1} ≈ 2.72 < 5, untouched.
    assert logp.grad[0, 1].item() == pytest.approx(-math.e * 1.5 / 5, rel=1e-6)


def test_cispo_has_no_lower_clip():
    # A tiny ratio (0.01) is NOT raised to 1-eps: the weight stays 0.01.
    logp = torch.tensor([[math.log(0.01)]], requires_grad=True)
    old = torch.tensor([[0.0]])
    out = cispo_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 1), 5.0, num_tokens=1)
    out.loss.backward()
    assert logp.grad.item() == pytest.approx(-0.01 * 2.0, rel=1e-5)
    assert out.clipped_tokens.item() == 0.0


def test_zero_advantage_gives_zero_gradient_for_every_loss():
    logp, old, _, mask = _toy()
    zero = torch.zeros(2)
    for fn in (
        lambda lp: cispo_loss(lp, old, zero, mask, 5.0, 5),
        lambda lp: grpo_loss(lp, old, zero, mask, 0.2, 2),
        lambda lp: dapo_loss(lp, old, zero, mask, 0.2, 0.28, 5),
    ):
        lp = logp.detach().clone().requires_grad_(True)
        fn(lp).loss.backward()
        assert torch.count_nonzero(lp.grad) == 0


def test_token_mean_is_invariant_to_micro_batching():
    logp, old, adv, mask = _toy()
    full = cispo_loss(logp, old, adv, mask, 5.0, num_tokens=5).loss
    parts = sum(
        cispo_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], 5.0, 5).loss
        for i in range(2)
    )
    assert full.item() == pytest.approx(parts.item(), rel=1e-6)


def test_grpo_clips_symmetric_and_zeroes_clipped_gradient():
    # ratio e^{0.5} ≈ 1.65 > 1.2 with A > 0: clipped, gradient 0.
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    old = torch.zeros(1, 2)
    out = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), clip_eps=0.2, num_sequences=1)
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-0.5, rel=1e-6)  # ratio 1, per-seq mean /2
    assert out.clipped_tokens.item() == 1.0


def test_dapo_clip_higher_is_asymmetric():
    # ratio 1.25: inside DAPO's (1-0.2, 1+0.28) but outside GRPO's 1.2.
    lr = math.log(1.25)
    for fn, clipped in (
        (
            lambda lp: dapo_loss(
                lp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), 0.2, 0.28, 1
            ),
            False,
        ),
        (
            lambda lp: grpo_loss(lp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), 0.2, 1),
            True,
        ),
    ):
        lp = torch.tensor([[lr]], requires_grad=True)
        out = fn(lp)
        out.loss.backward()
        assert (lp.grad.item() == 0.0) == clipped
