"""TaskStream manifests: validation errors name the field; stage configs merge as documented;
the next-stage logic (resume, new stage, new data version) on plain state."""

from __future__ import annotations

import pytest
import yaml

from fst.config import ConfigError
from fst.stream import StreamState, load_stream, next_stage, stage_config

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
    import copy

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
        (["spec", "defaults"], {"modee": "rl"}, "unknown keys ['modee']"),
        (["spec", "stages", 1, "slow"], {"groupSize": "x"}, "spec.stages.1 (two)"),
        (["spec", "stages", 1, "slow"], {"groupSize": "x"}, "slow.groupSize"),
    ],
)
def test_invalid_stream_errors_name_the_field(tmp_path, path, value, expected):
    with pytest.raises(ConfigError) as e:
        load_stream(write(tmp_path, broken(path, value)))
    assert expected in str(e.value) and "stream.yaml" in str(e.value)


def test_next_stage_order_resume_and_data_versions(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q1", "answer": "a"}\n' * 1)
    doc = broken(
        ["spec", "stages"],
        [
            {"name": "gen", "task": {"name": "arithmetic"}, "steps": 1},
            {"name": "data", "task": {"name": "jsonl", "params": {"path": str(data)}}, "steps": 1},
        ],
    )
    stream = load_stream(write(tmp_path, doc))
    state = StreamState(tmp_path / "stream.json", [])

    stage, entry = next_stage(stream, state)
    assert (stage.name, entry["name"], entry["start_checkpoint"]) == ("gen", "gen", None)
    state.entries.append({**entry, "status": "running"})
    stage, again = next_stage(stream, state)  # interrupted -> the same entry, continued
    assert again is state.entries[0]
    state.entries[0].update(status="succeeded", checkpoint="/c/gen", population=["pg"])

    stage, entry = next_stage(stream, state)
    assert entry["name"] == "data" and entry["start_checkpoint"] == "/c/gen"
    assert entry["start_population"] == ["pg"] and entry["source"]
    state.entries.append(
        {**entry, "status": "succeeded", "checkpoint": "/c/data", "population": ["pd"]}
    )
    assert next_stage(stream, state) is None

    data.write_text(data.read_text() + '{"question": "q2", "answer": "b"}\n')
    stage, entry = next_stage(stream, state)  # new data: the stage runs again, from the last
    assert entry["name"] == "data-v2" and entry["run"] == "acme-data-v2"
    assert entry["start_checkpoint"] == "/c/data" and entry["start_population"] == ["pd"]
