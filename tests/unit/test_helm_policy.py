"""The chart's `policy:` values reach the operator as FST_POLICY, and the operator reads them
back as the Policy they say (helm template only: no cluster). The helm binary is the test
harness's (tests/k8s/binaries.py: $FST_HELM_BIN or the cached build, built if missing)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fst_operator.policy import Policy

from tests.k8s.binaries import binary

CHART = Path(__file__).resolve().parents[2] / "helm" / "fastslow"


@pytest.fixture(scope="module")
def helm(tmp_path_factory) -> Any:
    path = binary("helm")  # `make test` builds it first (test-deps); never skipped
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
    }

    def template(*args: str) -> subprocess.CompletedProcess:
        cmd = [str(path), "template", "fs", str(CHART), "-n", "fastslow", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    return template


def operator_env(helm: Any, *args: str) -> dict[str, Any]:
    proc = helm("--show-only", "templates/operator-deployment.yaml", *args)
    assert proc.returncode == 0, proc.stderr
    deployment = yaml.safe_load(proc.stdout)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def settings_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, Any]) -> Any:
    """The operator's Settings from the rendered environment (plain values only)."""
    from fst_operator.settings import Settings

    for name in list(os.environ):
        if name.startswith("FST_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if isinstance(value, str) and name.startswith("FST_"):
            monkeypatch.setenv(name, value)
    return Settings.from_env()


def test_the_chart_default_policy_is_the_operator_default(helm, monkeypatch):
    env = operator_env(helm)
    assert json.loads(env["FST_POLICY"]) == json.loads(Policy().to_env())
    assert settings_from(monkeypatch, env).policy_config == Policy()


def test_policy_values_reach_the_operator(helm, monkeypatch, tmp_path):
    values = {
        "policy": {
            "images": ["registry.example.com/ml/trainer", "ghcr.io/fastslow/"],
            "imagePullPolicies": ["Always"],
            "serviceAccounts": ["trainer"],
            "secrets": ["team-s3"],
            "nodeSelectors": ["pool=gpu"],
            "tolerations": ["nvidia.com/gpu:NoSchedule", "dedicated=ml:NoExecute"],
            "priorityClasses": ["batch-low"],
            "maxGpus": 4,
            "requireQueue": True,
            "queues": ["team-queue"],
            "reflectorEndpoints": ["http://vllm.llm.svc:8000/v1"],
            "reflectorKeyEnvs": ["VLLM_API_KEY"],
            "sharedPrefixes": ["s3://fastslow/shared/models/"],
        }
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    env = operator_env(helm, "-f", str(path))
    got = settings_from(monkeypatch, env).policy_config
    assert got == Policy.model_validate(values["policy"])
    assert (
        got.max_gpus == 4 and got.require_queue and got.tolerations[1] == "dedicated=ml:NoExecute"
    )


def test_one_value_changes_only_that_key(helm, monkeypatch):
    env = operator_env(helm, "--set", "policy.maxGpus=2", "--set", "policy.requireQueue=true")
    got = settings_from(monkeypatch, env).policy_config
    assert got == Policy(max_gpus=2, require_queue=True)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "policy.maxGpus=65"], "maxGpus"),
        (["--set", "policy.maxGpus=-1"], "maxGpus"),
        (["--set", "policy.unknown=1"], "unknown"),
        (["--set", "policy.tolerations[0]=nvidia.com/gpu:Sometimes"], "tolerations"),
        (["--set", "policy.imagePullPolicies[0]=Maybe"], "imagePullPolicies"),
        (["--set", "policy.secrets[0]=Not_A_Name"], "secrets"),
        (["--set", "policy.sharedPrefixes[0]=/local/models"], "sharedPrefixes"),
        (["--set", "policy.reflectorEndpoints[0]=http://user@host/v1"], "reflectorEndpoints"),
        (["--set", "policy.requireQueue=maybe"], "requireQueue"),
    ],
)
def test_the_schema_refuses_bad_policy_values(helm, args, named):
    proc = helm(*args)
    assert proc.returncode != 0
    assert named in proc.stderr, proc.stderr
