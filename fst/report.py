"""`fst report`: an HTML page with plots for a run or a whole task stream.

Reads only what runs write (metrics.jsonl, population.jsonl, stream.json); draws with
matplotlib (Agg, no display) and saves every figure as a PNG beside report.html.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fst.metrics import read_metrics
from fst.schema import ConfigError


@dataclass
class Segment:
    """One run's records placed on the stream's global step axis."""

    name: str
    run_dir: Path
    offset: int  # global step of this run's step 0
    metrics: list[dict[str, Any]]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    entry: dict[str, Any] = field(default_factory=dict)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise ConfigError(f"{path}:{lineno}: not a JSON record ({e})") from None
    return records


def _read_stream_entries(stream_file: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads(stream_file.read_text(errors="replace"))["stages"]
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and "run" in e and "name" in e for e in entries
        ):
            raise ValueError("stages must be a list of stage runs")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{stream_file}: not a stream state file ({e})") from None
    return entries


def load_segments(path: Path) -> tuple[list[Segment], str]:
    """(segments, kind): a stream folder (stream.json) or a single run folder."""
    stream_file = path / "stream.json"
    if stream_file.is_file():
        entries = _read_stream_entries(stream_file)
        segments, offset = [], 0
        for e in entries:
            run_dir = path / e["run"]
            metrics = _step_records(run_dir)
            segments.append(
                Segment(
                    e["name"],
                    run_dir,
                    offset,
                    metrics,
                    _read_jsonl(run_dir / "population.jsonl"),
                    e,
                )
            )
            offset += max((m["step"] for m in metrics), default=0)
        return segments, "stream"
    if (path / "metrics.jsonl").is_file():
        return [
            Segment(path.name, path, 0, _step_records(path), _read_jsonl(path / "population.jsonl"))
        ], "run"
    raise ConfigError(f"{path}: neither a stream (stream.json) nor a run (metrics.jsonl)")


def _step_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's per-step records; the step-0 held-out eval (metrics.evalEvery) has no rollouts,
    so it is left out of the reward and KL plots."""
    return [m for m in read_metrics(run_dir) if "reward_mean" in m]


