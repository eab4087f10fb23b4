"""crds/ is generated from the config models, and says what they say."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fst.config import ConfigError, validate_config
from fst.k8s import crd
from fst.k8s.api import FastSlowRunSpec

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_crds_are_what_the_models_generate() -> None:
    for name, generated in crd.all_crds().items():
        path = REPO / "crds" / name
        assert path.is_file(), f"{path} missing: run `make crds`"
        assert path.read_text() == crd.render(generated), f"{path} is stale: run `make crds`"


def _spec_schema(kind_file: str) -> dict:
    doc = yaml.safe_load((REPO / "crds" / kind_file).read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_schema_carries_every_config_field_with_its_bounds_and_defaults() -> None:
    config = _spec_schema("fastslow.io_fastslowruns.yaml")["properties"]["config"]
    slow = config["properties"]["slow"]["properties"]
    assert slow["groupSize"] == {
        "type": "integer",
        "description": "G: rollouts per problem (one advantage group).",
        "minimum": 1,
        "exclusiveMinimum": True,
        "default": 8,
    }
    assert slow["loss"]["enum"] == ["cispo", "grpo", "dapo"]
    assert slow["betas"]["minItems"] == slow["betas"]["maxItems"] == 2
    assert config["required"] == ["task"]
    # Free-form task params stay free-form (the operator validates them with the task's model).
    assert config["properties"]["task"]["properties"]["params"] == {
        "type": "object",
        "description": "Task-specific settings, validated by the task's own schema.",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    # Fields the operator owns are not part of a FastSlowRun's config.
    assert not {"run", "outputDir", "database"} & set(config["properties"])
    # Optional fields are nullable, never a union.
    assert config["properties"]["model"]["properties"]["lora"]["nullable"] is True


def test_every_config_model_field_is_in_the_schema() -> None:
    """A field added to the models and not to the CRD would be pruned by the apiserver."""
    from pydantic import BaseModel

    def walk(model: type[BaseModel], schema: dict, path: str) -> None:
        for name, field in model.model_fields.items():
            alias = field.alias or name
            if path == ".config" and name in ("run", "output_dir", "database"):
                continue
            assert alias in schema["properties"], f"{path}.{alias} missing from the CRD"
            sub = field.annotation
            args = getattr(sub, "__args__", ())
            nested = [a for a in (sub, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
            if nested:
                child = schema["properties"][alias]
                walk(nested[0], child.get("items", child), f"{path}.{alias}")

    walk(FastSlowRunSpec, _spec_schema("fastslow.io_fastslowruns.yaml"), "")


def test_k_within_g_rule_is_enforced_by_fst_too() -> None:
    """The CRD's CEL rule and the config model refuse the same thing."""
    rule = crd.TOP_K_RULE["rule"]
    assert "self.fast.topK <= self.slow.groupSize" in rule
    task = {"name": "arithmetic"}
    with pytest.raises(ConfigError, match=r"fast.topK \(K=4\) must not exceed slow.groupSize"):
        validate_config({"mode": "fst", "task": task, "slow": {"groupSize": 2}})
    validate_config({"mode": "rl", "task": task, "slow": {"groupSize": 2}})  # rl: no prompts
    validate_config({"mode": "fst", "task": task, "slow": {"groupSize": 4}})


def test_a_run_spec_may_not_set_operator_owned_fields() -> None:
    with pytest.raises(ValueError, match=r"config\.outputDir is set by the operator"):
        FastSlowRunSpec.model_validate(
            {"config": {"task": {"name": "arithmetic"}, "outputDir": "x"}}
        )


def test_structural_translation_of_optional_and_exclusive_bounds() -> None:
    from pydantic import Field

    from fst.config import Schema

    class Tiny(Schema):
        rate: float = Field(0.5, gt=0.0, lt=1.0)
        note: str | None = None
        tags: dict[str, str] = Field(default_factory=dict)

    s = crd.structural(Tiny)
    assert s["properties"]["rate"] == {
        "type": "number",
        "minimum": 0.0,
        "exclusiveMinimum": True,
        "maximum": 1.0,
        "exclusiveMaximum": True,
        "default": 0.5,
    }
    assert s["properties"]["note"] == {"type": "string", "nullable": True}
    assert s["properties"]["tags"] == {"type": "object", "additionalProperties": {"type": "string"}}


def test_status_schemas_and_columns_come_from_the_status_models() -> None:
    """A field added to a status model appears in the CRD's status schema (and a column
    marked for `kubectl get`), with no second hand-written schema to forget."""
    from fst.k8s.status import FastSlowRunStatus, TaskStreamStatus

    for make, model in (
        (crd.fastslowrun_crd, FastSlowRunStatus),
        (crd.taskstream_crd, TaskStreamStatus),
    ):
        version = make()["spec"]["versions"][0]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        fields = {f.alias or name for name, f in model.model_fields.items()}
        assert set(status["properties"]) == fields
        conditions = status["properties"]["conditions"]
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        for column in version["additionalPrinterColumns"]:
            path = column["jsonPath"]
            if path.startswith(".status.") and "conditions" not in path:
                assert path.split(".")[2].split("[")[0] in fields, path
