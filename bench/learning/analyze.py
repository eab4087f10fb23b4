"""Read the benchmark's outputs, compute the comparisons with fst.analysis, write plots + tables.

Inputs (under --out): runs/<task>-<mode>-s<seed>/{metrics.jsonl, decomposition.json,
done.json}, streams/stream-<mode>-s0/stream.json and its stage runs. Only finished jobs
(done.json) are analysed; unfinished ones are listed as such.

Outputs (under --docs): results/*.png, results/summary.json, results/tables.md (the tables
docs/results.md quotes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bench.learning.spec import (
    COMMON,
    MODES,
    PLASTICITY_ARMS,
    PLASTICITY_STEPS_B,
    SEEDS,
    STEPS,
    TASKS,
    VARIANTS,
)
from fst.analysis import (
    Interval,
    bootstrap_diff,
    bootstrap_mean,
    decompose,
    first_step_reaching,
    fit_sigmoid,
    forgetting,
    kl_at_reward,
    running_max,
    stage_acquisition,
    steps_to_peak,
)

EVAL_N = COMMON["metrics"]["evalProblems"]
COLORS = {
    "rl": "tab:blue",
    "fst": "tab:red",
    "fst-distill": "tab:purple",
    "gepa": "tab:green",
    "base": "tab:gray",
}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, one record per step (the records of a step merged, later keys
    winning). Runs trained before fst.loop dropped a killed attempt's base eval on a fresh
    start hold one step-0 (a continued stage: first-step) record per attempt; all alike, since
    a base eval is greedy."""
    by_step: dict[Any, dict[str, Any]] = {}
    for m in _read_jsonl(run_dir / "metrics.jsonl"):
        by_step.setdefault(m.get("step"), {}).update(m)
    return list(by_step.values())


def load_run(run_dir: Path, partial: bool = False) -> dict[str, Any] | None:
    """A finished run's records; with `partial`, also a running one's (marked running)."""
    finished = (run_dir / "done.json").is_file()
    metrics = _read_metrics(run_dir)
    evals = [(m["step"], m["eval_pass_rate"]) for m in metrics if "eval_pass_rate" in m]
    if not finished and not (partial and len(evals) >= 2):
        return None
    steps = [m for m in metrics if "reward_mean" in m]
    kls = [(0, 0.0)] + [(m["step"], m["kl"]) for m in steps if m.get("kl") is not None]
    dec_path = run_dir / "decomposition.json"
    return {
        "eval_steps": [s for s, _ in evals],
        "eval": [v for _, v in evals],
        "train_steps": [m["step"] for m in steps],
        "train_reward": [m["reward_mean"] for m in steps],
        "kl_steps": [s for s, _ in kls],
        "kl": [v for _, v in kls],
        "gepa_metric_calls": sum(m.get("gepa_metric_calls", 0) for m in steps),
        "gepa_reused_rows": sum(m.get("gepa_reused_rows", 0) for m in steps),
        "gepa_s": sum(m.get("gepa_s", 0) for m in steps),
        # (fast.overlapRound: two rounds may end before one step, in one record)
        "rounds": sum(m.get("gepa_rounds_ended", 1) for m in steps if "gepa_s" in m),
        "gen_tokens": sum(m.get("gen_tokens", 0) for m in steps),
        "rollouts": len(steps) * COMMON["slow"]["problemsPerStep"] * COMMON["slow"]["groupSize"],
        "optimizer_steps": sum(1 for m in steps if m.get("updated", 1.0) and "loss" in m),
        # fst-distill distills only while the population's best prompt is not the seed prompt
        # (the student's own context): with the seed best all run, it trains exactly as fst.
        "distill_steps": sum(1 for m in steps if m.get("distill_tokens")),
        "steps": len(steps),
        # Wall seconds inside the loop (steps, GEPA rounds, evals): under CPU contention this
        # overstates the compute; done.json's cpu_s covers only the runner's last invocation.
        "loop_s": sum(
            m.get("step_s", 0) + m.get("gepa_s", 0) + m.get("eval_s", 0) for m in metrics
        ),
        "done": json.loads((run_dir / "done.json").read_text())
        if finished
        else {"wall_s": math.nan, "cpu_s": math.nan},
        "running": not finished,
        "decomposition": json.loads(dec_path.read_text()) if dec_path.is_file() else None,
        "final_prompt": _final_prompt(run_dir),
        # Per-problem outcomes of each eval ("1"/"0" per test problem; absent before they were
        # recorded), the out-of-domain eval, and the policy's entropy per training step.
        "eval_passed": [m.get("eval_passed") for m in metrics if "eval_pass_rate" in m],
        "ood_steps": [m["step"] for m in metrics if "ood_pass_rate" in m],
        "ood": [m["ood_pass_rate"] for m in metrics if "ood_pass_rate" in m],
        "ood_passed": [m.get("ood_passed") for m in metrics if "ood_pass_rate" in m],
        "entropy_steps": [m["step"] for m in steps if m.get("entropy") is not None],
        "entropy": [m["entropy"] for m in steps if m.get("entropy") is not None],
    }


def _final_prompt(run_dir: Path) -> str | None:
    rounds = _read_jsonl(run_dir / "population.jsonl")
    return rounds[-1]["members"][0]["text"] if rounds else None


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if abs(x) >= 1e4:
        return f"{x:.0e}"  # an unidentified parameter's error: its size is the message
    return f"{x:.{digits}f}"