def _smooth(values: list[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def plot_reward(segments: list[Segment], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    for seg in segments:
        xs = [seg.offset + m["step"] for m in seg.metrics]
        ys = [m["reward_mean"] for m in seg.metrics]
        (line,) = ax.plot(xs, ys, alpha=0.35)
        ax.plot(xs, _smooth(ys), color=line.get_color(), label=f"{seg.name} (5-step mean)")
        if seg.offset:
            ax.axvline(seg.offset + 0.5, color="grey", linestyle=":", linewidth=1)
        rounds = [seg.offset + m["step"] for m in seg.metrics if "round" in m]
        ax.plot(rounds, [0.0] * len(rounds), "|", color=line.get_color(), markersize=10)
    ax.set(
        xlabel="RL step (whole stream)",
        ylabel="mean reward of the step's rollouts",
        title="Reward per step, by stage (ticks at 0: GEPA rounds)",
        ylim=(-0.05, 1.05),
    )
    ax.legend(fontsize=8)
    return _save(fig, out / "reward_per_step.png")


def plot_kl(segments: list[Segment], out: Path) -> Path | None:
    points = [(seg, m) for seg in segments for m in seg.metrics if m.get("kl") is not None]
    if not points:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for seg in segments:
        ms = [m for m in seg.metrics if m.get("kl") is not None]
        if not ms:
            continue
        ax1.plot(
            [seg.offset + m["step"] for m in ms],
            [m["kl"] for m in ms],
            "o-",
            label=seg.name,
            markersize=3,
        )
        ax2.scatter([m["kl"] for m in ms], [m["reward_mean"] for m in ms], label=seg.name, s=14)
    ax1.set(
        xlabel="RL step (whole stream)",
        ylabel="KL(π_θ ‖ π_base), nats/token",
        title="KL to the base model",
    )
    ax2.set(
        xlabel="KL(π_θ ‖ π_base), nats/token",
        ylabel="mean reward",
        title="Reward against KL to base",
    )
    ax1.legend(fontsize=8)
    return _save(fig, out / "kl.png")


def plot_population(segments: list[Segment], out: Path) -> Path | None:
    """Every GEPA candidate at (round, val score); lines to its parent; members circled."""
    rounds = [(seg, r) for seg in segments for r in seg.rounds]
    if not rounds:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    where: dict[str, tuple[float, float]] = {}
    for x, (seg, r) in enumerate(rounds):
        members = {m["id"] for m in r["members"]}
        for c in r.get("candidates", r["members"]):
            y = c["mean_score"]
            for parent in c.get("parents", []):
                if parent in where:
                    ax.plot(
                        [where[parent][0], x],
                        [where[parent][1], y],
                        color="grey",
                        linewidth=0.7,
                        alpha=0.6,
                    )
            ax.scatter(
                [x],
                [y],
                s=40 if c["id"] in members else 12,
                facecolors="none" if c["id"] not in members else "C0",
                edgecolors="C0",
            )
            where[c["id"]] = (x, y)
        if r["round"] == 0:
            ax.annotate(seg.name, (x, 1.02), fontsize=7, ha="center")
    ax.set(
        xlabel="GEPA round (whole stream)",
        ylabel="mean Pareto-set reward",
        title="Prompt population: candidates (hollow), kept members (filled), lineage",
        ylim=(-0.05, 1.1),
    )
    return _save(fig, out / "population.png")


def plot_retention(segments: list[Segment], out: Path) -> Path | None:
    rows = [s for s in segments if s.entry.get("evaluation", {}).get("retention")]
    if not rows:
        return None
    stages = list(dict.fromkeys(k for s in rows for k in s.entry["evaluation"]["retention"]))
    grid = [[s.entry["evaluation"]["retention"].get(t, float("nan")) for t in stages] for s in rows]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(stages), 1.2 + 0.6 * len(rows)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=9)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_yticks(range(len(rows)), [f"after {s.name}" for s in rows])
    ax.set(title="Retention: test pass rate on each stage's task")
    fig.colorbar(im, ax=ax, fraction=0.05)
    return _save(fig, out / "retention.png")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(path: str | Path) -> Path:
    """Write report.html and its PNGs into `path` (a run or stream folder); return the page."""
    path = Path(path)
    segments, kind = load_segments(path)
    figures = [
        (
            plot_reward(segments, path),
            "Mean reward of each RL step's rollouts, per stage; the "
            "thick line is a 5-step running mean, dotted lines are stage boundaries.",
        ),
        (
            plot_kl(segments, path),
            "Left: KL(π_θ ‖ π_base) per token on fixed held-out prompts over the whole stream. "
            "Right: reward against KL (lower KL at the same reward is better).",
        ),
        (
            plot_population(segments, path),
            "Every GEPA round's candidates by mean score on the "
            "Pareto set; filled = kept in the population; grey lines = parent to child.",
        ),
        (
            plot_retention(segments, path),
            "After each stage, the greedy test pass rate on every "
            "stage's task so far (best prompt, trained weights): forgetting shows as a drop.",
        ),
    ]
    summary = []
    for s in segments:
        rewards = [m["reward_mean"] for m in s.metrics]
        kls = [m["kl"] for m in s.metrics if m.get("kl") is not None]
        summary.append(
            [
                s.name,
                len(s.metrics),
                rewards[0] if rewards else "-",
                max(_smooth(rewards)) if rewards else "-",
                rewards[-1] if rewards else "-",
                kls[-1] if kls else "-",
                len(s.rounds),
            ]
        )
    parts = [f"<h1>fastslow report: {html.escape(path.name)} ({kind})</h1>"]
    gate_rows = [_gate_row(s.name, s.entry["gate"]) for s in segments if s.entry.get("gate")]
    if gate_rows:
        parts += [
            "<h2>Summary: the promotion gate of each stage</h2>",
            "<p>Greedy test pass rate on the stage's own problems, of the model served before "
            "it (before) and of the stage's final weights with its best prompt (after); a "
            "stage is served only if promoted.</p>",
            _table(["stage", "before", "after", "n", "decision", "why"], gate_rows),
        ]
    parts += [
        "<h2>Stages</h2>",
        _table(
            [
                "stage",
                "steps",
                "first reward",
                "peak (5-step mean)",
                "last reward",
                "last KL",
                "GEPA rounds",
            ],
            summary,
        ),
    ]
    dec_rows = [
        [
            s.name,
            *[
                s.entry["evaluation"]["decomposition"].get(k, "-")
                for k in (
                    "base+seed prompt",
                    "base+FST prompt",
                    "trained+seed prompt",
                    "trained+FST prompt",
                )
            ],
            s.entry["evaluation"].get("n", "-"),
        ]
        for s in segments
        if s.entry.get("evaluation", {}).get("decomposition")
    ]
    if dec_rows:
        parts += [
            "<h2>Channel decomposition (greedy test pass rate)</h2>",
            _table(
                [
                    "stage",
                    "base + seed",
                    "base + FST prompt",
                    "trained + seed",
                    "trained + FST prompt",
                    "n",
                ],
                dec_rows,
            ),
        ]
    for fig, caption in figures:
        if fig is not None:
            parts.append(
                f"<figure><img src='{fig.name}'><figcaption>{html.escape(caption)}"
                "</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:100%}figcaption{color:#444;font-size:90%}"
    )
    page = path / "report.html"
    page.write_text(
        f"<!doctype html><meta charset=utf-8><title>fastslow {path.name}</title>"
        f"<style>{style}</style>" + "\n".join(parts)
    )
    return page


def _gate_row(name: str, gate: dict[str, Any]) -> list[Any]:
    """One summary row from a stage's gate decision (fst/promote.py GateDecision as JSON)."""
    stage = gate["stage"]
    before, after = gate["baseline"][stage], gate["candidate"][stage]
    decision = "promoted" if gate["promoted"] else f"rejected ({gate['reason']})"
    return [name, before["pass_rate"], after["pass_rate"], after["n"], decision, gate["message"]]
