"""Learning-curve analysis for comparing FST, RL-only and GEPA-only runs (pure functions).

- `running_max`: the best validation score so far (the paper plots running-max curves: a run
  is as good as its best checkpoint).
- `steps_to_peak`: how many steps FST needs to reach RL's running peak, and the ratio.
- `fit_sigmoid`: the saturating curve of ScaleRL (Khatri et al. 2025) and the FST paper,
      R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B),
  A = asymptotic reward, B = steepness, C_mid = compute (here: steps) at half the gain, R0 =
  the starting reward (fixed, not fitted, as in ScaleRL). Fitted by scipy's curve_fit (bounded
  trust-region least squares, analytic Jacobian) from several grid starts; standard errors
  from its covariance σ²(JᵀJ)⁻¹ at the optimum.
- `kl_at_reward`: KL to the base model where a run's reward curve first reaches a target,
  linearly interpolated, so two runs can be compared at matched reward.
- `decompose`: the four-way channel decomposition (base/trained weights × seed/evolved prompt).
- `stage_acquisition`: per-stage gain of a continual stream (end of stage − start of stage).
- `bootstrap_diff`, `bootstrap_mean`: percentile bootstrap confidence intervals, for a
  difference between two modes evaluated on the same problems (paired, resampling seeds and
  problems) and for a statistic per seed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import expit

# ----------------------------------------------------------------------------- curves


def running_max(values: Sequence[float]) -> list[float]:
    """Best value so far at every position; NaN/None entries carry the previous best."""
    out: list[float] = []
    best = -math.inf
    for v in values:
        if v is not None and not math.isnan(v):
            best = max(best, float(v))
        out.append(best if best > -math.inf else math.nan)
    return out


def first_step_reaching(
    steps: Sequence[float], values: Sequence[float], target: float, tol: float = 1e-9
) -> float | None:
    """The first step at which `values` reaches `target` (>= target − tol), or None."""
    for s, v in zip(steps, values, strict=True):
        if v is not None and not math.isnan(v) and v >= target - tol:
            return float(s)
    return None


@dataclass(frozen=True)
class PeakComparison:
    """How fast a candidate (FST) reaches a reference's (RL's) peak."""

    reference_peak: float  # max of the reference's curve
    reference_steps: float  # first step the reference reaches its peak
    candidate_steps: float | None  # first step the candidate reaches that value; None = never
    ratio: float | None  # candidate_steps / reference_steps (< 1: the candidate is faster)
    candidate_peak: float


def steps_to_peak(
    ref_steps: Sequence[float],
    ref_values: Sequence[float],
    cand_steps: Sequence[float],
    cand_values: Sequence[float],
) -> PeakComparison:
    """Steps for the candidate to reach the reference's running peak, as a ratio.

    The ratio is undefined (None) when the candidate never gets there, and when the reference
    peaks at step 0 (it never improved on where it started, so there is nothing to reach)."""
    peak = max(v for v in ref_values if not math.isnan(v))
    ref_at = first_step_reaching(ref_steps, ref_values, peak)
    assert ref_at is not None  # the peak is one of the values
    cand_at = first_step_reaching(cand_steps, cand_values, peak)
    ratio = None
    if cand_at is not None and ref_at > 0:
        ratio = cand_at / ref_at
    cand_peak = max(v for v in cand_values if not math.isnan(v))
    return PeakComparison(peak, ref_at, cand_at, ratio, cand_peak)


# ----------------------------------------------------------------------------- sigmoid fit
#
# Why scipy's curve_fit (method="trf") rather than an optimiser of our own: the fit needs
# bounds (A <= a_max for a pass rate; a box on B and C_mid), a least-squares solver that
# converges reliably from a given start, and the covariance of the parameters at the optimum.
# curve_fit's bounded trust-region reflective least squares does the first two, and it returns
# the third (σ²(JᵀJ)⁻¹, σ² from the residuals) — all maintained and tested upstream, where a
# hand-written Levenberg–Marquardt had to get its own damping, projection onto the box and
# stopping rule right. What stays here is what is specific to this curve: the starting
# points, its analytic Jacobian, and what a bound or an unidentified parameter means for the
# reported errors.

# B and C_mid stay in a wide box: a flat or step-like curve would otherwise send them to 0 or
# infinity without improving the fit. C_mid's box is relative to the range of C observed.
B_BOX = (0.01, 100.0)
C_MID_BOX_FACTOR = 100.0


def _gain_fraction(c: np.ndarray, b: float, c_mid: float) -> np.ndarray:
    """g = 1 / (1 + (C_mid / C)^B): the fraction of the gain A − R0 reached at C."""
    # Written as the logistic of B·log(C / C_mid): expit does not overflow where a steep B with
    # C_mid >> C makes the power itself overflow (g is then 0, its limit).
    return np.asarray(expit(b * np.log(c / c_mid)))


def sigmoid_curve(c: ArrayLike, r0: float, a: float, b: float, c_mid: float) -> np.ndarray:
    """R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B), for C > 0."""
    return r0 + (a - r0) * _gain_fraction(np.asarray(c, dtype=float), b, c_mid)


def _jacobian(c: np.ndarray, r0: float, a: float, b: float, c_mid: float) -> np.ndarray:
    """∂R/∂(A, B, C_mid), one row per point.

    With x = B·log(C / C_mid) and g = expit(x), dg/dx = g(1 − g), hence
        ∂R/∂A = g,
        ∂R/∂B = (A − R0)·g(1 − g)·log(C / C_mid),
        ∂R/∂C_mid = −(A − R0)·g(1 − g)·B / C_mid.
    """
    log_ratio = np.log(c / c_mid)
    g = expit(b * log_ratio)
    slope = (a - r0) * g * expit(-b * log_ratio)  # 1 − g as expit(−x): no cancellation near 1
    return np.stack([g, slope * log_ratio, -slope * b / c_mid], axis=1)


@dataclass(frozen=True)
class SigmoidFit:
    """The fitted curve R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B) and its uncertainty.

    The standard errors are the square roots of the diagonal of `cov`: inf for a parameter the
    points do not identify, NaN for A when it ended on `a_max` (a constraint, not an estimate).
    """

    r0: float
    a: float
    b: float
    c_mid: float
    a_se: float
    b_se: float
    c_mid_se: float
    rmse: float
    n: int
    a_at_bound: bool = False  # A ended on `a_max`: the data do not show saturation
    # Covariance of (A, B, C_mid) from curve_fit, scaled by the residual variance.
    cov: np.ndarray = field(
        default_factory=lambda: np.full((3, 3), math.nan), compare=False, repr=False
    )

    def predict(self, c: ArrayLike) -> np.ndarray:
        return sigmoid_curve(c, self.r0, self.a, self.b, self.c_mid)


def _starts(
    cs: np.ndarray, ys: np.ndarray, r0: float, a_max: float | None
) -> list[tuple[float, float, float]]:
    """Starting points (A, B, C_mid) for the local fits, one per steepness B of a coarse range.

    The sum of squares has long flat valleys (and, for step-like data, several minima), so a
    single fixed start is not enough. For each B, the C_mid of a grid over (and beyond) the
    observed C that fits best, with A in closed form: for fixed B and C_mid the model is
    linear in A − R0, so A − R0 = g·(y − R0) / g·g.
    """
    bs = np.geomspace(0.3, 8.0, 6)
    c_mids = np.geomspace(cs.min() / 4, cs.max() * 4, 40)
    # g for every (B, C_mid, point): shape (6, 40, n).
    g = expit(bs[:, None, None] * np.log(cs[None, None, :] / c_mids[None, :, None]))
    gain = (g @ (ys - r0)) / np.maximum(np.sum(g * g, axis=2), 1e-300)
    a = r0 + gain
    if a_max is not None:
        a = np.minimum(a, a_max)
    sse = np.sum((ys - r0 - (a - r0)[:, :, None] * g) ** 2, axis=2)
    best = np.argmin(sse, axis=1)  # the best C_mid for each B
    return [(float(a[i, k]), float(bs[i]), float(c_mids[k])) for i, k in enumerate(best)]


def _bounded_fit(
    model: Callable[..., np.ndarray],
    jac: Callable[..., np.ndarray],
    cs: np.ndarray,
    ys: np.ndarray,
    p0: Sequence[float],
    bounds: tuple[Sequence[float], Sequence[float]],
    max_nfev: int,
) -> tuple[np.ndarray, np.ndarray]:
    """curve_fit by trust-region reflective least squares: (parameters, covariance)."""
    with warnings.catch_warnings():
        # "Covariance of the parameters could not be estimated" (as many parameters as points,
        # so no residual variance): the covariance is then inf, which is what we report.
        warnings.simplefilter("ignore", OptimizeWarning)
        popt, pcov = curve_fit(
            model,
            cs,
            ys,
            p0=p0,
            bounds=bounds,
            method="trf",
            jac=jac,
            x_scale="jac",  # A ~ 1 and C_mid ~ 100 differ in scale by orders of magnitude
            max_nfev=max_nfev,
        )
    return np.asarray(popt, dtype=float), np.asarray(pcov, dtype=float)


def _mark_unidentified(cov: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """`cov` with inf rows and columns for the parameters the points do not identify.

    curve_fit inverts JᵀJ by a pseudo-inverse that drops zero singular values, so a parameter
    the data say nothing about (its column of J is zero, like the steepness of a jump between
    two measurements) would get variance 0 instead of the honest infinity. A parameter is
    identified when no direction of J's null space moves it.
    """
    _, s, vt = np.linalg.svd(jac, full_matrices=False)
    threshold = np.finfo(float).eps * max(jac.shape) * s[0]  # curve_fit's own cut-off
    null = vt[s <= threshold]
    unidentified = np.any(np.abs(null) > 1e-8, axis=0)
    out = cov.copy()
    out[unidentified, :] = math.inf
    out[:, unidentified] = math.inf
    return out


def fit_sigmoid(
    c: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    r0: float | None = None,
    a_max: float | None = None,
    max_nfev: int = 2000,
) -> SigmoidFit:
    """Fit A, B, C_mid of R(C) = R0 + (A − R0)/(1 + (C_mid/C)^B) to points (c, y), c > 0.

    `r0` is the reward at C = 0 (the base model); default: the y of the smallest c. Points with
    c <= 0 are used only for that default. The fit is the best of local bounded least-squares
    fits from several grid starts (`_starts`), so it does not depend on an initial guess;
    `max_nfev` caps the model evaluations of each.

    `a_max` bounds the asymptote (1.0 for a pass rate): a curve still rising at the last point
    otherwise extrapolates to any A. A fit that ends on the bound has `a_at_bound` set and
    `a_se` NaN (A is then a constraint, not an estimate); B and C_mid get errors from the
    remaining two-parameter problem.
    """
    c_all = np.asarray(c, dtype=float)
    y_all = np.asarray(y, dtype=float)
    if r0 is None:
        r0 = float(y_all[np.argmin(c_all)])
    keep = (c_all > 0) & np.isfinite(y_all)
    cs, ys = c_all[keep], y_all[keep]
    n = len(cs)
    if n < 3:
        raise ValueError(f"a sigmoid fit needs at least 3 points with C > 0, got {n}")
    base = r0  # a plain float for the closures below (mypy does not narrow into them)

    def model(x: np.ndarray, a: float, b: float, c_mid: float) -> np.ndarray:
        return sigmoid_curve(x, base, a, b, c_mid)

    def model_jac(x: np.ndarray, a: float, b: float, c_mid: float) -> np.ndarray:
        return _jacobian(x, base, a, b, c_mid)

    def sse(params: np.ndarray) -> float:
        return float(np.sum((ys - model(cs, *params)) ** 2))

    c_mid_box = (float(cs.min()) / C_MID_BOX_FACTOR, float(cs.max()) * C_MID_BOX_FACTOR)
    a_hi = math.inf if a_max is None else a_max
    bounds = ([-math.inf, B_BOX[0], c_mid_box[0]], [a_hi, B_BOX[1], c_mid_box[1]])
    fits = []
    for p0 in _starts(cs, ys, base, a_max):
        try:
            fits.append(_bounded_fit(model, model_jac, cs, ys, p0, bounds, max_nfev))
        except RuntimeError:  # this start did not converge within max_nfev; the others may
            continue
    if not fits:
        raise RuntimeError(f"the sigmoid fit did not converge from any start ({n} points)")
    params, cov = min(fits, key=lambda fit: sse(fit[0]))
    a, b, c_mid = (float(p) for p in params)

    # A is on its bound when the unconstrained best A for this (B, C_mid), in closed form as in
    # `_starts`, lies beyond it (the solver itself stops a hair inside its bounds).
    g = _gain_fraction(cs, b, c_mid)
    g_sq = float(g @ g)
    a_free = base + float(g @ (ys - base)) / g_sq if g_sq > 0 else a
    a_at_bound = a_max is not None and a_free >= a_max
    if a_at_bound:
        # A is then a constraint, not an estimate: fix it on the bound and refit B and C_mid,
        # whose covariance is that of the remaining two-parameter problem.
        a = a_hi

        def model_fixed_a(x: np.ndarray, b: float, c_mid: float) -> np.ndarray:
            return sigmoid_curve(x, base, a_hi, b, c_mid)

        def jac_fixed_a(x: np.ndarray, b: float, c_mid: float) -> np.ndarray:
            return _jacobian(x, base, a_hi, b, c_mid)[:, 1:]

        bounds_bc = (bounds[0][1:], bounds[1][1:])
        params_bc, cov_bc = _bounded_fit(
            model_fixed_a, jac_fixed_a, cs, ys, (b, c_mid), bounds_bc, max_nfev
        )
        b, c_mid = float(params_bc[0]), float(params_bc[1])
        cov = np.full((3, 3), math.nan)
        cov[1:, 1:] = _mark_unidentified(cov_bc, jac_fixed_a(cs, b, c_mid))
    else:
        cov = _mark_unidentified(cov, model_jac(cs, a, b, c_mid))

    a_se, b_se, c_mid_se = (math.sqrt(v) if v >= 0 else math.nan for v in np.diag(cov))
    rmse = math.sqrt(sse(np.array([a, b, c_mid])) / n)
    return SigmoidFit(base, a, b, c_mid, a_se, b_se, c_mid_se, rmse, n, a_at_bound, cov)


# ----------------------------------------------------------------------------- KL at reward


def crossing_step(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """Where the piecewise-linear curve through (steps, values) first reaches `target`."""
    pts = [(float(s), float(v)) for s, v in zip(steps, values, strict=True) if not math.isnan(v)]
    if not pts:
        return None
    if pts[0][1] >= target:
        return pts[0][0]
    for (s0, v0), (s1, v1) in pairwise(pts):
        if v1 >= target > v0:
            return s0 + (target - v0) / (v1 - v0) * (s1 - s0)
    return None


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Linear interpolation of y at x (clamped to the ends); NaN points are skipped."""
    pts = sorted((float(a), float(b)) for a, b in zip(xs, ys, strict=True) if not math.isnan(b))
    if not pts:
        return math.nan
    px, py = zip(*pts, strict=True)
    return float(np.interp(x, px, py))


