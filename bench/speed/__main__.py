"""A step of fastslow against a step of TRL's GRPOTrainer(loss_type="cispo"), side by side.

    python -m bench.speed [--measured 5] [--warmup 1] [--max-new-tokens 128] ...

Two worker processes (bench/speed/worker.py) load the same model; the orchestrator then steps
them in turn - fastslow, TRL, TRL, fastslow, ... (the first of each pair alternates) - so that
a drift in the machine's load hits both alike. Only one trainer runs at a time. After `warmup`
unmeasured steps each, `measured` steps each are recorded. Per step: wall time, generation
tokens/s (generated tokens / decoding time), training tokens/s (trained tokens / (step time -
rollout time)), peak RSS during the step, CPU utilisation and load average. A measured pair
in which either trainer got less than `--min-cpu-share` of its cores (other processes took
them) is measured again, at most `--contention-retries` times per run. Equal work is
checked step by step (same prompt token ids, same generated and trained token counts; see
bench/speed/settings.py). Prints a Markdown table of medians and writes every record to JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from bench.speed.settings import BenchSettings

ROOT = Path(__file__).resolve().parents[2]
TRAINERS = ("fastslow", "trl")


def parse_args(argv: list[str] | None = None) -> tuple[BenchSettings, Path]:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n")[0])
    d = BenchSettings()
    p.add_argument("--measured", type=int, default=d.measured, help="measured steps per trainer")
    p.add_argument("--warmup", type=int, default=d.warmup, help="unmeasured steps per trainer")
    p.add_argument("--problems-per-step", type=int, default=d.problems_per_step)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per trainer")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=d.precision,
        help="fp32: both in float32; bf16: both with bfloat16 matmuls and float32 master "
        "weights (fastslow model.autocast: bfloat16, TRL bf16=True)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--trl-keep-freed-memory",
        action="store_true",
        help="give TRL's process fastslow's malloc setting (fst.loop.keep_freed_memory)",
    )
    p.add_argument(
        "--contention-retries",
        type=int,
        default=d.contention_retries,
        help="measured pairs re-run, at most, when a trainer got too little CPU",
    )
    p.add_argument(
        "--min-cpu-share",
        type=float,
        default=d.min_cpu_share,
        help="a step counts as contended below this share of --threads cores busy",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "runs" / "bench-speed" / f"result-{time.strftime('%Y%m%d-%H%M%S')}.json",
    )
    a = p.parse_args(argv)
    if a.measured < 1 or a.warmup < 0:
        p.error("--measured must be >= 1 and --warmup >= 0")
    names = {f.name for f in fields(BenchSettings)}
    settings = BenchSettings(**{k: v for k, v in vars(a).items() if k in names})
    return settings, a.out


def start_workers(settings: BenchSettings, log_dir: Path) -> dict[str, Any]:
    from bench.speed.worker import serve

    ctx = mp.get_context("spawn")
    workers = {}
    for kind in TRAINERS:
        parent, child = ctx.Pipe()
        log = log_dir / f"{kind}.log"
        proc = ctx.Process(
            target=serve, args=(kind, settings.to_dict(), child, str(log)), name=f"bench-{kind}"
        )
        proc.start()
        workers[kind] = {"proc": proc, "conn": parent, "log": log}
    for kind, w in workers.items():
        w["info"] = receive(kind, w)
        print(f"{kind}: loaded in {w['info']['load_s']:.1f} s", flush=True)
    return workers


def receive(kind: str, w: dict[str, Any]) -> dict[str, Any]:
    while not w["conn"].poll(5.0):
        if not w["proc"].is_alive():
            raise SystemExit(f"{kind} worker died; see {w['log']}")
    try:
        msg = w["conn"].recv()
    except EOFError:
        raise SystemExit(f"{kind} worker died; see {w['log']}") from None
    if "error" in msg:
        raise SystemExit(f"{kind} worker failed: {msg['error']}; see {w['log']}")
    return msg


def median(records: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in records)


def derived(r: dict[str, Any], matmul_params: int, peak_gflops: float) -> dict[str, Any]:
    """A step's rates. The training phase's GFLOP/s counts 6 FLOPs per matmul weight per
    trained token (the same count for both trainers: TRL's extra prompt forwards are work it
    chose, not work the step needs), against the matmul peak in the run's precision."""
    train_s = r["step_s"] - r["rollout_s"]
    train_gflops = 6 * matmul_params * r["trained_tokens"] / train_s / 1e9
    return {
        **r,
        "train_phase_s": train_s,
        "gen_tok_per_s": r["gen_tokens"] / r["decode_s"],
        "train_tok_per_s": r["trained_tokens"] / train_s,
        "train_gflops": train_gflops,
        "train_peak_pct": 100 * train_gflops / peak_gflops,
    }


def equal_work(steps: list[dict[str, dict[str, Any]]]) -> list[str]:
    """Mismatches between the two trainers' work, step by step (empty: equal work)."""
    problems = []
    for i, pair in enumerate(steps):
        a, b = pair["fastslow"], pair["trl"]
        for key in ("prompts_hash", "gen_tokens", "trained_tokens"):
            if a[key] != b[key]:
                problems.append(f"step {i + 1}: {key} fastslow={a[key]} trl={b[key]}")
    return problems


