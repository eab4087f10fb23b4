"""Learning-curve analysis for comparing FST, RL-only and GEPA-only runs (pure functions).

- `running_max`: the best validation score so far (the paper plots running-max curves: a run
  is as good as its best checkpoint).
- `steps_to_peak`: how many steps FST needs to reach RL's running peak, and the ratio.
- `fit_sigmoid`: the saturating curve of ScaleRL (Khatri et al. 2025) and the FST paper,
      R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B),
  A = asymptotic reward, B = steepness, C_mid = compute (here: steps) at half the gain, R0 =
  the starting reward (fixed, not fitted, as in ScaleRL). Fitted by a grid over (B, C_mid) with
  A in closed form, then Levenberg–Marquardt on (A, log B, log C_mid); standard errors from the
  Gauss–Newton covariance σ²(JᵀJ)⁻¹ at the optimum. numpy only: scipy is not a dependency.
- `kl_at_reward`: KL to the base model where a run's reward curve first reaches a target,
  linearly interpolated, so two runs can be compared at matched reward.
- `decompose`: the four-way channel decomposition (base/trained weights × seed/evolved prompt).
- `stage_acquisition`: per-stage gain of a continual stream (end of stage − start of stage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

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


def sigmoid_curve(c: np.ndarray, r0: float, a: float, b: float, c_mid: float) -> np.ndarray:
    """R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B), for C > 0."""
    c = np.asarray(c, dtype=float)
    # (C_mid / C)^B through exp with a clip: the grid tries steep B with C_mid >> C, where the
    # power overflows to inf (the limit, R0, is still right; this only avoids the warning).
    u = np.exp(np.clip(b * np.log(c_mid / c), -700, 700))
    return r0 + (a - r0) / (1.0 + u)


@dataclass(frozen=True)
class SigmoidFit:
    r0: float
    a: float
    b: float
    c_mid: float
    a_se: float  # standard errors (Gauss–Newton covariance); inf when not identifiable
    b_se: float
    c_mid_se: float
    rmse: float
    n: int
    a_at_bound: bool = False  # A ended on `a_max`: the data do not show saturation

    def predict(self, c: Sequence[float]) -> np.ndarray:
        return sigmoid_curve(np.asarray(c, dtype=float), self.r0, self.a, self.b, self.c_mid)


def _jacobian(c: np.ndarray, r0: float, a: float, b: float, c_mid: float) -> np.ndarray:
    """d R / d (A, B, C_mid), one row per point."""
    log_ratio = np.log(c_mid / c)
    u = np.exp(np.clip(b * log_ratio, -700, 700))  # (C_mid / C)^B without overflow
    g = 1.0 / (1.0 + u)
    d_a = g
    d_b = -(a - r0) * u * log_ratio * g * g
    d_cmid = -(a - r0) * u * (b / c_mid) * g * g
    return np.stack([d_a, d_b, d_cmid], axis=1)


def _closed_form_a(c: np.ndarray, y: np.ndarray, r0: float, b: float, c_mid: float) -> float:
    """Least-squares A for fixed (B, C_mid): the model is linear in (A − R0)."""
    g = 1.0 / (1.0 + (c_mid / c) ** b)
    denom = float(g @ g)
    return r0 + (float(g @ (y - r0)) / denom if denom > 0 else 0.0)


def fit_sigmoid(
    c: Sequence[float],
    y: Sequence[float],
    r0: float | None = None,
    a_max: float | None = None,
    max_iter: int = 200,
) -> SigmoidFit:
    """Fit A, B, C_mid of R(C) = R0 + (A − R0)/(1 + (C_mid/C)^B) to points (c, y), c > 0.

    `r0` is the reward at C = 0 (the base model); default: the y of the smallest c. Points with
    c <= 0 are used only for that default. B and C_mid are fitted in log space (kept > 0);
    the grid start makes the result independent of any user-supplied initial guess.

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

    def clamp(a: float) -> float:
        return min(a, a_max) if a_max is not None else a

    def sse(a: float, b: float, cm: float) -> float:
        return float(np.sum((ys - sigmoid_curve(cs, r0, a, b, cm)) ** 2))

    # 1. Grid over (B, C_mid), A in closed form: a start near the global optimum.
    lo, hi = float(cs.min()), float(cs.max())
    best = (math.inf, 0.0, 1.0, 1.0)
    for b in np.geomspace(0.3, 8.0, 25):
        for cm in np.geomspace(lo / 4, hi * 4, 40):
            a = clamp(_closed_form_a(cs, ys, r0, b, cm))
            s = sse(a, b, cm)
            if s < best[0]:
                best = (s, a, b, cm)
    _, a, b, cm = best

    # 2. Levenberg–Marquardt on theta = (A, log B, log C_mid).
    log_b_box = (math.log(0.01), math.log(100.0))
    log_c_box = (math.log(lo / 100), math.log(hi * 100))
    theta = np.array([a, math.log(b), math.log(cm)])
    lam = 1e-3
    cur = sse(a, b, cm)
    for _ in range(max_iter):
        a, b, cm = theta[0], math.exp(theta[1]), math.exp(theta[2])
        resid = ys - sigmoid_curve(cs, r0, a, b, cm)
        j = _jacobian(cs, r0, a, b, cm) * np.array([1.0, b, cm])  # chain rule to log space
        jtj, jtr = j.T @ j, j.T @ resid
        improved = False
        for _ in range(30):
            step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), jtr)
            cand = theta + step
            cand[0] = clamp(cand[0])  # projected step: A stays within its bound
            # B and C_mid stay in a wide box: a flat or step-like curve would otherwise send
            # them to 0 or infinity (and exp overflow) without improving the fit.
            cand[1] = min(max(cand[1], log_b_box[0]), log_b_box[1])
            cand[2] = min(max(cand[2], log_c_box[0]), log_c_box[1])
            new = sse(cand[0], math.exp(cand[1]), math.exp(cand[2]))
            if new < cur:
                theta, cur, lam = cand, new, max(lam / 10, 1e-12)
                improved = True
                break
            lam *= 10
        if not improved or np.max(np.abs(step)) < 1e-10:
            break

    a, b, cm = float(theta[0]), math.exp(theta[1]), math.exp(theta[2])
    at_bound = a_max is not None and a >= a_max - 1e-9
    free = [1, 2] if at_bound else [0, 1, 2]  # a parameter on its bound is not estimated
    dof = n - len(free)
    sigma2 = cur / dof if dof > 0 else math.nan
    ses = [math.inf] * 3
    j = _jacobian(cs, r0, a, b, cm)[:, free]
    try:
        cov = sigma2 * np.linalg.inv(j.T @ j)
        for k, v in zip(free, np.diag(cov), strict=True):
            ses[k] = math.sqrt(v) if v >= 0 and math.isfinite(v) else math.inf
    except np.linalg.LinAlgError:
        pass  # singular: a parameter is not identified by these points
    if at_bound:
        ses[0] = math.nan
    return SigmoidFit(r0, a, b, cm, ses[0], ses[1], ses[2], math.sqrt(cur / n), n, at_bound)


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
