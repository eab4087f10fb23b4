"""How the operator scales: N FastSlowRuns on kwok GPU nodes (a measurement, not a test).

    python -m bench.operator_scale --runs 100 1000

For each N: a fresh test control plane (tests/k8s) with enough fake GPU nodes, the CRDs, one
operator process; N FastSlowRuns created as fast as the client can; then the time until every
run has its Job, until every run has a status, and until every run Succeeded (kwok completes
each trainer pod after ~1 s), and the operator's peak resident memory (VmHWM). The operator
has a PostgreSQL database (started here), as in production. Prints one JSON line per N and
writes bench/results/operator_scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from fst.k8s.api import GROUP, VERSION
from fst.store.db import RunDB
from tests.k8s.cluster import GpuNodes, test_cluster
from tests.k8s.operator_proc import OperatorProcess, Resources, install_crds
from tests.servers import postgres_server

# Operator settings (docs/operator.md) passed through from this bench's environment, to try.
TUNABLES = ("FST_OPERATOR_WORKERS", "FST_API_CONNECTIONS", "FST_EVENT_LEVEL")

SPEC = {
    "config": {"task": {"name": "arithmetic"}, "steps": 10},
    "trainer": {"gpus": 1},
}


def status_mib(pid: int, key: str = "VmHWM") -> float:
    """A memory line of /proc/PID/status in MiB: VmHWM (the peak resident set) or VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_sockets(pid: int) -> int:
    """The process's open sockets (its API connections: kopf's aiohttp pool, the handlers'
    urllib3 pools, the watch streams)."""
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed while we looked
            count += fd.readlink().name.startswith("socket:")
    return count


def start_profiler(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling the operator (all threads, including kopf's asyncio loop and its
    handler thread pool) into a flame graph, until it is interrupted."""
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--rate", "50", "--threads", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


# A list of N Jobs asks the apiserver to serialize N whole Jobs and the Python client to build
# its model objects from them: at N = 1000 that cost this bench ~0.4 s of CPU per poll, every
# 2 s, on the same 2 cores as the apiserver and the operator it measures. The poll counts Jobs
# from their metadata alone (a PartialObjectMetadataList, the `kubectl get --output name` way)
# and reads runs as plain JSON: observer_cpu_s in the result says what the polling cost.
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


def observe(api: k8s.ApiClient, ns: str) -> tuple[int, list[str | None]]:
    """(how many Jobs the namespace has, each run's status.phase)."""
    jobs = k8s.BatchV1Api(api).list_namespaced_job(
        ns, _preload_content=False, _headers={"Accept": METADATA_ONLY}
    )
    runs = k8s.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, ns, "fastslowruns", _preload_content=False
    )
    for response in (jobs, runs):
        if response.status >= 400:  # unread responses raise nothing: an overloaded apiserver
            raise ApiException(status=response.status, reason=response.reason)
    job_items = json.loads(jobs.data)["items"] or []  # null in an empty metadata-only list
    run_items = json.loads(runs.data)["items"] or []
    return len(job_items), [(r.get("status") or {}).get("phase") for r in run_items]


def measure(n: int, workdir: Path, profile: Path | None = None, memory: bool = False) -> dict:
    nodes = GpuNodes(count=max(2, (n + 63) // 64), gpus=64, cpu="256")
    with test_cluster(gpu_nodes=nodes) as cluster, postgres_server() as pg:
        api = cluster.api()
        install_crds(api)
        ns = cluster.create_namespace(f"scale-{n}")
        database = pg.url()
        with RunDB(database) as db:
            db.upgrade()
        # A database as in production, so the progress poller runs (no trainer writes to it:
        # each run's Job reads no progress and the poller finds no run that moved).
        env = {
            "FST_DEFAULT_CHECKPOINT_URI": "s3://bench/runs",
            "FST_PROGRESS_INTERVAL": "30",
            "FST_DATABASE_URL": database,
            **{k: v for k, v in os.environ.items() if k in TUNABLES},
        }
        module = "fst_operator"
        if memory and profile is not None:
            module = "bench.operator_memprobe"
            env["FST_MEMPROBE_OUT"] = str(profile / f"operator-{n}-memory.txt")
        op = OperatorProcess(
            cluster.kubeconfig, [ns], workdir / f"operator-{n}.log", env, module=module
        ).start()
        res = Resources(api, ns)
        rss_idle = status_mib(op.proc.pid)
        profiler = None
        if profile is not None and not memory:
            profiler = start_profiler(op.proc.pid, profile / f"operator-{n}.svg")
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: res.create("fastslowruns", "FastSlowRun", f"run-{i}", SPEC), range(n)
                )
            )
        created_s = time.monotonic() - t0
        marks: dict[str, float] = {}
        deadline = t0 + 3600
        max_sockets = 0
        observer_cpu0 = time.process_time()
        while time.monotonic() < deadline and len(marks) < 3:
            time.sleep(2)
            max_sockets = max(max_sockets, open_sockets(op.proc.pid))
            try:
                jobs, phases = observe(api, ns)
            except ApiException as e:  # an overloaded apiserver (504, 429): ask again
                print(f"poll: {e.status} {e.reason}", file=sys.stderr)
                continue
            with_status = sum(1 for p in phases if p)
            done = sum(1 for p in phases if p == "Succeeded")
            now = time.monotonic() - t0
            if jobs >= n:
                marks.setdefault("all_jobs_s", now)
            if with_status >= n:
                marks.setdefault("all_status_s", now)
            if done >= n:
                marks.setdefault("all_succeeded_s", now)
            print(
                f"{now:6.0f}s jobs {jobs} status {with_status} done {done} "
                f"operator rss {status_mib(op.proc.pid, 'VmRSS'):.0f} MiB sockets {max_sockets}",
                file=sys.stderr,
            )
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its flame graph on SIGINT
            profiler.wait(timeout=120)
        result = {
            "runs": n,
            "gpu_nodes": nodes.count,
            "create_s": round(created_s, 1),
            **{k: round(v, 1) for k, v in marks.items()},
            "operator_rss_idle_mib": round(rss_idle, 1),
            "operator_rss_peak_mib": round(status_mib(op.proc.pid), 1),
            "operator_sockets_max": max_sockets,
            "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "observer_cpu_s": round(time.process_time() - observer_cpu0, 1),
        }
        op.stop()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--out", type=Path, default=Path("bench/results/operator_scale.json"))
    parser.add_argument(
        "--profile",
        type=Path,
        help="write a py-spy flame graph of the operator per N into this folder (it costs "
        "CPU: profile and measure in separate runs)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="with --profile: run the operator under tracemalloc (bench/operator_memprobe.py) "
        "instead of py-spy",
    )
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.runs:
            result = measure(n, Path(tmp), args.profile, args.memory)
            print(json.dumps(result), flush=True)
            results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
