"""An FST step against an RL step on the same work: what the fast channel costs.

    python -m bench.fst_overhead [--cycles 3] [--every 4] [--proposals-per-iteration 1 4]
                                 [--reuse-step-rollouts 4] ...

Worker processes build the same run (SmolLM2, the same problems in the same order, P problems
x G completions, the same sampling and optimizer settings): one with `mode: rl`, and one with
`mode: fst` (K prompts, a GEPA round every T steps with the LLM-free digest reflector) per
value of `fast.proposalsPerIteration` given, and one more with `fast.reuseStepRollouts` per
value given to --reuse-step-rollouts (and, with --max-prompt-tokens, a twin of each under that
budget; with --overlap-round, those reuse workers run with `fast.overlapRound`: a round's rows
ride in the steps' engine calls, its "round" is its own work before the steps of a cycle, and
what its rows add shows in the steps' times; a round's counts (rows, candidates) are those of
each round that ended in a measured cycle). The orchestrator runs them one at a time, a
cycle each in turn (the order rotates every cycle): a cycle is T RL steps, or, for FST, one
GEPA round and T steps (the round runs before the step whose number is a multiple of T, as in
`fst train`). The first cycle of each is a warm-up: FST's first round starts from the seed
prompt alone, later ones from K prompts.

Reported (medians over measured cycles): the RL step, the FST step without its round, the
round, and the FST step with the round amortised over T, as a ratio to the RL step; and, over
all measured cycles together, the FST worker's time (steps and rounds) per step against the RL
worker's. Where the round's time goes is measured by timing every call it makes to the rollout
engine: re-scoring the population on the Pareto set, GEPA's minibatch evaluations (parent and
child) and its full-Pareto-set evaluations of accepted children, with rows per call; the rest
is reflection and bookkeeping. Completions end at the stop token (not forced to N tokens as in
bench.speed): FST's prompts change what the policy writes, so generated and prompt tokens per
step are reported beside the times rather than equalised.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

from bench.learning.spec import TASKS as LEARNING_TASKS
from bench.record import machine, started_at
from bench.speed.__main__ import receive  # a worker's next message, or its death reported

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2-135m-instruct"
    problems_per_step: int = 4  # P
    group_size: int = 8  # G
    max_new_tokens: int = 128
    every: int = 4  # T: a GEPA round every T steps
    top_k: int = 4  # K
    metric_calls: int = 64  # GEPA's budget per round (rollouts)
    minibatch_size: int = 4
    pareto_size: int = 16
    proposals_per_iteration: tuple[int, ...] = (1, 4)  # one FST worker per value
    # One more FST worker per value, with fast.reuseStepRollouts: its rounds start from the
    # last T steps' rollouts.
    reuse_step_rollouts: tuple[int, ...] = ()
    # > 0: one more worker per reuse_step_rollouts value, with fast.maxPromptTokens this.
    max_prompt_tokens: int = 0
    # True: the reuse workers run with fast.overlapRound (and room for the round's rows in
    # rollout.batchSize). Not twins beside them: five workers of SmolLM2 with AdamW (~5 GB
    # each at their peak) did not fit in this machine's 24 GB (one was OOM-killed).
    overlap_round: bool = False
    cycles: int = 3  # per mode; the first is a warm-up
    precision: str = "fp32"
    seed: int = 0
    threads: int = os.cpu_count() or 1


class Worker(NamedTuple):
    proposals: int  # fast.proposalsPerIteration; 0: the RL worker
    reuse: bool = False  # fast.reuseStepRollouts
    budget: int | None = None  # fast.maxPromptTokens
    overlap: bool = False  # fast.overlapRound


def workers_of(s: Settings) -> dict[str, Worker]:
    """Worker name -> its settings."""
    workers = {"rl": Worker(0)}
    workers |= {f"fst p={n}": Worker(n) for n in s.proposals_per_iteration}
    reuse = {f"fst p={n} reuse": Worker(n, True) for n in s.reuse_step_rollouts}
    if s.max_prompt_tokens > 0:
        budget = s.max_prompt_tokens
        reuse |= {
            f"fst p={n} reuse max{budget}": Worker(n, True, budget) for n in s.reuse_step_rollouts
        }
    if s.overlap_round:
        reuse = {f"{name} overlap": w._replace(overlap=True) for name, w in reuse.items()}
    return workers | reuse


def train_config(s: Settings, worker: Worker, output_dir: Path) -> Any:
    from fst.config import TrainConfig

    proposals, reuse, max_prompt_tokens, overlap = worker
    mode = "fst" if proposals else "rl"
    # With fast.overlapRound a step's engine call carries a round's rows too (0-36 beside the
    # step's 32 in docs/performance.md's runs): room for them, or they would run as a second
    # batch after the step's.
    batch_size = s.problems_per_step * s.group_size * (2 if overlap else 1)
    return TrainConfig.model_validate(
        {
            "run": f"bench-overhead-{mode}-{proposals}{'-reuse' if reuse else ''}"
            + (f"-max{max_prompt_tokens}" if max_prompt_tokens else "")
            + ("-overlap" if overlap else ""),
            "mode": mode,
            "steps": s.cycles * s.every,
            "seed": s.seed,
            "outputDir": str(output_dir),
            "model": {
                "name": s.model,
                "autocast": "bfloat16" if s.precision == "bf16" else "none",
            },
            # The learning bench's `mul` task: SmolLM2 solves about half of it, so groups
            # vary, RL trains every step and GEPA's candidates can differ in score.
            "task": copy.deepcopy(LEARNING_TASKS["mul"]),
            "rollout": {
                "maxNewTokens": s.max_new_tokens,
                "batchSize": batch_size,
            },
            "slow": {
                "problemsPerStep": s.problems_per_step,
                "groupSize": s.group_size,
                "lr": 1e-5,
                "microBatchSize": 8,
                "warmupSteps": 0,
            },
            "fast": {
                "everySteps": s.every,
                "topK": s.top_k,
                "metricCalls": s.metric_calls,
                "minibatchSize": s.minibatch_size,
                "paretoSize": s.pareto_size,
                "proposalsPerIteration": max(proposals, 1),
                "reuseStepRollouts": reuse,
                "maxPromptTokens": max_prompt_tokens,
                "overlapRound": overlap,
            },
            "metrics": {"klPrompts": 0, "evalEvery": 0},
            "checkpoint": {"every": 10_000},
        }
    )


class EngineCalls:
    """Every call the run makes to its rollout engine: phase, rows, prompt tokens, seconds.
    The phase is set by the worker: step, rescore (the round re-scoring its population), gepa
    minibatch (parents' and children's evaluations) or gepa Pareto set (accepted children's)."""

    def __init__(self, engine: Any) -> None:
        self.phase, self.calls = "step", []
        original = engine.generate

        def generate(prompts, params, generator):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = original(prompts, params, generator)
            self.calls.append(
                {
                    "phase": self.phase,
                    "rows": len(prompts),
                    "prompt_tokens": sum(len(p) for p in prompts),
                    "gen_tokens": sum(len(r.completion_ids) for r in out),
                    # The decoding steps the call ran: its longest completion.
                    "longest": max((len(r.completion_ids) for r in out), default=0),
                    # What a decoding step attends over: the longest prompt.
                    "longest_prompt": max((len(p) for p in prompts), default=0),
                    "s": time.perf_counter() - t0,
                }
            )
            return out

        engine.generate = generate

    def take(self) -> list[dict[str, Any]]:
        calls, self.calls = self.calls, []
        return calls


def serve(
    worker: Worker,
    settings_dict: dict[str, Any],
    conn: Connection,
    log_path: str,
) -> None:
    """A worker process: build the run, then run one cycle per "cycle" command."""
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    import torch

    from bench.speed.worker import StepMeter
    from fst import loop
    from fst.fast import gepa_adapter
    from fst.model import prompt_tokens

    proposals = worker.proposals
    s = Settings(**{**settings_dict, "proposals_per_iteration": (proposals,)})
    torch.set_num_threads(s.threads)
    out_dir = Path(tempfile.mkdtemp(prefix=f"fst-bench-overhead-{proposals}-"))
    try:
        t0 = time.perf_counter()
        cfg = train_config(s, worker, out_dir)
        run = loop.build_run(cfg, cfg.run_dir)
        calls = EngineCalls(run.engine)
        optimize = gepa_adapter.gepa.optimize

        def gepa_phase(*a: Any, **k: Any) -> Any:  # the round's search, after its re-scoring
            calls.phase = "gepa"
            return optimize(*a, **k)

        gepa_adapter.gepa.optimize = gepa_phase  # type: ignore[attr-defined]
        batch_evaluate = gepa_adapter.PolicyAdapter.batch_evaluate

        def classified(adapter: Any, items: list[Any]) -> Any:
            if calls.phase != "rescore":  # GEPA's own: whole Pareto sets, or minibatches
                full = all(len(batch) == s.pareto_size for _, batch in items)
                calls.phase = "gepa Pareto set" if full else "gepa minibatch"
            return batch_evaluate(adapter, items)

        gepa_adapter.PolicyAdapter.batch_evaluate = classified  # type: ignore[method-assign]
        conn.send({"ready": True, "load_s": time.perf_counter() - t0})
        meter = StepMeter()
        while conn.recv() == "cycle":
            steps, rounds = [], []
            # fast.overlapRound: the rounds' own work before every step of the cycle (their
            # attempts; their rows ride in the steps' engine calls), timed as one entry; the
            # metrics of each round that ended in the cycle kept apart under "ended".
            in_flight: dict[str, Any] = {"step_s": 0.0, "calls": [], "ended": []}
            for _ in range(s.every):
                if worker.overlap:
                    calls.phase = "rescore"
                    meter.start()
                    due = run.step % s.every == 0
                    metrics = loop.fast_channel(run, due, checkpoint_next=False)
                    in_flight["step_s"] += meter.stop()["step_s"]
                    in_flight["calls"] += calls.take()
                    if metrics:
                        in_flight["ended"].append(metrics)
                elif proposals and run.step % s.every == 0:
                    calls.phase = "rescore"
                    meter.start()
                    metrics = loop.gepa_round(run)
                    sizes = [prompt_tokens(run.tokenizer, p.text) for p in run.population]
                    rounds.append(
                        {
                            **meter.stop(),
                            **metrics,
                            "population_tokens": sizes,
                            "calls": calls.take(),
                        }
                    )
                calls.phase = "step"
                meter.start()
                record = loop.rl_step(run)
                run.sink.write(record)
                steps.append(
                    {
                        **meter.stop(),
                        "gen_tokens": int(record["gen_tokens"]),
                        "trained_tokens": int(record.get("trained_tokens", 0)),
                        "gen_s": record["gen_s"],
                        "reward_mean": record["reward_mean"],
                        "calls": calls.take(),
                    }
                )
            if worker.overlap:
                rounds.append(in_flight)
            conn.send({"steps": steps, "rounds": rounds})
        run.sink.close()
    except BaseException as e:  # report, then die: the orchestrator must not hang
        import traceback

        traceback.print_exc()
        conn.send({"error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # the run's metrics and GEPA rounds


def round_breakdown(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per round by what the engine was doing, and the rest."""
    parts: dict[str, list[float]] = {}
    for r in rounds:
        kinds = {"rescore": 0.0, "gepa minibatch": 0.0, "gepa Pareto set": 0.0}
        rows = {k: 0 for k in kinds}
        n_calls = {k: 0 for k in kinds}
        for c in r["calls"]:
            kind = c["phase"]
            kinds[kind] += c["s"]
            rows[kind] += c["rows"]
            n_calls[kind] += 1
        for k in kinds:
            parts.setdefault(f"{k} (s)", []).append(kinds[k])
            parts.setdefault(f"{k} (calls)", []).append(n_calls[k])
            parts.setdefault(f"{k} (rows)", []).append(rows[k])
        parts.setdefault("reflection + bookkeeping (s)", []).append(
            r["step_s"] - sum(kinds.values())
        )
        parts.setdefault("round (s)", []).append(r["step_s"])
    return {k: statistics.median(v) for k, v in parts.items()}


def _median_of(rounds: list[dict[str, Any]], key: str) -> float:
    """The median of one metric over the rounds that ended (0 if none did: a round in flight
    may end only after the last measured cycle)."""
    return statistics.median(r.get(key, 0) for r in rounds) if rounds else 0.0


def summary(rl_cycles: list[dict[str, Any]], fst_cycles: list[dict[str, Any]], every: int) -> dict:
    """Medians over measured cycles of one FST worker against the RL worker."""
    rl_steps = [st for c in rl_cycles for st in c["steps"]]
    fst_steps = [st for c in fst_cycles for st in c["steps"]]
    rounds = [r for c in fst_cycles for r in c["rounds"]]
    # The metrics of each round that ended: a round run at once is its own entry; an entry of
    # fast.overlapRound's holds those that ended in its cycle (none, one, or two).
    ended = [m for r in rounds for m in r.get("ended", [r])]
    rl = statistics.median(x["step_s"] for x in rl_steps)
    fst = statistics.median(x["step_s"] for x in fst_steps)
    # Per cycle: (T steps + its round) / T, the FST step with its round amortised.
    amortised = statistics.median(
        (sum(x["step_s"] for x in c["steps"]) + sum(r["step_s"] for r in c["rounds"])) / every
        for c in fst_cycles
    )

    # The whole run's time per step, rounds included: every measured cycle weighs by its
    # length, so one slow cycle moves it less than it moves the median of four.
    fst_total = sum(x["step_s"] for x in fst_steps) + sum(r["step_s"] for r in rounds)
    rl_mean = sum(x["step_s"] for x in rl_steps) / len(rl_steps)
    fst_mean = fst_total / len(fst_steps)

    def prompt_tokens(steps: list[dict[str, Any]]) -> float:
        return statistics.median(sum(c["prompt_tokens"] for c in x["calls"]) for x in steps)

    return {
        "rl_step_s": rl,
        "fst_step_s": fst,
        "round_s": statistics.median(r["step_s"] for r in rounds),
        "fst_amortised_step_s": amortised,
        "ratio_without_round": fst / rl,
        "ratio_amortised": amortised / rl,
        "rl_mean_step_s": rl_mean,
        "fst_mean_step_with_rounds_s": fst_mean,
        "ratio_of_totals": fst_mean / rl_mean,
        "rl_gen_tokens": statistics.median(x["gen_tokens"] for x in rl_steps),
        "fst_gen_tokens": statistics.median(x["gen_tokens"] for x in fst_steps),
        "rl_trained_tokens": statistics.median(x["trained_tokens"] for x in rl_steps),
        "fst_trained_tokens": statistics.median(x["trained_tokens"] for x in fst_steps),
        "rl_reward": statistics.mean(x["reward_mean"] for x in rl_steps),
        "fst_reward": statistics.mean(x["reward_mean"] for x in fst_steps),
        "rl_prompt_tokens": prompt_tokens(rl_steps),
        "fst_prompt_tokens": prompt_tokens(fst_steps),
        "rounds_ended": sum(m.get("gepa_rounds_ended", 1) for m in ended),
        "round_metric_calls": _median_of(ended, "gepa_metric_calls"),
        "round_reused_rows": _median_of(ended, "gepa_reused_rows"),
        "round_over_budget_rows": _median_of(ended, "gepa_over_budget_rows"),
        "round_new_candidates": _median_of(ended, "gepa_new_candidates"),
        "round_rows_alongside_steps": _median_of(ended, "gepa_rows_alongside_steps"),
        "round_breakdown": round_breakdown(rounds),
    }


def parse_args(argv: list[str] | None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(
        prog="python -m bench.fst_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Settings()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "precision":
            p.add_argument(flag, choices=("fp32", "bf16"), default=d.precision)
        elif f.name in ("proposals_per_iteration", "reuse_step_rollouts"):
            p.add_argument(flag, type=int, nargs="*", default=list(getattr(d, f.name)))
        elif f.name == "overlap_round":
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "runs" / "bench-overhead" / f"result-{time.strftime('%Y%m%d-%H%M%S')}.json",
    )
    a = p.parse_args(argv)
    if a.cycles < 2:
        p.error("--cycles must be >= 2 (the first cycle is a warm-up)")
    if min(a.proposals_per_iteration + a.reuse_step_rollouts, default=1) < 1:
        p.error("--proposals-per-iteration and --reuse-step-rollouts values must be >= 1")
    if not a.proposals_per_iteration + a.reuse_step_rollouts:
        p.error("no FST worker: give --proposals-per-iteration or --reuse-step-rollouts values")
    a.proposals_per_iteration = tuple(a.proposals_per_iteration)
    a.reuse_step_rollouts = tuple(a.reuse_step_rollouts)
    names = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in vars(a).items() if k in names}), a.out


def table(s: Settings, results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    first = results[names[0]]
    head = "| median over measured cycles | RL | " + " | ".join(names) + " |"
    rows = [head, "| --- | ---: |" + " ---: |" * len(names)]

    def row(label: str, rl: str, key: str, fmt: str, ratio: str | None = None) -> None:
        cells = []
        for n in names:
            cell = fmt.format(results[n][key])
            if ratio is not None:
                cell += f" ({results[n][ratio]:.2f}x)"
            cells.append(cell)
        rows.append(f"| {label} | {rl} | " + " | ".join(cells) + " |")

    row(
        "step without a round (s)",
        f"{first['rl_step_s']:.1f}",
        "fst_step_s",
        "{:.1f}",
        "ratio_without_round",
    )
    row("GEPA round (s)", "-", "round_s", "{:.1f}")
    row(
        f"step + round / T, T = {s.every} (s)",
        f"{first['rl_step_s']:.1f}",
        "fst_amortised_step_s",
        "{:.1f}",
        "ratio_amortised",
    )
    row(
        "all measured cycles: time per step, rounds included (s)",
        f"{first['rl_mean_step_s']:.1f}",
        "fst_mean_step_with_rounds_s",
        "{:.1f}",
        "ratio_of_totals",
    )
    row("generated tokens per step", f"{first['rl_gen_tokens']:.0f}", "fst_gen_tokens", "{:.0f}")
    row("prompt tokens per step", f"{first['rl_prompt_tokens']:.0f}", "fst_prompt_tokens", "{:.0f}")
    row(
        "trained tokens per step",
        f"{first['rl_trained_tokens']:.0f}",
        "fst_trained_tokens",
        "{:.0f}",
    )
    row("mean reward of the steps", f"{first['rl_reward']:.3f}", "fst_reward", "{:.3f}")
    row("rounds that ended in the measured cycles", "-", "rounds_ended", "{:d}")
    row("round: rollouts sampled", "-", "round_metric_calls", "{:.0f}")
    row("round: rollouts sampled in the steps' calls", "-", "round_rows_alongside_steps", "{:.0f}")
    row("round: rollouts served from the steps", "-", "round_reused_rows", "{:.0f}")
    row("round: candidates' rows over the prompt budget", "-", "round_over_budget_rows", "{:.0f}")
    row("round: new candidates", "-", "round_new_candidates", "{:.0f}")
    for k in first["round_breakdown"]:
        rows.append(
            f"| round: {k} | - | "
            + " | ".join(f"{results[n]['round_breakdown'][k]:.1f}" for n in names)
            + " |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    s, out = parse_args(argv)
    log_dir = out.with_suffix("")
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"settings: {asdict(s)}\nworker logs: {log_dir}/", flush=True)
    started, load_before = time.time(), os.getloadavg()
    ctx = mp.get_context("spawn")
    names = workers_of(s)
    workers: dict[str, dict[str, Any]] = {}
    for name, worker in names.items():
        parent, child = ctx.Pipe()
        log = log_dir / f"{name.replace(' ', '-')}.log"
        proc = ctx.Process(target=serve, args=(worker, asdict(s), child, str(log)))
        proc.start()
        workers[name] = {"proc": proc, "conn": parent, "log": log}
    for name, w in workers.items():
        print(f"{name}: loaded in {receive(name, w)['load_s']:.1f} s", flush=True)
    cycles: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    order = list(names)
    try:
        for i in range(s.cycles):
            for name in order[i % len(order) :] + order[: i % len(order)]:
                workers[name]["conn"].send("cycle")
                c = receive(name, workers[name])
                c["load_end"] = os.getloadavg()[0]
                cycles[name].append(c)
                took = sum(x["step_s"] for x in c["steps"] + c["rounds"])
                rounds = ", ".join(f"round {r['step_s']:.1f} s" for r in c["rounds"])
                print(
                    f"cycle {i + 1}/{s.cycles} {'(warm-up) ' if i == 0 else ''}{name}: "
                    f"{took:.1f} s, steps "
                    + " ".join(f"{x['step_s']:.1f}" for x in c["steps"])
                    + (f", {rounds}" if rounds else "")
                    + f", load {c['load_end']:.1f}",
                    flush=True,
                )
    finally:
        for w in workers.values():
            with contextlib.suppress(BrokenPipeError, OSError):
                w["conn"].send("stop")
            w["proc"].join(timeout=120)
            if w["proc"].is_alive():
                w["proc"].terminate()

    measured = {n: c[1:] for n, c in cycles.items()}
    results = {n: summary(measured["rl"], measured[n], s.every) for n in names if n != "rl"}
    out.write_text(
        json.dumps(
            {
                "settings": asdict(s),
                "started": started_at(started),
                "wall_s": time.time() - started,
                "machine": machine(load_before),
                "summary": results,
                "cycles": cycles,
            },
            indent=1,
        )
    )
    print()
    print(table(s, results))
    print(f"\nrecords: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
