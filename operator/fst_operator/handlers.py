"""kopf handlers: thin I/O around the pure builders (builders.py).

Level-triggered: whatever woke us (a change of the resource, an event of a child, a timer, an
operator restart), we read the current objects, decide with a pure function, and write. All
names are deterministic, so a handler that runs twice, or is killed halfway and run again after
a restart, finds what the first run created (409 AlreadyExists) and never duplicates it.

    FastSlowRun  create/update/resume, its Jobs' events, a timer  -> reconcile_run
    TaskStream   create/update/resume, its runs' events, a timer  -> reconcile_stream

No finalizers: deleting a FastSlowRun or TaskStream deletes its children through owner
references (the garbage collector). The external state of a run, its checkpoints in S3 and its
metrics and prompt populations in the database, is the customer's model and is kept on purpose;
deleting it is a separate, explicit act (no handler here ever deletes data).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from fst.config import ConfigError, format_validation_error
from fst.k8s.api import GROUP, VERSION
from fst.store.db import RunDB, RunProgress
from fst.stream import StreamState, next_stage, source_fingerprint
from fst_operator import builders, kube, metrics
from fst_operator.settings import Settings

log = logging.getLogger("fst_operator")
SETTINGS = Settings.from_env()
_db: RunDB | None = None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own prefix for everything kopf stores on objects: its progress and diff-base
    # annotations and (should a handler ever need one) the finalizer.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.getLevelName(SETTINGS.event_level)
    settings.watching.server_timeout = int(SETTINGS.watch_server_timeout)
    settings.watching.client_timeout = int(SETTINGS.watch_server_timeout) + 30
    settings.watching.connect_timeout = 30
    settings.execution.max_workers = SETTINGS.workers
    # Namespaced mode (least-privilege RBAC, nothing cluster-wide): kopf must not try to list
    # namespaces or watch CRDs, which it may not; the resources are known.
    settings.scanning.disabled = bool(kube.watched_namespaces())
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    kube.configure(SETTINGS)
    metrics.start_server(SETTINGS.metrics_port)
    log.info("fastslow operator: %s", SETTINGS.describe(kube.watched_namespaces()))


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own connection: the ServiceAccount (kube.service_account) in a pod, else the
    kubeconfig, as kopf would do by itself."""
    sa = kube.service_account()
    if sa is None:
        return kopf.login_via_client(**kwargs)
    server, token, ca = sa
    return kopf.ConnectionInfo(
        server=server,
        ca_path=str(ca),
        scheme="Bearer",
        token=token.read_text().strip(),
        expiration=None,
    )


@kopf.on.probe(id="database")
def database_probe(**_: Any) -> str:
    return "configured" if SETTINGS.database_url else "not configured"


def database() -> RunDB | None:
    global _db
    if SETTINGS.database_url and _db is None:
        _db = RunDB(SETTINGS.database_url)
    return _db


def read_progress(key: str) -> RunProgress | None:
    db = database()
    if db is None:
        return None
    try:
        return db.progress(key)
    except Exception as e:  # the database is down: status waits, the run goes on
        log.warning("progress of %s: %s", key, e)
        return None


# ----------------------------------------------------------------------------- FastSlowRun

RUNS = (GROUP, VERSION, "fastslowruns")


@kopf.on.resume(*RUNS)
@kopf.on.create(*RUNS)
@kopf.on.update(*RUNS, field="spec")
def run_changed(namespace: str, name: str, **_: Any) -> None:
    reconcile_run(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={builders.LABEL_RUN: kopf.PRESENT})
def job_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    if event["type"] == "DELETED":
        return
    owner = body["metadata"]["labels"][builders.LABEL_RUN]
    reconcile_run(body["metadata"]["namespace"], owner)


@kopf.timer(
    *RUNS,
    interval=SETTINGS.progress_interval,
    initial_delay=SETTINGS.progress_interval,
    idle=0,
    when=lambda status, **_: status.get("phase") not in builders.TERMINAL,
)
def run_progress(namespace: str, name: str, **_: Any) -> None:
    reconcile_run(namespace, name)


def reconcile_run(namespace: str, name: str) -> None:
    with metrics.reconciling("fastslowrun"):
        run = kube.get_run(namespace, name)
        if run is None or run["metadata"].get("deletionTimestamp"):
            return
        try:
            spec, cfg = builders.train_config(run, SETTINGS.defaults)
        except (ValidationError, ValueError) as e:
            message = _spec_error(e, f"FastSlowRun {namespace}/{name}")
            if (run.get("status") or {}).get("phase") != "Invalid":
                kube.patch_run_status(namespace, name, builders.invalid_status(run, message))
                kube.event(run, "Warning", "InvalidSpec", message)
            metrics.observe_phase(namespace, name, "Invalid")
            return
        status = run.get("status") or {}
        attempt = int(status.get("attempt") or 1)
        job = kube.get_job(namespace, builders.job_name(name, attempt))
        if job is None and status.get("phase") not in builders.TERMINAL:
            job = ensure_attempt(run, spec, cfg, attempt)
        elif job is not None and bool(job["spec"].get("suspend")) != spec.suspend:
            job = kube.set_job_suspend(namespace, job["metadata"]["name"], spec.suspend)
        progress = read_progress(cfg.run)
        decision = builders.decide_run(run, spec, job, progress)
        if decision.create_attempt is not None:
            # Create the next attempt BEFORE recording it: killed in between, the next
            # reconcile sees the failed attempt again, re-creates (409: it exists) and records.
            ensure_attempt(run, spec, cfg, decision.create_attempt)
            kube.event(
                run,
                "Warning",
                "Retrying",
                f"attempt {decision.create_attempt - 1} failed; "
                f"attempt {decision.create_attempt} resumes from the latest checkpoint",
            )
        if decision.status != status:
            kube.patch_run_status(namespace, name, decision.status)
            if decision.status.get("phase") != status.get("phase"):
                kube.event(run, "Normal", decision.status["phase"], _phase_message(decision))
        metrics.observe_phase(namespace, name, decision.status["phase"])


