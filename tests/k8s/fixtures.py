"""pytest fixtures for the test Kubernetes control plane (tests/k8s/cluster.py).

Use from a test module with `pytest_plugins = ["tests.k8s.fixtures"]`. A control plane that
cannot be built or started FAILS the tests that need it, never skips them. When a test that
used it fails, the tail of every component's log is added to that test's report, and the
cluster's folder (certs, kubeconfig, full logs) is kept and named at the end of the run.

`kueue` adds Kueue's real controller to the cluster (tests/k8s/kueue.py), started once, when a
test first asks for it; `kueue_namespace` is a fresh namespace whose queue-labelled Jobs it
manages (no other namespace's). `k8s_real_node` adds a real node (kubelet + containerd + runc,
tests/k8s/node.py) the same way.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s

from tests.k8s.binaries import BinaryUnavailable
from tests.k8s.cluster import ClusterError, TestCluster, test_cluster
from tests.k8s.kueue import KueueController, kueue_controller
from tests.k8s.node import RealNode, real_node
from tests.k8s.operator_proc import Resources, install_crds

_kept: list[str] = []
_clusters: list[TestCluster] = []


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest) -> Iterator[TestCluster]:
    manager = test_cluster()
    try:
        cluster = manager.__enter__()
    except (BinaryUnavailable, ClusterError) as e:
        problem = str(e)
    else:
        problem = None
    if problem is not None:
        pytest.fail(problem, pytrace=False)  # outside `except`: no chained traceback
    _clusters.append(cluster)
    try:
        yield cluster
    finally:
        if request.session.testsfailed:
            cluster.keep_logs = True
            _kept.append(str(cluster.root))
        _clusters.remove(cluster)
        manager.__exit__(None, None, None)


@pytest.fixture
def k8s_namespace(k8s_cluster: TestCluster, request: pytest.FixtureRequest) -> str:
    """A fresh namespace named after the test (left in place: the cluster is throwaway)."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    return k8s_cluster.create_namespace(f"{stem}-{uuid.uuid4().hex[:5]}")


@pytest.fixture(scope="session")
def crds(k8s_cluster: TestCluster) -> None:
    """fastslow's CRDs, installed once per session (the apiserver refuses a non-structural one)."""
    install_crds(k8s_cluster.api())


@pytest.fixture
def res(k8s_cluster: TestCluster, k8s_namespace: str, crds: None) -> Resources:
    """The test namespace's fastslow objects, Jobs, Secrets and Events."""
    return Resources(k8s_cluster.api(), k8s_namespace)


@pytest.fixture(scope="session")
def kueue(k8s_cluster: TestCluster) -> Iterator[KueueController]:
    manager = kueue_controller(k8s_cluster)
    try:
        controller = manager.__enter__()
    except (BinaryUnavailable, ClusterError) as e:
        problem = str(e)
    else:
        problem = None
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    try:
        yield controller
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture(scope="session")
def k8s_real_node(k8s_cluster: TestCluster) -> Iterator[RealNode]:
    """The real node (kubelet + containerd + runc, tests/k8s/node.py) joined to the cluster,
    started once, when a test first asks for it."""
    manager = real_node(k8s_cluster)
    try:
        node = manager.__enter__()
    except (BinaryUnavailable, ClusterError) as e:
        problem = str(e)
    else:
        problem = None
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    try:
        yield node
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture
def kueue_namespace(
    k8s_cluster: TestCluster, kueue: KueueController, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh namespace that Kueue manages; deleted afterwards, so that pods a test kept
    Running (kwok's fst.test/hold) do not keep the fake GPU nodes full for later tests."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    name = k8s_cluster.create_namespace(f"{stem}-{uuid.uuid4().hex[:5]}", kueue.namespace_labels())
    yield name
    k8s.CoreV1Api(k8s_cluster.api()).delete_namespace(name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed and "k8s_cluster" in getattr(item, "fixturenames", ()) and _clusters:
        report.sections.append(("kubernetes component logs", _clusters[0].describe_failure()))
    return report


def pytest_terminal_summary(terminalreporter) -> None:
    for root in _kept:
        terminalreporter.write_line(f"kept test cluster folder (logs, kubeconfig): {root}")