def _ci(i: dict[str, float] | None, signed: bool = False) -> str:
    """`+0.094 [+0.031, +0.156]`; `-` when there is nothing to show."""
    if i is None or math.isnan(i["estimate"]):
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(i['estimate'])} [{f.format(i['low'])}, {f.format(i['high'])}]"


def _pm(v: float, se: float, digits: int = 3) -> str:
    return f"{_fmt(v, digits)} ± {_fmt(se, digits)}"


def _common_steps(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict, dict]:
    """Both runs cut to the eval/KL steps up to the last eval step they both reached."""
    last = min(a["eval_steps"][-1], b["eval_steps"][-1])

    def cut(r: dict[str, Any]) -> dict[str, Any]:
        ev = [(x, y) for x, y in zip(r["eval_steps"], r["eval"], strict=True) if x <= last]
        kl = [(x, y) for x, y in zip(r["kl_steps"], r["kl"], strict=True) if x <= last]
        return {
            **r,
            "eval_steps": [x for x, _ in ev],
            "eval": [y for _, y in ev],
            "kl_steps": [x for x, _ in kl],
            "kl": [y for _, y in kl],
        }

    return cut(a), cut(b)


def _fit_dict(fit: Any, cs: list[float]) -> dict[str, Any]:
    return {
        "A": fit.a,
        "A_se": fit.a_se,
        "B": fit.b,
        "B_se": fit.b_se,
        "C_mid": fit.c_mid,
        "C_mid_se": fit.c_mid_se,
        "R0": fit.r0,
        "rmse": fit.rmse,
        "n": fit.n,
        "A_at_bound": fit.a_at_bound,
        # C_mid beyond the last step: the half-way point is an extrapolation.
        "C_mid_beyond_data": fit.c_mid > max(cs),
    }


# ----------------------------------------------------------------------------- per task