ROWS = (
    ("step time (s)", "step_s", "{:.1f}"),
    ("  rollout phase (s)", "rollout_s", "{:.1f}"),
    ("  training phase (s)", "train_phase_s", "{:.1f}"),
    ("generation tokens/s", "gen_tok_per_s", "{:.0f}"),
    ("training tokens/s", "train_tok_per_s", "{:.0f}"),
    ("training GFLOP/s (6 x matmul weights x trained tokens)", "train_gflops", "{:.0f}"),
    ("  % of the matmul peak in this precision", "train_peak_pct", "{:.0f}"),
    ("peak RSS during a step (MiB)", "peak_rss_mib", "{:.0f}"),
    ("CPU utilisation (cores busy)", "cpu_util", "{:.2f}"),
    ("load average (1 min) at step start", "load_start", "{:.1f}"),
)


def table(measured: list[dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| median over measured steps | fastslow | TRL | fastslow / TRL |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, key, fmt in ROWS:
        f = median([s["fastslow"] for s in measured], key)
        t = median([s["trl"] for s in measured], key)
        lines.append(f"| {label} | {fmt.format(f)} | {fmt.format(t)} | {f / t:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    settings, out = parse_args(argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.with_suffix("")
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"settings: {settings.to_dict()}", flush=True)
    print(f"worker logs: {log_dir}/", flush=True)
    started = time.time()
    load_before = os.getloadavg()
    workers = start_workers(settings, log_dir)
    # Measured with both workers loaded and idle (blocked on their pipes), so the peak is what
    # this machine gives a process right now, in both precisions (the other one for reference).
    from bench.speed.peak import PRECISIONS, matmul_gflops

    peaks = {name: matmul_gflops(dtype, settings.threads) for name, dtype in PRECISIONS.items()}
    peak = peaks[settings.precision]
    print(
        "matmul peak (2048^3, "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
        + f"), {settings.threads} threads",
        flush=True,
    )
    n_matmul = workers["fastslow"]["info"]["matmul_params"]
    steps: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    try:
        attempt, retries_left = 0, settings.contention_retries
        min_util = settings.min_cpu_share * settings.threads
        while len(steps) < settings.total_steps:
            i = len(steps)
            order = TRAINERS if attempt % 2 == 0 else TRAINERS[::-1]
            attempt += 1
            pair: dict[str, Any] = {}
            for kind in order:
                # A dead worker's pipe is broken; receive() then reports its error.
                with contextlib.suppress(BrokenPipeError):
                    workers[kind]["conn"].send("step")
                pair[kind] = derived(receive(kind, workers[kind]), n_matmul, peak)
            contended = [k for k in TRAINERS if pair[k]["cpu_util"] < min_util]
            tag = "warm-up" if i < settings.warmup else "measured"
            print(
                f"step {i + 1}/{settings.total_steps} ({tag}): "
                + ", ".join(
                    f"{k} {pair[k]['step_s']:.1f} s (cpu {pair[k]['cpu_util']:.2f})"
                    for k in TRAINERS
                )
                + f", load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if contended and tag == "measured" and retries_left > 0:
                # Other processes took this pair's cores: measure the pair again (both
                # trainers, so neither gets a second chance alone). Kept in the JSON.
                retries_left -= 1
                discarded.append(pair)
                print(f"  contended ({', '.join(contended)} below {min_util:.2f}): again")
                continue
            pair["contended"] = bool(contended)
            steps.append(pair)
    finally:
        for w in workers.values():
            if w["proc"].is_alive():
                with contextlib.suppress(BrokenPipeError):
                    w["conn"].send("stop")
        for w in workers.values():
            w["proc"].join(timeout=120)
            if w["proc"].is_alive():
                w["proc"].terminate()

    measured = steps[settings.warmup :]
    mismatches = equal_work(steps + discarded)
    ratio = median([s["fastslow"] for s in measured], "step_s") / median(
        [s["trl"] for s in measured], "step_s"
    )
    import torch
    import transformers

    result = {
        "settings": settings.to_dict(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_s": time.time() - started,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": workers["trl"]["info"].get("trl_version"),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "matmul_peak_gflops": peaks,
        "matmul_params": n_matmul,
        "equal_work": not mismatches,
        "mismatches": mismatches,
        "step_time_ratio": ratio,
        "steps": steps,
        "discarded_contended_pairs": discarded,
    }
    out.write_text(json.dumps(result, indent=1))
    print()
    print(table(measured))
    print()
    n = settings.problems_per_step * settings.group_size
    print(
        f"work per step: {n} completions x {settings.max_new_tokens} tokens generated and "
        f"trained; equal work: {'yes' if not mismatches else 'NO'}"
    )
    for m in mismatches:
        print(f"  mismatch: {m}")
    kept = sum(bool(p["contended"]) for p in measured)
    print(
        f"contention: {len(discarded)} measured pair(s) re-run because a trainer got less than "
        f"{settings.min_cpu_share:.0%} of {settings.threads} cores; {kept} contended pair(s) kept"
    )
    print(f"fastslow step time / TRL step time (medians, {settings.precision}): {ratio:.2f}")
    print(f"records: {out}")
    return 0 if not mismatches else 1


if __name__ == "__main__":
    raise SystemExit(main())