def ensure_attempt(run: dict[str, Any], spec: Any, cfg: Any, attempt: int) -> dict[str, Any]:
    kube.create_if_absent(builders.config_map(run, cfg))
    job = kube.create_if_absent(builders.job(run, spec, attempt, SETTINGS.defaults))
    _crash_point("after-job-create")
    return job


def _phase_message(decision: builders.RunDecision) -> str:
    s = decision.status
    return f"{s['phase']}: attempt {s['attempt']}, step {s.get('step', 0)}/{s.get('steps')}"


# ----------------------------------------------------------------------------- TaskStream

STREAMS = (GROUP, VERSION, "taskstreams")


@kopf.on.resume(*STREAMS)
@kopf.on.create(*STREAMS)
@kopf.on.update(*STREAMS, field="spec")
def stream_changed(namespace: str, name: str, **_: Any) -> None:
    reconcile_stream(namespace, name)


@kopf.on.event(*RUNS, labels={builders.LABEL_STREAM: kopf.PRESENT})
def stage_run_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    if event["type"] == "DELETED":
        return
    stream = body["metadata"]["labels"][builders.LABEL_STREAM]
    reconcile_stream(body["metadata"]["namespace"], stream)


@kopf.timer(*STREAMS, interval=SETTINGS.stream_poll_interval, idle=0)
def stream_data_poll(namespace: str, name: str, **_: Any) -> None:
    """New versions of the stages' data sources (s3:// jsonl) start new stage versions."""
    reconcile_stream(namespace, name)


def reconcile_stream(namespace: str, name: str) -> None:
    with metrics.reconciling("taskstream"):
        stream = kube.get_stream(namespace, name)
        if stream is None or stream["metadata"].get("deletionTimestamp"):
            return
        children = kube.list_runs(namespace, {builders.LABEL_STREAM: name})
        entries = builders.stream_entries(children)
        try:
            model = builders.stream_model(stream)
            builders.check_stages(model)
        except (ValidationError, ConfigError, ValueError) as e:
            message = _spec_error(e, f"TaskStream {namespace}/{name}")
            kube.patch_stream_status(
                namespace, name, builders.stream_status(stream, entries, invalid=message)
            )
            return
        if not model.spec.suspend:
            state = StreamState(path=None, entries=entries)  # type: ignore[arg-type]
            nxt = next_stage(model, state, fingerprint_of=_fingerprint)
            if nxt is not None and nxt[1] not in entries:  # a new stage version to start
                stage, entry = nxt
                run = builders.run_for_stage(stream, model, stage.name, entry, len(entries))
                kube.create_if_absent(run)
                kube.event(
                    stream,
                    "Normal",
                    "StageStarted",
                    f"stage {stage.name} v{entry['version']}: FastSlowRun "
                    f"{run['metadata']['name']} from "
                    f"{entry.get('start_checkpoint') or 'the base model'}",
                )
                children = kube.list_runs(namespace, {builders.LABEL_STREAM: name})
                entries = builders.stream_entries(children)
        status = builders.stream_status(stream, entries)
        if status != {k: v for k, v in (stream.get("status") or {}).items() if k in status}:
            kube.patch_stream_status(namespace, name, status)


def _fingerprint(task: Any) -> str | None:
    try:
        return source_fingerprint(task)
    except Exception as e:  # unreachable data: keep the current stage, say why
        log.warning("data source %s: %s", task.params.get("path"), e)
        raise kopf.TemporaryError(f"data source {task.params.get('path')}: {e}", delay=30) from e


# ----------------------------------------------------------------------------- helpers


def _spec_error(e: Exception, source: str) -> str:
    if isinstance(e, ValidationError):
        return format_validation_error(e, source).replace("\n", "; ")
    return f"{source}: {e}"


def _crash_point(point: str) -> None:
    """Fault injection for the restart test: FST_OPERATOR_CRASH_AT=<point> kills the operator
    the first time it reaches `point` (a marker file makes it once per test)."""
    if os.environ.get("FST_OPERATOR_CRASH_AT") != point:
        return
    marker = os.environ.get("FST_OPERATOR_CRASH_MARKER", "")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        log.error("crash point %s: exiting", point)
        os._exit(17)


__all__ = ["ApiException", "reconcile_run", "reconcile_stream"]