def analyze_task(task: str, runs: dict[tuple[str, int], dict[str, Any]], figdir: Path) -> dict:
    out: dict[str, Any] = {
        "fits": {},
        "train_fits": {},
        "peaks": {},
        "kl": {},
        "decomposition": {},
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES:
        seeds = [s for s in SEEDS if (mode, s) in runs]
        if not seeds:
            continue
        pooled_c, pooled_y, r0s = [], [], []
        for s in seeds:
            r = runs[(mode, s)]
            ax.plot(r["eval_steps"], r["eval"], color=COLORS[mode], alpha=0.25, lw=1)
            ax.plot(r["eval_steps"], running_max(r["eval"]), color=COLORS[mode], lw=1, ls=":")
            pooled_c += [c for c in r["eval_steps"] if c > 0]
            pooled_y += [y for c, y in zip(r["eval_steps"], r["eval"], strict=True) if c > 0]
            r0s += [y for c, y in zip(r["eval_steps"], r["eval"], strict=True) if c == 0]
        steps0 = runs[(mode, seeds[0])]["eval_steps"]
        mean_curve = [
            mean(runs[(mode, s)]["eval"][i] for s in seeds)
            for i in range(min(len(runs[(mode, s)]["eval"]) for s in seeds))
        ]
        ax.plot(steps0[: len(mean_curve)], mean_curve, color=COLORS[mode], lw=2, label=mode)
        r0 = mean(r0s) if r0s else None
        try:
            fit = fit_sigmoid(pooled_c, pooled_y, r0=r0, a_max=1.0)
            xs = np.linspace(0.5, max(pooled_c), 100)
            ax.plot(xs, fit.predict(xs), color=COLORS[mode], lw=1, ls="--")
            out["fits"][mode] = {**_fit_dict(fit, pooled_c), "seeds": seeds}
        except ValueError as e:
            out["fits"][mode] = {"error": str(e)}
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"held-out pass rate (greedy, {EVAL_N} test problems)")
    ax.set_title(
        f"{task}: mean over seeds (thick), per seed (thin), running max (dotted), fit (dashed)",
        fontsize=8,
    )
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figdir / f"curves-{task}.png", dpi=110)
    plt.close(fig)

    # Training reward (sampled, the prompts in use) per step.
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for mode in MODES:
        seeds = [s for s in SEEDS if (mode, s) in runs]
        if not seeds:
            continue
        n = min(len(runs[(mode, s)]["train_reward"]) for s in seeds)
        ys = [mean(runs[(mode, s)]["train_reward"][i] for s in seeds) for i in range(n)]
        ax.plot(runs[(mode, seeds[0])]["train_steps"][:n], ys, color=COLORS[mode], label=mode)
        # Second fit, on the per-step training reward: 20 points per seed instead of 5, but
        # noisy (16 samples a step) and, in fst/gepa, measured under the evolving prompts.
        # R0 = the mean step-1 reward (the batch sampled by the base model).
        cs = [c for s in seeds for c in runs[(mode, s)]["train_steps"]]
        rs = [y for s in seeds for y in runs[(mode, s)]["train_reward"]]
        r0 = mean(runs[(mode, s)]["train_reward"][0] for s in seeds)
        try:
            fit = fit_sigmoid(cs, rs, r0=r0, a_max=1.0)
            out["train_fits"][mode] = {**_fit_dict(fit, cs), "seeds": seeds}
        except ValueError as e:
            out["train_fits"][mode] = {"error": str(e)}
    ax.set_xlabel("step")
    ax.set_ylabel("training reward (sampled, T=0.7)")
    ax.set_title(f"{task}: mean training reward over seeds", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figdir / f"train-{task}.png", dpi=110)
    plt.close(fig)

    # Steps to RL's peak and KL at matched reward, per seed.
    fig, ax = plt.subplots(figsize=(5, 4))
    for s in SEEDS:
        if ("rl", s) not in runs:
            continue
        rl_full = runs[("rl", s)]
        for mode in (m for m in MODES if m != "rl"):
            if (mode, s) not in runs:
                continue
            # Compared on the steps both have (a running run is shorter): equal budgets.
            rl, c = _common_steps(rl_full, runs[(mode, s)])
            p = steps_to_peak(rl["eval_steps"], rl["eval"], c["eval_steps"], c["eval"])
            out["peaks"][f"{mode}-s{s}"] = {**p.__dict__, "up_to_step": rl["eval_steps"][-1]}
        if ("fst", s) in runs:
            rl, fst = _common_steps(rl_full, runs[("fst", s)])
            start = rl["eval"][0]
            target = min(max(rl["eval"]), max(fst["eval"]))
            kl_rl = kl_fst = None
            if target > start:  # a reward neither run gained is no match
                kl_rl = kl_at_reward(rl["eval_steps"], rl["eval"], rl["kl_steps"], rl["kl"], target)
                kl_fst = kl_at_reward(
                    fst["eval_steps"], fst["eval"], fst["kl_steps"], fst["kl"], target
                )
            ratio = kl_fst / kl_rl if kl_rl and kl_fst is not None else None
            out["kl"][f"s{s}"] = {
                "up_to_step": rl["eval_steps"][-1],
                "target": target,
                "kl_rl": kl_rl,
                "kl_fst": kl_fst,
                "ratio": ratio,
                "final_kl_rl": rl["kl"][-1],
                "final_kl_fst": fst["kl"][-1],
            }
        for mode in ("rl", "fst"):
            if (mode, s) not in runs:
                continue
            r = runs[(mode, s)]
            kls = [np.interp(x, r["kl_steps"], r["kl"]) for x in r["eval_steps"]]
            ax.plot(
                kls,
                running_max(r["eval"]),
                ["o-", "s--", "^:"][s % 3],  # one marker and line style per seed
                color=COLORS[mode],
                alpha=0.7,
                ms=3,
                label=f"{mode} s{s}",
            )
    ax.set_xlabel("KL(π_θ ‖ π_base), nats/token")
    ax.set_ylabel("running-max held-out pass rate")
    ax.set_title(f"{task}: reward against KL", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figdir / f"kl-{task}.png", dpi=110)
    plt.close(fig)

    out["differences"] = differences(runs)
    plot_entropy(task, runs, figdir)
    for s in SEEDS:
        r = runs.get(("fst", s))
        if r and r["decomposition"]:
            d = r["decomposition"]
            g = decompose(
                d["base weights + seed prompt"]["pass_rate"],
                d["base weights + FST prompt"]["pass_rate"],
                d["trained weights + seed prompt"]["pass_rate"],
                d["trained weights + FST prompt"]["pass_rate"],
            )
            out["decomposition"][f"s{s}"] = g.__dict__
    return out


# ----------------------------------------------------------------------------- differences


def _outcomes(r: dict[str, Any], key: str) -> list[int] | None:
    """The per-problem outcomes of a run's LAST eval (key eval_passed / ood_passed)."""
    last = r[key][-1] if r[key] else None
    return _bits(last) if last else None


def _bits(passed: str | list[int]) -> list[int]:
    """Per-problem outcomes as metrics.jsonl keeps them ("0110...") as a list of 0/1."""
    return [int(c) for c in passed]


def _interval(i: Interval | None) -> dict[str, float] | None:
    return None if i is None else {"estimate": i.estimate, "low": i.low, "high": i.high}


def _last_eval_diff(
    pairs: list[tuple[list[int] | None, list[int] | None]],
) -> dict[str, float] | None:
    """(candidate, reference) last-eval outcomes per seed -> the paired bootstrap interval of
    candidate − reference over seeds x problems, or None without comparable evals."""
    ok = [(a, b) for a, b in pairs if a and b and len(a) == len(b)]
    if not ok or len({len(a) for a, _ in ok}) != 1:
        return None
    return _interval(bootstrap_diff([a for a, _ in ok], [b for _, b in ok]))


def _peak_ratio(rl_run: dict[str, Any], run: dict[str, Any]) -> float | None:
    """Steps `run` took to reach rl's running peak / rl's, on the steps both have."""
    rl, c = _common_steps(rl_run, run)
    return steps_to_peak(rl["eval_steps"], rl["eval"], c["eval_steps"], c["eval"]).ratio


def _per_round(runs: list[dict[str, Any]], key: str) -> float:
    """A GEPA count (or seconds) of some runs per round, over all their rounds."""
    return sum(r[key] for r in runs) / sum(r["rounds"] for r in runs)


