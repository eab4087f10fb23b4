"""kopf handlers: thin I/O around the pure builders (builders.py) and the planner (fst.plan).

Level-triggered: whatever woke us (a change of the resource, an event of a child, a timer, an
operator restart), we read the current objects, decide with a pure function, and write. All
names are deterministic, so a handler that runs twice, or is killed halfway and run again after
a restart, finds what the first run created (409 AlreadyExists, owned by the same resource) and
never duplicates it.

    FastSlowRun  new, spec changed, first met     -> a queue of runs (workqueue.py), whose workers
                 its Jobs' events                    reconcile_run one run at a time, status
                 its Jobs' Kueue Workloads' events   through the API (the Admitted condition;
                                                     a changed spec.suspend: the Job's suspend,
                                                     Kueue's while queued)
                 training progress (the database) -> one poller for all runs (progress.py)
    TaskStream   create/update/resume, a timer   -> a queue of streams, whose workers run
                 its runs' events                   reconcile_stream one stream at a time,
                 its gate Jobs' events              status through the API

kopf's idioms throughout: children adopted with `kopf.adopt` (owner reference, namespace), Events
with `kopf.event`, `kopf.TemporaryError(delay=...)` when the outside world (the database, a
data source) is not there yet. Status is written through the API (kube.patch_run_status,
kube.patch_stream_status) by the queues' workers, on the object read afresh, never through
kopf's deferred `patch`, which lands after its handler returns and so can overwrite a newer
status written meanwhile by another reconcile of the same object (run_event says when it did).

No finalizers: deleting a FastSlowRun or TaskStream deletes its children through owner
references (the garbage collector). The external state of a run, its checkpoints in S3 and its
metrics and prompt populations in the database, is the customer's model and is kept on purpose;
deleting it is a separate, explicit act (no handler here ever deletes data).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import kopf
from minio.error import S3Error
from pydantic import ValidationError

from fst.config import ConfigError, TaskConfig, TrainConfig, format_validation_error
from fst.handover import checkpoint_population, source_fingerprint
from fst.k8s.api import GROUP, VERSION, FastSlowRunSpec, TaskStream
from fst.k8s.status import GateStatus, Phase, ServedModel
from fst.plan import (
    StageRun,
    awaiting_gate,
    check_history,
    check_stages,
    next_stage,
    serving_run,
    stage_config,
)
from fst.store.db import RunDB, RunProgress
from fst_operator import (
    admission,
    builders,
    kube,
    metrics,
    policy,
    progress,
    tenancy,
    workqueue,
)
from fst_operator.settings import Settings

log = logging.getLogger("fst_operator")
SETTINGS = Settings.from_env()
_dbs: dict[str, RunDB] = {}  # by namespace with tenancy, else one under ""
_tenants: tenancy.TenantProvisioner | None = None

StatusWriter = Callable[[dict[str, Any]], None]  # takes a JSON merge patch of `status`


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
    kube.configure(connections=SETTINGS.workers + 2)  # the handler threads and the poller's
    metrics.start_server(SETTINGS.metrics_port)
    log.info("fastslow operator: %s", SETTINGS.describe(kube.watched_namespaces()))


# Connections kept for kopf's watch streams per watched namespace (one per resource it
# watches: runs, streams, Jobs, Kueue Workloads; room to spare), or for the whole cluster.
WATCH_CONNECTIONS = 8


@kopf.on.login()
async def login(**_: Any) -> kopf.AiohttpSession:
    """kopf's connection from the same client configuration the handlers use (kube.py: the
    in-cluster loader, else the kubeconfig). kopf calls this again on a 401, which picks up
    a rotated token.

    The session is kopf's own but with a bounded pool: kopf's default has no connection limit,
    and at 1000 runs its patches and Event posts held 908 TLS connections open at once, each
    with a 128 KiB read buffer (595 MiB resident; docs/performance.md, round 2). A watch stream
    holds its connection for as long as it runs, so the pool keeps room for every watch plus
    FST_API_CONNECTIONS requests in flight."""
    info = _connection_info()
    watches = WATCH_CONNECTIONS * max(1, len(kube.watched_namespaces()))
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=watches + SETTINGS.api_connections, ssl=info.as_ssl_context()
        ),
        headers=info.as_http_headers(),
    )
    return kopf.AiohttpSession(server=info.server, aiohttp_session=session)


def _connection_info() -> kopf.ConnectionInfo:
    cfg = kube.configuration()
    header: str | None = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _space, token = (header or "").partition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme if token else None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        expiration=None,
    )


@kopf.on.probe(id="database")
def database_probe(**_: Any) -> str:
    return "configured" if SETTINGS.database_url else "not configured"


def tenants() -> tenancy.TenantProvisioner | None:
    """The maker of per-namespace credentials, when the chart turned tenancy on."""
    global _tenants
    if SETTINGS.tenant_prefix and _tenants is None:
        s3_admin = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        _tenants = tenancy.TenantProvisioner(
            SETTINGS.tenant_prefix,
            s3_admin,
            SETTINGS.database_url,
            list(SETTINGS.policy.shared_prefixes),
        )
    return _tenants


def ensure_tenant(body: kopf.Body, namespace: str) -> None:
    """The namespace's own S3 user, database role and Secret exist (before its first Job)."""
    provisioner = tenants()
    if provisioner is None:
        return
    try:
        provisioner.ensure(namespace, kube.read_secret, kube.write_secret)
    except tenancy.TenantError as e:
        kopf.event(body, type="Warning", reason="TenantNotReady", message=str(e))
        raise kopf.TemporaryError(str(e), delay=30) from e


