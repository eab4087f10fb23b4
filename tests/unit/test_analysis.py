"""fst/analysis.py on synthetic curves whose parameters are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fst.analysis import (
    SigmoidFit,
    crossing_step,
    decompose,
    first_step_reaching,
    fit_sigmoid,
    forgetting,
    kl_at_reward,
    running_max,
    sigmoid_curve,
    stage_acquisition,
    steps_to_peak,
)

# Tolerances stated once: noise-free curves are recovered almost exactly; with Gaussian noise
# of sd 0.02 on 60 points the asymptote A is recovered within 0.03 and the true value lies
# within 3 reported standard errors.
EXACT_TOL = 1e-4
NOISY_A_TOL = 0.03


def test_running_max_carries_best_and_skips_nan() -> None:
    assert running_max([0.1, 0.3, 0.2, math.nan, 0.5, 0.4]) == [0.1, 0.3, 0.3, 0.3, 0.5, 0.5]
    out = running_max([math.nan, 0.2])
    assert math.isnan(out[0]) and out[1] == 0.2


def test_first_step_reaching() -> None:
    assert first_step_reaching([0, 4, 8], [0.1, 0.4, 0.6], 0.4) == 4
    assert first_step_reaching([0, 4, 8], [0.1, 0.4, 0.6], 0.7) is None


def test_steps_to_peak_ratio() -> None:
    steps = [0, 4, 8, 12, 16, 20]
    rl = [0.1, 0.2, 0.3, 0.3, 0.5, 0.4]  # running peak 0.5, first reached at step 16
    fst = [0.1, 0.3, 0.5, 0.6, 0.6, 0.6]  # reaches 0.5 at step 8
    cmp = steps_to_peak(steps, rl, steps, fst)
    assert cmp.reference_peak == 0.5 and cmp.reference_steps == 16
    assert cmp.candidate_steps == 8 and cmp.ratio == pytest.approx(0.5)
    assert cmp.candidate_peak == 0.6


def test_steps_to_peak_undefined_cases() -> None:
    steps = [0, 4, 8]
    never = steps_to_peak(steps, [0.1, 0.5, 0.4], steps, [0.1, 0.2, 0.3])
    assert never.candidate_steps is None and never.ratio is None
    flat_ref = steps_to_peak(steps, [0.3, 0.2, 0.3], steps, [0.3, 0.4, 0.5])
    assert flat_ref.reference_steps == 0 and flat_ref.ratio is None  # nothing to reach


@pytest.mark.parametrize(
    ("a", "b", "c_mid"),
    [(0.8, 2.0, 10.0), (0.5, 1.0, 4.0), (0.95, 4.0, 25.0)],
)
def test_sigmoid_fit_recovers_noise_free_parameters(a: float, b: float, c_mid: float) -> None:
    c = np.arange(1, 61, dtype=float)
    y = sigmoid_curve(c, 0.1, a, b, c_mid)
    fit = fit_sigmoid(c, y, r0=0.1)
    assert fit.a == pytest.approx(a, abs=EXACT_TOL)
    assert fit.b == pytest.approx(b, rel=1e-3)
    assert fit.c_mid == pytest.approx(c_mid, rel=1e-3)
    assert fit.rmse < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigmoid_fit_recovers_a_under_noise_with_honest_errors(seed: int) -> None:
    rng = np.random.default_rng(seed)
    true = {"a": 0.7, "b": 1.5, "c_mid": 12.0}
    c = np.arange(1, 61, dtype=float)
    y = sigmoid_curve(c, 0.05, true["a"], true["b"], true["c_mid"]) + rng.normal(0, 0.02, c.size)
    fit = fit_sigmoid(c, y, r0=0.05)
    assert abs(fit.a - true["a"]) < NOISY_A_TOL
    assert 0 < fit.a_se < 0.05
    assert abs(fit.a - true["a"]) < 3 * fit.a_se
    assert abs(fit.c_mid - true["c_mid"]) < 3 * fit.c_mid_se
    assert abs(fit.b - true["b"]) < 3 * fit.b_se
    assert fit.rmse == pytest.approx(0.02, rel=0.3)  # the residual matches the noise


def test_sigmoid_fit_default_r0_and_step_zero() -> None:
    c = np.array([0.0, 2, 4, 6, 8, 10, 12, 16, 20])
    y = np.concatenate([[0.2], sigmoid_curve(c[1:], 0.2, 0.6, 2.0, 6.0)])
    fit = fit_sigmoid(c, y)  # r0 from the point at C = 0, which is not fitted
    assert fit.r0 == 0.2 and fit.n == 8
    assert fit.a == pytest.approx(0.6, abs=EXACT_TOL)


def test_sigmoid_fit_bounded_asymptote() -> None:
    # Still steeply rising at the last point, towards A = 1.6: unbounded, the fit extrapolates
    # past 1; with a_max = 1 (a pass rate) A sits on the bound and is reported as such.
    c = np.arange(1, 21, dtype=float)
    y = sigmoid_curve(c, 0.0, 1.6, 2.0, 30.0)
    free = fit_sigmoid(c, y, r0=0.0)
    assert free.a == pytest.approx(1.6, abs=1e-3) and not free.a_at_bound
    bounded = fit_sigmoid(c, y, r0=0.0, a_max=1.0)
    assert bounded.a == 1.0 and bounded.a_at_bound and math.isnan(bounded.a_se)
    assert math.isfinite(bounded.b_se) and math.isfinite(bounded.c_mid_se)
    # A curve that saturates below the bound is unaffected by it.
    y2 = sigmoid_curve(c, 0.1, 0.6, 2.0, 5.0)
    assert fit_sigmoid(c, y2, r0=0.1, a_max=1.0).a == pytest.approx(0.6, abs=EXACT_TOL)


def test_sigmoid_fit_of_a_step_stays_finite_and_says_it_is_unidentified() -> None:
    # A jump between two measurements (a step function, as a coarse eval grid sees a fast
    # learner): the steepness and midpoint are not identified, and the errors say so.
    c = np.array([4.0, 8, 12, 16, 20, 4, 8, 12, 16, 20])
    y = np.array([0.7, 0.75, 0.7, 0.72, 0.7, 0.66, 0.7, 0.72, 0.7, 0.74])
    fit = fit_sigmoid(c, y, r0=0.45, a_max=1.0)
    assert fit.a == pytest.approx(y.mean(), abs=0.02)
    assert math.isfinite(fit.b) and math.isfinite(fit.c_mid)
    assert fit.b_se > fit.b or not math.isfinite(fit.b_se)


def test_sigmoid_fit_needs_three_points() -> None:
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_sigmoid([0, 1, 2], [0.1, 0.2, 0.3])


def test_crossing_step_interpolates() -> None:
    assert crossing_step([0, 10], [0.0, 1.0], 0.25) == pytest.approx(2.5)
    assert crossing_step([0, 10], [0.5, 1.0], 0.25) == 0
    assert crossing_step([0, 10], [0.0, 0.2], 0.25) is None


def test_kl_at_matched_reward() -> None:
    steps = [0, 4, 8, 12]
    # RL reaches 0.4 at step 8 (KL 0.02 there); FST reaches it at step 4 with KL 0.005.
    rl = kl_at_reward(steps, [0.1, 0.2, 0.4, 0.3], steps, [0.0, 0.01, 0.02, 0.03], 0.4)
    fst = kl_at_reward(steps, [0.1, 0.4, 0.5, 0.5], steps, [0.0, 0.005, 0.01, 0.02], 0.4)
    assert rl == pytest.approx(0.02) and fst == pytest.approx(0.005)
    # Crossing between measurements: reward 0.3 is reached half-way from step 4 to 8, and KL
    # is measured on other steps, so it is interpolated at step 6.
    half = kl_at_reward([4, 8], [0.2, 0.4], [0, 10], [0.0, 0.1], 0.3)
    assert half == pytest.approx(0.06)
    assert kl_at_reward(steps, [0.1, 0.2, 0.2, 0.2], steps, [0, 1, 2, 3], 0.5) is None


def test_four_way_decomposition() -> None:
    g = decompose(base_seed=0.1, base_fst=0.3, trained_seed=0.25, trained_fst=0.5)
    assert g.base == 0.1
    assert g.fast == pytest.approx(0.2) and g.slow == pytest.approx(0.15)
    assert g.both == pytest.approx(0.4) and g.interaction == pytest.approx(0.05)


def test_stage_acquisition_and_forgetting() -> None:
    assert stage_acquisition([0.1, 0.2, 0.0], [0.4, 0.2, 0.3]) == pytest.approx([0.3, 0.0, 0.3])
    retention = [[0.5, None, None], [0.4, 0.6, None], [0.3, 0.6, 0.2]]
    assert forgetting(retention) == pytest.approx([0.2, 0.0, 0.0])


def _noisy_fit(n: int, seed: int) -> SigmoidFit:
    """A fit to n points on steps 1..60 of a known curve (A = 0.7) with noise of sd 0.02."""
    c = np.linspace(1, 60, n)
    y = sigmoid_curve(c, 0.05, 0.7, 1.5, 12.0) + np.random.default_rng(seed).normal(0, 0.02, n)
    return fit_sigmoid(c, y, r0=0.05)


def test_sigmoid_fit_standard_error_shrinks_like_one_over_root_n() -> None:
    few, many = _noisy_fit(30, seed=0), _noisy_fit(480, seed=0)
    assert 0 < many.a_se < few.a_se < 0.1
    # 16 times the points on the same range: the error of A shrinks by about √16 = 4 (give or
    # take the uncertainty of the error itself, estimated from 27 residual degrees of freedom).
    assert 2.5 < few.a_se / many.a_se < 6
    # The reported standard errors are the covariance's diagonal.
    assert np.allclose(many.cov, many.cov.T)
    assert np.sqrt(np.diag(many.cov)) == pytest.approx([many.a_se, many.b_se, many.c_mid_se])


def test_sigmoid_fit_standard_error_matches_the_spread_over_noise_draws() -> None:
    # The reported error of A is honest: over repeated noise draws, the fitted A scatters by
    # about the standard error each fit reports, and the truth lies within 3 of them.
    fits = [_noisy_fit(60, seed) for seed in range(40)]
    a = np.array([f.a for f in fits])
    a_se = np.array([f.a_se for f in fits])
    assert np.all(np.isfinite(a_se)) and np.all(a_se > 0)
    assert a.std() == pytest.approx(a_se.mean(), rel=0.3)
    assert np.mean(np.abs(a - 0.7) < 3 * a_se) >= 0.95


def test_sigmoid_fit_of_a_flat_curve_says_b_and_c_mid_are_unidentified() -> None:
    # No gain at all: A = R0 fits exactly, and then no steepness or midpoint changes the curve.
    # Their errors are infinite, not the 0 a pseudo-inverse of JᵀJ would give.
    c = np.arange(1, 11, dtype=float)
    fit = fit_sigmoid(c, np.full(c.size, 0.3), r0=0.3, a_max=1.0)
    assert fit.a == pytest.approx(0.3) and math.isfinite(fit.a_se)
    assert math.isinf(fit.b_se) and math.isinf(fit.c_mid_se)


def test_bootstrap_diff_is_paired_and_covers_the_truth():
    import numpy as np

    from fst.analysis import bootstrap_diff

    rng = np.random.default_rng(1)
    # 3 seeds x 64 problems; mode a passes each problem with p + 0.15, b with p: a true gain.
    hard = rng.uniform(0.1, 0.7, size=64)
    b = (rng.uniform(size=(3, 64)) < hard).astype(float)
    a = (rng.uniform(size=(3, 64)) < hard + 0.15).astype(float)
    ci = bootstrap_diff(a, b)
    assert ci.low < ci.estimate < ci.high
    assert ci.estimate == pytest.approx(a.mean() - b.mean())
    # Two identical modes: a zero difference with a zero-width interval (paired).
    same = bootstrap_diff(b, b)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero()
    # A shift of one problem in 64 on one seed: far inside the noise.
    c = b.copy()
    c[0, np.argmin(c[0])] = 1.0
    small = bootstrap_diff(c, b)
    assert small.estimate > 0 and small.low == 0.0  # resamples without that problem give 0
    with pytest.raises(ValueError, match="equal"):
        bootstrap_diff(a, b[:2])


def test_bootstrap_diff_interval_shrinks_with_more_problems():
    import numpy as np

    from fst.analysis import bootstrap_diff

    rng = np.random.default_rng(2)
    widths = []
    for n in (32, 512):
        a = (rng.uniform(size=(3, n)) < 0.6).astype(float)
        b = (rng.uniform(size=(3, n)) < 0.4).astype(float)
        ci = bootstrap_diff(a, b)
        widths.append(ci.high - ci.low)
        assert ci.excludes_zero() or n == 32
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n)


def test_bootstrap_mean_over_seeds():
    from fst.analysis import bootstrap_mean

    ci = bootstrap_mean([0.5, 0.6, 0.7])
    assert ci.estimate == pytest.approx(0.6) and 0.5 <= ci.low < 0.6 < ci.high <= 0.7
    one = bootstrap_mean([0.4, None, float("nan")])
    assert (one.estimate, one.low, one.high) == (0.4, 0.4, 0.4)
    assert math.isnan(bootstrap_mean([]).estimate)