def variant_differences(
    runs: dict[tuple[str, int], dict[str, Any]], variants: dict[tuple[str, int], dict[str, Any]]
) -> dict[str, Any]:
    """Every variant (spec.VARIANTS) against its base mode, over the seeds both ran: final and
    out-of-domain held-out difference (paired bootstrap over seeds x problems), its own
    steps-to-RL-peak ratio beside the base mode's, and what its GEPA rounds cost (rollouts
    sampled and seconds per round, both modes' rounds alike, the first round included)."""
    out: dict[str, Any] = {}
    for variant, (base, _) in VARIANTS.items():
        seeds = [s for s in SEEDS if (variant, s) in variants and (base, s) in runs]
        if not seeds:
            continue
        row: dict[str, Any] = {"base": base, "seeds": seeds}
        for key, name in (("eval_passed", "final"), ("ood_passed", "ood")):
            row[name] = _last_eval_diff(
                [
                    (_outcomes(variants[(variant, s)], key), _outcomes(runs[(base, s)], key))
                    for s in seeds
                ]
            )
        for who, own in (
            ("variant", [variants[(variant, s)] for s in seeds]),
            ("base_mode", [runs[(base, s)] for s in seeds]),
        ):
            ratios = [
                _peak_ratio(runs[("rl", s)], r)
                for s, r in zip(seeds, own, strict=True)
                if ("rl", s) in runs
            ]
            row[f"{who}_peak_ratio"] = _interval(
                bootstrap_mean([x for x in ratios if x is not None])
            )
            row[f"{who}_peak_reached"] = sum(x is not None for x in ratios)
            row[f"{who}_sampled_per_round"] = _per_round(own, "gepa_metric_calls")
            row[f"{who}_reused_per_round"] = _per_round(own, "gepa_reused_rows")
            row[f"{who}_round_s"] = _per_round(own, "gepa_s")
            row[f"{who}_final"] = mean(r["eval"][-1] for r in own)
        out[variant] = row
    return out


def round_lateness(run_dir: Path, every: int) -> list[int]:
    """Per GEPA round of a run: how many steps after it was due its population came in (0 for
    a round run at once). Round i is due before step i*T + 1 (a round that waited for another
    takes the index of the step it started at) and its population record is under the step
    it precedes."""
    return [r["step"] - (r["round"] * every + 1) for r in _read_jsonl(run_dir / "population.jsonl")]


