"""The operator's policy point (operator/fst_operator/policy.py) and its settings
(FST_POLICY, FST_TENANT_PREFIX in operator/fst_operator/settings.py), without a cluster."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from fst_operator import policy as pol
from fst_operator.policy import Policy, Violation

from fst.config import TrainConfig
from fst.k8s.api import FastSlowRunSpec, TaskStream, TrainerSpec

REPO = Path(__file__).resolve().parents[2]
ROOT = "s3://fastslow/tenants/team-a/"
ARITH = {"name": "arithmetic", "params": {"answerFormat": "last_number"}}
DIGEST = "a" * 64


def trainer(**fields: Any) -> TrainerSpec:
    return TrainerSpec.model_validate(fields)


def config(**sections: Any) -> TrainConfig:
    return TrainConfig.model_validate({"task": ARITH, "steps": 2, **sections})


def jsonl(path: str) -> dict[str, Any]:
    return {"name": "jsonl", "params": {"path": path}}


def fields(violations: list[Violation]) -> list[str]:
    return [v.field for v in violations]


def only(violations: list[Violation], field: str) -> Violation:
    """The single violation, which must be on `field`."""
    assert fields(violations) == [field], violations
    return violations[0]


# ----------------------------------------------------------------------------- defaults


def test_the_default_trainer_and_config_pass_the_default_policy():
    assert pol.check_trainer(TrainerSpec(), Policy(), ROOT) == []
    assert pol.check_config(config(), Policy(), ROOT) == []


def test_the_example_stream_passes_the_default_policy():
    body = yaml.safe_load((REPO / "examples" / "taskstream.yaml").read_text())
    assert pol.check_stream(TaskStream.model_validate(body), Policy(), ROOT) == []


def test_unrestricted_allows_what_the_default_refuses():
    t = trainer(
        image="docker.io/someone/else:1",
        imagePullPolicy="Never",
        serviceAccountName="admin",
        s3Secret="root-creds",
        nodeSelector={"tenant": "b"},
        tolerations=[{"operator": "Exists"}],
        priorityClassName="system-cluster-critical",
        gpus=64,
    )
    assert len(pol.check_trainer(t, Policy())) == 8
    assert pol.check_trainer(t, Policy.unrestricted()) == []


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "image",
    [
        "ghcr.io/fastslow/trainer:0.1.0",
        "ghcr.io/fastslow/trainer",
        "ghcr.io/fastslow/team/trainer:cpu",
        f"ghcr.io/fastslow/trainer@sha256:{DIGEST}",
    ],
)
def test_images_under_the_allowed_prefix_pass(image):
    assert pol.check_trainer(trainer(image=image), Policy()) == []


@pytest.mark.parametrize(
    "image",
    [
        "docker.io/library/python:3.11",
        "python:3.11",  # docker.io, not ghcr.io
        "ghcr.io/fastslowevil/trainer:1",  # shares only a string prefix
        "ghcr.io/fastslow",  # the prefix itself is not a repository under it
        "ghcr.io/fastslow/../evil/trainer:1",  # not a valid reference
        "ghcr.io/fastslow//trainer",
        "GHCR.io/fastslow/trainer",  # (domains may be upper case, but do not match)
        "evil.io/ghcr.io/fastslow/trainer",
    ],
)
def test_other_images_are_refused_naming_the_field(image):
    v = only(pol.check_trainer(trainer(image=image), Policy()), "spec.trainer.image")
    assert "ghcr.io/fastslow/" in v.message  # says what is allowed


def test_a_repository_entry_allows_its_tags_and_digests_only():
    p = Policy(images=("registry.example.com:5000/ml/trainer",))
    for ok in ("", ":v2", f"@sha256:{DIGEST}", f":v2@sha256:{DIGEST}"):
        assert pol.image_allowed("registry.example.com:5000/ml/trainer" + ok, p.images), ok
    for bad in ("registry.example.com:5000/ml/trainer-evil:1", "registry.example.com/ml/trainer"):
        assert not pol.image_allowed(bad, p.images), bad


def test_a_registry_with_a_port_is_a_valid_prefix_entry():
    p = Policy(images=("localhost:5000/",))
    assert pol.image_allowed("localhost:5000/trainer:1", p.images)
    assert not pol.image_allowed("localhost:5001/trainer:1", p.images)


@pytest.mark.parametrize("entry", ["ghcr.io/fastslow/trainer:1", "has space/", "", "a@b"])
def test_bad_image_entries_are_refused(entry):
    with pytest.raises(ValueError, match="images"):
        Policy(images=(entry,))


# ----------------------------------------------------------------------------- pod fields


def test_image_pull_policy():
    assert pol.check_trainer(trainer(imagePullPolicy="Always"), Policy()) == []
    v = only(
        pol.check_trainer(trainer(imagePullPolicy="Never"), Policy()),
        "spec.trainer.imagePullPolicy",
    )
    assert "IfNotPresent" in v.message


def test_service_accounts_default_to_none_but_the_namespace_default():
    v = only(
        pol.check_trainer(trainer(serviceAccountName="deployer"), Policy()),
        "spec.trainer.serviceAccountName",
    )
    assert "none" in v.message
    p = Policy(service_accounts=("trainer",))
    assert pol.check_trainer(trainer(serviceAccountName="trainer"), p) == []
    assert fields(pol.check_trainer(trainer(serviceAccountName="deployer"), p)) == [
        "spec.trainer.serviceAccountName"
    ]
    assert pol.check_trainer(trainer(serviceAccountName="x"), Policy(service_accounts=("*",))) == []


def test_secrets_a_spec_may_name():
    t = trainer(s3Secret="fastslow-s3", databaseSecret={"name": "fastslow-db", "key": "url"})
    assert fields(pol.check_trainer(t, Policy())) == [
        "spec.trainer.s3Secret",
        "spec.trainer.databaseSecret.name",
    ]
    assert pol.check_trainer(t, Policy(secrets=("fastslow-s3", "fastslow-db"))) == []
    assert fields(pol.check_trainer(t, Policy(secrets=("fastslow-s3",)))) == [
        "spec.trainer.databaseSecret.name"
    ]
    assert pol.check_trainer(trainer(), Policy()) == []  # the default Secret: not named


def test_with_secrets_adds_names_once():
    p = Policy(secrets=("a",)).with_secrets(["a", "b", ""])
    assert p.secrets == ("a", "b")


def test_node_selector_keys_and_pairs():
    p = Policy(node_selectors=("nvidia.com/gpu.product", "pool=gpu"))
    ok = trainer(nodeSelector={"nvidia.com/gpu.product": "H100", "pool": "gpu"})
    assert pol.check_trainer(ok, p) == []
    bad = trainer(nodeSelector={"pool": "team-b", "kubernetes.io/hostname": "node-7"})
    vs = pol.check_trainer(bad, p)
    assert fields(vs) == [
        "spec.trainer.nodeSelector[pool]",
        "spec.trainer.nodeSelector[kubernetes.io/hostname]",
    ]
    assert "pool=gpu" in vs[0].message


GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    "toleration",
    [
        GPU_TAINT,
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},  # Equal
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "x", "effect": "NoSchedule"},
    ],
)
def test_the_gpu_taint_is_tolerated_by_default(toleration):
    assert pol.check_trainer(trainer(tolerations=[toleration]), Policy()) == []


@pytest.mark.parametrize(
    "toleration",
    [
        {"key": "nvidia.com/gpu", "operator": "Exists"},  # every effect, NoExecute too
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"},
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"},
        {"key": "dedicated", "value": "team-b", "effect": "NoSchedule"},
    ],
)
def test_other_tolerations_are_refused(toleration):
    t = trainer(tolerations=[GPU_TAINT, toleration])
    v = only(pol.check_trainer(t, Policy()), "spec.trainer.tolerations[1]")
    assert "nvidia.com/gpu:NoSchedule" in v.message


@pytest.mark.parametrize("toleration", [{"operator": "Exists"}, {"key": "", "operator": "Exists"}])
def test_tolerate_everything_is_refused_unless_star(toleration):
    t = trainer(tolerations=[toleration])
    for p in (Policy(), Policy(tolerations=("nvidia.com/gpu", "dedicated=team-a"))):
        v = only(pol.check_trainer(t, p), "spec.trainer.tolerations[0]")
        assert "every taint" in v.message
    assert pol.check_trainer(t, Policy(tolerations=("*",))) == []


def test_a_toleration_entry_with_a_value_needs_that_value():
    p = Policy(tolerations=("dedicated=team-a:NoSchedule",))
    ok = {"key": "dedicated", "value": "team-a", "effect": "NoSchedule"}
    assert pol.check_trainer(trainer(tolerations=[ok]), p) == []
    for bad in (
        {"key": "dedicated", "value": "team-b", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"},  # any value
        {"key": "dedicated", "value": "team-a"},  # any effect
    ):
        assert fields(pol.check_trainer(trainer(tolerations=[bad]), p)) == [
            "spec.trainer.tolerations[0]"
        ], bad


def test_priority_classes():
    t = trainer(priorityClassName="system-node-critical")
    v = only(pol.check_trainer(t, Policy()), "spec.trainer.priorityClassName")
    assert "none" in v.message
    assert pol.check_trainer(t, Policy(priority_classes=("system-node-critical",))) == []


def test_max_gpus():
    assert pol.check_trainer(trainer(gpus=8), Policy()) == []
    v = only(pol.check_trainer(trainer(gpus=9), Policy()), "spec.trainer.gpus")
    assert "at most 8" in v.message
    assert pol.check_trainer(trainer(gpus=0), Policy(max_gpus=0)) == []


def test_queues():
    assert pol.check_trainer(trainer(), Policy()) == []  # not required by default
    required = Policy(require_queue=True, queues=("team-a",))
    v = only(pol.check_trainer(trainer(), required), "spec.trainer.queueName")
    assert "required" in v.message and "team-a" in v.message
    assert pol.check_trainer(trainer(queueName="team-a"), required) == []
    assert fields(pol.check_trainer(trainer(queueName="team-b"), required)) == [
        "spec.trainer.queueName"
    ]
    with pytest.raises(ValueError, match="refuse every run"):
        Policy(require_queue=True, queues=())


def test_trainer_checkpoint_uri_must_be_under_the_tenant_root():
    ok = trainer(checkpointUri="s3://fastslow/tenants/team-a/ckpt")
    assert pol.check_trainer(ok, Policy(), ROOT) == []
    bad = trainer(checkpointUri="s3://fastslow/tenants/team-b/ckpt")
    only(pol.check_trainer(bad, Policy(), ROOT), "spec.trainer.checkpointUri")
    assert pol.check_trainer(bad, Policy(), None) == []  # no tenancy: not checked


# ----------------------------------------------------------------------------- storage


def test_tenant_root():
    assert pol.tenant_root("s3://fastslow/tenants", "team-a") == ROOT
    assert pol.tenant_root("s3://fastslow/tenants/", "team-a") == ROOT
    assert pol.tenant_root("s3://fastslow", "team-a") == "s3://fastslow/team-a/"
    for prefix in ("s3://fastslow/a/../b", "s3://Fast/x", "http://fastslow/x", "s3://b//x"):
        with pytest.raises(ValueError):
            pol.tenant_root(prefix, "team-a")
    with pytest.raises(ValueError, match="namespace"):
        pol.tenant_root("s3://fastslow/tenants", "../team-b")


INSIDE = [
    "s3://fastslow/tenants/team-a/data/train.jsonl",
    "s3://fastslow/tenants/team-a/ckpt/",
    "s3://fastslow/tenants/team-a/runs/x/step-00000010",
    "s3://fastslow/tenants/team-a/team-b/x",  # a folder of team-a's named team-b
]
OUTSIDE = [
    "s3://fastslow/tenants/team-b/data.jsonl",  # another tenant
    "s3://fastslow/tenants/team-ab/data.jsonl",  # shares only a string prefix
    "s3://fastslow/tenants/team-a",  # the root itself: listed as a key prefix (team-ab too)
    "s3://fastslow/tenants/team-a/",
    "s3://fastslow/tenants",
    "s3://other/tenants/team-a/data.jsonl",  # another bucket
    "s3://fastslow/tenants/team-a/../team-b/data.jsonl",
    "s3://fastslow/tenants/team-a/./data.jsonl",
    "s3://fastslow/tenants/team-a//data.jsonl",
    "s3://fastslow//tenants/team-a/data.jsonl",  # a leading '//' the trainer would strip
    "s3://fastslow/tenants/team-a/%2e%2e/team-b/data.jsonl",  # percent-encoded
    "s3://fastslow/tenants/team-a%2fx",
    "s3://fastslow/tenants/team-a/..%2f..%2fteam-b",
    "s3://fastslow/tenants/team-a/x\\..\\..\\team-b",
    "s3://fastslow/tenants/team-a/x?prefix=tenants/team-b",
    "s3://fastslow/tenants/team-a/x#frag",
    "s3://fastslow/tenants/team-a/a b",
    "s3://fastslow/tenants/team-a/caf\u00e9",
    "s3://fastslow@other/tenants/team-a/x",
    "s3://fastslow:9000/tenants/team-a/x",
    "S3://fastslow/tenants/team-a/x",  # the trainer would not read it as S3
    "s3:fastslow/tenants/team-a/x",
]


@pytest.mark.parametrize("uri", INSIDE)
def test_uris_under_the_tenant_root_pass(uri):
    assert pol.check_storage_uri(uri, ROOT) is None
    assert pol.check_config(config(checkpoint={"uri": uri}), Policy(), ROOT) == []
    assert pol.check_config(config(task=jsonl(uri)), Policy(), ROOT) == []
    assert pol.check_config(config(model={"name": uri, "reference": uri}), Policy(), ROOT) == []


@pytest.mark.parametrize("uri", OUTSIDE)
def test_uris_outside_the_tenant_root_are_refused_in_every_field(uri):
    assert pol.check_storage_uri(uri, ROOT) is not None
    p = Policy()
    only(pol.check_config(config(checkpoint={"uri": uri}), p, ROOT), "spec.config.checkpoint.uri")
    only(pol.check_config(config(task=jsonl(uri)), p, ROOT), "spec.config.task.params.path")
    assert fields(pol.check_config(config(model={"name": uri, "reference": uri}), p, ROOT)) == [
        "spec.config.model.name",
        "spec.config.model.reference",
    ]


def test_a_refusal_says_where_storage_must_be():
    v = only(
        pol.check_config(config(task=jsonl("s3://fastslow/x.jsonl")), Policy(), ROOT),
        "spec.config.task.params.path",
    )
    assert ROOT in v.message


def test_shared_prefixes_are_readable_for_models_only():
    shared = "s3://fastslow/shared/models/"
    p = Policy(shared_prefixes=("s3://fastslow/shared/models",))  # canonicalised
    assert p.shared_prefixes == (shared,)
    base = f"{shared}smollm2/step-00000010"
    assert pol.check_config(config(model={"name": base, "reference": base}), p, ROOT) == []
    # checkpoints and data are written or read-write: the tenant's own only
    only(pol.check_config(config(checkpoint={"uri": base}), p, ROOT), "spec.config.checkpoint.uri")
    only(pol.check_config(config(task=jsonl(base)), p, ROOT), "spec.config.task.params.path")
    # the shared prefix's look-alikes and escapes
    for bad in ("s3://fastslow/shared/models-evil/x", f"{shared}../../tenants/team-b/x"):
        only(pol.check_config(config(model={"name": bad}), p, ROOT), "spec.config.model.name")
    v = only(
        pol.check_config(config(model={"name": "s3://elsewhere/y/z"}), p, ROOT),
        "spec.config.model.name",
    )
    assert shared in v.message


def test_bad_shared_prefixes_are_refused():
    for bad in ("s3://fastslow/shared/../x", "/local/models", "s3://fastslow/a%2f"):
        with pytest.raises(ValueError):
            Policy(shared_prefixes=(bad,))


def test_without_a_tenant_root_s3_uris_are_not_checked():
    cfg = config(checkpoint={"uri": "s3://anywhere/x"}, task=jsonl("s3://other/data"))
    assert pol.check_config(cfg, Policy(), None) == []


@pytest.mark.parametrize(
    "name",
    [
        "smollm2-135m-instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "/opt/models/smollm2",
        "models/smollm2",
        "~/models/smollm2",
        "/scratch/../opt/models/x",
    ],
)
def test_hub_ids_and_local_paths_are_allowed_as_models(name):
    assert pol.check_config(config(model={"name": name}), Policy(), ROOT) == []


@pytest.mark.parametrize(
    "name",
    [
        "/proc/self/environ",
        "../../proc/self/environ",  # relative to the pod's /scratch
        "a/../../../proc/self/environ",
        "//proc/self/environ",
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "/run/secrets/x",
        "/dev/fd/0",
        "/sys/kernel",
        "~root/.ssh",
        "http://evil.example.com/model",
        "hf://org/model",
        "file:///proc/self/environ",
    ],
)
def test_credentials_pseudo_files_and_other_schemes_are_refused_as_models(name):
    only(pol.check_config(config(model={"name": name}), Policy(), ROOT), "spec.config.model.name")


def test_every_task_param_string_is_checked():
    cfg = config(task=jsonl("../proc/self/environ"))
    only(pol.check_config(cfg, Policy(), ROOT), "spec.config.task.params.path")
    cfg = config(task=jsonl("data/train.jsonl"))
    assert pol.check_config(cfg, Policy(), ROOT) == []


def test_a_local_reflector_model_is_a_model_source():
    cfg = config(fast={"reflector": {"kind": "local", "model": "s3://fastslow/tenants/team-b/m"}})
    only(pol.check_config(cfg, Policy(), ROOT), "spec.config.fast.reflector.model")


# ----------------------------------------------------------------------------- reflector


ENDPOINT = "http://vllm.llm.svc:8000/v1"


def openai(base_url: str | None, key: str = "OPENAI_API_KEY") -> TrainConfig:
    reflector = {"kind": "openai", "model": "m", "baseUrl": base_url, "apiKeyEnv": key}
    return config(mode="fst", fast={"reflector": reflector})


def test_no_openai_endpoint_is_allowed_by_default():
    v = only(
        pol.check_config(openai(ENDPOINT), Policy(), ROOT), "spec.config.fast.reflector.baseUrl"
    )
    assert "none" in v.message and "digest" in v.message


@pytest.mark.parametrize(
    "url",
    [ENDPOINT, f"{ENDPOINT}/", f"{ENDPOINT}/chat", "http://VLLM.llm.svc:8000/v1"],
)
def test_allowed_endpoints(url):
    p = Policy(reflector_endpoints=(ENDPOINT,))
    assert pol.check_config(openai(url), p, ROOT) == []


@pytest.mark.parametrize(
    "url",
    [
        "http://vllm.llm.svc:8000@evil.example.com/v1",  # user info: the host is evil
        "http://vllm.llm.svc:8000/v10",  # a string prefix, not a path segment
        "http://vllm.llm.svc.evil.example.com:8000/v1",
        "http://vllm.llm.svc:8001/v1",
        "https://vllm.llm.svc:8000/v1",
        "http://vllm.llm.svc/v1",
        "http://vllm.llm.svc:8000/v1/../../x",
        "http://vllm.llm.svc:8000/v1/%2e%2e/x",
        "http://vllm.llm.svc:8000/v1?x=1",
        "ftp://vllm.llm.svc:8000/v1",
    ],
)
def test_endpoint_tricks_are_refused(url):
    p = Policy(reflector_endpoints=(ENDPOINT,))
    only(pol.check_config(openai(url), p, ROOT), "spec.config.fast.reflector.baseUrl")


def test_the_key_variable_is_allow_listed():
    p = Policy(reflector_endpoints=(ENDPOINT,))
    v = only(
        pol.check_config(openai(ENDPOINT, "OTHER_TEAM_KEY"), p, ROOT),
        "spec.config.fast.reflector.apiKeyEnv",
    )
    assert "OPENAI_API_KEY" in v.message
    assert (
        pol.check_config(
            openai(ENDPOINT, "VLLM_KEY"),
            p.model_copy(update={"reflector_key_envs": ("VLLM_KEY",)}),
            ROOT,
        )
        == []
    )


def test_reflector_fields_are_unchecked_when_not_used():
    cfg = config(fast={"reflector": {"kind": "digest", "baseUrl": "http://x", "apiKeyEnv": "X"}})
    assert pol.check_config(cfg, Policy(), ROOT) == []


def test_bad_endpoint_entries_are_refused():
    for bad in ("vllm:8000", "http://user@host/v1", "http://host/a/../b", "http://host/v1?x"):
        with pytest.raises(ValueError):
            Policy(reflector_endpoints=(bad,))


# ----------------------------------------------------------------------------- runs, streams


def test_check_run_covers_trainer_and_config():
    spec = FastSlowRunSpec.model_validate(
        {
            "config": {"task": jsonl("s3://fastslow/tenants/team-b/d.jsonl"), "steps": 2},
            "trainer": {"image": "evil/x:1", "gpus": 9},
        }
    )
    assert fields(pol.check_run(spec, Policy(), ROOT)) == [
        "spec.trainer.image",
        "spec.trainer.gpus",
        "spec.config.task.params.path",
    ]


def stream_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "TaskStream",
        "metadata": {"name": "demo"},
        "spec": {
            "stages": [
                {"name": "one", "task": ARITH, "steps": 2},
                {"name": "two", "task": jsonl(f"{ROOT}data.jsonl"), "steps": 2},
            ],
            **spec,
        },
    }


def test_stream_violations_name_where_the_user_wrote_them():
    body = stream_body(
        model={"name": "s3://fastslow/tenants/team-b/base"},
        defaults={
            "mode": "fst",
            "checkpoint": {"uri": "s3://fastslow/other/ckpt"},
            "fast": {"reflector": {"kind": "openai", "model": "m", "baseUrl": "http://evil/v1"}},
        },
        trainer={"image": "evil/x:1"},
    )
    body["spec"]["stages"][1]["task"] = jsonl("s3://fastslow/tenants/team-b/data.jsonl")
    body["spec"]["stages"][1]["checkpoint"] = {"uri": f"{ROOT}ckpt2"}
    vs = pol.check_stream(TaskStream.model_validate(body), Policy(), ROOT)
    assert fields(vs) == [
        "spec.trainer.image",
        "spec.model.name",  # once, though every stage has it
        "spec.defaults.checkpoint.uri",  # stage one's, from the defaults (stage two overrides)
        "spec.defaults.fast.reflector.baseUrl",  # once
        "spec.stages[1].task.params.path",
    ]


@pytest.mark.parametrize("key", ["baseUrl", "base_url"])
def test_a_stage_override_is_named_on_the_stage(key):
    body = stream_body(defaults={"fast": {"reflector": {"kind": "openai", "model": "m"}}})
    body["spec"]["stages"][0]["mode"] = "fst"
    body["spec"]["stages"][0]["fast"] = {"reflector": {key: "http://evil/v1"}}
    vs = pol.check_stream(TaskStream.model_validate(body), Policy(), ROOT)
    assert fields(vs) == ["spec.stages[0].fast.reflector.baseUrl"]


def test_a_clean_stream_passes():
    assert pol.check_stream(TaskStream.model_validate(stream_body()), Policy(), ROOT) == []


# ----------------------------------------------------------------------------- messages


def test_format_violations_shows_the_first_few_and_the_count():
    vs = [Violation(f"spec.trainer.f{i}", f"problem {i}") for i in range(5)]
    text = pol.format_violations(vs)
    assert text.startswith("refused by the operator's policy (5 problem(s)): ")
    assert "spec.trainer.f0: problem 0; spec.trainer.f1" in text and "f2: problem 2" in text
    assert "f3" not in text and text.endswith("and 2 more")
    assert pol.format_violations(vs[:1]).endswith("spec.trainer.f0: problem 0")
    assert pol.format_violations([]) == ""


def test_enforce_raises_a_value_error_with_the_message():
    pol.enforce([])
    vs = [Violation("spec.trainer.gpus", "too many")]
    with pytest.raises(ValueError, match=r"spec\.trainer\.gpus: too many") as info:
        pol.enforce(vs)
    assert isinstance(info.value, pol.PolicyViolation) and info.value.violations == vs


def test_policy_round_trips_through_its_env_form():
    for p in (Policy(), Policy.unrestricted(), Policy(shared_prefixes=("s3://bkt/shared",))):
        assert Policy.model_validate_json(p.to_env()) == p


# ----------------------------------------------------------------------------- settings


@pytest.fixture
def env(monkeypatch):
    """A clean operator environment: set variables with env(NAME=value)."""
    for name in list(os.environ):
        if name.startswith("FST_"):
            monkeypatch.delenv(name)

    def set_env(**values: str) -> Any:
        from fst_operator.settings import Settings

        for k, v in values.items():
            monkeypatch.setenv(k, v)
        return Settings.from_env()

    return set_env


def test_settings_default_policy_is_the_built_in_one(env):
    s = env()
    assert s.policy == Policy() and s.tenant_prefix is None and s.tenant_root("team-a") is None
    assert env(FST_POLICY="").policy == Policy()
    assert env(FST_POLICY="{}").policy == Policy()


def test_settings_read_the_policy_json(env):
    s = env(FST_POLICY='{"images": ["registry.example.com/ml/"], "maxGpus": 2}')
    assert s.policy.images == ("registry.example.com/ml/",) and s.policy.max_gpus == 2
    assert s.policy.tolerations == Policy().tolerations  # keys left out keep their default


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("{not json", "FST_POLICY="),
        ('["a"]', "FST_POLICY="),
        ('{"maxGpus": -1}', "FST_POLICY.maxGpus=-1"),
        ('{"maxGpus": 65}', "FST_POLICY.maxGpus=65"),
        ('{"imagez": []}', "FST_POLICY.imagez"),
        ('{"tolerations": ["nvidia.com/gpu:Sometimes"]}', "FST_POLICY.tolerations"),
        ('{"imagePullPolicies": ["Maybe"]}', "FST_POLICY.imagePullPolicies[0]"),
        ('{"secrets": ["Not_A_Name"]}', "FST_POLICY.secrets"),
        ('{"sharedPrefixes": ["s3://b/../x"]}', "FST_POLICY.sharedPrefixes"),
        ('{"requireQueue": true, "queues": []}', "FST_POLICY="),
    ],
)
def test_a_bad_policy_stops_the_operator_naming_the_variable(env, value, named):
    with pytest.raises(SystemExit) as info:
        env(FST_POLICY=value)
    message = str(info.value)
    assert message.startswith("operator settings: ") and named in message, message


@pytest.mark.parametrize("prefix", ["bucket/x", "s3://b/../x", "s3://B/x", "s3://b/x%2f"])
def test_a_bad_tenant_prefix_stops_the_operator_naming_the_variable(env, prefix):
    with pytest.raises(SystemExit, match="FST_TENANT_PREFIX="):
        env(FST_TENANT_PREFIX=prefix)


def test_tenant_root_from_settings(env):
    s = env(FST_TENANT_PREFIX="s3://fastslow/tenants")
    assert s.tenant_root("team-a") == ROOT
    assert s.defaults.tenant_root("team-a") == ROOT  # where the builders put checkpoints
    assert env(FST_TENANT_PREFIX="").tenant_root("team-a") is None


def test_the_default_secrets_are_allowed_by_name_without_tenancy_only(env):
    s = env(FST_DEFAULT_S3_SECRET="fastslow-s3", FST_DEFAULT_DATABASE_SECRET="fastslow-db/url")
    assert s.policy.secrets == ("fastslow-s3", "fastslow-db")
    # With tenancy the defaults are the root credentials: a spec may name only the tenant's.
    s = env(FST_TENANT_PREFIX="s3://fastslow/tenants")
    assert "fastslow-s3" not in s.policy.secrets and "fastslow-db" not in s.policy.secrets
    assert s.policy.secrets == (s.defaults.tenant_secret,)
    # ...unless the policy lists them
    s = env(FST_POLICY='{"secrets": ["fastslow-s3"]}')
    assert "fastslow-s3" in s.policy.secrets


def test_unrestricted_env_form_is_accepted_by_settings(env):
    assert env(FST_POLICY=Policy.unrestricted().to_env()).policy == Policy.unrestricted()


def test_settings_describe_shows_the_policy(env):
    import json

    shown = json.loads(env(FST_POLICY='{"maxGpus": 3}').describe())
    assert shown["policy"]["maxGpus"] == 3 and "none" in shown["tenantPrefix"]


def test_violations_come_in_field_order():
    t = trainer(tolerations=[GPU_TAINT, {"operator": "Exists"}], gpus=9, image="evil/x")
    assert fields(pol.check_trainer(t, Policy())) == [
        "spec.trainer.image",
        "spec.trainer.tolerations[1]",
        "spec.trainer.gpus",
    ]
