"""The promotion gate through the operator, on the test control plane: the SmolLM2 scenario of
tests/promotion_scenario.py, each stage's trainer AND its gate (`fst gate`, fst/gate.py) a Job
whose pod the process kubelet runs (tests/k8s), against the test MinIO and PostgreSQL:

    add, add-more, wreck   the first two promoted (GatePassed), wreck rejected
                           (RegressionOnAdd...): status, the Promoted condition, Events, and
                           the `<stream>-serving` ConfigMap show each step; add-more is served
    pin add, unpin         spec.serving.pin moves the ConfigMap to add's bundle and back
    recover                a stage added: it starts from add-more (not wreck), is promoted,
                           served

`fst stream` runs the same scenario in-process (test_promotion.py): one implementation of the
gate, two executors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fst_operator.builders import run_key, stream_key
from kubernetes import client as k8s

from fst.bundle import read_bundle
from fst.store.db import RunDB
from tests.k8s.cluster import PROCESS_NODE_SELECTOR, PROCESS_NODE_TOLERATION
from tests.k8s.operator_proc import (
    GROUP,
    VERSION,
    OperatorProcess,
    Resources,
    condition,
    dump,
    phase,
)
from tests.k8s.waiting import wait_until
from tests.promotion_scenario import RECOVER, STAGES, stream_spec

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def operator(k8s_cluster, k8s_namespace, crds, res, s3_env, pg_url, tmp_path: Path):
    """An operator with the database (it reads the gates' decisions there), and the Secrets
    the trainer and gate pods read."""
    s3 = {k: v for k, v in s3_env.items() if k.startswith("AWS_")}
    res.secret("s3", s3)
    res.secret("db", {"url": pg_url})
    log = tmp_path / "operator.log"
    op = OperatorProcess(
        k8s_cluster.kubeconfig, [k8s_namespace], log, {"FST_DATABASE_URL": pg_url, **s3}
    )
    op.start()
    yield op
    op.stop()
    if log.exists():
        print(f"operator log ({log}):\n{log.read_text()[-6000:]}")  # shown if the test fails


def trainer(s3_uri: str) -> dict[str, Any]:
    return {
        "gpus": 0,
        "image": "fastslow/trainer:cpu",
        "nodeSelector": PROCESS_NODE_SELECTOR,
        "tolerations": [PROCESS_NODE_TOLERATION],
        "s3Secret": "s3",
        "databaseSecret": {"name": "db", "key": "url"},
        "checkpointUri": s3_uri,
    }


def serving(res: Resources) -> dict[str, str]:
    cm = k8s.CoreV1Api(res.api).read_namespaced_config_map("gated-serving", res.ns)
    return dict(cm.data or {})


def gate(res: Resources, stage: str) -> dict[str, Any] | None:
    return (res.run(f"gated-{stage}").get("status") or {}).get("gate")


def test_the_gate_promotes_rejects_pins_and_recovers_through_the_operator(
    res: Resources, operator: OperatorProcess, s3_uri: str, pg_url: str, k8s_cluster
) -> None:
    def wait(what: str, fn, timeout: float = 120):
        return wait_until(fn, timeout, what, operator.tail, 1.0)

    def stages_gated(n: int):
        def check() -> dict[str, Any] | None:
            stream = res.stream("gated")
            stages = (stream.get("status") or {}).get("stages") or []
            if phase(stream) == "Failed":  # a stage run or a gate failed: no use waiting
                raise AssertionError(f"stream failed: {dump(stream['status'])}")
            done = len(stages) == n and all(s.get("promoted") is not None for s in stages)
            return stream if done and phase(stream) == "Succeeded" else None

        return check

    res.create("taskstreams", "TaskStream", "gated", stream_spec(trainer=trainer(s3_uri)))
    stream = wait("3 stages trained and gated", stages_gated(3), 1800)
    add, more, wreck = gate(res, "add"), gate(res, "add-more"), gate(res, "wreck")
    assert add and more and wreck, dump(stream["status"])
    assert add["promoted"] and more["promoted"], (add, more)
    assert add["reason"] == more["reason"] == "GatePassed"
    # The base model scores on add (1 of 8 or more): a drop to 0 exceeds maxRegression 0.1.
    assert add["baseline"]["add"] >= 0.125, add
    assert not wreck["promoted"] and wreck["reason"].startswith("RegressionOnAdd"), wreck
    assert wreck["candidate"]["add"] < wreck["baseline"]["add"] - 0.1, wreck
    assert "bundle" not in wreck  # kept for inspection, never published or served
    status = stream["status"]
    promoted = condition(stream, "Promoted")
    assert promoted["status"] == "False" and promoted["reason"] == wreck["reason"], promoted
    assert status["promoted"]["stage"] == "add-more" and status["promoted"]["bundle"]
    assert status["serving"]["stage"] == "add-more"
    assert [s["promoted"] for s in status["stages"]] == [True, True, False]
    cm = serving(res)
    assert cm["stage"] == "add-more" and cm["model"] == more["bundle"], cm
    # The ConfigMap's prompt is the bundle's: what a server must send with these weights.
    _folder, prompt, lineage = read_bundle(more["bundle"])
    assert cm["systemPrompt"] == prompt and lineage["stage"] == "add-more"
    assert lineage["earlierStages"][0]["stage"] == "add"
    events = res.events("gated")
    assert sum(e.startswith("GateStarted") for e in events) == 3, events
    assert sum(e.startswith("GatePassed") for e in events) == 2, events
    assert any(e.startswith("RegressionOnAdd") for e in events), events
    assert any(e.startswith("ServingChanged") for e in events), events
    # The decisions, with every number, are in the database's stages table.
    with RunDB(pg_url) as db:
        rows = db.stages(stream_key(res.ns, "gated"))
    assert [(r.name, r.promoted) for r in rows] == [
        ("add", True),
        ("add-more", True),
        ("wreck", False),
    ]
    assert rows[2].run_name == run_key(res.ns, "gated-wreck")
    assert rows[2].gate["candidate"]["add"]["pass_rate"] == wreck["candidate"]["add"]

    # A rollback: pin stage add; then the pin removed, back to the newest promoted.
    res.patch("taskstreams", "gated", {"spec": {"serving": {"pin": "add"}}})
    cm = wait("pinned", lambda: (c := serving(res))["stage"] == "add" and c)
    assert cm["model"] == add["bundle"] and cm["pinned"] == "add"
    assert cm["systemPrompt"] == read_bundle(add["bundle"])[1]
    wait("status pinned", lambda: res.stream("gated")["status"]["serving"].get("pinned") == "add")
    res.patch("taskstreams", "gated", {"spec": {"serving": {"pin": None}}})
    cm = wait("unpinned", lambda: (c := serving(res))["stage"] == "add-more" and c)
    assert cm["model"] == more["bundle"] and cm["pinned"] == ""

    # A passing stage added: it starts from the promoted add-more, not the rejected wreck.
    res.patch("taskstreams", "gated", {"spec": {"stages": [*STAGES, RECOVER]}})
    stream = wait("recover trained and gated", stages_gated(4), 900)
    recover = gate(res, "recover")
    assert recover and recover["promoted"], dump(stream["status"])
    more_ckpt = res.run("gated-add-more")["status"]["checkpointUri"]
    assert res.run("gated-recover")["spec"]["config"]["model"]["name"] == more_ckpt
    assert condition(stream, "Promoted")["reason"] == "GatePassed"
    cm = wait("serving recover", lambda: (c := serving(res))["stage"] == "recover" and c)
    assert cm["model"] == recover["bundle"]
    assert stream["status"]["servingStage"] == "recover"

    # Deleting the stream deletes its runs, Jobs, pods (and the pods' GBs of scratch on the
    # node) and the serving ConfigMap; its checkpoints and bundles in S3 are kept.
    res.custom.delete_namespaced_custom_object(GROUP, VERSION, res.ns, "taskstreams", "gated")
    wait("cascade", lambda: not res.runs() and not res.core.list_namespaced_pod(res.ns).items, 180)
    # The node drops their scratch (a finished pod is deleted at once, with no grace period).
    pods = k8s_cluster.root / "process-kubelet" / "pods"
    scratch = lambda: [p.name for p in pods.glob(f"{res.ns}_*") if (p / "volumes").exists()]  # noqa: E731
    wait("scratch removed", lambda: not scratch(), 60)
    assert read_bundle(recover["bundle"])[1]


def test_the_documented_vllm_deployment_is_accepted_by_the_apiserver(res: Resources) -> None:
    """examples/serving/vllm-deployment.yaml (docs/serving.md) with a server-side dry run: the
    apiserver validates it in full (schema, defaults, admission) and stores nothing. vLLM
    itself never ran here (no GPU)."""
    import yaml

    path = Path(__file__).resolve().parents[2] / "examples" / "serving" / "vllm-deployment.yaml"
    deployment = yaml.safe_load(path.read_text())
    apps = k8s.AppsV1Api(res.api)
    made = apps.create_namespaced_deployment(res.ns, deployment, dry_run="All")
    assert made.metadata.name == "acme-vllm"
    (container,) = made.spec.template.spec.containers
    refs = {e.value_from.config_map_key_ref.key for e in container.env if e.value_from}
    assert refs == {"systemPrompt", "stage"}
    assert apps.list_namespaced_deployment(res.ns).items == []  # a dry run stores nothing
    # The apiserver, not the client, checks it: a mount of a volume the pod does not have.
    bad = yaml.safe_load(path.read_text())
    bad["spec"]["template"]["spec"]["volumes"].pop()  # `serving`, which vllm mounts
    with pytest.raises(k8s.ApiException) as e:
        apps.create_namespaced_deployment(res.ns, bad, dry_run="All")
    assert e.value.status == 422 and "volumeMounts" in e.value.body, e.value.body