def compare(record: Path, a: str, b: str, seeds: tuple[int, ...] = SEEDS) -> str:
    """Two modes or variants of one record, paired by (task, seed): a markdown table of the
    final held-out pass rates, `a` − `b` over the seeds both finished (paired bootstrap over
    seeds x problems), the mean of each run's evals, and what the rounds cost and how late
    their populations came in."""
    rows = [
        f"| task | final held-out, {a} (per seed) | {b} | {a} − {b} | out-of-domain, "
        f"{a} − {b} | mean of the evals: {a} / {b} | rollouts sampled per round: {a} / {b} "
        f"| steps late per round: {a} / {b} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in TASKS:
        dirs = {s: [record / "runs" / f"{task}-{m}-s{s}" for m in (a, b)] for s in seeds}
        loaded = {s: [load_run(d) for d in ds] for s, ds in dirs.items()}
        paired = [s for s, rs in loaded.items() if None not in rs]
        if paired:
            rows.append(_compare_row(task, paired, loaded, dirs))
    return "\n".join(rows)


def _compare_row(
    task: str,
    seeds: list[int],
    runs: dict[int, list[Any]],  # seed -> [run of a, run of b]
    dirs: dict[int, list[Path]],
) -> str:
    def each(i: int) -> list[dict[str, Any]]:
        return [runs[s][i] for s in seeds]

    def per_seed(i: int) -> str:
        return " / ".join(_fmt(r["eval"][-1]) for r in each(i))

    def sampled(i: int) -> str:
        return _fmt(_per_round(each(i), "gepa_metric_calls"), 0)

    def late(i: int) -> str:
        every = COMMON["fast"]["everySteps"]
        steps = [x for s in seeds for x in round_lateness(dirs[s][i], every)]
        return _fmt(mean(steps), 1) if steps else "–"

    final, ood = (
        _last_eval_diff([(_outcomes(runs[s][0], k), _outcomes(runs[s][1], k)) for s in seeds])
        for k in ("eval_passed", "ood_passed")
    )
    mean_a, mean_b = (_fmt(mean(mean(r["eval"]) for r in each(i))) for i in (0, 1))
    return (
        f"| `{task}` (seeds {', '.join(map(str, seeds))}) | {per_seed(0)} | {per_seed(1)} | "
        f"{_ci(final, signed=True)} | {_ci(ood, signed=True)} | {mean_a} / {mean_b} | "
        f"{sampled(0)} / {sampled(1)} | {late(0)} / {late(1)} |"
    )


def differences(runs: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """Every mode against rl, over the seeds both ran, each with a 95% bootstrap interval:
    final held-out and out-of-domain pass rate (paired over seeds x problems), the
    steps-to-RL-peak ratio and the KL ratio at matched reward (over seeds), and the mean
    entropy of the last 5 training steps (difference per seed, over seeds)."""
    out: dict[str, Any] = {}
    for mode in (m for m in MODES if m != "rl"):
        seeds = [s for s in SEEDS if (mode, s) in runs and ("rl", s) in runs]
        if not seeds:
            continue
        row: dict[str, Any] = {"seeds": seeds}
        for key, name in (("eval_passed", "final"), ("ood_passed", "ood")):
            row[name] = _last_eval_diff(
                [(_outcomes(runs[(mode, s)], key), _outcomes(runs[("rl", s)], key)) for s in seeds]
            )
        ratios = [_peak_ratio(runs[("rl", s)], runs[(mode, s)]) for s in seeds]
        row["peak_ratio"] = _interval(bootstrap_mean([r for r in ratios if r is not None]))
        row["peak_reached"] = sum(r is not None for r in ratios)
        kl_ratios = []
        for s in seeds:
            rl, c = _common_steps(runs[("rl", s)], runs[(mode, s)])
            target = min(max(rl["eval"]), max(c["eval"]))
            if target <= rl["eval"][0] or mode == "gepa":  # no matched gain; gepa has KL 0
                continue
            k_rl = kl_at_reward(rl["eval_steps"], rl["eval"], rl["kl_steps"], rl["kl"], target)
            k_c = kl_at_reward(c["eval_steps"], c["eval"], c["kl_steps"], c["kl"], target)
            if k_rl and k_c is not None:
                kl_ratios.append(k_c / k_rl)
        row["kl_ratio"] = _interval(bootstrap_mean(kl_ratios)) if kl_ratios else None
        ent = [
            mean(runs[(mode, s)]["entropy"][-5:]) - mean(runs[("rl", s)]["entropy"][-5:])
            for s in seeds
            if runs[(mode, s)]["entropy"] and runs[("rl", s)]["entropy"]
        ]
        row["entropy"] = _interval(bootstrap_mean(ent)) if ent else None
        out[mode] = row
    return out


def plot_entropy(task: str, runs: dict[tuple[str, int], dict[str, Any]], figdir: Path) -> None:
    """The policy's entropy on its trained tokens per step, per mode (mean over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn = False
    for mode in MODES:
        seeds = [s for s in SEEDS if (mode, s) in runs and runs[(mode, s)]["entropy"]]
        if not seeds:
            continue
        n = min(len(runs[(mode, s)]["entropy"]) for s in seeds)
        ys = [mean(runs[(mode, s)]["entropy"][i] for s in seeds) for i in range(n)]
        ax.plot(runs[(mode, seeds[0])]["entropy_steps"][:n], ys, color=COLORS[mode], label=mode)
        drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("entropy of π_θ on trained tokens (nats)")
        ax.set_title(f"{task}: policy entropy, mean over seeds", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(figdir / f"entropy-{task}.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- stream


def analyze_streams(out_dir: Path, figdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for mode in MODES:
        folder = out_dir / "streams" / f"stream-{mode}-s0"
        state_file = folder / "stream.json"
        if not state_file.is_file():
            continue
        entries = [e for e in json.loads(state_file.read_text())["stages"]]
        starts, ends, names, retention, intervals = [], [], [], [], []
        for e in entries:
            metrics = _read_metrics(folder / e["run"])
            evals = [m for m in metrics if "eval_pass_rate" in m]
            if e["status"] != "succeeded" or len(evals) < 2:
                continue
            names.append(e["stage"])
            starts.append(evals[0]["eval_pass_rate"])
            ends.append(evals[-1]["eval_pass_rate"])
            retention.append(e["evaluation"]["retention"])
            # The same test problems at the stage's first and last eval: a paired interval.
            first, last = evals[0].get("eval_passed"), evals[-1].get("eval_passed")
            paired = first is not None and last is not None and len(first) == len(last)
            intervals.append(
                _interval(bootstrap_diff([_bits(last)], [_bits(first)])) if paired else None
            )
        if not names:
            continue
        matrix = [[row.get(n) for n in names] for row in retention]
        result[mode] = {
            "stages": names,
            "start": starts,
            "end": ends,
            "acquisition": stage_acquisition(starts, ends),
            "acquisition_ci": intervals,
            "retention": matrix,
            "forgetting": forgetting(matrix) if len(matrix) == len(names) else None,
            "finished": bool((folder / "done.json").is_file()),
        }
    if result:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        shown = [m for m in MODES if m in result]
        width = 0.8 / len(shown)
        for i, mode in enumerate(shown):
            r = result[mode]
            xs = np.arange(len(r["stages"])) + (i - (len(shown) - 1) / 2) * width
            axes[0].bar(xs, r["acquisition"], width, color=COLORS[mode], label=mode)
            final = r["retention"][-1]
            axes[1].bar(
                xs,
                [v if v is not None else 0 for v in final],
                width,
                color=COLORS[mode],
                label=mode,
            )
        names = next(iter(result.values()))["stages"]
        for ax, title in zip(
            axes,
            [
                f"acquisition per stage (end − start, {EVAL_N} test problems)",
                "pass rate on each stage after the last (16 test problems)",
            ],
            strict=True,
        ):
            ax.set_xticks(range(len(names)), names)
            ax.set_title(title, fontsize=9)
            ax.axhline(0, color="k", lw=0.5)
            ax.legend()
        fig.tight_layout()
        fig.savefig(figdir / "stream.png", dpi=110)
        plt.close(fig)
    return result


# ----------------------------------------------------------------------------- plasticity


def plasticity_curves(out_dir: Path, seeds: tuple[int, ...] = SEEDS) -> dict[str, Any]:
    """Per arm (A trained in rl, fst or fst-distill, or the base) and seed: task B's fresh rl
    run, its held-out eval curve (every 2 steps) and training reward. Only finished B runs."""
    curves: dict[str, Any] = {}
    for arm in PLASTICITY_ARMS:
        for seed in seeds:
            folder = out_dir / "streams" / f"plasticity-{arm}-s{seed}"
            state_file = folder / "stream.json"
            if not state_file.is_file():
                continue
            entries = json.loads(state_file.read_text())["stages"]
            b = next((e for e in entries if e["stage"] == "b"), None)
            if b is None or b["status"] != "succeeded":
                continue
            metrics = _read_metrics(folder / b["run"])
            evals = [m for m in metrics if "eval_pass_rate" in m]
            train = [(m["step"], m["reward_mean"]) for m in metrics if "reward_mean" in m]
            curves.setdefault(arm, {})[seed] = {
                "eval_steps": [m["step"] for m in evals],
                "eval": [m["eval_pass_rate"] for m in evals],
                "passed_start": evals[0].get("eval_passed") if evals else None,
                "passed_end": evals[-1].get("eval_passed") if evals else None,
                "train_steps": [s for s, _ in train],
                "train_reward": [v for _, v in train],
            }
    return curves


def analyze_plasticity(out_dir: Path, figdir: Path) -> dict[str, Any]:
    """B's learning per arm: start, end, gain and the steps to reach a common threshold (the
    lowest final score of any arm on that seed, so that every arm gets there)."""
    curves = plasticity_curves(out_dir)
    if not curves:
        return {}
    result: dict[str, Any] = {"arms": {}, "steps_b": PLASTICITY_STEPS_B}
    seeds = sorted({s for per_seed in curves.values() for s in per_seed})
    for seed in seeds:
        arms = {a: c[seed] for a, c in curves.items() if seed in c}
        threshold = min(c["eval"][-1] for c in arms.values())
        for arm, c in arms.items():
            result["arms"].setdefault(arm, {})[seed] = {
                "start": c["eval"][0],
                "end": c["eval"][-1],
                "gain": c["eval"][-1] - c["eval"][0],
                "threshold": threshold,
                "steps_to_threshold": first_step_reaching(c["eval_steps"], c["eval"], threshold),
            }
    result["intervals"] = plasticity_intervals(curves)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, per_seed in curves.items():
        for i, (seed, c) in enumerate(sorted(per_seed.items())):
            label = f"A: {arm}" if i == 0 else None
            style = "-" if seed == seeds[0] else "--"
            axes[0].plot(c["eval_steps"], c["eval"], style, color=COLORS[arm], label=label)
            axes[1].plot(c["train_steps"], c["train_reward"], style, color=COLORS[arm], label=label)
    axes[0].set_title(f"task B held-out pass rate (greedy, {EVAL_N} test problems)", fontsize=9)
    axes[1].set_title("task B training reward", fontsize=9)
    for ax in axes:
        ax.set_xlabel("rl step on task B")
        ax.legend()
    fig.tight_layout()
    fig.savefig(figdir / "plasticity.png", dpi=110)
    plt.close(fig)
    return result


def plasticity_intervals(curves: dict[str, Any]) -> dict[str, Any]:
    """Per arm, over the seeds with per-problem outcomes: B's gain (end − start on the same
    test problems) and, for a trained arm, its B end − the base arm's B end (same seeds),
    each with a paired 95% bootstrap interval over seeds x problems."""

    def outcomes(arm: str, key: str, seeds: list[int]) -> list[list[int]] | None:
        rows = [curves[arm][s].get(key) for s in seeds]
        if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
            return None
        return [_bits(r) for r in rows]

    out: dict[str, Any] = {}
    for arm, per_seed in curves.items():
        seeds = sorted(per_seed)
        start, end = outcomes(arm, "passed_start", seeds), outcomes(arm, "passed_end", seeds)
        row: dict[str, Any] = {"seeds": seeds, "gain": None, "end_vs_base": None}
        if start and end:
            row["gain"] = _interval(bootstrap_diff(end, start))
        both = sorted(set(seeds) & set(curves.get("base", {})))
        if arm != "base" and both:
            mine, base = outcomes(arm, "passed_end", both), outcomes("base", "passed_end", both)
            if mine and base and len(mine[0]) == len(base[0]):
                row["end_vs_base"] = _interval(bootstrap_diff(mine, base))
        out[arm] = row
    return out


# ----------------------------------------------------------------------------- tables


def _fit_rows(fits: dict[str, Any]) -> list[str]:
    rows = []
    for mode, f in fits.items():
        if "error" in f:
            rows.append(f"| {mode} | {f['error']} | | | | | |")
            continue
        a = "1 (at bound)" if f["A_at_bound"] else _pm(f["A"], f["A_se"])
        cmid = _pm(f["C_mid"], f["C_mid_se"], 1) + (" (beyond data)" * f["C_mid_beyond_data"])
        rows.append(
            f"| {mode} | {_fmt(f['R0'])} | {a} | {_pm(f['B'], f['B_se'], 2)} | {cmid} | "
            f"{_fmt(f['rmse'])} | {f['n']} |"
        )
    return rows


def tables(summary: dict[str, Any]) -> str:
    lines = ["<!-- written by `python -m bench.learning analyze`; do not edit by hand -->", ""]
    lines += [
        "### Runs",
        "",
        "| run | steps | optimizer steps | distilled steps | training rollouts | GEPA "
        "metric calls | generated tokens | loop wall s | CPU s (last invocation) | "
        "final held-out | best held-out |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in sorted(summary["runs"].items()):
        label = f"{name} (running)" if r["running"] else name
        distilled = r.get("distill_steps", 0) if "-fst-distill-" in name else "–"
        lines.append(
            f"| {label} | {r['steps']} | {r['optimizer_steps']} | {distilled} | {r['rollouts']} | "
            f"{r['gepa_metric_calls']} | {r['gen_tokens']} | {r['loop_s']:.0f} | "
            f"{r['done'].get('cpu_s', float('nan')):.0f} | {_fmt(r['eval'][-1])} | "
            f"{_fmt(max(r['eval']))} |"
        )
    if summary["unfinished"]:
        lines += [
            "",
            f"Not finished: {', '.join(summary['unfinished'])} (a run marked running above is "
            "analysed up to the step it reached; comparisons use the steps both runs have).",
        ]
    for task, t in summary["tasks"].items():
        lines += [
            "",
            f"### {task}",
            "",
            "Sigmoid fit R = R0 + (A − R0)/(1 + (C_mid/C)^B) "
            "over steps, held-out pass rate, seeds pooled (± = standard error; A ≤ 1):",
            "",
            "| mode | R0 | A | B | C_mid | rmse | points |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += _fit_rows(t["fits"])
        lines += [
            "",
            "The same fit on the per-step training reward (sampled at T = 0.7, 16 rollouts a "
            "step, seeds pooled; R0 = mean step-1 reward):",
            "",
            "| mode | R0 | A | B | C_mid | rmse | points |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += _fit_rows(t["train_fits"])
        lines += [
            "",
            "Steps to reach RL's running peak (held-out pass rate, evaluated every "
            f"{COMMON['metrics']['evalEvery']} steps):",
            "",
            "| comparison | steps compared | RL peak | RL steps to it | steps to RL's peak | "
            "ratio | own peak |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key, p in t["peaks"].items():
            reached = p["candidate_steps"]
            lines.append(
                f"| {key} vs rl | 0–{p['up_to_step']} | {_fmt(p['reference_peak'])} | "
                f"{_fmt(p['reference_steps'], 0)} | "
                f"{'never' if reached is None else _fmt(reached, 0)} | "
                f"{_fmt(p['ratio'], 2)} | {_fmt(p['candidate_peak'])} |"
            )
        lines += [
            "",
            "KL to base at matched reward (the highest held-out pass rate both RL and "
            "FST reached):",
            "",
            "| seed | steps compared | matched pass rate | KL rl | KL fst | FST/RL | last KL rl | "
            "last KL fst |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key, k in t["kl"].items():
            lines.append(
                f"| {key} | 0–{k['up_to_step']} | {_fmt(k['target'])} | {_fmt(k['kl_rl'], 4)} | "
                f"{_fmt(k['kl_fst'], 4)} "
                f"| {_fmt(k['ratio'], 2)} | {_fmt(k['final_kl_rl'], 4)} | "
                f"{_fmt(k['final_kl_fst'], 4)} |"
            )
        if t["decomposition"]:
            lines += [
                "",
                f"Four-way channel decomposition of the FST run (greedy, {EVAL_N} test "
                "problems; gains over base weights + seed prompt):",
                "",
                "| seed | base | fast alone | slow alone | both | interaction |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for key, g in t["decomposition"].items():
                lines.append(
                    f"| {key} | {_fmt(g['base'])} | {g['fast']:+.3f} | {g['slow']:+.3f} | "
                    f"{g['both']:+.3f} | {g['interaction']:+.3f} |"
                )
    for task, t in summary["tasks"].items():
        if not t.get("differences"):
            continue
        lines += [
            "",
            f"### `{task}`: every mode against rl (95% bootstrap intervals)",
            "",
            "Final and OOD: pass-rate difference at the last eval, paired bootstrap over seeds "
            "and the held-out problems. Peak ratio: steps to reach rl's running peak / rl's "
            "steps (< 1 faster; over the seeds that reached it). KL ratio: KL to the base at "
            "matched held-out reward / rl's. Entropy: last 5 steps, difference per seed.",
            "",
            "| mode | seeds | final Δ | OOD Δ | peak ratio (reached) | KL ratio | entropy Δ |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for mode, d in t["differences"].items():
            lines.append(
                f"| {mode} | {len(d['seeds'])} | {_ci(d['final'], True)} | "
                f"{_ci(d['ood'], True)} | {_ci(d['peak_ratio'])} ({d['peak_reached']}) | "
                f"{_ci(d['kl_ratio'])} | {_ci(d['entropy'], True)} |"
            )
    for task, t in summary["tasks"].items():
        if not t.get("variants"):
            continue
        lines += [
            "",
            f"### `{task}`: variants against their mode (95% bootstrap intervals)",
            "",
            "Final and OOD Δ: variant − its mode at the last eval, paired bootstrap over seeds "
            "and the held-out problems. Peak ratio: steps to rl's running peak / rl's (reached "
            "by how many seeds). Per round: rollouts sampled, rollouts served from the steps "
            "(fast.reuseStepRollouts) and seconds, every round of every seed (2 jobs shared "
            "the CPU).",
            "",
            "| variant | of | seeds | final (variant / mode) | final Δ | OOD Δ | peak ratio: "
            "variant | mode | sampled / round | served / round | s / round |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for variant, d in t["variants"].items():
            lines.append(
                f"| {variant} | {d['base']} | {len(d['seeds'])} | {_fmt(d['variant_final'])} / "
                f"{_fmt(d['base_mode_final'])} | {_ci(d['final'], True)} | "
                f"{_ci(d['ood'], True)} | {_ci(d['variant_peak_ratio'])} "
                f"({d['variant_peak_reached']}) | {_ci(d['base_mode_peak_ratio'])} "
                f"({d['base_mode_peak_reached']}) | {d['variant_sampled_per_round']:.0f} / "
                f"{d['base_mode_sampled_per_round']:.0f} | {d['variant_reused_per_round']:.0f} | "
                f"{d['variant_round_s']:.0f} / {d['base_mode_round_s']:.0f} |"
            )
    if summary["streams"]:
        lines += [
            "",
            "### Continual stream (3 stages, one trajectory, seed 0)",
            "",
            f"start/end: the stage run's own held-out eval (greedy, {EVAL_N} test problems) at its "
            "first and last step; acquisition = end − start, with a 95% paired bootstrap "
            "interval over the test problems. At stream end and forgetting: "
            "`fst stream`'s retention evals (greedy, the first 16 test problems of each stage, "
            "best prompt) after the last stage; forgetting = score right after the stage − "
            "score at stream end.",
            "",
            "| mode | stage | start | end | acquisition | at stream end | forgetting |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for mode, r in summary["streams"].items():
            for i, name in enumerate(r["stages"]):
                fg = r["forgetting"][i] if r["forgetting"] else None
                ci = (r.get("acquisition_ci") or [None] * len(r["stages"]))[i]
                acquired = _ci(ci, True) if ci else f"{r['acquisition'][i]:+.3f}"
                lines.append(
                    f"| {mode} | {name} | {_fmt(r['start'][i])} | {_fmt(r['end'][i])} | "
                    f"{acquired} | {_fmt(r['retention'][-1][i])} | {_fmt(fg)} |"
                )
    if summary.get("plasticity"):
        lines += [
            "",
            "### Plasticity probe (a fresh rl run on task B from each checkpoint)",
            "",
            "Task A (`mul`) trained in mode rl, fst or fst-distill, or not at all (base); then "
            "task B (add/sub) by rl from that checkpoint under the seed prompt. Held-out greedy "
            "pass rate on B "
            f"({EVAL_N} test problems) at B's step 0 and last step; steps to threshold: the "
            "first B step at which the arm reaches the lowest final B score of any arm on that "
            "seed.",
            "",
            "| A trained by | seed | B start | B end | B gain | threshold | steps to threshold |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for arm, per_seed in summary["plasticity"]["arms"].items():
            for seed, r in sorted(per_seed.items()):
                reached = _fmt(r["steps_to_threshold"], 0)
                lines.append(
                    f"| {arm} | {seed} | {_fmt(r['start'])} | {_fmt(r['end'])} | "
                    f"{r['gain']:+.3f} | {_fmt(r['threshold'])} | {reached} |"
                )
        lines += [
            "",
            "Over seeds x test problems (95% paired bootstrap): B's gain, and B's final score "
            "against the base arm's.",
            "",
            "| A trained by | seeds | B gain | B end − base's B end |",
            "| --- | --- | --- | --- |",
        ]
        for arm, row in summary["plasticity"].get("intervals", {}).items():
            lines.append(
                f"| {arm} | {len(row['seeds'])} | {_ci(row['gain'], True)} | "
                f"{_ci(row['end_vs_base'], True)} |"
            )
    return "\n".join(lines) + "\n"


def analyze(out_dir: Path, docs: Path, partial: bool = False) -> dict[str, Any]:
    figdir = docs / "results"
    figdir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"runs": {}, "unfinished": [], "tasks": {}, "streams": {}}
    for task in TASKS:
        runs, variants = {}, {}
        for mode in (*MODES, *VARIANTS):
            for s in SEEDS:
                name = f"{task}-{mode}-s{s}"
                r = load_run(out_dir / "runs" / name, partial)
                if r is None or r["running"]:
                    summary["unfinished"].append(name)
                if r is None:
                    continue
                (runs if mode in MODES else variants)[(mode, s)] = r
                summary["runs"][name] = r
        if runs:
            summary["tasks"][task] = analyze_task(task, runs, figdir)
            summary["tasks"][task]["variants"] = variant_differences(runs, variants)
    summary["streams"] = analyze_streams(out_dir, figdir)
    summary["plasticity"] = analyze_plasticity(out_dir, figdir)
    summary["steps_per_run"] = STEPS
    (figdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (figdir / "tables.md").write_text(tables(summary))
    print(f"wrote {figdir}/tables.md, summary.json and plots")
    return summary
