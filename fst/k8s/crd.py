"""CustomResourceDefinitions generated from the config models: one source of truth.

    python -m fst.k8s.crd crds/        (make crds) writes crds/*.yaml
    tests/unit/test_crd.py             fails when crds/ differs from what this generates

Pydantic emits JSON Schema 2020-12; the apiserver wants a *structural* OpenAPI v3.0 schema.
`structural()` translates: $refs inlined, Optional[X] -> X + nullable, numeric
exclusiveMinimum -> minimum + exclusiveMinimum: true, tuples -> arrays with min/maxItems,
free-form dicts -> x-kubernetes-preserve-unknown-fields, titles dropped. A TaskStream's stage
sections and defaults are override models (fst/k8s/api.py overrides_of): typed like the
TrainConfig sections, without defaults, so the apiserver checks them and fills nothing in.
Unknown keys: a structural schema cannot say `additionalProperties: false` beside
`properties`; the apiserver refuses them under strict field validation (kubectl's default)
and prunes them otherwise. Rules that span fields are CEL (x-kubernetes-validations), each
mirrored by a pydantic validator so `fst` and the apiserver refuse the same things
(tests/unit/test_crd.py checks both).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from fst.k8s.api import (
    GPUS_AND_GPUS_PER_NODE,
    GPUS_WITH_NODES,
    GROUP,
    OPERATOR_OWNED_KEYS,
    VERSION,
    FastSlowRunSpec,
    TaskStreamSpec,
    device_cpu_message,
    device_cuda_message,
)
from fst.k8s.status import ConditionType, FastSlowRunStatus, TaskStreamStatus

# ----------------------------------------------------------------------------- translation


def structural(model: type[BaseModel], drop: dict[str, tuple[str, ...]] | None = None) -> dict:
    """The structural OpenAPI schema of `model` (by alias). `drop` maps a $defs model name to
    property aliases to leave out (fields the operator owns)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    for name, props in (drop or {}).items():
        target = defs.get(name) if name in defs else (raw if raw.get("title") == name else None)
        if target is None:
            raise KeyError(f"no model {name} in the schema of {model.__name__}")
        for prop in props:
            target["properties"].pop(prop, None)
            if prop in target.get("required", []):
                target["required"].remove(prop)
    return _convert(raw, defs)


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**copy.deepcopy(target), **node}  # keep the field's own description/default
    out: dict[str, Any] = {}
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        options = [o for o in any_of if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot make a structural schema of a union: {any_of}")
        out.update(_convert(options[0], defs))
        if len(options) < len(any_of):
            out["nullable"] = True
    for key in ("type", "format", "description", "enum", "pattern", "minLength", "maxLength"):
        if key in node:
            out[key] = node[key]
    for key in ("minimum", "maximum", "minItems", "maxItems"):
        if key in node:
            out[key] = node[key]
    # JSON Schema 2020-12 exclusive bounds are numbers; OpenAPI v3.0's are booleans.
    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True
    if "default" in node and node["default"] is not None:
        out["default"] = node["default"]
    # A union was converted above, as its one option.
    kind = out.get("type") if any_of is None else None
    if kind == "array":
        if "prefixItems" in node:  # a fixed-length tuple of one item type
            types = {p["type"] for p in node["prefixItems"]}
            out["items"] = {"type": types.pop()} if len(types) == 1 else {}
        else:
            out["items"] = _convert(node.get("items", {}), defs)
    if kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {k: _convert(v, defs) for k, v in props.items()}
            # An omitted section still gets its fields' defaults: the apiserver defaults
            # an object field only when the object itself is present.
            # Not so for an override (default null, fst/k8s/api.py overrides_of): unset, it
            # overrides nothing.
            for k, v in out["properties"].items():
                if (
                    v.get("type") == "object"
                    and "properties" in v
                    and not v.get("required")
                    and not v.get("nullable")
                    and "default" not in v
                    and not ("default" in props[k] and props[k]["default"] is None)
                ):
                    v["default"] = {}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(extra, dict) and extra.get("type") in ("string", "integer", "number"):
            out["additionalProperties"] = {"type": extra["type"]}
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "type" not in out and "x-kubernetes-preserve-unknown-fields" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True  # Any
    return out


def _add_rules(schema: dict[str, Any], path: tuple[str, ...], rules: list[dict[str, str]]) -> None:
    node = schema
    for p in path:
        node = node["properties"][p]
    node.setdefault("x-kubernetes-validations", []).extend(rules)


# ----------------------------------------------------------------------------- status


def status_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of a status model (fst/k8s/status.py). Conditions are a map list
    keyed by type, as `kubectl` and server-side apply expect of metav1.Condition lists."""
    schema = structural(model)
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def printer_columns(model: type[BaseModel]) -> list[dict[str, Any]]:
    """`kubectl get` columns of the status fields marked with status.printer(), in field
    order."""
    columns = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        col = extra.get("x-printer-column")
        if isinstance(col, dict):
            path = f".status.{field.alias or name}"
            priority = col["priority"]
            assert isinstance(priority, int)
            columns.append(_printer(str(col["name"]), path, str(col["type"]), priority))
    return columns


def condition_column(name: str, type_: ConditionType) -> dict[str, Any]:
    return _printer(name, f'.status.conditions[?(@.type=="{type_.value}")].status')


# ----------------------------------------------------------------------------- the CRDs

TOP_K_RULE = {
    "rule": "!(self.mode in ['fst', 'fst-distill']) || self.fast.topK <= self.slow.groupSize",
    "message": "fast.topK (K) must not exceed slow.groupSize (G) in fst mode: "
    "each problem's G rollouts are split across the K prompts",
    "fieldPath": ".fast.topK",
}

# spec.trainer (of a FastSlowRun and of a TaskStream); mirrored by TrainerSpec._gpu_fields.
TRAINER_RULES = [
    {
        "rule": "!(has(self.gpus) && has(self.gpusPerNode))",
        "message": GPUS_AND_GPUS_PER_NODE,
        "fieldPath": ".gpus",
    },
    {
        "rule": "!has(self.gpus) || !has(self.nodes) || self.nodes <= 1",
        "message": GPUS_WITH_NODES,
        "fieldPath": ".gpus",
    },
]


def device_rules(model: str, model_path: str) -> list[dict[str, str]]:
    """CEL rules on a spec holding `trainer` and a model section at `model` (CEL, from the
    spec: self.config.model or self.model), whose path the messages name (`model_path`):
    the model's device must fit the pods' GPUs. Mirrored by fst.k8s.api.check_device."""
    # The GPUs of each pod as TrainerSpec.node_gpus computes them: gpusPerNode, else gpus,
    # else 1 (the apiserver has already filled in defaults; has() guards the optional fields).
    gpus = (
        "(!has(self.trainer) ? 1 : has(self.trainer.gpusPerNode) ? self.trainer.gpusPerNode"
        " : has(self.trainer.gpus) ? self.trainer.gpus : 1)"
    )
    device = f"(has({model}) && has({model}.device) ? {model}.device : 'auto')"
    return [
        {
            "rule": f"!({device} == 'cpu' && {gpus} > 0)",
            "message": device_cpu_message(model_path),
            "fieldPath": f"{model.removeprefix('self')}.device",
        },
        {
            "rule": f"!({device}.startsWith('cuda') && {gpus} == 0)",
            "message": device_cuda_message(model_path),
            "fieldPath": f"{model.removeprefix('self')}.device",
        },
    ]


def _printer(name: str, path: str, kind: str = "string", priority: int = 0) -> dict[str, Any]:
    col: dict[str, Any] = {"name": name, "type": kind, "jsonPath": path}
    if priority:
        col["priority"] = priority
    return col


def _crd(kind: str, plural: str, short: list[str], spec: dict, status: dict, columns: list) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["fastslow"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                            "x-kubernetes-validations": [
                                {
                                    # Job names are <run>-a<attempt> and must fit 63 chars.
                                    "rule": "self.metadata.name.size() <= 52",
                                    "message": "metadata.name must be at most 52 characters",
                                }
                            ],
                        }
                    },
                }
            ],
        },
    }


def fastslowrun_crd() -> dict[str, Any]:
    spec = structural(FastSlowRunSpec, drop={"TrainConfig": OPERATOR_OWNED_KEYS})
    spec["description"] = "A training run: what to train (config) and where (trainer)."
    _add_rules(
        spec,
        ("config",),
        [
            TOP_K_RULE,
            {
                "rule": "self == oldSelf",
                "message": "spec.config is immutable: create a new FastSlowRun to train "
                "differently",
            },
        ],
    )
    _add_rules(spec, ("trainer",), TRAINER_RULES)
    _add_rules(spec, (), device_rules("self.config.model", "spec.config.model"))
    columns = [
        _printer("Stage", ".metadata.labels.fastslow\\.io/stage"),
        *printer_columns(FastSlowRunStatus),
        condition_column("Ready", ConditionType.RUNNING),
        condition_column("Succeeded", ConditionType.SUCCEEDED),
        _printer("Age", ".metadata.creationTimestamp", "date"),
    ]
    status = status_schema(FastSlowRunStatus)
    return _crd("FastSlowRun", "fastslowruns", ["fsr"], spec, status, columns)


def taskstream_crd() -> dict[str, Any]:
    spec = structural(TaskStreamSpec)
    spec["description"] = "One customer's stream of task stages, run in order."
    spec["properties"]["stages"]["maxItems"] = 100  # bounds the CEL cost of the rule below
    _add_rules(
        spec,
        ("stages",),
        [
            {
                "rule": "self.all(s, self.exists_one(t, t.name == s.name))",
                "message": "stage names must be unique",
            }
        ],
    )
    _add_rules(
        spec,
        ("model",),
        [
            {
                "rule": "self == oldSelf",
                "message": "spec.model is immutable: a stream adapts one base model",
            }
        ],
    )
    _add_rules(spec, ("trainer",), TRAINER_RULES)
    _add_rules(spec, (), device_rules("self.model", "spec.model"))
    _add_rules(
        spec,
        (),
        [
            {
                # Mirrors TaskStreamSpec._pin_names_a_stage.
                "rule": "!has(self.serving) || !has(self.serving.pin) || "
                "self.stages.exists(s, s.name == self.serving.pin)",
                "message": "spec.serving.pin must name a stage of spec.stages",
                "fieldPath": ".serving.pin",
            }
        ],
    )
    columns = [
        *printer_columns(TaskStreamStatus),
        _printer("Stages", ".status.stages[*].stage", priority=1),
        condition_column("Ready", ConditionType.RUNNING),
        condition_column("Succeeded", ConditionType.SUCCEEDED),
        _printer("Age", ".metadata.creationTimestamp", "date"),
    ]
    status = status_schema(TaskStreamStatus)
    return _crd("TaskStream", "taskstreams", ["ts"], spec, status, columns)


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD, as checked in under crds/."""
    return {
        f"{GROUP}_fastslowruns.yaml": fastslowrun_crd(),
        f"{GROUP}_taskstreams.yaml": taskstream_crd(),
    }


HEADER = (
    "# Generated by `python -m fst.k8s.crd crds/` (make crds) from fst/config.py. Do not edit.\n"
)


def render(crd: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "crds")
    out.mkdir(parents=True, exist_ok=True)
    for name, crd in all_crds().items():
        (out / name).write_text(render(crd))
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
