"""Two customers, two namespaces, one operator, one MinIO, one PostgreSQL.

The operator runs with the stores' root/owner logins and FST_TENANT_PREFIX; it gives each
namespace its own S3 user and database role (operator/fst_operator/tenancy.py). A's run trains
for real on the process kubelet with A's credentials (on the tiny random Llama of
tests/tiny_model.py: what matters is where its checkpoint and rows land, not what it learns).
Then B tries what B can: specs naming A's places (refused by the operator's policy, field
named) and B's own credentials against A's objects and rows (refused by MinIO and PostgreSQL
themselves).
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fst_operator import tenancy
from fst_operator.builders import run_key
from kubernetes import client as k8s
from minio.error import S3Error
from sqlalchemy.engine import make_url

from fst.store.db import RunDB
from fst.store.s3 import parse_s3_uri
from tests.integration.test_tenancy import client_of
from tests.k8s.cluster import PROCESS_NODE_SELECTOR, PROCESS_NODE_TOLERATION
from tests.k8s.operator_proc import (
    OperatorProcess,
    Resources,
    condition,
    dump,
    install_crds,
    phase,
    tiny_config,
    tiny_model_config,
)
from tests.k8s.waiting import wait_until
from tests.servers import TEST_BUCKET
from tests.tiny_model import tiny_model_dir  # noqa: F401  (fixture)

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = pytest.mark.integration

TRAINER = {
    "gpus": 0,
    "image": "fastslow/trainer:cpu",
    "nodeSelector": PROCESS_NODE_SELECTOR,
    "tolerations": [PROCESS_NODE_TOLERATION],
}
# The chart's policy for this cluster: the test image, the process node's selector and taint.
POLICY = {
    "images": ["fastslow/trainer"],
    "nodeSelectors": [f"{k}={v}" for k, v in PROCESS_NODE_SELECTOR.items()],
    "tolerations": [f"{PROCESS_NODE_TOLERATION['key']}:{PROCESS_NODE_TOLERATION['effect']}"],
    "maxGpus": 0,
}


STORAGE_FIELDS = (
    "spec.config.checkpoint.uri",
    "spec.config.model.name",
    "spec.trainer.checkpointUri",
)


def decoded(secret: Any) -> dict[str, str]:
    import base64

    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


@pytest.mark.slow
def test_two_customers_cannot_reach_each_other(
    k8s_cluster,
    s3_env: dict[str, str],
    pg_url: str,
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    api = k8s_cluster.api()
    install_crds(api)
    tag = uuid.uuid4().hex[:5]
    a_ns = k8s_cluster.create_namespace(f"cust-a-{tag}")
    b_ns = k8s_cluster.create_namespace(f"cust-b-{tag}")
    prefix = f"s3://{TEST_BUCKET}/tenants-{tag}"
    root = {k: v for k, v in s3_env.items() if k.startswith("AWS_")}
    env = {
        "FST_TENANT_PREFIX": prefix,
        "FST_DATABASE_URL": pg_url,
        "FST_POLICY": json.dumps(POLICY),
    }
    op = OperatorProcess(k8s_cluster.kubeconfig, [a_ns, b_ns], tmp_path / "op.log", {**root, **env})
    op.start()
    a, b = Resources(api, a_ns), Resources(api, b_ns)
    try:
        # A trains for real, with A's own credentials only (the spec names no Secret, so no
        # varied reward either: the random model's steps may not update it, but they run,
        # write their metrics and a checkpoint, which is what B must not reach).
        cfg = tiny_model_config(tiny_model_dir, steps=2, checkpoint={"every": 2, "keepLast": 1})
        a.create("fastslowruns", "FastSlowRun", "model", {"config": cfg, "trainer": TRAINER})

        def done() -> dict[str, Any] | None:
            run = a.run("model")
            if phase(run) in ("Failed", "Invalid"):
                raise AssertionError(dump(run.get("status")) + op.tail())
            return run if phase(run) == "Succeeded" else None

        run = wait_until(done, 420, "A's run Succeeded", poll=1)
        checkpoint = run["status"]["checkpointUri"]
        a_root = f"{prefix}/{a_ns}/"
        assert checkpoint.startswith(f"{a_root}runs/{run_key(a_ns, 'model')}/"), dump(run["status"])

        # B names A's places: Invalid, the field named, no Job.
        attempts = {
            "spec.config.checkpoint.uri": {
                "config": tiny_config(checkpoint={"uri": f"{a_root}runs/stolen"}),
                "trainer": TRAINER,
            },
            "spec.config.model.name": {
                "config": tiny_config(model={"name": checkpoint}),
                "trainer": TRAINER,
            },
            "spec.trainer.checkpointUri": {
                "config": tiny_config(),
                "trainer": {**TRAINER, "checkpointUri": f"{a_root}runs"},
            },
        }
        # B asks the operator for what the policy does not allow: Invalid, the field named.
        forbidden = {
            "spec.trainer.image": {"image": "docker.io/evil/miner:1"},
            "spec.trainer.s3Secret": {"s3Secret": "someone-elses-keys"},
            "spec.trainer.serviceAccountName": {"serviceAccountName": "cluster-admin-sa"},
            "spec.trainer.tolerations[0]": {"tolerations": [{"operator": "Exists"}]},
            "spec.trainer.priorityClassName": {"priorityClassName": "system-node-critical"},
        }
        for field, trainer in forbidden.items():
            attempts[field] = {"config": tiny_config(), "trainer": {**TRAINER, **trainer}}
        for i, spec in enumerate(attempts.values()):
            b.create("fastslowruns", "FastSlowRun", f"steal-{i}", spec)
        for i, field in enumerate(attempts):
            run = wait_until(
                lambda name=f"steal-{i}": phase(b.run(name)) == "Invalid" and b.run(name),
                60,
                f"steal-{i} Invalid",
            )
            message = condition(run, "Failed")["message"]
            assert field in message, (field, message)
            if field in STORAGE_FIELDS:
                assert a_ns in message, message
        assert not b.jobs()  # nothing refused ever reached a Job
        # B's own (suspended) run gets B's credentials.
        spec = {"config": tiny_config(), "trainer": TRAINER, "suspend": True}
        b.create("fastslowruns", "FastSlowRun", "mine", spec)
        core = k8s.CoreV1Api(api)
        wait_until(
            lambda: any(
                s.metadata.name == tenancy.SECRET_NAME
                for s in core.list_namespaced_secret(b_ns).items
            ),
            60,
            "B's tenant Secret",
        )
        # (its Job follows the Secret: the operator creates the Secret first)
        wait_until(lambda: b.jobs(), 60, "B's Job")
        assert [j.metadata.name for j in b.jobs()] == ["mine-a1"]

        # No root or owner credential in B's namespace.
        b_secrets = [decoded(s) for s in core.list_namespaced_secret(b_ns).items]
        for data in b_secrets:
            values = set(data.values())
            assert root["AWS_SECRET_ACCESS_KEY"] not in values
            assert data.get("AWS_ACCESS_KEY_ID") != root["AWS_ACCESS_KEY_ID"]
            assert pg_url not in values
            if "FST_DATABASE_URL" in data:
                assert (
                    make_url(data["FST_DATABASE_URL"]).username == f"fst_{b_ns.replace('-', '_')}"
                )
        (env_b,) = (d for d in b_secrets if "AWS_ACCESS_KEY_ID" in d)

        # B's credentials against A's checkpoint: list, read, write, delete all refused.
        cb = client_of(env_b)
        bucket, key = parse_s3_uri(checkpoint)
        manifest = f"{key}/manifest.json"
        for what, call in {
            "list": lambda: list(cb.list_objects(bucket, f"{key}/", recursive=True)),
            "read": lambda: cb.get_object(bucket, manifest),
            "write": lambda: cb.put_object(bucket, manifest, io.BytesIO(b"{}"), 2),
            "delete": lambda: cb.remove_object(bucket, manifest),
        }.items():
            with pytest.raises(S3Error) as e:
                call()
            assert e.value.code == "AccessDenied", (what, e.value)
        assert client_of(root).stat_object(bucket, manifest)  # still there

        # B's database login against A's rows.
        a_role = tenancy.tenant(a_ns, prefix).db_role
        dsn = make_url(env_b["FST_DATABASE_URL"]).set(drivername="postgresql")
        with psycopg.connect(dsn.render_as_string(hide_password=False), autocommit=True) as conn:
            for query in (f"SELECT * FROM {a_role}.runs", f"SELECT * FROM {a_role}.metrics"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(query)
        with RunDB(env_b["FST_DATABASE_URL"]) as db:
            assert db.run_info(run_key(a_ns, "model")) is None
        with RunDB(tenancy.schema_url(pg_url, a_role)) as db:  # A's rows, where A wrote them
            assert sorted(db.metrics(run_key(a_ns, "model"))) == [1, 2]
    finally:
        op.stop()
