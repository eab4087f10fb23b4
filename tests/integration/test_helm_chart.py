"""The Helm chart (helm/fastslow) against the real control plane of tests/k8s.

What is checked, and how:

- the chart's CRDs are byte-identical to the generated crds/ (Helm cannot package a symlink);
- `helm lint --strict` and `helm package`, with the default values and with the option files
  of tests/integration/helm-values/ (all options on with the bundled stores; namespaced with
  extra namespaces and external stores; external stores through existing Secrets); wrong
  values fail with a message that says what is wrong;
- the operator's Deployment gives the operator what operator/fst_operator reads (command,
  environment, probes) in each variant;
- every object of `helm template` is accepted by the apiserver: a server-side dry run
  (`POST ...?dryRun=All&fieldValidation=Strict`, so admission runs and an unknown field is an
  error) of each object, through the kubernetes client. Not `helm install --dry-run=server`,
  which only lets templates `lookup` and does not send the objects through admission;
- RBAC, after `helm install`: SubjectAccessReviews as the chart's ServiceAccount, and the
  ServiceAccount's own token (TokenRequest) against the API;
- in a namespace that enforces the restricted Pod Security Standard the chart's pods (operator,
  MinIO, PostgreSQL, bucket Job) are created by their controllers;
- `helm upgrade` keeps the generated credentials; `helm uninstall` removes everything of the
  release except the CRDs and, when asked to keep them, the bundled stores' volumes and their
  credentials, which a reinstall adopts.

The ServiceMonitor's CRD (Prometheus Operator) is not in the test cluster: a session fixture
installs a reduced copy of it that declares the fields the chart uses, so that a misspelt one
is still rejected by the strict dry run.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

from tests.k8s.waiting import wait_until

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "fastslow"
VALUES = Path(__file__).resolve().parent / "helm-values"
# name -> values files: the variants every static and dry-run check goes through.
VARIANTS = {
    "default": [],
    "all-bundled": [VALUES / "all-bundled.yaml"],
    "namespaced-external": [VALUES / "namespaced-external.yaml"],
    "existing-secrets": [VALUES / "existing-secrets.yaml"],
}
WATCHED = ["fst-team-a", "fst-team-b"]  # watchNamespaces of namespaced-external.yaml
INSTANCE = "app.kubernetes.io/instance"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


# ----------------------------------------------------------------------------- helm


@dataclass
class Helm:
    binary: Path
    kubeconfig: Path
    home: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # Helm keeps caches and settings under HOME/XDG folders: keep them out of the user's.
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / "cache"),
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "XDG_DATA_HOME": str(self.home / "data"),
        }
        cmd = [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def template(self, release: str, namespace: str, *args: str) -> list[dict[str, Any]]:
        out = self.run("template", release, str(CHART), "-n", namespace, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def install(self, release: str, namespace: str, *args: str) -> subprocess.CompletedProcess:
        return self.run("install", release, str(CHART), "-n", namespace, *args)


def value_args(variant: str) -> list[str]:
    return [arg for path in VARIANTS[variant] for arg in ("-f", str(path))]


@pytest.fixture(scope="session")
def helm(k8s_cluster, tmp_path_factory) -> Helm:
    return Helm(
        k8s_cluster.bins["helm"], k8s_cluster.kubeconfig, tmp_path_factory.mktemp("helm-home")
    )


def release_name() -> str:
    """Unique per test: the uninstall checks find a release's objects by its label."""
    return f"fs{uuid.uuid4().hex[:6]}"


# ----------------------------------------------------------------------------- API helpers


def call(api: k8s.ApiClient, method: str, path: str, body=None, query=()) -> Any:
    """A raw API request through the dynamic client (it passes any query parameter, e.g.
    fieldValidation): the parsed JSON response, ApiException on an error status."""
    return _dynamic(api).request(
        method, path, body=body, query_params=list(query), serializer=lambda _, data: data
    )


@functools.cache
def _dynamic(api: k8s.ApiClient) -> DynamicClient:
    # Only its request() is used: no discovery cache file left in the temp folder.
    return DynamicClient(api, cache_file=os.devnull)


