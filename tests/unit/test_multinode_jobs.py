"""Multi-GPU and multi-node trainer Jobs (issue 17): spec.trainer.nodes / gpusPerNode in the
models and the CRDs, the Job, headless Service and NetworkPolicy the operator builds, its
policy and S3 checks, and the process kubelet's stand-in for the pods' DNS names."""

from __future__ import annotations

from typing import Any

import pytest
from fst_operator import builders
from fst_operator import policy as pol
from fst_operator.policy import Policy
from pydantic import ValidationError

from fst.k8s import crd
from fst.k8s.api import (
    GPUS_AND_GPUS_PER_NODE,
    GPUS_WITH_NODES,
    FastSlowRunSpec,
    TaskStreamSpec,
    TrainerSpec,
    device_cpu_message,
    device_cuda_message,
)
from tests.k8s.process_kubelet import pod_name_pattern, rewrite_names

TASK = {"name": "arithmetic", "params": {"answerFormat": "last_number"}}
S3 = builders.Defaults(checkpoint_prefix="s3://ckpt/runs")
TRAIN_ARGS = [
    "--config",
    "/etc/fastslow/config.yaml",
    "--resume",
    "--no-progress",
    "--override=outputDir=/scratch/runs",
]


def run_object(trainer: dict[str, Any], **config: Any) -> dict[str, Any]:
    return {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "FastSlowRun",
        "metadata": {"name": "acme", "namespace": "team", "uid": "u-1", "generation": 1},
        "spec": {"config": {"task": TASK, **config}, "trainer": trainer},
    }


def build(trainer: dict[str, Any], attempt: int = 1) -> tuple[dict, dict | None, dict | None]:
    run = run_object(trainer)
    spec, _ = builders.train_config(run, S3)
    return (
        builders.job(run, spec, attempt, S3),
        builders.service(run, spec, attempt),
        builders.network_policy(run, spec, attempt),
    )