def kl_at_reward(
    reward_steps: Sequence[float],
    rewards: Sequence[float],
    kl_steps: Sequence[float],
    kls: Sequence[float],
    target: float,
) -> float | None:
    """KL to base when the running-max reward first reaches `target`; None if it never does.

    Running max, because a run "has" a reward once it reached it; the KL is interpolated at
    the (interpolated) crossing step, since KL and reward may be measured on different steps.
    """
    at = crossing_step(reward_steps, running_max(rewards), target)
    if at is None:
        return None
    return interpolate(kl_steps, kls, at)


# ----------------------------------------------------------------------------- channels


@dataclass(frozen=True)
class ChannelGains:
    """Four-way decomposition, each gain relative to base weights + seed prompt."""

    base: float  # base weights + seed prompt
    fast: float  # evolved prompt alone (base weights)
    slow: float  # trained weights alone (seed prompt)
    both: float  # trained weights + evolved prompt
    interaction: float  # both − fast − slow: > 0 means the channels help each other


def decompose(
    base_seed: float, base_fst: float, trained_seed: float, trained_fst: float
) -> ChannelGains:
    fast = base_fst - base_seed
    slow = trained_seed - base_seed
    both = trained_fst - base_seed
    return ChannelGains(base_seed, fast, slow, both, both - fast - slow)


