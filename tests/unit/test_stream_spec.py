"""TaskStream manifests: validation errors name the field; stage configs merge as documented;
the next-stage logic (resume, new stage, new data version) on plain state."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fst import plan
from fst.config import DEFAULT_SEED_PROMPT, ConfigError, RolloutConfig, TrainConfig
from fst.handover import HandoverError, checkpoint_population, source_fingerprint
from fst.k8s.api import STAGE_SECTIONS, TaskStream
from fst.plan import StageRun, StageStatus, stage_config, stage_run_name
from fst.stream import StreamState, load_stream

REPO = Path(__file__).resolve().parents[2]

GOOD = {
    "apiVersion": "fastslow.io/v1alpha1",
    "kind": "TaskStream",
    "metadata": {"name": "acme"},
    "spec": {
        "defaults": {"mode": "fst", "slow": {"groupSize": 4, "lr": 1e-6}},
        "stages": [
            {"name": "one", "task": {"name": "arithmetic"}, "steps": 3},
            {
                "name": "two",
                "task": {"name": "star_graph"},
                "steps": 2,
                "slow": {"lr": 5e-6},
                "fast": {"topK": 2},
            },
        ],
    },
}


def write(tmp_path, doc) -> str:
    p = tmp_path / "stream.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def broken(path: list, value) -> dict:
    doc = copy.deepcopy(GOOD)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def test_good_stream_merges_defaults_and_stage_settings(tmp_path):
    stream = load_stream(write(tmp_path, GOOD))
    two = stage_config(stream, stream.spec.stages[1], "acme-two", "/ckpt/step-3", ["p1", "p2"])
    assert two.mode == "fst" and two.slow.group_size == 4 and two.slow.lr == 5e-6
    assert two.fast.top_k == 2 and two.fast.initial_population == ["p1", "p2"]
    assert two.model.name == "/ckpt/step-3" and two.model.reference == "smollm2-135m-instruct"
    assert two.output_dir.endswith("acme") and two.run == "acme-two"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["kind"], "TaskStreem", "kind: Input should be 'TaskStream'"),
        (["apiVersion"], "v1", "apiVersion"),
        (["metadata", "name"], "Acme Corp", "metadata.name"),
        (["spec", "stages"], [], "spec.stages: List should have at least 1 item"),
        (["spec", "stages", 0, "steps"], 0, "spec.stages.0.steps"),
        (["spec", "stages", 1, "name"], "one", "repeated: ['one']"),
        (["spec", "stages", 0, "task"], {"name": "nope"}, "unknown task 'nope'"),
        (["spec", "defaults"], {"modee": "rl"}, "spec.defaults.modee: Extra inputs"),
        (["spec", "stages", 1, "slow"], {"groupSize": "x"}, "spec.stages.1.slow.groupSize"),
        (["spec", "stages", 1, "slow"], {"lrr": 1}, "spec.stages.1.slow.lrr: Extra inputs"),
        (["spec", "stages", 1, "rollout"], {"topP": 2}, "spec.stages.1.rollout.topP"),
        (["spec", "stages", 1, "fast"], {"reflector": {"kind": "x"}}, "fast.reflector.kind"),
        (["spec", "defaults", "checkpoint"], {"every": None}, "spec.defaults.checkpoint.every"),
        (
            ["spec", "stages", 0, "task"],
            {"name": "arithmetic", "params": {"maxOperand": "big"}},
            "spec.stages.0.task.params.maxOperand",
        ),
        # Only the merged config can say this one (topK 8 > the defaults' groupSize 4).
        (["spec", "stages", 1, "fast"], {"topK": 8}, "spec.stages.1 (two)"),
    ],
)
def test_invalid_stream_errors_name_the_field(tmp_path, path, value, expected):
    with pytest.raises(ConfigError) as e:
        load_stream(write(tmp_path, broken(path, value)))
    assert expected in str(e.value) and "stream.yaml" in str(e.value)


def merged_as_before(doc: dict, i: int) -> dict:
    """Stage i's settings merged as stage_config merged them before the typed overrides: the
    stream's defaults and the stage's sections deep-merged as the raw mappings of the file."""
    spec = doc["spec"]
    raw = copy.deepcopy(spec.get("defaults", {}))
    for section in STAGE_SECTIONS:
        if spec["stages"][i].get(section) is not None:
            raw = plan._deep_merge(raw, {section: spec["stages"][i][section]})
    return raw


def nested_overrides() -> dict:
    """examples/taskstream.yaml with stage settings that go into nested sections."""
    doc = yaml.safe_load((REPO / "examples" / "taskstream.yaml").read_text())
    doc["spec"]["defaults"]["checkpoint"]["uri"] = "s3://bucket/acme"
    doc["spec"]["defaults"]["fast"]["reflector"] = {
        "kind": "openai",
        "model": "m",
        "temperature": 1,
    }
    doc["spec"]["stages"][0].update(
        mode="rl",
        seed=7,
        slow={"betas": [0.8, 0.9], "lr": 1e-6},
        fast={"reflector": {"temperature": 0.2}, "topK": 2},
        checkpoint={"uri": None},  # back to the built-in default (the run folder)
    )
    doc["spec"]["stages"][1].update(
        fast={"reflector": {"kind": "digest"}, "initialPopulation": ["p"]},
        metrics={"evalEvery": 2},
        rollout={"temperature": 1},
    )
    return doc


@pytest.mark.parametrize("make", [nested_overrides, None], ids=["nested", "example"])
def test_stage_configs_merge_as_before_the_typed_overrides(tmp_path, make):
    """stage_config deep-merges the typed overrides into the same TrainConfig as it did the
    raw mappings: examples/taskstream.yaml, and nested overrides (fast.reflector, a nullable
    checkpoint.uri set back to null, a tuple, an int for a float)."""
    if make is None:
        doc = yaml.safe_load((REPO / "examples" / "taskstream.yaml").read_text())
    else:
        doc = make()
    stream = load_stream(write(tmp_path, doc))
    for i, stage in enumerate(stream.spec.stages):
        cfg = stage_config(stream, stage, f"demo-{stage.name}")
        before = TrainConfig.model_validate(
            {**merged_as_before(doc, i), "task": doc["spec"]["stages"][i]["task"]}
        )
        sections = set(STAGE_SECTIONS)
        assert cfg.model_dump(include=sections) == before.model_dump(include=sections)


def test_nested_overrides_merge_key_by_key(tmp_path):
    """A golden of the merged sections: stream defaults < stage, key by key, also inside
    fast.reflector."""
    stream = load_stream(write(tmp_path, nested_overrides()))
    one, two = (stage_config(stream, s, s.name) for s in stream.spec.stages[:2])
    dump = {"mode": "json", "by_alias": True}
    assert (one.mode, one.seed, one.slow.betas, one.slow.lr) == ("rl", 7, (0.8, 0.9), 1e-6)
    assert one.slow.group_size == 4 and one.slow.warmup_steps == 1  # from the defaults
    assert one.fast.model_dump(**dump) == {
        "seedPrompt": DEFAULT_SEED_PROMPT,
        "everySteps": 4,
        "topK": 2,
        "metricCalls": 16,
        "minibatchSize": 4,
        "paretoSize": 8,
        "proposalsPerIteration": 1,
        "reuseStepRollouts": False,
        "overlapRound": False,
        "maxPromptTokens": None,
        "reflector": {
            "kind": "openai",
            "model": "m",
            "baseUrl": None,
            "apiKeyEnv": "OPENAI_API_KEY",
            "maxNewTokens": 512,
            "temperature": 0.2,
        },
        "initialPopulation": [],
    }
    assert one.checkpoint.model_dump(**dump) == {
        "every": 4,
        "keepLast": 1,
        "uri": None,
        "backgroundUpload": True,
    }
    assert two.fast.reflector.model_dump(**dump) == {
        "kind": "digest",
        "model": "m",
        "baseUrl": None,
        "apiKeyEnv": "OPENAI_API_KEY",
        "maxNewTokens": 512,
        "temperature": 1.0,
    }
    assert two.fast.initial_population == ["p"] and two.checkpoint.uri == "s3://bucket/acme"
    assert two.metrics.model_dump(**dump) == {
        "klPrompts": 4,
        "klEvery": 4,
        "tensorboard": False,
        "evalEvery": 2,
        "evalProblems": 32,
        "oodTask": None,
    }
    assert two.rollout.temperature == 1.0 and two.rollout.max_new_tokens == 48


def test_a_stage_overrides_only_what_it_sets():
    """An empty (null) section sets nothing; snake_case and camelCase keys are one setting."""
    doc = copy.deepcopy(GOOD)
    doc["spec"]["defaults"]["rollout"] = None
    doc["spec"]["stages"][1].update(slow={"group_size": 6}, rollout=None, metrics={})
    stream = TaskStream.model_validate(doc)
    two = stream.spec.stages[1]
    assert two.overrides() == {"slow": {"groupSize": 6}, "fast": {"topK": 2}, "metrics": {}}
    assert stream.spec.defaults.overrides() == {"mode": "fst", "slow": {"groupSize": 4, "lr": 1e-6}}
    cfg = stage_config(stream, two, "acme-two")
    assert cfg.slow.group_size == 6 and cfg.slow.lr == 1e-6 and cfg.rollout == RolloutConfig()


def test_next_stage_order_resume_and_data_versions(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q1", "answer": "a"}\n' * 1)
    doc = broken(
        ["spec", "stages"],
        [
            {"name": "gen", "task": {"name": "arithmetic"}, "steps": 1, "mode": "fst"},
            {
                "name": "data",
                "task": {"name": "jsonl", "params": {"path": str(data)}},
                "steps": 1,
                "mode": "fst",
            },
        ],
    )
    stream = load_stream(write(tmp_path, doc))
    populations = {"/c/gen": ["pg"], "/c/data": ["pd"]}

    def next_run(runs: list[StageRun]) -> StageRun | None:
        return plan.next_stage(stream, runs, source_fingerprint, populations.__getitem__)

    runs: list[StageRun] = []
    first = next_run(runs)
    assert first is not None
    assert (first.stage, first.name, first.start_checkpoint) == ("gen", "gen", None)
    runs.append(first.model_copy(update={"status": StageStatus.RUNNING}))
    assert next_run(runs) is runs[0]  # interrupted -> the same run, continued
    runs[0].status, runs[0].checkpoint = StageStatus.SUCCEEDED, "/c/gen"

    second = next_run(runs)
    assert second is not None and second.name == "data" and second.start_checkpoint == "/c/gen"
    assert second.start_population == ["pg"] and second.source
    runs.append(
        second.model_copy(update={"status": StageStatus.SUCCEEDED, "checkpoint": "/c/data"})
    )
    assert next_run(runs) is None

    data.write_text(data.read_text() + '{"question": "q2", "answer": "b"}\n')
    third = next_run(runs)  # new data: the stage runs again, from the last
    assert third is not None and third.name == "data-v2" and third.run == "acme-data-v2"
    assert third.start_checkpoint == "/c/data" and third.start_population == ["pd"]


def test_an_rl_stage_never_inherits_prompts(tmp_path):
    doc = broken(
        ["spec", "stages"],
        [
            {"name": "one", "task": {"name": "arithmetic"}, "steps": 1, "mode": "fst"},
            {"name": "two", "task": {"name": "arithmetic"}, "steps": 1, "mode": "rl"},
        ],
    )
    stream = load_stream(write(tmp_path, doc))
    done = StageRun(
        stage="one", version=1, run="acme-one", status=StageStatus.SUCCEEDED, checkpoint="/c/1"
    )
    asked: list[str] = []

    def population_of(uri: str) -> list[str]:
        asked.append(uri)
        return ["fst's best prompt"]

    nxt = plan.next_stage(stream, [done], lambda t: None, population_of)
    assert nxt is not None and nxt.stage == "two" and nxt.start_checkpoint == "/c/1"
    assert nxt.start_population is None and asked == []
    cfg = stage_config(stream, stream.spec.stages[1], nxt.run, "/c/1", ["fst's best prompt"])
    assert cfg.fast.initial_population == []  # even when handed prompts, rl takes none


def test_one_run_name_for_every_executor():
    assert stage_run_name("acme", "mul", 1) == "acme-mul"
    assert stage_run_name("acme", "mul", 3) == "acme-mul-v3"
    long = stage_run_name("a" * 40, "b" * 40, 12)
    assert len(long) == 52 and long == stage_run_name("a" * 40, "b" * 40, 12)
    assert long != stage_run_name("a" * 40, "b" * 40, 13)


def test_stream_state_round_trips_and_rejects_garbage(tmp_path):
    state = StreamState(tmp_path / "stream.json", [StageRun(stage="a", version=2, run="s-a-v2")])
    state.save()
    again = StreamState.load(tmp_path / "stream.json")
    assert again.runs == state.runs and again.runs[0].name == "a-v2"
    (tmp_path / "stream.json").write_text('{"stages": [{"stage": 3}]}')
    with pytest.raises(ConfigError, match=r"stream\.json"):
        StreamState.load(tmp_path / "stream.json")


def test_checkpoint_population_reads_the_checkpoint_and_checks_its_manifest(tmp_path):
    import hashlib
    import json

    folder = tmp_path / "step-00000002"
    folder.mkdir()
    state = json.dumps({"population": [{"id": "a", "text": "best"}, {"id": "b", "text": "2nd"}]})
    (folder / "state.json").write_text(state)
    with pytest.raises(HandoverError, match=r"manifest\.json"):  # not complete yet
        checkpoint_population(str(folder))
    digest = hashlib.sha256(state.encode()).hexdigest()
    files = {"state.json": {"size": len(state), "sha256": digest}}
    (folder / "manifest.json").write_text(json.dumps({"step": 2, "files": files}))
    assert checkpoint_population(str(folder)) == ["best", "2nd"]
    (folder / "state.json").write_text(state.replace("best", "evil"))
    with pytest.raises(HandoverError, match="does not match"):
        checkpoint_population(str(folder))