def pod_of(job: dict) -> tuple[dict, dict]:
    pod = job["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def gpu_limit(container: dict) -> str | None:
    return container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")


def has_shm(pod: dict, container: dict) -> bool:
    shm = [v for v in pod["volumes"] if v["name"] == "shm"]
    mounted = any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    assert bool(shm) == mounted
    return bool(shm) and shm[0]["emptyDir"] == {"medium": "Memory"}


# ----------------------------------------------------------------------------- the spec


def test_gpus_per_node_defaults_to_gpus_then_one() -> None:
    assert TrainerSpec().node_gpus == 1 and TrainerSpec().nodes == 1
    assert TrainerSpec(gpus=4).node_gpus == 4  # the deprecated synonym, one node
    assert TrainerSpec(gpusPerNode=0).processes_per_node == 1  # CPU: one process
    t = TrainerSpec(nodes=3, gpusPerNode=8)
    assert (t.node_gpus, t.processes_per_node, t.total_gpus) == (8, 8, 24)


@pytest.mark.parametrize(
    ("trainer", "field", "message"),
    [
        ({"nodes": 0}, "trainer.nodes", "greater than or equal to 1"),
        ({"nodes": 65}, "trainer.nodes", "less than or equal to 64"),
        ({"gpusPerNode": 17}, "trainer.gpusPerNode", "less than or equal to 16"),
        ({"gpus": 1, "gpusPerNode": 1}, "trainer", GPUS_AND_GPUS_PER_NODE),
        ({"gpus": 1, "nodes": 2}, "trainer", GPUS_WITH_NODES),
    ],
)
def test_bad_trainer_specs_are_refused_naming_the_field(
    trainer: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as e:
        FastSlowRunSpec.model_validate({"config": {"task": TASK}, "trainer": trainer})
    (err,) = e.value.errors()
    assert ".".join(str(p) for p in err["loc"]) == field and message in err["msg"], err


def test_the_device_must_fit_the_gpus() -> None:
    def spec(device: str, **trainer: Any) -> FastSlowRunSpec:
        config = {"task": TASK, "model": {"device": device}}
        return FastSlowRunSpec.model_validate({"config": config, "trainer": trainer})

    with pytest.raises(ValidationError, match=r"spec\.config\.model\.device: cpu cannot use"):
        spec("cpu", gpusPerNode=1)
    with pytest.raises(ValidationError, match=r"spec\.config\.model\.device: cpu cannot use"):
        spec("cpu")  # the default: one GPU per pod
    with pytest.raises(ValidationError, match=r"spec\.config\.model\.device: cpu cannot use"):
        spec("cpu", gpus=2)
    with pytest.raises(ValidationError, match=r"spec\.config\.model\.device: cuda needs a GPU"):
        spec("cuda", gpusPerNode=0)
    with pytest.raises(ValidationError, match=r"spec\.config\.model\.device: cuda needs a GPU"):
        spec("cuda:1", gpus=0)
    spec("cpu", gpusPerNode=0)
    spec("cuda", nodes=2, gpusPerNode=8)
    spec("auto")  # the default run: auto on one GPU
    spec("auto", gpusPerNode=0)
    # A stream: its base model's device against the trainer copied into every stage's run.
    stages = [{"name": "a", "task": TASK, "steps": 2}]
    with pytest.raises(ValidationError, match=r"spec\.model\.device: cpu cannot use"):
        TaskStreamSpec.model_validate({"model": {"device": "cpu"}, "stages": stages})
    TaskStreamSpec.model_validate(
        {"model": {"device": "cpu"}, "trainer": {"gpusPerNode": 0}, "stages": stages}
    )


def test_the_crd_rules_say_what_the_models_say() -> None:
    """The CEL rules carry the models' messages (the apiserver test checks they fire)."""
    assert [r["message"] for r in crd.TRAINER_RULES] == [GPUS_AND_GPUS_PER_NODE, GPUS_WITH_NODES]
    run = crd.fastslowrun_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = run["properties"]["spec"]
    messages = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert messages == [
        device_cpu_message("spec.config.model"),
        device_cuda_message("spec.config.model"),
    ]
    trainer = spec["properties"]["trainer"]
    assert trainer["x-kubernetes-validations"] == crd.TRAINER_RULES
    props = trainer["properties"]
    assert props["nodes"]["minimum"] == 1 and props["nodes"]["maximum"] == 64
    assert props["nodes"]["default"] == 1
    assert props["gpusPerNode"]["minimum"] == 0 and props["gpusPerNode"]["maximum"] == 16
    # No default for either GPU field: the apiserver must not fill in one beside the other.
    assert "default" not in props["gpusPerNode"] and "default" not in props["gpus"]
    stream = crd.taskstream_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    stream_spec = stream["properties"]["spec"]
    assert [r["message"] for r in stream_spec["x-kubernetes-validations"]] == [
        device_cpu_message("spec.model"),
        device_cuda_message("spec.model"),
        "spec.serving.pin must name a stage of spec.stages",
    ]
    assert stream_spec["properties"]["trainer"]["x-kubernetes-validations"] == crd.TRAINER_RULES


# ----------------------------------------------------------------------------- the Job


@pytest.mark.parametrize("trainer", [{"gpus": 0}, {"gpusPerNode": 0}])
def test_one_cpu_process_runs_fst_train_as_before(trainer: dict[str, Any]) -> None:
    job, svc, netpol = build(trainer)
    pod, c = pod_of(job)
    assert c["command"] == ["fst", "train"] and c["args"] == TRAIN_ARGS
    assert gpu_limit(c) is None and not has_shm(pod, c)
    assert "completionMode" not in job["spec"] and "subdomain" not in pod
    assert svc is None and netpol is None


@pytest.mark.parametrize("trainer", [{}, {"gpus": 1}, {"gpusPerNode": 1}])
def test_one_gpu_runs_fst_train_with_shared_memory(trainer: dict[str, Any]) -> None:
    job, svc, _ = build(trainer)
    pod, c = pod_of(job)
    assert c["command"] == ["fst", "train"] and c["args"] == TRAIN_ARGS
    assert gpu_limit(c) == "1" and has_shm(pod, c)
    assert "completionMode" not in job["spec"] and svc is None


@pytest.mark.parametrize("trainer", [{"gpusPerNode": 8}, {"gpus": 8}])
def test_one_node_with_eight_gpus_runs_torchrun_standalone(trainer: dict[str, Any]) -> None:
    job, svc, netpol = build(trainer)
    pod, c = pod_of(job)
    assert c["command"] == ["torchrun"]
    assert c["args"] == [
        "--standalone",
        "--nproc-per-node",
        "8",
        "-m",
        "fst",
        "train",
        *TRAIN_ARGS,
    ]
    assert gpu_limit(c) == "8" and has_shm(pod, c)
    assert "completionMode" not in job["spec"] and "subdomain" not in pod
    assert svc is None and netpol is None


def test_two_nodes_are_an_indexed_job_behind_a_headless_service() -> None:
    job, svc, netpol = build({"nodes": 2, "gpusPerNode": 8}, attempt=3)
    pod, c = pod_of(job)
    assert job["metadata"]["name"] == "acme-a3"
    s = job["spec"]
    assert s["completionMode"] == "Indexed" and s["completions"] == s["parallelism"] == 2
    assert s["backoffLimit"] == 0
    assert pod["subdomain"] == "acme-a3" and pod["restartPolicy"] == "Never"
    assert c["command"] == ["torchrun"]
    assert c["args"] == [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--node-rank",
        "$(JOB_COMPLETION_INDEX)",
        "--master-addr",
        "acme-a3-0.acme-a3",
        "--master-port",
        "29500",
        "-m",
        "fst",
        "train",
        *TRAIN_ARGS,
    ]
    assert gpu_limit(c) == "8" and has_shm(pod, c)  # per pod
    # The Service: headless, named like the Job (the pods' subdomain), selecting its pods.
    assert svc is not None and svc["metadata"]["name"] == "acme-a3"
    assert svc["metadata"]["namespace"] == "team" and "ownerReferences" not in svc["metadata"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["ports"][0]["port"] == 29500
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["selector"] == {"fastslow.io/run": "acme", "fastslow.io/attempt": "3"}
    # The pods of this attempt, and only they, may connect to each other.
    assert netpol is not None and netpol["metadata"]["name"] == "acme-a3"
    np = netpol["spec"]
    assert np["podSelector"] == {"matchLabels": svc["spec"]["selector"]}
    assert np["policyTypes"] == ["Ingress"]  # egress stays as the chart's policy says
    assert np["ingress"] == [{"from": [{"podSelector": np["podSelector"]}]}]


def test_cpu_nodes_run_one_process_each_without_shared_memory() -> None:
    job, svc, _ = build({"nodes": 2, "gpusPerNode": 0})
    pod, c = pod_of(job)
    assert c["args"][:4] == ["--nnodes", "2", "--nproc-per-node", "1"]
    assert gpu_limit(c) is None and not has_shm(pod, c)
    assert svc is not None


def test_a_service_name_starts_with_a_letter() -> None:
    assert builders.service_name("acme-a1") == "acme-a1"
    assert builders.service_name("1st-run-a1") == "fst-1st-run-a1"
    run = run_object({"nodes": 2, "gpusPerNode": 0})
    run["metadata"]["name"] = "1st-run"
    spec, _ = builders.train_config(run, S3)
    job, svc = builders.job(run, spec, 1, S3), builders.service(run, spec, 1)
    assert svc is not None and svc["metadata"]["name"] == "fst-1st-run-a1"
    assert job["spec"]["template"]["spec"]["subdomain"] == "fst-1st-run-a1"
    assert "1st-run-a1-0.fst-1st-run-a1" in job["spec"]["template"]["spec"]["containers"][0]["args"]


# ----------------------------------------------------------------------------- checks


def test_the_policy_counts_every_gpu_of_the_run() -> None:
    def trainer(**fields: Any) -> TrainerSpec:
        return TrainerSpec.model_validate(fields)

    assert pol.check_trainer(trainer(nodes=1, gpusPerNode=8), Policy()) == []
    (v,) = pol.check_trainer(trainer(nodes=2, gpusPerNode=8), Policy())
    assert v.field == "spec.trainer.gpusPerNode"
    assert "16 GPUs per run (2 node(s) x 8)" in v.message and "at most 8" in v.message
    assert pol.check_trainer(trainer(nodes=2, gpusPerNode=8), Policy(max_gpus=16)) == []
    (v,) = pol.check_trainer(trainer(gpus=9), Policy())
    assert v.field == "spec.trainer.gpus"
    (v,) = pol.check_trainer(trainer(nodes=9), Policy())  # the default: one GPU per pod
    assert v.field == "spec.trainer.gpusPerNode" and "9 GPUs per run" in v.message
    assert pol.check_trainer(trainer(nodes=64, gpusPerNode=0), Policy(max_gpus=0)) == []


def test_several_nodes_need_checkpoints_in_s3() -> None:
    run = run_object({"nodes": 2, "gpusPerNode": 0})
    with pytest.raises(ValueError, match=r"spec\.trainer\.checkpointUri: required") as e:
        builders.train_config(run, builders.Defaults())
    assert "a run on 2 nodes saves checkpoints to S3 only" in str(e.value)
    # An operator default that is not in S3 does for one pod, not for several.
    local = builders.Defaults(checkpoint_prefix="/data/checkpoints")
    with pytest.raises(ValueError, match="saves checkpoints to S3 only") as e:
        builders.train_config(run, local)
    assert "'/data/checkpoints/" in str(e.value)
    builders.train_config(run_object({"gpusPerNode": 0}), local)
    # A checkpoint location in S3, from any of the three places, does.
    _, cfg = builders.train_config(run, S3)
    assert cfg.checkpoint.uri is not None and cfg.checkpoint.uri.startswith("s3://ckpt/runs/")
    own = run_object({"nodes": 2, "gpusPerNode": 0, "checkpointUri": "s3://mine/x"})
    _, cfg = builders.train_config(own, builders.Defaults())
    assert cfg.checkpoint.uri is not None and cfg.checkpoint.uri.startswith("s3://mine/x/")
    tenancy = builders.Defaults(tenant_prefix="s3://fastslow/tenants")
    _, cfg = builders.train_config(run, tenancy)
    assert cfg.checkpoint.uri is not None
    assert cfg.checkpoint.uri.startswith("s3://fastslow/tenants/team/runs/")
    in_config = run_object({"nodes": 2, "gpusPerNode": 0}, checkpoint={"uri": "/scratch/c"})
    with pytest.raises(ValueError, match="must be an s3:// URI"):
        builders.train_config(in_config, S3)


# ----------------------------------------------------------------------------- process kubelet


def test_the_process_kubelet_finds_pod_names_of_a_subdomain() -> None:
    pattern = pod_name_pattern("acme-a1", "team")
    found = [
        (m.group(0), m.group(1))
        for text in [
            "acme-a1-0.acme-a1",
            "--master-addr=acme-a1-1.acme-a1.team.svc.cluster.local:29500",
            "acme-a1-0.acme-a1.team.svc",
            "x.acme-a1.other",  # another name
            "acme-a1-0.acme-a1x",
            "y-acme-a1-0.acme-a1",  # one whole name: y-acme-a1-0 is the hostname
            "http://acme-a1-0.acme-a1/path",
        ]
        for m in pattern.finditer(text)
    ]
    assert found == [
        ("acme-a1-0.acme-a1", "acme-a1-0"),
        ("acme-a1-1.acme-a1.team.svc.cluster.local", "acme-a1-1"),
        ("acme-a1-0.acme-a1.team.svc", "acme-a1-0"),
        ("y-acme-a1-0.acme-a1", "y-acme-a1-0"),
        ("acme-a1-0.acme-a1", "acme-a1-0"),
    ]
    hosts = {"acme-a1-0.acme-a1": "127.0.0.1", "acme-a1-0.acme-a1.team.svc": "127.0.0.1"}
    assert rewrite_names("acme-a1-0.acme-a1", hosts) == "127.0.0.1"
    assert rewrite_names("acme-a1-0.acme-a1.team.svc:29500", hosts) == "127.0.0.1:29500"
    assert rewrite_names("xacme-a1-0.acme-a1", hosts) == "xacme-a1-0.acme-a1"
    assert rewrite_names("acme-a1-0.acme-a1.elsewhere", hosts) == "acme-a1-0.acme-a1.elsewhere"
