"""crds/ is generated from the config models, and says what they say."""

from __future__ import annotations

import re
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


# ----------------------------------------------------------------------------- TaskStream


def structural_problems(node: dict, path: str = "") -> list[str]:
    """Where `node` breaks the apiserver's rules for a structural schema (the subset our
    generator could break): every node typed unless it preserves unknown fields, no
    junctors or $refs, properties and additionalProperties not both, arrays with items."""
    problems = []
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    for key in ("anyOf", "oneOf", "allOf", "not", "$ref", "$defs", "prefixItems", "const"):
        if key in node:
            problems.append(f"{path}: {key}")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{path}: array without items")
    for key in ("exclusiveMinimum", "exclusiveMaximum", "nullable"):
        if key in node and not isinstance(node[key], bool):
            problems.append(f"{path}: {key} must be a boolean in OpenAPI v3.0")
    for name, child in node.get("properties", {}).items():
        problems += structural_problems(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}.*")
    return problems


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
}


def openapi_errors(schema: dict, value, path: str = "spec") -> list[str]:
    """`value` checked against an OpenAPI v3.0 structural schema as the apiserver does for a
    client asking for strict field validation (kubectl's default): a field the schema does
    not declare is an error, not pruned."""
    if value is None:
        return [] if schema.get("nullable") else [f"{path}: must not be null"]
    kind = schema.get("type")
    number = kind in ("integer", "number")
    wrong = kind is not None and not isinstance(value, _TYPES[kind])
    if wrong or (number and isinstance(value, bool)):
        return [f"{path}: must be of type {kind}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: Unsupported value {value!r}")
    if number:
        low, high = schema.get("minimum"), schema.get("maximum")
        low_open, high_open = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if low is not None and (value <= low if low_open else value < low):
            errors.append(
                f"{path}: should be greater than {'' if low_open else 'or equal to '}{low}"
            )
        if high is not None and (value >= high if high_open else value > high):
            errors.append(
                f"{path}: should be less than {'' if high_open else 'or equal to '}{high}"
            )
    if kind == "string":
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: should match {schema['pattern']!r}")
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: too long")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: too short")
    if kind == "array":
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            errors.append(f"{path}: wrong number of items")
        for i, item in enumerate(value):
            errors += openapi_errors(schema["items"], item, f"{path}[{i}]")
    if kind == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}.{key}: Required value")
        for key, item in value.items():
            if props is not None and key in props:
                errors += openapi_errors(props[key], item, f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += openapi_errors(extra, item, f"{path}.{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f'unknown field "{path}.{key}"')
    return errors


def _example_stream() -> dict:
    return yaml.safe_load((REPO / "examples" / "taskstream.yaml").read_text())


def test_crds_are_structural() -> None:
    for name, generated in crd.all_crds().items():
        schema = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert structural_problems(schema) == [], name


def test_taskstream_stage_sections_are_typed_in_the_crd() -> None:
    spec = _spec_schema("fastslow.io_taskstreams.yaml")
    stage = spec["properties"]["stages"]["items"]
    defaults = spec["properties"]["defaults"]
    for schema in (stage, defaults):
        for section in ("rollout", "slow", "fast", "metrics", "checkpoint"):
            node = schema["properties"][section]
            assert node["type"] == "object" and node["nullable"] is True
            assert "x-kubernetes-preserve-unknown-fields" not in node, section
        assert schema["properties"]["mode"]["enum"] == ["rl", "fst", "fst-distill", "gepa"]
    slow = stage["properties"]["slow"]["properties"]
    assert slow["groupSize"] == {
        "type": "integer",
        "description": "G: rollouts per problem (one advantage group).",
        "minimum": 1,
        "exclusiveMinimum": True,
    }
    reflector = stage["properties"]["fast"]["properties"]["reflector"]
    assert reflector["properties"]["kind"]["enum"] == ["digest", "local", "openai"]
    # Task params stay free-form: which keys are allowed depends on the task's name (a sibling
    # field, and tasks can be registered by users), which a structural schema cannot say.
    params = stage["properties"]["task"]["properties"]["params"]
    assert params["x-kubernetes-preserve-unknown-fields"] is True


def test_taskstream_crd_defaults_nothing_inside_a_stage_or_the_stream_defaults() -> None:
    """A stage overrides only what it sets: a default the apiserver filled in would override
    the stream's defaults."""
    spec = _spec_schema("fastslow.io_taskstreams.yaml")

    def defaults_in(node: dict, path: str) -> list[str]:
        if path.endswith("metrics.oodTask"):  # a task is a whole value (like a stage's task)
            return []
        found = [path] if "default" in node else []
        for name, child in node.get("properties", {}).items():
            found += defaults_in(child, f"{path}.{name}")
        return found

    stage = spec["properties"]["stages"]["items"]
    for section in ("mode", "seed", "rollout", "slow", "fast", "distill", "metrics", "checkpoint"):
        assert defaults_in(stage["properties"][section], section) == []
        assert defaults_in(spec["properties"]["defaults"]["properties"][section], section) == []


@pytest.mark.parametrize(
    ("where", "value", "expected"),
    [
        (["stages", 0, "slow"], {"lrr": 1e-5}, 'unknown field "spec.stages[0].slow.lrr"'),
        (
            ["stages", 1, "slow"],
            {"groupSize": "eight"},
            "spec.stages[1].slow.groupSize: must be of type integer",
        ),
        (
            ["stages", 0, "slow"],
            {"groupSize": 1},
            "spec.stages[0].slow.groupSize: should be greater than 1",
        ),
        (
            ["stages", 0, "rollout"],
            {"topP": 1.5},
            "spec.stages[0].rollout.topP: should be less than or equal to 1.0",
        ),
        (["stages", 0, "mode"], "sft", "spec.stages[0].mode: Unsupported value 'sft'"),
        (
            ["defaults", "fast", "reflector"],
            {"kind": "gpt"},
            "spec.defaults.fast.reflector.kind: Unsupported value 'gpt'",
        ),
        (
            ["defaults", "checkpoint"],
            {"everyy": 3},
            'unknown field "spec.defaults.checkpoint.everyy"',
        ),
        (["defaults", "slow", "betas"], [0.9], "spec.defaults.slow.betas: wrong number of items"),
    ],
)
def test_taskstream_crd_rejects_invalid_stage_sections(where, value, expected) -> None:
    """What the apiserver refuses (per the CRD's schema); the models refuse it too, naming
    the same field."""
    from fst.k8s.api import TaskStreamSpec

    schema = _spec_schema("fastslow.io_taskstreams.yaml")
    spec = _example_stream()["spec"]
    assert openapi_errors(schema, spec) == []
    node = spec
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    assert openapi_errors(schema, spec) == [expected]
    with pytest.raises(ValueError, match=re.escape(".".join(str(k) for k in where))):
        TaskStreamSpec.model_validate(spec)


def test_override_models_have_the_config_sections_fields_and_constraints() -> None:
    """The override models are generated from the TrainConfig sections: the same fields,
    types and bounds, only without defaults (and an omitted nested section stays omitted)."""
    from fst.config import TrainConfig
    from fst.k8s.api import STAGE_SECTIONS, StageSpec, StreamDefaults, overrides_of

    def strip_defaults(node: dict) -> dict:
        out = {k: v for k, v in node.items() if k != "default"}
        if "properties" in out:
            out["properties"] = {k: strip_defaults(v) for k, v in out["properties"].items()}
        return out

    for section in ("rollout", "slow", "fast", "metrics", "checkpoint"):
        model = TrainConfig.model_fields[section].annotation
        assert isinstance(model, type)
        # (A whole-valued task inside, metrics.oodTask, keeps its own defaults: strip both.)
        assert strip_defaults(crd.structural(overrides_of(model))) == strip_defaults(
            crd.structural(model)
        )
        top = crd.structural(overrides_of(model))["properties"]
        assert not [f for f, node in top.items() if "default" in node], section
    assert set(StreamDefaults.model_fields) == set(STAGE_SECTIONS)
    assert set(StageSpec.model_fields) == {*STAGE_SECTIONS, "name", "task", "steps"}
