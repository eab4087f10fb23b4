"""The Kubernetes API calls the handlers make beyond kopf's own (official client; blocking, so
the reconciles run in kopf's handler threads): reading a run or a stream afresh, a stream's
child runs and a failed attempt's pods, creating children, and writing status (always through
the API, never kopf's deferred `patch`: handlers.py says why)."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)

from fst.k8s.api import GROUP, VERSION

log = logging.getLogger("fst_operator")
T = TypeVar("T")
_api: client.ApiClient | None = None
_namespaces: list[str] = []


class NotOwnedError(RuntimeError):
    """An object of a name the operator derives exists, but another owner made it."""


def watch_namespaces(namespaces: list[str]) -> None:
    _namespaces[:] = namespaces


def watched_namespaces() -> list[str]:
    return list(_namespaces)


def configuration() -> client.Configuration:
    """In a pod: its ServiceAccount, through the client's own in-cluster loader (which re-reads
    the kubelet-rotated token before it expires). Elsewhere: $KUBECONFIG or ~/.kube/config.

    $FST_SERVICE_ACCOUNT_DIR points the loader at a token mounted somewhere other than the
    standard path (the test harness's process kubelet rewrites mount paths)."""
    cfg = client.Configuration()
    folder = os.environ.get("FST_SERVICE_ACCOUNT_DIR")
    token = os.path.join(folder, "token") if folder else SERVICE_TOKEN_FILENAME
    ca = os.path.join(folder, "ca.crt") if folder else SERVICE_CERT_FILENAME
    try:
        InClusterConfigLoader(
            token_filename=token, cert_filename=ca, try_refresh_token=True
        ).load_and_set(cfg)
        log.debug("in-cluster configuration from %s", os.path.dirname(token))
    except ConfigException as in_cluster:
        if folder:  # asked for, and not there: say why before falling back
            log.warning("no ServiceAccount at %s: %s", folder, in_cluster)
        config.load_kube_config(client_configuration=cfg)
    return cfg


def configure(connections: int = 32) -> client.ApiClient:
    """The handlers' client; `connections`: its pool, one per thread that calls it (a thread
    without one opens a connection per request and drops it after)."""
    global _api
    cfg = configuration()
    cfg.connection_pool_maxsize = connections
    _api = client.ApiClient(cfg)
    return _api


def api() -> client.ApiClient:
    return _api if _api is not None else configure()


def _custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api())


