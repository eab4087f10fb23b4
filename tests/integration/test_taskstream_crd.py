"""The real kube-apiserver (tests/k8s) validates a TaskStream's stage sections and stream
defaults with the generated CRD: a bad setting is refused at `kubectl apply`, naming the
field, instead of surfacing later in the operator."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from fst.k8s.api import TaskStream
from fst.plan import stage_config
from fst.stream import load_stream
from tests.k8s.operator_proc import GROUP, VERSION, install_crds

pytest_plugins = ["tests.k8s.fixtures"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "taskstream.yaml"


def test_apiserver_refuses_invalid_stage_sections_naming_the_field(
    k8s_cluster, k8s_namespace
) -> None:
    api = k8s_cluster.api()
    install_crds(api)  # the apiserver refuses a CRD whose schema is not structural
    objects = k8s.CustomObjectsApi(api)
    example = yaml.safe_load(EXAMPLE.read_text())

    def create(spec: dict[str, Any], strict: bool = True) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TaskStream",
            "metadata": {"name": f"s-{uuid.uuid4().hex[:8]}"},
            "spec": spec,
        }
        return objects.create_namespaced_custom_object(
            GROUP,
            VERSION,
            k8s_namespace,
            "taskstreams",
            body,
            field_validation="Strict" if strict else None,  # kubectl's default is Strict
        )

    def refused(where: list, value: Any) -> tuple[int, str]:
        spec = copy.deepcopy(example["spec"])
        node = spec
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value
        with pytest.raises(ApiException) as e:
            create(spec)
        return e.value.status, json.loads(e.value.body)["message"]

    # The example is accepted as written: the apiserver adds no setting to a stage or to the
    # defaults (a default there would override the stream's defaults).
    stored = create(copy.deepcopy(example["spec"]))
    assert stored["spec"]["defaults"] == example["spec"]["defaults"]
    for got, written in zip(stored["spec"]["stages"], example["spec"]["stages"], strict=True):
        assert set(got) == set(written), got
    # ... and the operator's view of the stored object plans the same runs as `fst stream`.
    model = TaskStream.model_validate({**stored, "metadata": {"name": "demo"}})
    local = load_stream(EXAMPLE)
    for theirs, ours in zip(model.spec.stages, local.spec.stages, strict=True):
        assert stage_config(model, theirs, "r") == stage_config(local, ours, "r")

    status, msg = refused(["stages", 0, "slow"], {"lrr": 1e-5})
    assert status == 400 and 'unknown field "spec.stages[0].slow.lrr"' in msg, msg
    status, msg = refused(["stages", 1, "slow"], {"groupSize": "eight"})
    assert status == 422 and "spec.stages[1].slow.groupSize" in msg and "integer" in msg, msg
    status, msg = refused(["stages", 0, "slow"], {"groupSize": 1})
    assert status == 422 and "spec.stages[0].slow.groupSize" in msg, msg
    assert "should be greater than 1" in msg, msg
    status, msg = refused(["defaults", "fast", "reflector"], {"kind": "gpt"})
    assert status == 422 and "spec.defaults.fast.reflector.kind" in msg, msg
    assert 'Unsupported value: "gpt"' in msg, msg
    # serving.pin names a stage of the stream (the CEL rule mirrors the model's check).
    status, msg = refused(["serving"], {"pin": "no-such-stage"})
    assert status == 422 and "spec.serving.pin" in msg, msg
    assert "must name a stage of spec.stages" in msg, msg
    spec = copy.deepcopy(example["spec"])
    spec["serving"] = {"pin": spec["stages"][0]["name"]}
    assert create(spec)["spec"]["serving"]["pin"] == spec["stages"][0]["name"]

    # Without strict field validation (the API's default, Warn) an unknown key is pruned with
    # a warning, as everywhere in a structural schema; task params are preserved as written.
    spec = copy.deepcopy(example["spec"])
    spec["stages"][0]["slow"] = {"lrr": 1e-5, "lr": 1e-6}
    spec["stages"][0]["task"]["params"]["typo"] = 1
    stored = create(spec, strict=False)
    assert stored["spec"]["stages"][0]["slow"] == {"lr": 1e-6}
    assert stored["spec"]["stages"][0]["task"]["params"]["typo"] == 1
