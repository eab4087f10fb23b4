"""The config schema: YAML in, typed models out, and errors that name the field."""

from types import SimpleNamespace

import pytest
from pydantic import ValidationError, field_validator

from fst import tasks
from fst.config import (
    ConfigError,
    Schema,
    TaskConfig,
    TrainConfig,
    apply_overrides,
    dump_config,
    load_config,
    validate_config,
)
from fst.tasks import params_of


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_camel_and_snake_case_both_load(tmp_path):
    camel = load_config(write(tmp_path, "task: {name: arithmetic}\nslow: {groupSize: 6}\n"))
    snake = load_config(write(tmp_path, "task: {name: arithmetic}\nslow: {group_size: 6}\n"))
    assert camel.slow.group_size == snake.slow.group_size == 6


def test_dump_round_trips(tmp_path):
    cfg = validate_config({"task": {"name": "star_graph", "params": {"degree": 4}}, "steps": 7})
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert "groupSize" in dump_config(cfg)


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "task: {name: arithmetic}\nslow: {groupSize: lots}\n"))
    msg = str(e.value)
    assert "cfg.yaml" in msg and "slow.groupSize" in msg and "'lots'" in msg


def test_out_of_range_and_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "task: {name: arithmetic}\nslow: {epsMax: -1, lrr: 3}\n"))
    msg = str(e.value)
    assert "slow.epsMax" in msg and "greater than 0" in msg
    assert "slow.lrr" in msg and "Extra inputs are not permitted" in msg


def test_missing_task_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"task: Field required"):
        load_config(write(tmp_path, "steps: 3\n"))


def test_unknown_task_and_bad_task_params_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"task\.name: unknown task 'nope'"):
        load_config(write(tmp_path, "task: {name: nope}\n"))
    with pytest.raises(ConfigError, match=r"task\.params\.degre: Extra inputs"):
        load_config(write(tmp_path, "task: {name: star_graph, params: {degre: 3}}\n"))
    # Task params and the other fields are reported together.
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "task: {name: jsonl}\nslow: {lr: fast}\n"))
    assert "task.params.path: Field required" in str(e.value) and "slow.lr" in str(e.value)


def test_task_params_are_validated_once_and_kept_typed(monkeypatch):
    validated: list[int] = []

    class CountingParams(Schema):
        level_count: int = 1

        @field_validator("level_count")
        @classmethod
        def _count(cls, v: int) -> int:
            validated.append(v)
            return v

    def build(cfg):
        return SimpleNamespace(name="counting", params=params_of(cfg, CountingParams))

    monkeypatch.setitem(tasks.TASKS, "counting", tasks.TaskSpec(CountingParams, build))
    cfg = TaskConfig(name="counting", params={"level_count": 3})
    assert validated == [3]
    assert isinstance(cfg.typed_params, CountingParams) and cfg.typed_params.level_count == 3
    assert cfg.params == {"levelCount": 3}  # canonical: camelCase keys, defaults included
    assert tasks.build_task(cfg).params is cfg.typed_params
    assert validated == [3]  # the builder used the typed params, it did not validate again


def test_task_name_and_params_are_fixed_once_validated():
    cfg = TaskConfig(name="arithmetic", params={"steps": 2})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.params = {"steps": 5}
    with pytest.raises(ValidationError, match="frozen"):
        cfg.name = "star_graph"
    cfg.seed = 3  # the other fields stay assignable
    assert cfg.typed_params.model_dump() == {
        "steps": 2,
        "max_operand": 20,
        "ops": ["+", "-", "*"],
        "answer_format": "boxed",
        "hidden_op": None,
        "non_negative": False,
    }


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.yaml:3:\d+: YAML syntax error"):
        load_config(write(tmp_path, "task:\n  name: arithmetic\n   seed: 1\nsteps: 2\n"))


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_set_nested_fields_with_yaml_values(tmp_path):
    cfg = load_config(
        write(tmp_path, "task: {name: arithmetic}\n"),
        ["slow.lr=2e-5", "steps=3", "model.lora.rank=4", "rollout.topP=0.9"],
    )
    assert cfg.slow.lr == 2e-5 and cfg.steps == 3 and cfg.model.lora.rank == 4
    assert cfg.rollout.top_p == 0.9


def test_bad_override_is_an_error():
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="steps is not a mapping"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_run_name_must_be_a_dns_label():
    with pytest.raises(ConfigError, match="run"):
        validate_config({"task": {"name": "arithmetic"}, "run": "My_Run"})


def test_defaults_are_the_paper_settings():
    cfg = TrainConfig(task={"name": "arithmetic"})
    assert cfg.slow.loss == "cispo" and cfg.slow.eps_max == 5.0
    assert cfg.model.name == "smollm2-135m-instruct"


def test_autocast_needs_float32_master_weights():
    from pydantic import ValidationError

    from fst.config import ModelConfig

    assert ModelConfig(autocast="bfloat16").autocast == "bfloat16"
    with pytest.raises(ValidationError, match="autocast: bfloat16 keeps float32 master weights"):
        ModelConfig(autocast="bfloat16", dtype="bfloat16")