def database(namespace: str) -> RunDB | None:
    """The database as the operator reads it for `namespace`: with tenancy, that namespace's
    schema (the owner's login, search_path set to it); else the shared tables."""
    if not SETTINGS.database_url:
        return None
    provisioner = tenants()
    key = namespace if provisioner else ""
    if key not in _dbs:
        url = SETTINGS.database_url
        if provisioner is not None:
            url = tenancy.schema_url(url, provisioner.tenant(namespace).db_role)
        _dbs[key] = RunDB(url)
    return _dbs[key]


def read_progress(namespace: str, key: str) -> RunProgress | None:
    db = database(namespace)
    if db is None:
        return None
    try:
        return db.progress(key)
    except Exception as e:  # the database is down: status waits, the run goes on
        log.warning("progress of %s: %s", key, e)
        return None


# ----------------------------------------------------------------------------- FastSlowRun

RUNS = (GROUP, VERSION, "fastslowruns")


@kopf.index("batch", "v1", "jobs", labels={builders.LABEL_RUN: kopf.PRESENT})
def jobs_by_run(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]]:
    """kopf's in-memory index of the trainer Jobs, by (namespace, run): a reconcile reads its
    Job from here instead of asking the API server (kopf keeps it current from its watch)."""
    return {(namespace, labels[builders.LABEL_RUN]): builders.job_summary(dict(body))}


def _jobs(handler_kwargs: dict[str, Any]) -> kopf.Index[Any, Any]:
    """kopf passes every index to every handler as a keyword argument named after it."""
    index: kopf.Index[Any, Any] = handler_kwargs["jobs_by_run"]
    return index


def _indexed_job(jobs: kopf.Index[Any, Any], namespace: str, run: str, attempt: int) -> Any:
    name = builders.job_name(run, attempt)
    return next((j for j in jobs.get((namespace, run), []) if j["metadata"]["name"] == name), None)


def _owned_by_job(body: kopf.Body, **_: Any) -> bool:
    return admission.owning_job(dict(body)) is not None


# Kueue's Workloads of Jobs (admission.py). Without Kueue's CRDs kopf logs that it cannot serve
# this resource and runs the rest; the index is then empty and a queued run says it has no
# Workload. In namespaced mode (no CRD watch) Kueue installed later needs an operator restart.
@kopf.index(admission.GROUP, admission.VERSION, admission.PLURAL, when=_owned_by_job)
def workloads_by_job(
    namespace: str | None, body: kopf.Body, **_: Any
) -> dict[tuple[str | None, str | None], dict[str, Any]]:
    """Kueue's Workloads by (namespace, owning Job), as admission.workload_summary."""
    return {(namespace, admission.owning_job(dict(body))): admission.workload_summary(dict(body))}


