"""Run the learning benchmark with our own CLI: `fst train` per run, `fst stream` per stream.

Every job is a subprocess of `python -m fst` (this checkout's code, PYTHONPATH=its root), one
torch thread each, `--resume` always: a killed bench continues where it stopped, and a job
with a `done.json` is skipped. After a run finishes, an FST run gets its four-way channel
decomposition (`fst eval`), then its checkpoints are deleted (~1.6 GB each; the metrics,
populations and decomposition are what the analysis reads).

A finished job's small files are then copied into the repo's record (`bench/learning/results`,
the same layout as the workspace, without weights): the analysis reads the record, so the
published tables can be rebuilt from a clone, and a runner on a machine whose workspace was
lost restores the recorded jobs first and runs only the others.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.learning.spec import (
    COMMON,
    MODES,
    PLASTICITY_ARMS,
    SEEDS,
    STEPS,
    TASKS,
    RunSpec,
    all_runs,
    base_mode,
    plasticity_manifest,
    run_config,
    stream_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path(os.environ.get("FST_CACHE", Path.home() / ".cache" / "fastslow")) / (
    "bench-runs/learning"
)
RECORD = ROOT / "bench" / "learning" / "results"
# Weights, locks and databases stay out of the record: a finished job's checkpoints are deleted
# anyway, a stream's bundles only point at them, and its database holds what its files hold
# (metrics.jsonl, population.jsonl, stream.json: what the analysis reads). So do rendered
# pages: GEPA's candidate trees (the same page around each round's candidates.json) and a
# stream's report.html (`fst report` writes it again; its plots stay, they show as images).
_NOT_RECORDED = shutil.ignore_patterns(
    "checkpoints",
    "candidate_tree.html",
    "report.html",
    ".lock",
    "*.migrate-lock",
    "*.safetensors",
    "*.pt",
    "*.bin",
    "*.distcp",
    "*.gguf",
    "*.db",
    "*.db-wal",
    "*.db-shm",
)


@dataclass
class Job:
    name: str
    folder: Path  # where done.json goes
    commands: list[list[str]]
    cleanup: Callable[[], None]

    @property
    def done(self) -> bool:
        return (self.folder / "done.json").is_file()


def fst(*args: str) -> list[str]:
    return [sys.executable, "-m", "fst", *args]


def train_job(spec: RunSpec, out: Path, steps: int) -> Job:
    runs = out / "runs"
    cfg_path = out / "configs" / f"{spec.name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(run_config(spec, str(runs), steps), sort_keys=False))
    run_dir = runs / spec.name
    commands = [fst("train", "-c", str(cfg_path), "--resume", "--no-progress")]
    if base_mode(spec.mode) in ("fst", "fst-distill"):
        # Greedy, on the same test problems as the periodic eval.
        commands.append(
            fst(
                "eval",
                "-c",
                str(cfg_path),
                "--limit",
                str(COMMON["metrics"]["evalProblems"]),
                "--json",
                str(run_dir / "decomposition.json"),
            )
        )
    return Job(spec.name, run_dir, commands, lambda: _rm(run_dir / "checkpoints"))


def stream_job(mode: str, out: Path) -> Job:
    return _stream_job(stream_manifest(mode, str(out / "streams")), out)


def plasticity_job(arm: str, out: Path, seed: int = 0) -> Job:
    return _stream_job(plasticity_manifest(arm, str(out / "streams"), seed), out)


def _stream_job(manifest: dict, out: Path) -> Job:
    name = manifest["metadata"]["name"]
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    folder = out / "streams" / name

    def cleanup() -> None:
        for ckpt in folder.glob("*/checkpoints"):
            _rm(ckpt)

    return Job(name, folder, [fst("stream", str(path), "--no-progress")], cleanup)


def _rm(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def plan(
    out: Path, seeds: tuple[int, ...], steps: int, streams: bool, plasticity: bool = True
) -> list[Job]:
    """In order of what a bench stopped early most needs: the first task's three modes on the
    first seed, RL and FST on its other seeds, the two streams, then the rest, then the
    plasticity probe (its four arms per seed), then the variants (spec.VARIANTS)."""
    first_task = next(iter(TASKS))

    def rank(r: RunSpec) -> tuple[int, int, int]:
        if r.mode not in MODES:  # a variant: after everything it is compared with
            return (5, r.seed, 0)
        if r.task == first_task and r.seed == seeds[0]:
            group = 0
        elif r.task == first_task and r.mode != "gepa":
            group = 1
        elif r.task == first_task:
            group = 3
        else:
            group = 4
        return (group, r.seed, MODES.index(r.mode))

    runs = sorted(all_runs(seeds), key=rank)
    jobs = [train_job(r, out, steps) for r in runs if rank(r)[0] < 2]
    if streams:
        jobs += [stream_job(m, out) for m in MODES]
    jobs += [train_job(r, out, steps) for r in runs if 2 <= rank(r)[0] < 5]
    if plasticity:
        jobs += [plasticity_job(arm, out, s) for s in seeds for arm in PLASTICITY_ARMS]
    jobs += [train_job(r, out, steps) for r in runs if rank(r)[0] == 5]
    return jobs


def wait_for_lock(run_dir: Path, poll_s: float = 30.0) -> None:
    """Wait while another process (an earlier runner's job) holds the run folder's lock, so a
    restarted runner does not fail on a job that is still running; it then resumes it."""
    lock = run_dir / ".lock"
    if not lock.exists():
        return
    while True:
        with lock.open("a") as fd:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                pass
        time.sleep(poll_s)


def record_job(job: Job, out: Path, record: Path) -> None:
    """Copy a finished job's folder (and its config) into the record, weights left out."""
    shutil.copytree(
        job.folder, record / job.folder.relative_to(out), ignore=_NOT_RECORDED, dirs_exist_ok=True
    )
    config = out / "configs" / f"{job.name}.yaml"
    if config.is_file():
        (record / "configs").mkdir(parents=True, exist_ok=True)
        shutil.copy2(config, record / "configs" / config.name)


def restore_recorded(jobs: list[Job], out: Path, record: Path) -> list[str]:
    """Jobs the record holds as finished but the workspace does not: copied back, so the
    runner skips them. Returns their names."""
    restored = []
    for job in jobs:
        recorded = record / job.folder.relative_to(out)
        if not job.done and (recorded / "done.json").is_file():
            shutil.copytree(recorded, job.folder, dirs_exist_ok=True)
            restored.append(job.name)
    return restored


def _source_commit() -> str | None:
    """The commit of the code that ran a job (the bench runs from a frozen checkout)."""
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_job(job: Job, out: Path, lock: threading.Lock, record: Path | None = None) -> bool:
    log_path = out / "logs" / f"{job.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        # One thread per run: the bench runs two jobs side by side on 2 cores, and one
        # thread per job avoids the two oversubscribing each other.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    wait_for_lock(job.folder)
    t0, cpu = time.time(), 0.0
    with log_path.open("a") as log:
        for cmd in job.commands:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            # wait4 gives this child's own CPU time (two jobs run at once, so the runner's
            # cumulative children time could not be split between them).
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
            cpu += usage.ru_utime + usage.ru_stime
            if rc != 0:
                with lock:
                    print(f"FAILED {job.name} (exit {rc}); log: {log_path}", flush=True)
                return False
    job.cleanup()
    job.folder.mkdir(parents=True, exist_ok=True)
    # Wall and CPU of this invocation only: a resumed job reports the part it ran.
    done = {"wall_s": time.time() - t0, "cpu_s": cpu, "finished": time.time()}
    (job.folder / "done.json").write_text(json.dumps({**done, "commit": _source_commit()}))
    if record is not None:
        record_job(job, out, record)
    with lock:
        print(f"done {job.name}: {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return True


def run_all(
    out: Path = DEFAULT_OUT,
    seeds: tuple[int, ...] = SEEDS,
    steps: int = STEPS,
    workers: int = 2,
    streams: bool = True,
    only: list[str] | None = None,
    plasticity: bool = True,
    record: Path | None = RECORD,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in plan(out, seeds, steps, streams, plasticity) if not only or j.name in only]
    if record is not None:
        restored = restore_recorded(jobs, out, record)
        if restored:
            print(f"restored {len(restored)} finished jobs from {record}", flush=True)
    todo = [j for j in jobs if not j.done]
    print(f"{len(jobs)} jobs, {len(jobs) - len(todo)} already done; output {out}", flush=True)
    lock = threading.Lock()
    queue = list(todo)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
                print(f"start {job.name}", flush=True)
            run_job(job, out, lock, record)

    threads = [threading.Thread(target=worker) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t = os.times()
    print(f"all jobs tried; CPU of children {t.children_user + t.children_system:.0f} s")
