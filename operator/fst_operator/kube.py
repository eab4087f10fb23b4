"""The few Kubernetes API calls the handlers make (official client; blocking, so the handlers
are sync and kopf runs them in its thread pool)."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from fst.k8s.api import GROUP, VERSION

log = logging.getLogger("fst_operator")
_api: client.ApiClient | None = None
_namespaces: list[str] = []
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def watch_namespaces(namespaces: list[str]) -> None:
    _namespaces[:] = namespaces


def watched_namespaces() -> list[str]:
    return list(_namespaces)


def service_account() -> tuple[str, Path, Path] | None:
    """(server URL, token file, CA file) of the pod's ServiceAccount, or None outside a pod.

    The folder is $FST_SERVICE_ACCOUNT_DIR (the chart sets it to the standard mount path), so
    a runtime that mounts the token elsewhere (the test harness's process kubelet) still works.
    """
    folder = Path(os.environ.get("FST_SERVICE_ACCOUNT_DIR", SERVICE_ACCOUNT_DIR))
    host, port = (
        os.environ.get("KUBERNETES_SERVICE_HOST"),
        os.environ.get("KUBERNETES_SERVICE_PORT"),
    )
    token, ca = folder / "token", folder / "ca.crt"
    if not (host and port and token.is_file() and ca.is_file()):
        if "FST_SERVICE_ACCOUNT_DIR" in os.environ:  # asked for, and not there: say why
            log.warning(
                "no ServiceAccount at %s (KUBERNETES_SERVICE_HOST=%s, token %s, ca.crt %s)",
                folder,
                host,
                token.is_file(),
                ca.is_file(),
            )
        return None
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}:{port}", token, ca


def configure(_settings: Any = None) -> None:
    """In a pod: its ServiceAccount. Elsewhere: $KUBECONFIG (or ~/.kube/config)."""
    global _api
    sa = service_account()
    if sa is not None:
        server, token, ca = sa
        cfg = client.Configuration(host=server)
        cfg.ssl_ca_cert = str(ca)

        # Bound tokens are rotated by the kubelet: read the file at each request.
        def refresh(c: client.Configuration) -> None:
            c.api_key["authorization"] = "Bearer " + token.read_text().strip()

        cfg.refresh_api_key_hook = refresh
        refresh(cfg)
    else:
        cfg = client.Configuration()
        config.load_kube_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = 32
    _api = client.ApiClient(cfg)


def api() -> client.ApiClient:
    if _api is None:
        configure()
    assert _api is not None
    return _api


def _custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api())


def _get(fn: Any, *args: Any) -> dict[str, Any] | None:
    try:
        return fn(*args)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def get_run(namespace: str, name: str) -> dict[str, Any] | None:
    return _get(
        _custom().get_namespaced_custom_object, GROUP, VERSION, namespace, "fastslowruns", name
    )


def get_stream(namespace: str, name: str) -> dict[str, Any] | None:
    return _get(
        _custom().get_namespaced_custom_object, GROUP, VERSION, namespace, "taskstreams", name
    )


def list_runs(namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    out = _custom().list_namespaced_custom_object(
        GROUP, VERSION, namespace, "fastslowruns", label_selector=selector
    )
    return out["items"]


def get_job(namespace: str, name: str) -> dict[str, Any] | None:
    batch = client.BatchV1Api(api())
    try:
        job = batch.read_namespaced_job(name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return api().sanitize_for_serialization(job)


def set_job_suspend(namespace: str, name: str, suspend: bool) -> dict[str, Any]:
    job = client.BatchV1Api(api()).patch_namespaced_job(
        name, namespace, {"spec": {"suspend": suspend}}
    )
    return api().sanitize_for_serialization(job)


def create_if_absent(obj: dict[str, Any]) -> dict[str, Any]:
    """Create `obj`; if an object of that name exists (a previous reconcile made it), return
    the existing one. Deterministic names make this the whole idempotency story."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        if kind == "Job":
            made = client.BatchV1Api(api()).create_namespaced_job(ns, obj)
            return api().sanitize_for_serialization(made)
        if kind == "ConfigMap":
            made = client.CoreV1Api(api()).create_namespaced_config_map(ns, obj)
            return api().sanitize_for_serialization(made)
        if kind == "FastSlowRun":
            return _custom().create_namespaced_custom_object(
                GROUP, VERSION, ns, "fastslowruns", obj
            )
        raise ValueError(f"create_if_absent: unsupported kind {kind}")
    except ApiException as e:
        if e.status != 409:
            raise
    log.info("%s %s/%s exists already", kind, ns, name)
    if kind == "Job":
        return get_job(ns, name) or obj
    if kind == "FastSlowRun":
        return get_run(ns, name) or obj
    return obj


def patch_run_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    _custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "fastslowruns", name, {"status": status}
    )


def patch_stream_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    _custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "taskstreams", name, {"status": status}
    )


def event(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on `obj` (what `kubectl describe` shows). Best effort."""
    meta = obj["metadata"]
    now = datetime.now(UTC)
    body = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(
            api_version=obj["apiVersion"],
            kind=obj["kind"],
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
        ),
        type=type_,
        reason=reason,
        message=message[:1000],
        first_timestamp=now,
        last_timestamp=now,
        count=1,
        source=client.V1EventSource(component="fastslow-operator"),
        reporting_component="fastslow-operator",
    )
    try:
        client.CoreV1Api(api()).create_namespaced_event(meta["namespace"], body)
    except ApiException as e:
        log.warning("event %s on %s: %s", reason, meta["name"], e.reason)