def _plain(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = api().sanitize_for_serialization(obj)
    return out


def _as_dict(obj: object) -> dict[str, Any]:
    """The custom-objects API returns parsed JSON typed as `object`."""
    assert isinstance(obj, dict)
    return obj


def _or_none(read: Callable[[], T]) -> T | None:
    """`read()`, or None when the object does not exist (404)."""
    try:
        return read()
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def get_job(namespace: str, name: str) -> dict[str, Any] | None:
    job = _or_none(lambda: client.BatchV1Api(api()).read_namespaced_job(name, namespace))
    return None if job is None else _plain(job)


def list_job_pods(namespace: str, job: str) -> list[dict[str, Any]]:
    """The pods of one Job (the Job controller labels them batch.kubernetes.io/job-name); read
    only when an attempt failed, to tell why (builders.oom_failure)."""
    pods = client.CoreV1Api(api()).list_namespaced_pod(
        namespace, label_selector=f"batch.kubernetes.io/job-name={job}"
    )
    items: list[dict[str, Any]] = _plain(pods)["items"]
    return items


def _get_custom(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    obj = _or_none(
        lambda: _custom().get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    )
    return None if obj is None else _as_dict(obj)


def get_run(namespace: str, name: str) -> dict[str, Any] | None:
    return _get_custom("fastslowruns", namespace, name)


def get_stream(namespace: str, name: str) -> dict[str, Any] | None:
    return _get_custom("taskstreams", namespace, name)


def list_runs(namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    out = _as_dict(
        _custom().list_namespaced_custom_object(
            GROUP, VERSION, namespace, "fastslowruns", label_selector=selector
        )
    )
    items: list[dict[str, Any]] = out["items"]
    return items


def set_job_suspend(namespace: str, name: str, suspend: bool) -> dict[str, Any]:
    job = client.BatchV1Api(api()).patch_namespaced_job(
        name, namespace, {"spec": {"suspend": suspend}}
    )
    return _plain(job)


def _json(response: Any) -> dict[str, Any]:
    """The body of a call made with `_preload_content=False`: parsed JSON as the apiserver
    wrote it. The client would otherwise build its model objects (a V1Job is hundreds of
    them) only for `_plain` to turn them back into this dict."""
    out: dict[str, Any] = json.loads(response.data)
    return out


def _create(obj: dict[str, Any]) -> dict[str, Any]:
    kind, ns = obj["kind"], obj["metadata"]["namespace"]
    raw = {"_preload_content": False}
    # The client's create calls take plain dicts as well as its model objects.
    if kind == "Job":
        return _json(client.BatchV1Api(api()).create_namespaced_job(ns, obj, **raw))  # type: ignore[arg-type]
    if kind == "ConfigMap":
        return _json(client.CoreV1Api(api()).create_namespaced_config_map(ns, obj, **raw))  # type: ignore[arg-type]
    if kind == "Service":  # a multi-node attempt's headless Service
        return _json(client.CoreV1Api(api()).create_namespaced_service(ns, obj, **raw))  # type: ignore[arg-type]
    if kind == "NetworkPolicy":  # a multi-node attempt's pods may connect to each other
        net = client.NetworkingV1Api(api())
        return _json(net.create_namespaced_network_policy(ns, obj, **raw))  # type: ignore[arg-type]
    if kind == "FastSlowRun":
        return _as_dict(
            _custom().create_namespaced_custom_object(GROUP, VERSION, ns, "fastslowruns", obj)
        )
    raise ValueError(f"create_if_absent: unsupported kind {kind}")


def _read(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    if kind == "Job":
        return get_job(namespace, name)
    if kind == "FastSlowRun":
        return get_run(namespace, name)
    if kind == "Service":
        svc = _or_none(lambda: client.CoreV1Api(api()).read_namespaced_service(name, namespace))
        return None if svc is None else _plain(svc)
    if kind == "NetworkPolicy":
        net = client.NetworkingV1Api(api())
        pol = _or_none(lambda: net.read_namespaced_network_policy(name, namespace))
        return None if pol is None else _plain(pol)
    cm = _or_none(lambda: client.CoreV1Api(api()).read_namespaced_config_map(name, namespace))
    return None if cm is None else _plain(cm)


def create_if_absent(obj: dict[str, Any]) -> dict[str, Any]:
    """Create `obj` (already adopted by its owner); if an object of that name exists, return
    it when the same owner controls it (a previous reconcile made it: deterministic names are
    the whole idempotency story), else raise NotOwnedError: a pre-made object of that name is
    never taken over."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        return _create(obj)
    except ApiException as e:
        if e.status != 409:
            raise
    existing = _read(kind, ns, name)
    if existing is None:  # deleted in between: the next reconcile creates it
        return obj
    _check_owner(obj, existing)
    log.info("%s %s/%s exists already", kind, ns, name)
    return existing


def _check_owner(obj: dict[str, Any], existing: dict[str, Any]) -> None:
    owners = {r["uid"] for r in obj["metadata"].get("ownerReferences") or []}
    theirs = {r.get("uid") for r in existing["metadata"].get("ownerReferences") or []}
    if owners and not owners & theirs:
        meta = obj["metadata"]
        raise NotOwnedError(
            f"{obj['kind']} {meta['namespace']}/{meta['name']} exists and is not owned by this "
            "resource"
        )


def sync_config_map(obj: dict[str, Any]) -> bool:
    """Create the ConfigMap (adopted by its owner), or patch its data when it differs; True
    when anything changed. One of another owner's is never taken over (NotOwnedError)."""
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        _create(obj)
        return True
    except ApiException as e:
        if e.status != 409:
            raise
    existing = _read("ConfigMap", ns, name)
    if existing is None:  # deleted in between: the next reconcile creates it
        return False
    _check_owner(obj, existing)
    if (existing.get("data") or {}) == obj["data"]:
        return False
    client.CoreV1Api(api()).patch_namespaced_config_map(name, ns, {"data": obj["data"]})
    return True


def read_secret(namespace: str, name: str) -> dict[str, str] | None:
    """A Secret's data, decoded; None if it does not exist. The operator's RBAC allows this
    for the tenant Secret's name only (resourceNames), never for other Secrets."""

    secret = _or_none(lambda: client.CoreV1Api(api()).read_namespaced_secret(name, namespace))
    if secret is None:
        return None
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def write_secret(obj: dict[str, Any], replace: dict[str, str] | None = None) -> None:
    """Create the Secret; `replace` (its current data) set: it exists, so replace it."""
    core = client.CoreV1Api(api())
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    if replace is not None:
        core.replace_namespaced_secret(name, ns, obj)  # type: ignore[arg-type]
    else:
        core.create_namespaced_secret(ns, obj)  # type: ignore[arg-type]


def patch_run_status(namespace: str, name: str, patch: dict[str, Any]) -> None:
    _custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "fastslowruns", name, {"status": patch}
    )


def patch_stream_status(namespace: str, name: str, patch: dict[str, Any]) -> None:
    _custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "taskstreams", name, {"status": patch}
    )
