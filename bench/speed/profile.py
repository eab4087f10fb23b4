"""Profile one fastslow RL step (the benchmark's settings): where the time goes.

    python -m bench.speed.profile [--max-new-tokens 128] [--precision bf16] [--top 12]

Runs one warm-up step, then one step under torch's (legacy, CPU) autograd profiler, with the
step's parts marked: decoding (`engine.generate`), the rest of the rollout phase (prompts,
scoring), the forward/backward passes (`trainer` minus the optimizer) and the optimizer update.
Prints each part's wall time and, per part, the operators with the most self CPU time.
CPU time is summed over threads, so under contention it is a steadier measure of work than
wall time.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections import defaultdict
from typing import Any

import torch

from bench.speed.fastslow_side import FastslowSide
from bench.speed.settings import BenchSettings
from fst.loop import rl_step

PARTS = ("decode", "rollout (rest)", "forward+backward", "optimizer")


def _mark(obj: Any, name: str, label: str, timings: dict[str, float]) -> None:
    """Wrap obj.name in a profiler range and a wall-clock timer (instrumentation only)."""
    original = getattr(obj, name)

    def wrapped(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        with torch.autograd.profiler.record_function(f"part:{label}"):
            out = original(*a, **k)
        timings[label] += time.perf_counter() - t0
        return out

    setattr(obj, name, wrapped)


def _part_of(evt: Any) -> str | None:
    node = evt
    while node is not None:
        if node.name.startswith("part:"):
            return node.name[5:]
        node = node.cpu_parent
    return None


def profile_step(settings: BenchSettings, top: int) -> str:
    side = FastslowSide(settings)
    run = side.fst_run
    timings: dict[str, float] = defaultdict(float)
    _mark(run.engine, "generate", "decode", timings)
    _mark(run.trainer, "step", "trainer", timings)
    _mark(run.trainer.optimizer, "step", "optimizer", timings)
    # Wrapping optimizer.step after the scheduler was built makes torch warn; it is still called
    # before the scheduler's step.
    warnings.filterwarnings("ignore", "Seems like `optimizer.step\\(\\)` has been overridden")
    rl_step(run)  # warm-up
    timings.clear()
    with torch.autograd.profiler.profile() as prof:
        t0 = time.perf_counter()
        record = rl_step(run)
        step_s = time.perf_counter() - t0
    side.close()

    wall = {
        "decode": timings["decode"],
        "rollout (rest)": record["gen_s"] - timings["decode"],
        "forward+backward": timings["trainer"] - timings["optimizer"],
        "optimizer": timings["optimizer"],
    }
    per_op: dict[str, dict[str, float]] = {p: defaultdict(float) for p in PARTS}
    cpu: dict[str, float] = defaultdict(float)
    for evt in prof.function_events:
        if evt.name.startswith("part:"):
            continue
        part = _part_of(evt)
        if part == "trainer":
            part = "forward+backward"
        if part is None:
            part = "rollout (rest)"
        per_op[part][evt.name] += evt.self_cpu_time_total / 1e6
        cpu[part] += evt.self_cpu_time_total / 1e6

    lines = [
        f"one step: {settings.problems_per_step}x{settings.group_size} completions x "
        f"{settings.max_new_tokens} tokens, {int(record['trained_tokens'])} trained tokens; "
        f"wall {step_s:.1f} s (profiler on), {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f}",
        "",
        "| part | wall s | CPU s | share of CPU |",
        "| --- | ---: | ---: | ---: |",
    ]
    total_cpu = sum(cpu.values())
    for p in PARTS:
        lines.append(f"| {p} | {wall[p]:.1f} | {cpu[p]:.1f} | {cpu[p] / total_cpu:.0%} |")
    for p in PARTS:
        ops = sorted(per_op[p].items(), key=lambda kv: -kv[1])[:top]
        if not ops:
            continue
        lines += ["", f"{p}: top operators by self CPU time", ""]
        lines += ["| operator | CPU s | share of part |", "| --- | ---: | ---: |"]
        lines += [f"| `{n}` | {s:.2f} | {s / cpu[p]:.0%} |" for n, s in ops]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speed.profile", description=__doc__)
    d = BenchSettings()
    p.add_argument("--problems-per-step", type=int, default=d.problems_per_step)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision)
    p.add_argument("--top", type=int, default=12, help="operators listed per part")
    a = p.parse_args(argv)
    settings = BenchSettings(
        problems_per_step=a.problems_per_step,
        group_size=a.group_size,
        max_new_tokens=a.max_new_tokens,
        threads=a.threads,
        precision=a.precision,
    )
    torch.set_num_threads(settings.threads)
    print(profile_step(settings, a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
