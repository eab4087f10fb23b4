"""Untrusted input, the pure pieces: the YAML loader (size, encoding, aliases, duplicate keys),
size limits on prompts and data lines, one-line validation errors that never echo a huge
input, secret redaction, the reflector's apiKeyEnv, the planner's rename/reorder check, the
NaN guard of the slow trainer, and the CLI's error reporting. The same inputs through the
real `fst` CLI: tests/integration/test_cli_bad_input.py."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
import yaml

from fst import cli
from fst.config import (
    SECRET_ENV_NAMES,
    ConfigError,
    ReflectorConfig,
    SlowConfig,
    TrainConfig,
    apply_overrides,
    dump_config,
    load_config,
    public_config,
    redact_url,
    validate_config,
)
from fst.k8s.api import TaskStream
from fst.plan import StageRun, StageStatus, check_history, stage_spec
from fst.rollout import Rollout
from fst.schema import MAX_PROMPT_CHARS, MAX_RECORD_CHARS
from fst.slow.trainer import DivergedError, SlowTrainer
from fst.tasks.jsonl import DataError, read_records
from fst.yamlio import MAX_YAML_BYTES, load_yaml

TASK = "task: {name: arithmetic}\n"


def write(tmp_path, text: str | bytes, name: str = "cfg.yaml"):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        refs = ",".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- YAML


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    path = write(tmp_path, TASK + billion_laughs())  # 10^10 nodes once expanded
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert time.perf_counter() - t0 < 5  # a loose sanity bound: it takes milliseconds
    msg = str(e.value)
    assert "cfg.yaml:" in msg and "alias bomb" in msg and "\n" not in msg and len(msg) < 300


def test_an_alias_bomb_in_an_override_value_is_refused():
    # Seven levels of ten, each level ten copies of the last: 10^7 nodes.
    value = "[&a0 [1,1,1,1,1,1,1,1,1,1]"
    value += "".join(f", &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)) + "]"
    with pytest.raises(ConfigError, match=r"--override slow\.lr:1:\d+: .*alias bomb"):
        apply_overrides({}, [f"slow.lr={value}"])


def test_a_recursive_alias_and_deep_nesting_are_refused():
    with pytest.raises(ConfigError, match="refers to itself"):
        load_yaml("a: &a [*a]\n", "f.yaml")
    with pytest.raises(ConfigError, match=r"f\.yaml"):
        load_yaml("[" * 100_000, "f.yaml")
    with pytest.raises(ConfigError, match=r"f\.yaml:1:\d+: YAML nested more than"):
        load_yaml("[" * 100 + "]" * 100, "f.yaml")


def test_anchors_and_merge_keys_still_work():
    doc = load_yaml("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\ne: *b\n", "f.yaml")
    assert doc == {"base": {"x": 1, "y": 2}, "d": {"x": 3, "y": 2}, "e": {"x": 1, "y": 2}}


def test_duplicate_keys_name_both_lines(tmp_path):
    path = write(tmp_path, TASK + "slow:\n  lr: 1.0e-5\n  groupSize: 4\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path}:5:3: duplicate key 'lr' (first at line 3); a key may appear once in a mapping"
    )
    with pytest.raises(ConfigError, match=r"cfg\.yaml:2:1: duplicate key 'task' \(first at line 1"):
        load_config(write(tmp_path, TASK + TASK))
    with pytest.raises(ConfigError, match=r"--override slow:1:\d+: duplicate key 'lr'"):
        apply_overrides({}, ["slow={lr: 1, lr: 2}"])


def test_file_size_and_encoding_are_checked_before_parsing(tmp_path):
    big = write(tmp_path, TASK + "#" + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: \d+ bytes is too large for a config file"):
        load_config(big)
    latin1 = write(tmp_path, (TASK + "seed: 1\nrun: caf\xe9\n").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"cfg\.yaml:3: the config file is not UTF-8 text"):
        load_config(latin1)
    with pytest.raises(ConfigError, match=r"cannot read the config file: Is a directory"):
        load_config(tmp_path)
    bom = write(tmp_path, "\ufeff" + TASK)  # a BOM is fine
    assert load_config(bom).task.name == "arithmetic"


# ----------------------------------------------------------------------------- limits


def test_prompt_size_limits_name_the_field_and_do_not_echo_the_prompt():
    huge = "p" * (10 * 1024 * 1024)
    with pytest.raises(ConfigError) as e:
        validate_config({"task": {"name": "arithmetic"}, "fast": {"seedPrompt": huge}}, "cfg")
    msg = str(e.value)
    assert "fast.seedPrompt" in msg and f"at most {MAX_PROMPT_CHARS}" in msg
    assert "\n" not in msg and len(msg) < 400
    ok = "p" * MAX_PROMPT_CHARS
    validate_config({"task": {"name": "arithmetic"}, "fast": {"seedPrompt": ok}})
    with pytest.raises(ConfigError, match=r"fast\.initialPopulation: member 1: a prompt of"):
        validate_config(
            {"task": {"name": "arithmetic"}, "fast": {"initialPopulation": ["a", ok + "p"]}}
        )
    with pytest.raises(ConfigError, match=r"fast\.initialPopulation: 300 prompts; at most 256"):
        validate_config(
            {"task": {"name": "arithmetic"}, "fast": {"initialPopulation": ["a"] * 300}}
        )


def test_validation_errors_are_one_line_and_quote_inputs_short():
    nested = [[list(range(1000))] * 1000] * 1000  # a huge (shared) structure: never repr'd whole
    with pytest.raises(ConfigError) as e:
        validate_config({"task": {"name": "arithmetic"}, "steps": nested, "seed": "x"}, "cfg")
    msg = str(e.value)
    assert msg.startswith("cfg: invalid configuration (2 problems): steps: ")
    assert "; seed: " in msg and "\n" not in msg and len(msg) < 500


def test_data_lines_have_a_size_limit_and_name_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"question": "q", "answer": "a"})
    path.write_text(
        f"{good}\n\n{json.dumps({'question': 'x' * MAX_RECORD_CHARS, 'answer': 'a'})}\n"
    )
    with pytest.raises(DataError, match=r"data\.jsonl:3: a record of \d+ characters; at most"):
        read_records(path)
    path.write_text(f"{good}\n" + "[" * 50_000 + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl:2: invalid JSON"):
        read_records(path)
    path.write_bytes(f"{good}\n".encode() + b'{"question": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: not UTF-8 text"):
        read_records(path)


def test_an_s3_data_path_without_credentials_fails_at_once(monkeypatch):
    for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(v, raising=False)
    t0 = time.perf_counter()
    with pytest.raises(
        DataError, match=r"s3://b/data\.jsonl: no S3 credentials: AWS_ACCESS_KEY_ID"
    ):
        read_records("s3://b/data.jsonl")
    assert time.perf_counter() - t0 < 5  # no minute of retried anonymous requests


# ----------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://fst:s3cret@db:5432/fst", "postgresql+psycopg://fst:***@db:5432/fst"),
        ("postgresql://fst:p@ss:w@db/fst", "postgresql://fst:***@db/fst"),
        (
            "postgresql://db/fst?user=fst&password=s3cret",
            "postgresql://db/fst?user=fst&password=***",
        ),
        ("postgresql+psycopg://fst@db/fst", "postgresql+psycopg://fst@db/fst"),
        ("/var/lib/fst.db", "/var/lib/fst.db"),
        ("error: cannot reach mysql://u:pw@h/db now", "error: cannot reach mysql://u:***@h/db now"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_persisted_configs_hide_the_database_password_the_live_one_keeps_it():
    url = "postgresql+psycopg://fst:s3cret@db:5432/fst"
    cfg = validate_config({"task": {"name": "arithmetic"}, "database": url})
    assert "s3cret" not in dump_config(cfg) and "fst:***@db" in dump_config(cfg)
    assert public_config(cfg)["database"] == "postgresql+psycopg://fst:***@db:5432/fst"
    assert cfg.database == url  # what the process connects with


@pytest.mark.parametrize(
    "name", ["FST_DATABASE_URL", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "DATABASE_URL", "fst_x"]
)
def test_api_key_env_may_not_name_a_credential(name):
    assert "DATABASE_URL" in SECRET_ENV_NAMES
    with pytest.raises(ConfigError) as e:
        validate_config(
            {
                "task": {"name": "arithmetic"},
                "fast": {
                    "reflector": {
                        "kind": "openai",
                        "baseUrl": "http://x/v1",
                        "model": "m",
                        "apiKeyEnv": name,
                    }
                },
            },
            "cfg",
        )
    assert "fast.reflector.apiKeyEnv" in str(e.value) and "credentials" in str(e.value)


def test_api_key_env_accepts_a_key_of_its_own():
    for name in ("OPENAI_API_KEY", "HF_TOKEN", "VLLM_KEY"):
        assert ReflectorConfig(api_key_env=name).api_key_env == name
    with pytest.raises(ValueError, match="not an environment variable name"):
        ReflectorConfig(api_key_env="A B")


# ----------------------------------------------------------------------------- the planner


STREAM = {
    "apiVersion": "fastslow.io/v1alpha1",
    "kind": "TaskStream",
    "metadata": {"name": "acme"},
    "spec": {
        "stages": [
            {"name": "one", "task": {"name": "arithmetic"}, "steps": 1},
            {"name": "two", "task": {"name": "star_graph"}, "steps": 1},
        ]
    },
}


def stream_with(*names: str) -> TaskStream:
    doc = copy.deepcopy(STREAM)
    by_name = {s["name"]: s for s in doc["spec"]["stages"]}
    doc["spec"]["stages"] = [
        by_name.get(n, {"name": n, "task": {"name": "arithmetic"}, "steps": 1}) for n in names
    ]
    return TaskStream.model_validate(doc)


def ran(*names: str, status=StageStatus.SUCCEEDED) -> list[StageRun]:
    return [StageRun(stage=n, version=1, run=f"acme-{n}", status=status) for n in names]


def test_history_accepts_the_same_stages_new_ones_at_the_end_and_new_versions():
    check_history(stream_with("one", "two"), ran("one", "two"), "s.yaml")
    check_history(stream_with("one", "two", "three"), ran("one", "two"), "s.yaml")
    check_history(stream_with("one", "two"), ran("one"), "s.yaml")
    v2 = StageRun(stage="one", version=2, run="acme-one-v2")
    check_history(stream_with("one", "two"), [*ran("one", "two"), v2], "s.yaml")
    check_history(stream_with("one", "two"), [], "s.yaml")


def test_a_renamed_or_removed_stage_is_named():
    with pytest.raises(ConfigError) as e:
        check_history(stream_with("one", "deux"), ran("one", "two"), "s.yaml")
    assert str(e.value).startswith("s.yaml: spec.stages: stage 'two' (renamed to 'deux'?) is gone")
    assert "acme-two, succeeded" in str(e.value)
    with pytest.raises(
        ConfigError, match=r"stage 'one' \(renamed to 'two'\?\) is gone from the manifest"
    ):
        check_history(stream_with("two"), ran("one", status=StageStatus.RUNNING), "s.yaml")


def test_a_reordered_stage_or_one_inserted_before_a_stage_that_ran_is_named():
    with pytest.raises(ConfigError, match=r"spec\.stages\.0 \(two\): expected stage 'one' here"):
        check_history(stream_with("two", "one"), ran("one", "two"), "s.yaml")
    with pytest.raises(ConfigError, match=r"spec\.stages\.1 \(new\): expected stage 'two' here"):
        check_history(stream_with("one", "new", "two"), ran("one", "two"), "s.yaml")


def test_stage_spec_of_an_unknown_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="no stage named 'gone'"):
        stage_spec(stream_with("one"), "gone")


# ----------------------------------------------------------------------------- NaN guard


def _rollouts(model, n: int = 4) -> list[Rollout]:
    out = []
    for i in range(n):
        p, c = [1, 2, 3], [4 + i, 5]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0, :-1].float(), -1)
        out.append(
            Rollout(p, c, [float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(c)], "", True)
        )
    return out


def test_a_non_finite_loss_refuses_the_update(tiny_llama):
    rs = _rollouts(tiny_llama)
    rs[0] = Rollout(rs[0].prompt_ids, rs[0].completion_ids, [float("nan")] * 2, "", True)
    before = [p.detach().clone() for p in tiny_llama.parameters()]
    trainer = SlowTrainer(tiny_llama, SlowConfig(lr=1e-2), 1.0, pad_id=0)
    with pytest.raises(DivergedError, match="the loss is nan; the update was refused"):
        trainer.step(rs, [1.0, -1.0, 1.0, -1.0])
    for a, b in zip(before, tiny_llama.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_update_that_breaks_the_model_is_reported(tiny_llama):
    rs = _rollouts(tiny_llama)
    trainer = SlowTrainer(tiny_llama, SlowConfig(lr=1e-2), 1.0, pad_id=0)
    step = trainer.optimizer.step

    def overflowing_step(*args, **kwargs):  # what a huge learning rate does to some models
        step(*args, **kwargs)
        with torch.no_grad():
            tiny_llama.model.layers[0].mlp.down_proj.weight.fill_(float("inf"))

    trainer.optimizer.step = overflowing_step
    with pytest.raises(DivergedError, match="the update made the model's outputs NaN or infinite"):
        trainer.step(rs, [1.0, -1.0, 1.0, -1.0])


def test_no_upper_bound_on_lr_in_the_schema():
    # 1e9 is accepted by the schema (the guard stops the run); the CRD stays as generated.
    assert SlowConfig(lr=1e9).lr == 1e9
    assert TrainConfig(task={"name": "arithmetic"}, slow={"lr": 1e9}).slow.lr == 1e9


# ----------------------------------------------------------------------------- the CLI


def _fail_with(monkeypatch, error: BaseException) -> None:
    def boom(args):
        raise error

    monkeypatch.setattr(cli, "cmd_report", boom)


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (ConfigError("cfg.yaml: steps: bad\n  more"), "error: cfg.yaml: steps: bad; more"),
        (
            FileNotFoundError(2, "No such file or directory", "/x/y"),
            "error: /x/y: No such file or directory",
        ),
        (IsADirectoryError(21, "Is a directory", "/x"), "error: /x: Is a directory"),
        (DivergedError("step 3: diverged"), "error: step 3: diverged"),
        (yaml.YAMLError("bad"), "error: YAML error: bad"),
    ],
)
def test_anticipated_errors_are_one_line_and_exit_2(monkeypatch, capsys, error, shown):
    _fail_with(monkeypatch, error)
    assert cli.main(["report", "x"]) == 2
    err = capsys.readouterr().err
    assert err == shown + "\n" and "Traceback" not in err


def test_a_bug_is_an_internal_error_and_debug_shows_the_traceback(monkeypatch, capsys):
    _fail_with(monkeypatch, ZeroDivisionError("division by zero"))
    assert cli.main(["report", "x"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "internal error: ZeroDivisionError: division by zero (run with --debug for the traceback)\n"
    )
    assert cli.main(["--debug", "report", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("for the traceback)\n")


def test_a_huge_error_message_is_cut(monkeypatch, capsys):
    _fail_with(monkeypatch, ConfigError("x" * 100_000))
    assert cli.main(["report", "x"]) == 2
    err = capsys.readouterr().err
    assert len(err) <= cli.MAX_ERROR_CHARS + 10 and err.count("\n") == 1


def test_output_dir_that_is_a_file_is_named(tmp_path):
    from fst.loop import check_output_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"outputDir: .*/f is a file, not a folder"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match=r"outputDir: .*/f/runs is under .*/f, which is a file"):
        check_output_dir(tmp_path / "f" / "runs")
    check_output_dir(tmp_path / "new" / "runs")  # nothing created
    assert not (tmp_path / "new").exists()


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    from fst.config import ModelConfig
    from fst.model import ModelLoadError, load_policy, load_tokenizer

    with pytest.raises(ModelLoadError, match=r"model\.name: .* is not a model folder \(no config"):
        load_tokenizer(ModelConfig(name=str(tmp_path)))
    (tmp_path / "config.json").write_text("{garbage")
    with pytest.raises(ModelLoadError, match=r"model\.name: .*: not a loadable model: "):
        load_policy(ModelConfig(name=str(tmp_path)))


# ----------------------------------------------------------------------------- stream state


def test_a_stage_that_never_started_leaves_no_entry_and_a_failed_one_says_why(
    tmp_path, monkeypatch
):
    from fst import loop
    from fst.store.db import RunDB, database_url
    from fst.stream import StreamRunner, load_stream

    doc = copy.deepcopy(STREAM)
    doc["spec"].update(outputDir=str(tmp_path / "runs"), evalProblems=0)
    path = write(tmp_path, yaml.safe_dump(doc), "stream.yaml")
    runner = StreamRunner(load_stream(path), progress=False, source=str(path))

    def never_starts(cfg, resume, progress, on_start):
        raise ConfigError("task (jsonl): data.jsonl: cannot read: No such file or directory")

    monkeypatch.setattr(loop, "train", never_starts)
    with pytest.raises(ConfigError, match=r"stream\.yaml: stage one \(run acme-one\): task"):
        runner.run_pending()
    assert runner.state.runs == [] and not (runner.dir / "stream.json").exists()

    def diverges(cfg, resume, progress, on_start):
        on_start()
        raise DivergedError("step 1: training diverged")

    monkeypatch.setattr(loop, "train", diverges)
    with pytest.raises(DivergedError):
        runner.run_pending()
    entries = json.loads((runner.dir / "stream.json").read_text())["stages"]
    assert [(e["name"], e["status"], e["error"]) for e in entries] == [
        ("one", "failed", "step 1: training diverged")
    ]
    stages = RunDB(database_url(None, tmp_path / "runs" / "acme" / "fst.db")).stages("acme")
    assert [(s.name, s.status) for s in stages] == [("one", "failed")]
    # Retried by the next run; a failure before it starts keeps the reason, not "running".
    monkeypatch.setattr(loop, "train", never_starts)
    with pytest.raises(ConfigError):
        StreamRunner(load_stream(path), progress=False, source=str(path)).run_pending()
    entries = json.loads((runner.dir / "stream.json").read_text())["stages"]
    assert [(e["status"], e["error"][:12]) for e in entries] == [("failed", "task (jsonl)")]