class Discovery:
    """kind -> (resource, namespaced), and every listable resource type, from discovery."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.api = api
        self._lists: dict[str, list[dict[str, Any]]] = {}

    def resources(self, api_version: str) -> list[dict[str, Any]]:
        if api_version not in self._lists:
            base = "/api" if "/" not in api_version else "/apis"
            self._lists[api_version] = call(self.api, "GET", f"{base}/{api_version}")["resources"]
        return self._lists[api_version]

    def find(self, api_version: str, kind: str) -> tuple[str, bool]:
        for r in self.resources(api_version):
            if r["kind"] == kind and "/" not in r["name"]:
                return r["name"], r["namespaced"]
        raise LookupError(f"{api_version} {kind}: not served")

    def path(self, obj: dict[str, Any]) -> str:
        api_version = obj["apiVersion"]
        plural, namespaced = self.find(api_version, obj["kind"])
        base = "/api" if "/" not in api_version else "/apis"
        ns = obj["metadata"].get("namespace")
        if namespaced and ns:
            return f"{base}/{api_version}/namespaces/{ns}/{plural}"
        return f"{base}/{api_version}/{plural}"

    def listable(self) -> list[tuple[str, str]]:
        """(apiVersion, resource) of every listable type, preferred versions only."""
        versions = ["v1"] + [
            g["preferredVersion"]["groupVersion"] for g in call(self.api, "GET", "/apis")["groups"]
        ]
        out = []
        for v in versions:
            for r in self.resources(v):
                if "/" not in r["name"] and "list" in r["verbs"]:
                    out.append((v, r["name"]))
        return out


def dry_run_create(api: k8s.ApiClient, disco: Discovery, obj: dict[str, Any]) -> str | None:
    """None if the apiserver would create `obj` (admission included), else its message."""
    try:
        call(
            api,
            "POST",
            disco.path(obj),
            body=obj,
            query=[("dryRun", "All"), ("fieldValidation", "Strict")],
        )
    except ApiException as e:
        return f"{obj['kind']} {obj['metadata']['name']}: {e.status} {_message(e)}"
    return None


def _message(e: ApiException) -> str:
    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(e.body)


def release_objects(api: k8s.ApiClient, release: str) -> list[str]:
    """Every object in the cluster (any namespace, any type) labelled with the release."""
    disco = Discovery(api)
    found = []
    for api_version, resource in disco.listable():
        if resource == "events":  # unlabelled by nature; and they age out by themselves
            continue
        base = "/api" if "/" not in api_version else "/apis"
        try:
            items = call(
                api,
                "GET",
                f"{base}/{api_version}/{resource}",
                query=[("labelSelector", f"{INSTANCE}={release}")],
            )["items"]
        except ApiException as e:
            if e.status in (404, 405):  # e.g. a type that is listable only per namespace
                continue
            raise
        for item in items:
            meta = item["metadata"]
            where = f"{meta['namespace']}/" if meta.get("namespace") else ""
            found.append(f"{resource}:{where}{meta['name']}")
    return sorted(found)


def ensure_namespace(k8s_cluster, name: str, labels: dict[str, str] | None = None) -> str:
    try:
        k8s.CoreV1Api(k8s_cluster.api()).read_namespace(name)
    except ApiException as e:
        if e.status != 404:
            raise
        k8s_cluster.create_namespace(name, labels)
    return name


# A reduced ServiceMonitor CRD: the fields of monitoring.coreos.com/v1 the chart sets, with
# their real names and types, and nothing else (strict dry runs reject unknown fields).
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "listKind": "ServiceMonitorList",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["selector"],
                                "properties": {
                                    "jobLabel": {"type": "string"},
                                    "selector": {
                                        "type": "object",
                                        "properties": {
                                            "matchLabels": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                        },
                                    },
                                    "namespaceSelector": {
                                        "type": "object",
                                        "properties": {
                                            "any": {"type": "boolean"},
                                            "matchNames": {
                                                "type": "array",
                                                "items": {"type": "string"},
                                            },
                                        },
                                    },
                                    "endpoints": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "port": {"type": "string"},
                                                "path": {"type": "string"},
                                                "scheme": {"type": "string"},
                                                "interval": {
                                                    "type": "string",
                                                    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?"
                                                    "(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                                    "(([0-9]+)s)?(([0-9]+)ms)?)$",
                                                },
                                                "scrapeTimeout": {
                                                    "type": "string",
                                                    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?"
                                                    "(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                                    "(([0-9]+)s)?(([0-9]+)ms)?)$",
                                                },
                                            },
                                        },
                                    },
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="session")
def service_monitor_crd(k8s_cluster) -> None:
    api = k8s_cluster.api()
    try:
        k8s.ApiextensionsV1Api(api).create_custom_resource_definition(SERVICE_MONITOR_CRD)
    except ApiException as e:
        if e.status != 409:
            raise

    def served() -> bool:
        try:
            Discovery(api).find("monitoring.coreos.com/v1", "ServiceMonitor")
        except (ApiException, LookupError):
            return False
        return True

    wait_until(served, 60, "ServiceMonitor CRD served")


# ----------------------------------------------------------------------------- static checks


def test_chart_crds_are_the_generated_ones() -> None:
    """helm/fastslow/crds/ is a copy of crds/ (make crds writes both): same files, same bytes."""
    generated = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    packaged = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert generated, "crds/ is empty"
    assert sorted(packaged) == sorted(generated), "helm/fastslow/crds/ has other files: make crds"
    for name, content in generated.items():
        assert not (CHART / "crds" / name).is_symlink(), f"{name}: a symlink is not packaged"
        assert packaged[name] == content, f"helm/fastslow/crds/{name} is stale: run make crds"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict(helm: Helm, variant: str) -> None:
    proc = helm.run("lint", "--strict", str(CHART), "-n", "fastslow", *value_args(variant))
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


def test_package_contains_the_crds(helm: Helm, tmp_path: Path) -> None:
    helm.run("package", str(CHART), "-d", str(tmp_path))
    (archive,) = tmp_path.glob("fastslow-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for crd in (REPO / "crds").glob("*.yaml"):
        assert f"fastslow/crds/{crd.name}" in names
    assert "fastslow/values.schema.json" in names and "fastslow/templates/NOTES.txt" in names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicas=2"], "additional properties 'replicas' not allowed"),
        (["--set", "operator.image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "defaults.checkpointUri=/local/path"], "checkpointUri"),
        (
            ["--set", "clusterWide=true", "--set", "watchNamespaces={a}"],
            "watchNamespaces is for namespaced mode",
        ),
        (
            ["--set", "minio.enabled=true", "--set", "s3.external.endpoint=http://x:9000"],
            "minio.enabled and s3.external.* are exclusive",
        ),
        (
            ["--set", "s3.external.endpoint=http://x:9000"],
            "s3.external needs endpoint, accessKey and secretKey together",
        ),
        (
            ["--set", "postgres.enabled=true", "--set", "database.external.url=postgresql://x/y"],
            "postgres.enabled and database.external.* are exclusive",
        ),
        (["--set", "serviceAccount.create=false"], "serviceAccount.name"),
    ],
    ids=[
        "unknown-key",
        "bad-enum",
        "bad-uri",
        "cluster-wide-with-namespaces",
        "minio-and-external-s3",
        "external-s3-without-keys",
        "postgres-and-external-db",
        "no-sa-name",
    ],
)
def test_wrong_values_are_refused_with_a_reason(helm: Helm, args: list[str], message: str) -> None:
    proc = helm.run("template", "x", str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_operator_deployment_gives_the_operator_what_it_reads(helm: Helm) -> None:
    """Command, environment and probe that operator/fst_operator reads, per variant."""
    ns = "fastslow"
    expected_db = {
        "default": None,
        "all-bundled": ("fsall-database", "url"),
        "namespaced-external": ("rel-fastslow-database", "url"),
        "existing-secrets": ("my-database", "dsn"),
    }
    expected_s3 = {
        "default": None,
        "all-bundled": "fsall-s3",
        "namespaced-external": "rel-fastslow-s3",
        "existing-secrets": "my-s3",
    }
    for variant in VARIANTS:
        docs = helm.template("rel", ns, *value_args(variant))
        (deploy,) = _by_kind(docs, "Deployment")
        (config,) = _by_kind(docs, "ConfigMap")
        spec, pod = deploy["spec"], deploy["spec"]["template"]["spec"]
        assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}, variant
        (c,) = pod["containers"]
        assert c["command"] == ["python", "-m", "fst_operator"], variant
        assert pod["automountServiceAccountToken"] is True
        env = _env(c)
        assert env["FST_SERVICE_ACCOUNT_DIR"] == SA_DIR
        metrics, health = (p["containerPort"] for p in c["ports"])
        assert env["FST_METRICS_PORT"] == str(metrics) and env["FST_LIVENESS_PORT"] == str(health)
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        watch = {
            "default": ns,
            "all-bundled": "",
            "namespaced-external": ",".join([ns, *WATCHED]),
            "existing-secrets": ns,
        }[variant]
        assert env["FST_WATCH_NAMESPACES"] == watch, variant
        # Defaults come from the ConfigMap users read.
        for var, key in [
            ("FST_DEFAULT_CHECKPOINT_URI", "checkpointUri"),
            ("FST_DEFAULT_S3_SECRET", "s3Secret"),
            ("FST_DEFAULT_DATABASE_SECRET", "databaseSecret"),
        ]:
            ref = env[var]["configMapKeyRef"]
            assert ref == {"name": config["metadata"]["name"], "key": key}, (variant, var)
        ref = env["FST_TENANT_PREFIX"]["configMapKeyRef"]
        assert ref == {"name": config["metadata"]["name"], "key": "tenantPrefix"}, variant
        # With tenancy (all but namespaced-external) runs get no default Secret: the operator
        # makes each namespace's own; the root/owner Secrets are the operator's alone.
        tenancy = variant != "namespaced-external"
        assert config["data"]["tenantPrefix"] == {
            "all-bundled": "s3://checkpoints/tenants",
            "namespaced-external": "",
        }.get(variant, ""), variant
        db = expected_db[variant]
        if db is None:
            assert "FST_DATABASE_URL" not in env and config["data"]["databaseSecret"] == ""
        else:
            ref = env["FST_DATABASE_URL"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == db, variant
            assert config["data"]["databaseSecret"] == ("" if tenancy else "/".join(db))
        s3 = expected_s3[variant]
        if s3 is None:
            assert "envFrom" not in c and config["data"]["s3Secret"] == ""
        else:
            assert c["envFrom"] == [{"secretRef": {"name": s3}}], variant
            assert config["data"]["s3Secret"] == ("" if tenancy else s3)
    # Options reach the pod.
    docs = helm.template("rel", ns, *value_args("all-bundled"))
    (deploy,) = _by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["--verbose"] and _env(c)["FST_PROGRESS_INTERVAL"] == "5"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated" and "nodeAffinity" in pod["affinity"]
    (config,) = _by_kind(docs, "ConfigMap")
    assert config["data"]["checkpointUri"] == "s3://checkpoints/checkpoints"


def test_root_credentials_stay_in_the_release_namespace(helm: Helm) -> None:
    """Tenancy (default): the MinIO root and database owner Secrets exist only where the
    operator runs; served namespaces get nothing from the chart (the operator makes their own
    credentials). Tenancy off (one trusted team): copies in every served namespace."""
    served = ["team-a", "team-b"]
    args = ["--set", "minio.enabled=true", "--set", "postgres.enabled=true"]
    args += ["--set", "watchNamespaces={team-a,team-b}"]
    docs = helm.template("rel", "fastslow", *args)
    assert {
        (d["metadata"]["namespace"], d["metadata"]["name"]) for d in _by_kind(docs, "Secret")
    } == {
        ("fastslow", "rel-fastslow-s3"),
        ("fastslow", "rel-fastslow-database"),
    }
    (config,) = _by_kind(docs, "ConfigMap")
    assert config["data"]["tenantPrefix"] == "s3://fastslow/tenants"
    shared = helm.template("rel", "fastslow", *args, "--set", "tenancy.enabled=false")
    where = {d["metadata"]["namespace"] for d in _by_kind(shared, "Secret")}
    assert where == {"fastslow", *served}


def test_network_policies_fence_trainers_and_stores(helm: Helm) -> None:
    args = ["--set", "minio.enabled=true", "--set", "postgres.enabled=true"]
    docs = helm.template("rel", "fastslow", *args, "--set", "watchNamespaces={team-a}")
    policies = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d["spec"]
        for d in _by_kind(docs, "NetworkPolicy")
    }
    assert set(policies) == {
        ("fastslow", "rel-fastslow-operator"),
        ("fastslow", "rel-fastslow-trainers"),
        ("team-a", "rel-fastslow-trainers"),
        ("fastslow", "rel-fastslow-minio"),
        ("fastslow", "rel-fastslow-postgres"),
    }
    trainers = policies[("team-a", "rel-fastslow-trainers")]
    assert trainers["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "fastslow-trainer"}
    }
    assert trainers["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in trainers
    ports = sorted(p["port"] for rule in trainers["egress"] for p in rule.get("ports", []))
    assert ports == [53, 53, 5432, 9000]  # DNS, the bundled stores, nothing else
    minio = policies[("fastslow", "rel-fastslow-minio")]
    assert minio["policyTypes"] == ["Ingress"]
    (rule,) = minio["ingress"]
    assert [p["port"] for p in rule["ports"]] == [9000]
    assert all("podSelector" in peer for peer in rule["from"])  # never "from anywhere"
    off = helm.template("rel", "fastslow", *args, "--set", "networkPolicy.enabled=false")
    assert not _by_kind(off, "NetworkPolicy")


def test_every_pod_is_restricted_and_read_only(helm: Helm) -> None:
    """The restricted Pod Security Standard, field by field (the admission test below checks
    that the apiserver agrees), plus what it does not require: a read-only root filesystem."""
    docs = helm.template("rel", "fastslow", *value_args("all-bundled"))
    pods = [
        d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")
    ]
    assert len(pods) == 4  # operator, MinIO, PostgreSQL, bucket Job
    for template in pods:
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
            assert c.get("command"), "explicit commands: what runs is in the chart"


# ----------------------------------------------------------------------------- dry run


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_object_passes_a_server_side_dry_run(
    k8s_cluster, k8s_namespace, helm: Helm, service_monitor_crd, variant: str
) -> None:
    api = k8s_cluster.api()
    for ns in WATCHED:
        ensure_namespace(k8s_cluster, ns)
    docs = helm.template(release_name(), k8s_namespace, *value_args(variant))
    assert docs
    disco = Discovery(api)
    problems = [p for obj in docs if (p := dry_run_create(api, disco, obj))]
    assert problems == []
    # Namespaced objects go to the release namespace, or to a served one (Roles, Secrets).
    allowed = {k8s_namespace, *WATCHED}
    for obj in docs:
        ns = obj["metadata"].get("namespace")
        if disco.find(obj["apiVersion"], obj["kind"])[1]:
            assert ns in allowed, f"{obj['kind']} {obj['metadata']['name']} in {ns}"
        else:
            assert ns is None, obj["kind"]


# ----------------------------------------------------------------------------- RBAC


def sa_can(
    api: k8s.ApiClient,
    sa: tuple[str, str],
    verb: str,
    resource: str,
    namespace: str | None,
    group: str = "",
    subresource: str | None = None,
    name: str | None = None,
) -> bool:
    """SubjectAccessReview: may ServiceAccount `sa` (namespace, name) do this?"""
    sa_ns, sa_name = sa
    review = k8s.V1SubjectAccessReview(
        spec=k8s.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{sa_ns}:{sa_name}",
            # The groups a ServiceAccount token carries: bindings to them count too.
            groups=[
                "system:serviceaccounts",
                f"system:serviceaccounts:{sa_ns}",
                "system:authenticated",
            ],
            resource_attributes=k8s.V1ResourceAttributes(
                verb=verb,
                group=group,
                resource=resource,
                subresource=subresource,
                namespace=namespace,
                name=name,
            ),
        )
    )
    return k8s.AuthorizationV1Api(api).create_subject_access_review(review).status.allowed


def sa_client(k8s_cluster, namespace: str, name: str) -> k8s.ApiClient:
    """A client authenticated as the ServiceAccount, with a token from the TokenRequest API."""
    token = (
        k8s.CoreV1Api(k8s_cluster.api())
        .create_namespaced_service_account_token(
            name,
            namespace,
            k8s.AuthenticationV1TokenRequest(
                spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
            ),
        )
        .status.token
    )
    cfg = k8s.Configuration(host=k8s_cluster.server)
    cfg.ssl_ca_cert = str(k8s_cluster.pki / "ca.crt")
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return k8s.ApiClient(cfg)


def forbidden(fn: Callable[[], Any]) -> bool:
    try:
        fn()
    except ApiException as e:
        return e.status == 403
    return False


def test_namespaced_rbac_is_least_privilege(k8s_cluster, k8s_namespace, helm: Helm) -> None:
    api = k8s_cluster.api()
    ns = k8s_namespace
    served = k8s_cluster.create_namespace(f"{ns[:50]}-w")
    other = k8s_cluster.create_namespace(f"{ns[:50]}-o")
    release = release_name()
    helm.install(release, ns, "--set", f"watchNamespaces={{{served}}}")
    sa = (ns, f"{release}-fastslow-operator")

    def can(verb, resource, namespace, group="", sub=None, name=None):
        return sa_can(api, sa, verb, resource, namespace, group, sub, name)

    for where in (ns, served):
        assert can("create", "jobs", where, "batch")
        assert can("watch", "jobs", where, "batch")
        assert can("patch", "fastslowruns", where, "fastslow.io", "status")
        assert can("create", "fastslowruns", where, "fastslow.io")
        assert can("watch", "taskstreams", where, "fastslow.io")
        assert can("create", "configmaps", where)
        assert can("patch", "configmaps", where)  # <stream>-serving follows the served bundle
        assert can("create", "events", where)
        assert can("create", "events", where, "events.k8s.io")
        assert not can("get", "secrets", where)
        assert not can("list", "secrets", where)
        # Tenancy: it makes each namespace's own credentials Secret, and reads only that one.
        assert can("create", "secrets", where)
        assert can("get", "secrets", where, name="fastslow-tenant")
        assert not can("get", "secrets", where, name="fsall-s3")
        assert not can("delete", "secrets", where, name="fastslow-tenant")
        assert not can("create", "pods", where, sub="exec")
        assert not can("get", "pods", where, sub="exec")
        assert not can("create", "pods", where)
        # Pods: listed only (a failed attempt's, to tell an OOM kill), never read one by one.
        assert can("list", "pods", where)
        assert not can("get", "pods", where) and not can("watch", "pods", where)
        assert not can("delete", "pods", where)
        assert not can("delete", "jobs", where, "batch")
        assert not can("delete", "fastslowruns", where, "fastslow.io")
        assert not can("update", "configmaps", where)
    # Nothing in a namespace it does not serve, nothing cluster-wide.
    assert not can("create", "jobs", other, "batch")
    assert not can("list", "fastslowruns", other, "fastslow.io")
    assert not can("list", "fastslowruns", None, "fastslow.io")
    assert not can("list", "namespaces", None)
    assert not can("list", "customresourcedefinitions", None, "apiextensions.k8s.io")

    # The same with the ServiceAccount's real token against the API.
    as_sa = sa_client(k8s_cluster, *sa)
    core, batch = k8s.CoreV1Api(as_sa), k8s.BatchV1Api(as_sa)
    custom = k8s.CustomObjectsApi(as_sa)
    batch.list_namespaced_job(ns)  # allowed: the token works
    custom.list_namespaced_custom_object("fastslow.io", "v1alpha1", ns, "fastslowruns")
    job = {
        "metadata": {"name": "probe"},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "x", "command": ["true"]}],
                }
            }
        },
    }
    batch.create_namespaced_job(ns, job, dry_run="All")
    core.create_namespaced_config_map(ns, {"metadata": {"name": "probe"}}, dry_run="All")
    assert forbidden(lambda: core.read_namespaced_secret("anything", ns))
    assert forbidden(lambda: core.list_namespaced_secret(ns))
    core.list_namespaced_pod(ns)  # allowed: a failed attempt's pods, to tell an OOM kill
    assert forbidden(lambda: core.read_namespaced_pod("anything", ns))
    assert forbidden(lambda: core.list_namespaced_pod(other))
    assert forbidden(lambda: batch.list_namespaced_job(other))
    assert forbidden(lambda: batch.create_namespaced_job(other, job, dry_run="All"))
    assert forbidden(
        lambda: custom.list_cluster_custom_object("fastslow.io", "v1alpha1", "fastslowruns")
    )
    as_sa.close()


# ----------------------------------------------------------------------------- bundled stores


def secret_data(api: k8s.ApiClient, namespace: str, name: str) -> dict[str, str]:
    data = k8s.CoreV1Api(api).read_namespaced_secret(name, namespace).data
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


@pytest.fixture
def restricted_namespace(k8s_cluster) -> str:
    name = f"fst-restricted-{uuid.uuid4().hex[:5]}"
    levels = {
        f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")
    }
    return k8s_cluster.create_namespace(
        name, {**levels, "pod-security.kubernetes.io/enforce-version": "latest"}
    )


def test_pods_are_admitted_under_restricted_pod_security(
    k8s_cluster, restricted_namespace, helm: Helm, service_monitor_crd
) -> None:
    """Installed (every option on, bundled stores) into a namespace that enforces the
    restricted standard: every controller creates its pod, and the apiserver warns of nothing
    (PodSecurity warns on workload objects, `warn` label, whose pods would be rejected)."""
    api, ns = k8s_cluster.api(), restricted_namespace
    release = release_name()
    proc = helm.install(release, ns, *value_args("all-bundled"))
    assert "PodSecurity" not in proc.stderr, proc.stderr
    core = k8s.CoreV1Api(api)

    def pods() -> dict[str, str]:
        items = core.list_namespaced_pod(ns, label_selector=f"{INSTANCE}={release}").items
        return {p.metadata.labels["app.kubernetes.io/component"]: p.metadata.name for p in items}

    wanted = {"operator", "minio", "postgres", "minio-bucket"}

    def all_there() -> bool:
        return wanted <= set(pods())

    deadline = time.monotonic() + 60
    while not all_there():
        if time.monotonic() > deadline:
            failed = [
                f"{e.involved_object.kind} {e.involved_object.name}: {e.message}"
                for e in core.list_namespaced_event(ns).items
                if e.reason == "FailedCreate"
            ]
            pytest.fail(f"pods {sorted(pods())}, wanted {sorted(wanted)}; failures: {failed}")
        time.sleep(0.5)
    helm.run("uninstall", release, "-n", ns, "--wait")


def test_cluster_wide_rbac(k8s_cluster, k8s_namespace, helm: Helm, service_monitor_crd) -> None:
    api = k8s_cluster.api()
    release = release_name()
    helm.install(release, k8s_namespace, *value_args("all-bundled"))
    sa = (k8s_namespace, "fsall-operator")
    anywhere = k8s_cluster.create_namespace(f"{k8s_namespace[:50]}-any")
    for where in (None, k8s_namespace, anywhere):
        assert sa_can(api, sa, "watch", "fastslowruns", where, "fastslow.io")
        assert sa_can(api, sa, "list", "jobs", where, "batch")
        assert not sa_can(api, sa, "get", "secrets", where)
        assert not sa_can(api, sa, "list", "secrets", where)
        assert not sa_can(api, sa, "create", "pods", where, subresource="exec")
    assert sa_can(api, sa, "create", "jobs", anywhere, "batch")
    assert sa_can(api, sa, "watch", "customresourcedefinitions", None, "apiextensions.k8s.io")
    assert not sa_can(api, sa, "create", "customresourcedefinitions", None, "apiextensions.k8s.io")
    # kopf does not observe namespaces in cluster-wide mode: no permission for them.
    assert not sa_can(api, sa, "list", "namespaces", None)
    # Users: `edit` in a namespace now covers the fastslow resources (aggregated ClusterRole).
    user = k8s.V1SubjectAccessReview(
        spec=k8s.V1SubjectAccessReviewSpec(
            user="alice",
            resource_attributes=k8s.V1ResourceAttributes(
                verb="create", group="fastslow.io", resource="taskstreams", namespace=anywhere
            ),
        )
    )
    authz = k8s.AuthorizationV1Api(api)
    assert not authz.create_subject_access_review(user).status.allowed
    k8s.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
        anywhere,
        {
            "metadata": {"name": "alice-edit"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "edit",
            },
            "subjects": [
                {"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}
            ],
        },
    )
    wait_until(
        lambda: authz.create_subject_access_review(user).status.allowed,
        30,
        "aggregated edit role covers taskstreams",
    )
    helm.run("uninstall", release, "-n", k8s_namespace, "--wait")
    for pvc in k8s.CoreV1Api(api).list_namespaced_persistent_volume_claim(k8s_namespace).items:
        k8s.CoreV1Api(api).delete_namespaced_persistent_volume_claim(
            pvc.metadata.name, k8s_namespace
        )


def wait_release_gone(api: k8s.ApiClient, release: str, keep: set[str]) -> list[str]:
    """Poll until only `keep` is left of the release (garbage collection is asynchronous)."""
    left: list[str] = []

    def only_kept() -> bool:
        nonlocal left
        left = release_objects(api, release)
        return set(left) <= keep

    deadline = time.monotonic() + 90
    while not only_kept():
        if time.monotonic() > deadline:
            pytest.fail(f"left after uninstall: {sorted(set(left) - keep)}")
        time.sleep(2)
    return left


def crds_exist(api: k8s.ApiClient) -> bool:
    names = {
        c.metadata.name for c in k8s.ApiextensionsV1Api(api).list_custom_resource_definition().items
    }
    return {"fastslowruns.fastslow.io", "taskstreams.fastslow.io"} <= names


def test_uninstall_removes_everything_but_the_crds(k8s_cluster, k8s_namespace, helm: Helm) -> None:
    api = k8s_cluster.api()
    release = release_name()
    served = k8s_cluster.create_namespace(f"{k8s_namespace[:50]}-w")
    helm.install(release, k8s_namespace, "--set", f"watchNamespaces={{{served}}}")
    made = release_objects(api, release)
    assert any(o.startswith("roles:" + served) for o in made), made
    assert any(o.startswith("clusterroles:") for o in made), made  # the aggregated user roles
    helm.run("uninstall", release, "-n", k8s_namespace, "--wait")
    assert wait_release_gone(api, release, keep=set()) == []
    assert crds_exist(api)


def test_bundled_credentials_survive_upgrade_and_kept_stores_survive_uninstall(
    k8s_cluster, k8s_namespace, helm: Helm, service_monitor_crd
) -> None:
    """all-bundled.yaml keeps MinIO's volume on uninstall and not PostgreSQL's: after the
    uninstall exactly MinIO's volume and credentials are left, and a reinstall reuses them."""
    api, ns = k8s_cluster.api(), k8s_namespace
    release = release_name()
    values = value_args("all-bundled")
    helm.install(release, ns, *values)
    s3 = secret_data(api, ns, "fsall-s3")
    db = secret_data(api, ns, "fsall-database")
    assert len(s3["AWS_SECRET_ACCESS_KEY"]) == 40 and len(db["password"]) == 32
    assert s3["AWS_ENDPOINT_URL"] == f"http://fsall-minio.{ns}.svc:9000"
    assert (
        db["url"] == f"postgresql://fastslow:{db['password']}@fsall-postgres.{ns}.svc:5432/fastslow"
    )

    # Upgrade: the generated credentials stay (lookup), the bucket Job of revision 2 replaces 1.
    # A label change reaches every object: the StatefulSets' immutable claim templates must
    # not carry such labels, or the upgrade is refused.
    helm.run(
        "upgrade", release, str(CHART), "-n", ns, *values, "--set-string", "commonLabels.rev=2"
    )
    assert secret_data(api, ns, "fsall-s3") == s3
    assert secret_data(api, ns, "fsall-database") == db
    jobs = {j.metadata.name for j in k8s.BatchV1Api(api).list_namespaced_job(ns).items}
    assert jobs == {"fsall-minio-bucket-2"}

    # The StatefulSets have made their claims by now (the PVCs wait for storage that the test
    # cluster does not have; they exist all the same).
    core = k8s.CoreV1Api(api)

    def claims() -> set[str]:
        return {p.metadata.name for p in core.list_namespaced_persistent_volume_claim(ns).items}

    wait_until(
        lambda: {"data-fsall-minio-0", "data-fsall-postgres-0"} <= claims(), 60, "PVCs created"
    )
    helm.run("uninstall", release, "-n", ns, "--wait")
    kept = {f"secrets:{ns}/fsall-s3", f"persistentvolumeclaims:{ns}/data-fsall-minio-0"}
    assert set(wait_release_gone(api, release, keep=kept)) == kept
    assert crds_exist(api)

    # A reinstall of the release adopts the kept Secret: MinIO's volume opens with it.
    helm.install(release, ns, *values)
    assert secret_data(api, ns, "fsall-s3") == s3
    assert secret_data(api, ns, "fsall-database")["password"] != db["password"]  # a new volume
    helm.run("uninstall", release, "-n", ns, "--wait")
    core.delete_namespaced_secret("fsall-s3", ns)
    core.delete_namespaced_persistent_volume_claim("data-fsall-minio-0", ns)