def stage_acquisition(start: Sequence[float], end: Sequence[float]) -> list[float]:
    """Per-stage acquisition of a continual stream: score at the end of each stage minus the
    score of the model entering it, both on that stage's own held-out problems."""
    return [float(e) - float(s) for s, e in zip(start, end, strict=True)]


def forgetting(retention: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Per stage: its score right after it was trained minus its score at the end of the
    stream. `retention[i][j]` = score on stage j after training stage i (None for j > i)."""
    last = len(retention) - 1
    out: list[float | None] = []
    for j in range(len(retention)):
        after, final = retention[j][j], retention[last][j]
        out.append(None if after is None or final is None else float(after) - float(final))
    return out


# ----------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Interval:
    """An estimate and its percentile bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_diff(
    a: ArrayLike, b: ArrayLike, n_boot: int = 4000, level: float = 0.95, seed: int = 0
) -> Interval:
    """mean(a) − mean(b) with a paired, two-level percentile bootstrap interval.

    a, b: (S, N) outcomes (e.g. 0/1 greedy pass) of two modes on the SAME N held-out problems
    for each of S seeds (seed s of both modes shares its problems and sampling seed). Each
    replicate draws S seeds and N problems with replacement and applies the same draw to both,
    so the variation of problems (which are hard) and of seeds (training noise) both enter the
    interval, and their shared part cancels. With S = 1 only problems are resampled."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 2 or x.size == 0:
        raise ValueError(
            f"bootstrap_diff: need two equal (seeds, problems) arrays, got {x.shape} and {y.shape}"
        )
    d = x - y  # (S, N): paired differences
    S, N = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, S, size=(n_boot, S)) if S > 1 else np.zeros((n_boot, 1), dtype=int)
    problems = rng.integers(0, N, size=(n_boot, N))
    # Replicate r: mean over its drawn seeds and, within each, its drawn problems.
    reps = d[seeds[:, :, None], problems[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(d.mean()), float(lo), float(hi), level)


def bootstrap_mean(
    values: Sequence[float], n_boot: int = 4000, level: float = 0.95, seed: int = 0
) -> Interval:
    """The mean of per-seed values (a steps-to-peak ratio, a KL at matched reward, ...) with a
    percentile bootstrap interval over seeds. With 3 seeds the interval is coarse, and it
    says so by being wide; with one value it is that value."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan, level)
    rng = np.random.default_rng(seed)
    reps = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(v.mean()), float(lo), float(hi), level)