def _workloads(handler_kwargs: dict[str, Any]) -> kopf.Index[Any, Any] | None:
    index: kopf.Index[Any, Any] | None = handler_kwargs.get("workloads_by_job")
    return index


def _indexed_workload(
    workloads: kopf.Index[Any, Any] | None, namespace: str, job: dict[str, Any] | None
) -> dict[str, Any] | None:
    if workloads is None or job is None:
        return None
    return admission.newest(list(workloads.get((namespace, job["metadata"]["name"]), [])))


@kopf.on.event(admission.GROUP, admission.VERSION, admission.PLURAL, when=_owned_by_job)
async def workload_event(type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """Kueue admitted a queued Job, or says why not (yet): mirror it into the run at once."""
    if type == "DELETED":
        return
    namespace = body["metadata"]["namespace"]
    # A Workload carries none of its Job's labels: the run is in the Job's name (builders.
    # job_name), confirmed by the index of the runs' Jobs (a Job of someone else is not one).
    run, _, attempt = (admission.owning_job(dict(body)) or "").rpartition("-a")
    if attempt.isdigit() and _indexed_job(_jobs(kwargs), namespace, run, int(attempt)):
        memo["run_queue"].add((namespace, run))


# Runs without a status yet, as kopf delivered them the first time this process met them, until
# their first reconcile. Nothing has written to such a run but its user, so this body is as fresh
# as a GET, which a new run is then spared: one API round trip less per new run. Only the first
# reconcile may use it (after that, only a GET sees this process's own status writes), and a
# body is stored only when the run is first met, so it is never stored twice.
_unseen_runs: dict[tuple[str, str], dict[str, Any]] = {}
# The runs this process has met (one small key per live run; a DELETED event removes it): a
# run kopf lists again after a "410 Gone" watch restart is not reconciled again for it.
_met_runs: set[tuple[str, str]] = set()


def _reconcile_named_run(namespace: str, name: str, handler_kwargs: dict[str, Any]) -> None:
    """reconcile_run of the run as it is now: status through the API."""
    run = _unseen_runs.pop((namespace, name), None) or kube.get_run(namespace, name)
    if run is not None:
        write = lambda changes: kube.patch_run_status(namespace, name, changes)  # noqa: E731
        body = kopf.Body(cast(kopf.RawBody, run))
        reconcile_run(body, write, _jobs(handler_kwargs), _workloads(handler_kwargs))


@kopf.on.startup()
async def start_run_workers(
    settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any
) -> None:
    """The queue of runs to reconcile and its workers (workqueue.py says why a queue): as many
    as kopf has handler threads, whose threads they use."""
    indices = {k: kwargs.get(k) for k in ("jobs_by_run", "workloads_by_job")}

    def reconcile(key: tuple[str, str]) -> None:
        _reconcile_named_run(*key, indices)

    executor = settings.execution.executor
    memo["run_queue"], memo["run_workers"] = workqueue.start(reconcile, executor, SETTINGS.workers)


@kopf.on.event(*RUNS)
async def run_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Queue the run when a reconcile has something to do: it is new (no status yet; it goes
    ahead of the runs whose Jobs changed: its Job first, their status after), its spec changed
    (metadata.generation is ahead of status.observedGeneration), or this process meets it for
    the first time (at start: every run is reconciled once, as kopf's resume would).

    An event handler, not kopf's create/update/resume handlers: those store a diff-base
    annotation on every run, one more PATCH (and one more watch event) per run, and the
    generation already says what they would. The run's own status writes queue nothing. All
    of a run's reconciles go through one queue, one at a time, each reading the run afresh: a
    reconcile that wrote its status through kopf's deferred `patch` once landed after a Job
    event's reconcile had written Succeeded, and put the run back to Pending for good."""
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    if type == "DELETED":
        _met_runs.discard(key)
        _unseen_runs.pop(key, None)
        return
    new = not (body.get("status") or {}).get("phase")
    first = key not in _met_runs
    if not (new or builders.spec_changed(dict(body)) or first):
        return
    _met_runs.add(key)
    if new and first:
        _unseen_runs[key] = dict(body)
    memo["run_queue"].add(key, urgent=new)


@kopf.on.event("batch", "v1", "jobs", labels={builders.LABEL_RUN: kopf.PRESENT})
async def job_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Any change of a trainer Job, its deletion included (a run whose current Job was deleted,
    and that has not finished, gets it back): its run is queued for a reconcile."""
    key = (body["metadata"]["namespace"], body["metadata"]["labels"][builders.LABEL_RUN])
    memo["run_queue"].add(key)


@kopf.index(*RUNS, when=lambda status, **_: status.get("phase") not in builders.TERMINAL)
def active_runs(
    namespace: str | None, name: str, status: kopf.Status, **_: Any
) -> dict[str | None, tuple[str, dict[str, Any]]]:
    """The unfinished runs by namespace, with their status's progress fields: what the
    progress poller (progress.py) reads. A run leaves it when it finishes or is deleted."""
    return {namespace: (name, {k: status[k] for k in builders.PROGRESS_FIELDS if k in status})}


@kopf.on.startup()
async def start_progress_poller(memo: kopf.Memo, **kwargs: Any) -> None:
    """One loop for the whole operator mirrors the database's training progress into the
    unfinished runs' status every FST_PROGRESS_INTERVAL seconds (progress.py says why not a
    timer per run). Without a database there is no progress to mirror."""
    if not SETTINGS.database_url:
        return
    poller = progress.ProgressPoller(database, kube.patch_run_status)
    loop = progress.poll_forever(kwargs["active_runs"], poller, SETTINGS.progress_interval)
    memo["progress_poller"] = asyncio.get_running_loop().create_task(loop)


@kopf.on.cleanup()
async def stop_background_tasks(memo: kopf.Memo, **_: Any) -> None:
    workers = [*memo.get("run_workers", []), *memo.get("stream_workers", [])]
    for task in [memo.get("progress_poller"), *workers]:
        if task is not None:
            task.cancel()


def reconcile_run(
    body: kopf.Body,
    write_status: StatusWriter,
    jobs: kopf.Index[Any, Any],
    workloads: kopf.Index[Any, Any] | None = None,
) -> None:
    """Observe the run's Job, its Kueue Workload and progress, decide (builders.decide_run),
    act, write status."""
    run = dict(body)
    meta = run["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return
    old = run.get("status") or {}
    with metrics.reconciling("fastslowrun"):
        try:
            spec, cfg = builders.train_config(run, SETTINGS.defaults, SETTINGS.policy)
        except (ValidationError, ValueError) as e:
            message = _spec_error(e, f"FastSlowRun {namespace}/{name}")
            if old.get("phase") != Phase.INVALID:
                write_status(
                    builders.status_patch(old, builders.invalid_status(run, message).dump())
                )
                kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
            metrics.observe_phase(namespace, name, Phase.INVALID)
            return
        attempt = int(old.get("attempt") or 1)
        job = _indexed_job(jobs, namespace, name, attempt)
        if job is None and old.get("phase") not in builders.TERMINAL:
            job = ensure_attempt(body, spec, cfg, attempt)
        elif job is not None and builders.spec_changed(run):
            job = apply_suspend(body, spec, job)
        workload = _indexed_workload(workloads, namespace, job)
        oom = None
        if job is not None and builders.job_outcome(job)[0] == Phase.FAILED:
            oom = builders.oom_failure(kube.list_job_pods(namespace, job["metadata"]["name"]))
        progress = read_progress(namespace, cfg.run)
        decision = builders.decide_run(run, spec, job, progress, workload, oom)
        if oom is not None and old.get("phase") != Phase.FAILED:
            kopf.event(body, type="Warning", reason="OOMKilled", message=oom)
        if decision.create_attempt is not None:
            # Create the next attempt BEFORE recording it: killed in between, the next
            # reconcile sees the failed attempt again, re-creates (409: it exists) and records.
            ensure_attempt(body, spec, cfg, decision.create_attempt)
            kopf.event(
                body,
                type="Warning",
                reason="Retrying",
                message=f"attempt {decision.create_attempt - 1} failed; "
                f"attempt {decision.create_attempt} resumes from the latest checkpoint",
            )
        new = decision.status.dump()
        changes = builders.status_patch(old, new)
        if changes:
            write_status(changes)
            if new.get("phase") != old.get("phase"):
                s = decision.status
                kopf.event(
                    body,
                    type="Normal",
                    reason=str(s.phase),
                    message=f"{s.phase}: attempt {s.attempt}, step {s.step or 0}/{s.steps}",
                )
        metrics.observe_phase(namespace, name, str(decision.status.phase))


def apply_suspend(run: kopf.Body, spec: FastSlowRunSpec, job: dict[str, Any]) -> dict[str, Any]:
    """The spec changed: apply the user's `suspend` to the current attempt's Job
    (builders.job_suspend_change says when; a queued Job's suspend is otherwise Kueue's).
    Returns the Job as it is now."""
    change = builders.job_suspend_change(spec, job)
    if change is None:
        return job
    name = job["metadata"]["name"]
    kube.set_job_suspend(run["metadata"]["namespace"], name, change)
    kopf.event(
        run,
        type="Normal",
        reason="Suspended" if change else "Resumed",
        message=f"Job {name} {'suspended' if change else 'resumed'}",
    )
    return {**job, "spec": {**job.get("spec", {}), "suspend": change}}


def ensure_attempt(
    run: kopf.Body, spec: FastSlowRunSpec, cfg: TrainConfig, attempt: int
) -> dict[str, Any]:
    """The attempt's ConfigMap and Job, adopted by the run, created unless they exist; first
    the namespace's own credentials, which the Job's pod reads. A multi-node attempt also
    gets its headless Service (its pods' DNS names) and NetworkPolicy (its pods may connect
    to each other), before the Job, so the names resolve when its pods start."""
    ensure_tenant(run, run["metadata"]["namespace"])
    config_map = builders.config_map(dict(run), cfg)
    job = builders.job(dict(run), spec, attempt, SETTINGS.defaults)
    create_child(config_map, run)
    for child in (
        builders.service(dict(run), spec, attempt),
        builders.network_policy(dict(run), spec, attempt),
    ):
        if child is not None:
            create_child(child, run)
    return create_child(job, run)


def create_child(obj: dict[str, Any], owner: kopf.Body) -> dict[str, Any]:
    """Adopt `obj` (owner reference, namespace) and create it unless it exists. An object of
    that name made by someone else is never taken over: a Warning says so, and kopf retries."""
    kopf.adopt(obj, owner=owner)
    try:
        return kube.create_if_absent(obj)
    except kube.NotOwnedError as e:
        kopf.event(owner, type="Warning", reason="NameTaken", message=str(e))
        raise kopf.TemporaryError(str(e), delay=60) from e


# ----------------------------------------------------------------------------- TaskStream

STREAMS = (GROUP, VERSION, "taskstreams")


@kopf.on.startup()
async def start_stream_workers(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """The queue of streams to reconcile and its workers: a stream is woken by its own changes,
    its data poll and its children's events, and all of them go through one queue, so that one
    stream is reconciled once at a time, on the stream read afresh, status through the API (the
    runs' queue says what a deferred kopf `patch` racing an API write did to a run)."""
    executor = settings.execution.executor
    memo["stream_queue"], memo["stream_workers"] = workqueue.start(
        _reconcile_named_stream, executor, SETTINGS.workers
    )


def _queue_stream(memo: kopf.Memo, namespace: str, name: str) -> None:
    """Every wake-up of a stream only queues its key; the queue's workers reconcile it."""
    memo["stream_queue"].add((namespace, name))


@kopf.on.resume(*STREAMS)
@kopf.on.create(*STREAMS)
@kopf.on.update(*STREAMS, field="spec")
async def stream_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _queue_stream(memo, body["metadata"]["namespace"], body["metadata"]["name"])


@kopf.timer(*STREAMS, interval=SETTINGS.stream_poll_interval, idle=0)
async def stream_data_poll(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """New versions of the stages' data sources (s3:// jsonl) start new stage versions."""
    _queue_stream(memo, body["metadata"]["namespace"], body["metadata"]["name"])


@kopf.on.event(*RUNS, labels={builders.LABEL_STREAM: kopf.PRESENT})
async def stage_run_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if type != "DELETED":
        meta = body["metadata"]
        _queue_stream(memo, meta["namespace"], meta["labels"][builders.LABEL_STREAM])


@kopf.on.event("batch", "v1", "jobs", labels={builders.LABEL_GATE: kopf.PRESENT})
async def gate_job_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A stage run's gate Job progressed: its stream reads the decision at once."""
    if type != "DELETED":
        meta = body["metadata"]
        _queue_stream(memo, meta["namespace"], meta["labels"][builders.LABEL_STREAM])


def _reconcile_named_stream(key: tuple[str, str]) -> None:
    """reconcile_stream of the stream as it is now: status through the API."""
    namespace, name = key
    stream = kube.get_stream(namespace, name)
    if stream is not None:
        write = lambda c: kube.patch_stream_status(namespace, name, c)  # noqa: E731
        reconcile_stream(kopf.Body(cast(kopf.RawBody, stream)), write)


def reconcile_stream(body: kopf.Body, write_status: StatusWriter) -> None:
    """Gate the stream's finished stage run, plan its next one with fst.plan (as `fst stream`
    does) and create it, keep its serving ConfigMap, write status."""
    stream = dict(body)
    meta = stream["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return
    old = stream.get("status") or {}
    with metrics.reconciling("taskstream"):
        children = kube.list_runs(namespace, {builders.LABEL_STREAM: name})
        try:
            model = builders.stream_model(stream)
            check_stages(model, f"TaskStream {namespace}/{name}")
            # A stage that has run keeps its name and place (fst.plan.check_history).
            check_history(model, builders.stage_runs(children), f"TaskStream {namespace}/{name}")
            # Before planning lists any of its data with the operator's own credentials.
            root = SETTINGS.defaults.tenant_root(namespace)
            policy.enforce(policy.check_stream(model, SETTINGS.policy, root))
        except (ValidationError, ConfigError, ValueError) as e:
            message = _spec_error(e, f"TaskStream {namespace}/{name}")
            invalid = builders.stream_status(stream, children, invalid=message)
            changes = builders.status_patch(old, invalid.dump())
            if changes:
                write_status(changes)
                kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
            return
        rule = model.spec.promotion
        gating = None
        if not model.spec.suspend:
            runs = builders.stage_runs(children, rule)
            waiting = awaiting_gate(model, runs) if SETTINGS.database_url else None
            if waiting is not None:
                gating = gate_stage(body, stream, model, children, runs, waiting)
                if gating is None:  # decided just now: its run's status has the gate
                    children = kube.list_runs(namespace, {builders.LABEL_STREAM: name})
                    runs = builders.stage_runs(children, rule)
            try:
                planned = None if gating else next_stage(model, runs, _fingerprint, _population)
            except DataSourceError as e:
                # Credentials missing, access denied, S3 down: say so in status and an Event
                # (once per message); the next poll tries again.
                status = builders.stream_status(stream, children, data_error=str(e))
                changes = builders.status_patch(old, status.dump())
                if changes:
                    write_status(changes)
                    kopf.event(body, type="Warning", reason="DataUnreadable", message=str(e))
                return
            if planned is not None and planned not in runs:  # a new stage version to start
                run = builders.run_for_stage(stream, model, planned, len(runs))
                create_child(run, body)
                inherited = len(planned.start_population or [])
                kopf.event(
                    body,
                    type="Normal",
                    reason="StageStarted",
                    message=f"stage {planned.name}: FastSlowRun {planned.run} from "
                    f"{planned.start_checkpoint or 'the base model'}"
                    + (f" with {inherited} inherited prompt(s)" if inherited else ""),
                )
                children = kube.list_runs(namespace, {builders.LABEL_STREAM: name})
        serving = sync_serving(body, stream, model, builders.stage_runs(children, rule))
        status = builders.stream_status(stream, children, gating=gating, serving=serving)
        changes = builders.status_patch(old, status.dump())
        if changes:
            write_status(changes)


def gate_stage(
    body: kopf.Body,
    stream: dict[str, Any],
    model: TaskStream,
    children: list[dict[str, Any]],
    runs: list[StageRun],
    waiting: StageRun,
) -> builders.Gating | None:
    """Drive the gate of `waiting` (a succeeded, ungated stage run): create its gate Job
    (owned by the run) unless it exists; once it succeeded, copy the decision it recorded in
    the database into the run's status.gate, with an Event, and return None. Else what the
    gate is doing (or that it failed)."""
    namespace = body["metadata"]["namespace"]
    name = builders.gate_name(waiting.run)
    gate = _recorded_gate(namespace, model, waiting)
    if gate is None:  # not decided yet: its Job runs, or is to be created
        child = next(c for c in children if c["metadata"]["name"] == waiting.run)
        gating = _drive_gate_job(body, stream, model, child, runs, waiting)
        gate = _recorded_gate(namespace, model, waiting) if gating is None else None
        if gate is None:
            return gating or builders.Gating(waiting.run, f"Job {name} succeeded; reading")
    kube.patch_run_status(namespace, waiting.run, {"gate": gate.dump()})
    verdict = "promoted" if gate.promoted else "rejected, kept for inspection, not served"
    kopf.event(
        body,
        type="Normal" if gate.promoted else "Warning",
        reason=gate.reason,
        message=f"stage {waiting.name} {verdict}: {gate.message}",
    )
    return None


def _recorded_gate(namespace: str, model: TaskStream, run: StageRun) -> GateStatus | None:
    """The decision the gate Job of `run` recorded in the stages table, if any (the record
    of truth: read first, so a gate decided while the operator was away is not run again)."""
    db = database(namespace)
    assert db is not None  # gates run only with a database (reconcile_stream)
    key = builders.run_key(namespace, run.run)
    stages = db.stages(builders.stream_key(namespace, model.metadata.name))
    # Of this run's final checkpoint: a stream deleted and made again under the same name
    # finds its old rows (run names are deterministic) but gates what it trained now.
    info = next(
        (s for s in stages if s.run_name == key and s.checkpoint_uri == run.checkpoint), None
    )
    return builders.gate_status(info) if info is not None else None


def _drive_gate_job(
    body: kopf.Body,
    stream: dict[str, Any],
    model: TaskStream,
    child: dict[str, Any],
    runs: list[StageRun],
    waiting: StageRun,
) -> builders.Gating | None:
    """Create the gate Job of `waiting` unless it exists; None once it succeeded, else what
    it is doing (or that it failed)."""
    namespace = body["metadata"]["namespace"]
    owner = kopf.Body(cast(kopf.RawBody, child))
    name = builders.gate_name(waiting.run)
    job = kube.get_job(namespace, name)
    if job is None:
        gate_json = builders.gate_input(stream, model, runs, waiting)
        create_child(builders.gate_config_map(child, gate_json), owner)
        job = create_child(builders.gate_job(child, SETTINGS.defaults), owner)
        # Two reconciles of the stream (a timer, a child's event) may both get here; the
        # second finds the first's Job (409) and says nothing.
        with _announced_lock:
            first = job["metadata"].get("uid") not in _announced
            _announced.add(job["metadata"].get("uid"))
        if first:
            kopf.event(
                body,
                type="Normal",
                reason="GateStarted",
                message=f"stage {waiting.name}: Job {name} scores run {waiting.run} against "
                "the promoted model",
            )
    outcome, message = builders.job_outcome(job)
    if outcome == Phase.FAILED:
        why = f"Job {name} failed ({message}); delete the Job to gate again"
        return builders.Gating(waiting.run, why, failed=True)
    if outcome != Phase.SUCCEEDED:
        return builders.Gating(waiting.run, f"Job {name}: {str(outcome).lower()}")
    return None


def sync_serving(
    body: kopf.Body, stream: dict[str, Any], model: TaskStream, runs: list[StageRun]
) -> ServedModel:
    """`<stream>-serving` holds what is served (fst.plan.serving_run: the newest promoted
    bundle, or spec.serving.pin's); an Event when it changes."""
    if SETTINGS.database_url and model.spec.eval_problems > 0:
        # Gated: a run is served once its gate promoted it, never while it waits for its gate.
        runs = [r for r in runs if r.gate is not None]
    pin = model.spec.serving.pin
    served = serving_run(runs, pin)
    if served is None and pin is not None:
        kopf.event(
            body,
            type="Warning",
            reason="PinNotPromoted",
            message=f"spec.serving.pin: stage {pin} has no promoted bundle; serving the newest "
            "promoted one",
        )
        served = serving_run(runs, None)
    if served is not None and served.checkpoint:
        prompt = _best_prompt(served.checkpoint)
    else:  # the base model with the seed prompt of the first stage
        first = model.spec.stages[0]
        prompt = stage_config(model, first, "serving").fast.seed_prompt
    config_map = builders.serving_config_map(stream, served, model, prompt)
    kopf.adopt(config_map, owner=body)
    try:
        changed = kube.sync_config_map(config_map)
    except kube.NotOwnedError as e:
        kopf.event(body, type="Warning", reason="NameTaken", message=str(e))
        raise kopf.TemporaryError(str(e), delay=60) from e
    cm_name = config_map["metadata"]["name"]
    what = f"stage {served.name}'s bundle {served.bundle}" if served else "the base model"
    if changed:
        kopf.event(body, type="Normal", reason="ServingChanged", message=f"{cm_name}: {what}")
    return ServedModel(
        stage=served.name if served else None,
        run=served.run if served else None,
        bundle=served.bundle if served else None,
        pinned=pin,
        config_map=cm_name,
    )


_announced: set[str | None] = set()  # gate Jobs whose start was announced (an Event)
_announced_lock = threading.Lock()


@functools.lru_cache(maxsize=256)
def _best_prompt(checkpoint: str) -> str:
    """The best prompt saved in a checkpoint (what its bundle is served with); a checkpoint
    never changes, so it is read once."""
    population = _population(checkpoint)
    return population[0] if population else ""


class DataSourceError(RuntimeError):
    """A stage's data source or a hand-over checkpoint cannot be read right now."""


def _fingerprint(task: TaskConfig) -> str | None:
    try:
        return source_fingerprint(task)
    except Exception as e:  # unreachable data: keep the current stage, say why
        log.warning("data source %s: %s", task.params.get("path"), e)
        message = f"data source {task.params.get('path')}: {_one_line(e)}"
        raise DataSourceError(message) from e


def _population(checkpoint: str) -> list[str]:
    try:
        return checkpoint_population(checkpoint)
    except Exception as e:  # S3 down, or the checkpoint not readable yet: try again later
        log.warning("population of %s: %s", checkpoint, e)
        raise DataSourceError(f"population of {checkpoint}: {_one_line(e)}") from e


def _one_line(e: Exception) -> str:
    """The error in one stable line: an S3 error's code and message without its request ids,
    so a status condition and its Event change only when the problem does."""
    if isinstance(e, S3Error):
        return f"S3 {e.code}: {e.message}"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:400] + "..."


# ----------------------------------------------------------------------------- helpers


def _spec_error(e: Exception, source: str) -> str:
    if isinstance(e, ValidationError):
        return format_validation_error(e, source).replace("\n", "; ")
    return f"{source}: {e}".replace("\n", "; ")
