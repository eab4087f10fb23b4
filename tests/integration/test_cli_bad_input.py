"""Bad input through the real `fst` CLI, as a new user would try it: every case ends with ONE
line `error: ...` naming the field, file or line, exit code 2, no traceback, and what was
saved before (a run's checkpoints, a stream's stream.json, the database) is unchanged.

Runs use the tiny model (tests/tiny_model.py): a training step takes well under a second.
The pure pieces are tested in tests/unit/test_bad_input.py."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import fst_cmd, run_fst
from tests.tiny_model import tiny_model_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

ARITH = {
    "name": "arithmetic",
    "trainSize": 12,
    "valSize": 2,
    "testSize": 2,
    # Sums of small numbers: a random model's last digit is right now and then, so most steps
    # have reward variance and update the weights.
    "params": {"steps": 1, "maxOperand": 5, "ops": ["+"], "answerFormat": "last_number"},
}


def base_config(root: Path, model: Path, **changes) -> dict:
    cfg = {
        "run": "good",
        "mode": "rl",
        "steps": 2,
        "seed": 3,
        "outputDir": str(root / "runs"),
        "model": {"name": str(model)},
        "task": ARITH,
        "rollout": {"temperature": 1.0, "maxNewTokens": 8, "batchSize": 32},
        "slow": {"problemsPerStep": 4, "groupSize": 8, "lr": 1e-2, "microBatchSize": 32},
        "metrics": {"klPrompts": 0},
        "checkpoint": {"every": 1, "keepLast": 100},
    }
    cfg = copy.deepcopy(cfg)
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def write(path: Path, data: dict | str | bytes) -> Path:
    if isinstance(data, dict):
        data = yaml.safe_dump(data, sort_keys=False)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def fails(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run `fst ARGS`; assert exit code 2, a last stderr line `error: ...` (the only one), no
    traceback; return the message."""
    proc = subprocess.run(fst_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env)
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err[-3000:]
    return errors[0].removeprefix("error: ")


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (no lock files)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def db_ok(path: Path, run: str) -> None:
    """The SQLite database is intact and still knows `run`, finished."""
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        status = conn.execute("SELECT status FROM runs WHERE name = ?", (run,)).fetchone()
    assert status == ("finished",)


# ----------------------------------------------------------------------------- fst train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):  # noqa: F811
    """A finished 2-step run `good` (checkpoints at steps 1 and 2) that every bad command below
    then targets with --resume: it must come out unchanged."""
    root = tmp_path_factory.mktemp("bad-input")
    cfg = base_config(root, tiny_model_dir)
    path = write(root / "good.yaml", cfg)
    run_fst("train", "-c", str(path), "--no-progress")
    run_dir = root / "runs" / "good"
    return root, cfg, run_dir, snapshot(run_dir / "checkpoints")


def unchanged(trained) -> None:
    root, _, run_dir, before = trained
    assert snapshot(run_dir / "checkpoints") == before
    db_ok(root / "runs" / "fst.db", "good")


def test_a_learning_rate_of_1e9_stops_before_the_bad_step_is_saved(trained):
    root, cfg, _, _ = trained
    bad = {**base_config(root, Path(cfg["model"]["name"]), run="nan", steps=6)}
    bad["slow"]["lr"] = 1e9
    msg = fails("train", "-c", str(write(root / "nan.yaml", bad)), "--no-progress")
    assert "training diverged" in msg and "slow.lr=1e+09 too large?" in msg, msg
    step = int(msg.split(":")[0].removeprefix("step "))
    assert f"nothing of step {step} was saved" in msg
    ckpts = root / "runs" / "nan" / "checkpoints"
    saved = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert all(s < step for s in saved), (step, saved)  # none of the bad step or later
    metrics = root / "runs" / "nan" / "metrics.jsonl"
    steps = (
        [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        if (metrics.exists())
        else []
    )
    assert steps == list(range(1, step))
    unchanged(trained)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("seed prompt of 100 KB", ["fast.seedPrompt", "a prompt of 100000 characters"]),
        ("initialPopulation member of 20 KB", ["fast.initialPopulation", "member 1"]),
        ("config file of 2 MB", ["bad.yaml: ", "too large for a config file"]),
        ("config in Latin-1", ["bad.yaml:{tail}: the config file is not UTF-8 text"]),
        ("alias bomb", ["bad.yaml:", "alias bomb"]),
        ("duplicate key", ["bad.yaml:{tail}:1: duplicate key 'steps' (first at line 3)"]),
        ("apiKeyEnv FST_DATABASE_URL", ["fast.reflector.apiKeyEnv", "FST_DATABASE_URL"]),
        ("empty model folder", ["model.name: ", "/empty is not a model folder (no config.json"]),
        ("garbage model folder", ["model.name: ", "/garbage: not a loadable model: "]),
        ("outputDir is a file", ["outputDir: ", "/a-file is a file, not a folder"]),
        ("data line of 100 KB", ["data.jsonl:3: a record of 100031 characters; at most 65536"]),
    ],
)
def test_bad_config(trained, case, expected):
    root, cfg, _, _ = trained
    tail = ""
    bad = copy.deepcopy(cfg)
    if case == "seed prompt of 100 KB":
        bad["fast"] = {"seedPrompt": "a" * 100_000}
    elif case == "initialPopulation member of 20 KB":
        bad["mode"] = "fst"
        bad["fast"] = {"initialPopulation": ["short", "b" * 20_000], "topK": 2}
    elif case == "config file of 2 MB":
        tail = "# " + "c" * 2_000_000 + "\n"
    elif case == "config in Latin-1":
        tail = "# caf\xe9\n"
    elif case == "alias bomb":
        tail = "x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
            f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]\n" for i in range(1, 10)
        )
    elif case == "duplicate key":
        tail = "steps: 5\n"
    elif case == "apiKeyEnv FST_DATABASE_URL":
        bad["mode"] = "fst"
        bad["fast"] = {
            "topK": 2,
            "reflector": {
                "kind": "openai",
                "model": "m",
                "baseUrl": "http://127.0.0.1:9/v1",
                "apiKeyEnv": "FST_DATABASE_URL",
            },
        }
    elif case == "empty model folder":
        (root / "empty").mkdir(exist_ok=True)
        bad["model"] = {"name": str(root / "empty")}
    elif case == "garbage model folder":
        garbage = root / "garbage"
        garbage.mkdir(exist_ok=True)
        for f in Path(cfg["model"]["name"]).iterdir():
            if f.suffix != ".safetensors":
                (garbage / f.name).write_bytes(f.read_bytes())
        (garbage / "model.safetensors").write_bytes(os.urandom(1000))
        bad["model"] = {"name": str(garbage)}
    elif case == "outputDir is a file":
        (root / "a-file").write_text("not a folder")
        bad["outputDir"] = str(root / "a-file")
    elif case == "data line of 100 KB":
        data = root / "data.jsonl"
        line = json.dumps({"question": "What is 1+1?", "answer": "2"})
        big = json.dumps({"question": "x" * 100_000, "answer": "2"})
        data.write_text(f"{line}\n{line}\n{big}\n")
        bad["task"] = {"name": "jsonl", "valSize": 1, "testSize": 1, "params": {"path": str(data)}}
    text = yaml.safe_dump(bad, sort_keys=False).encode("latin-1" if "Latin" in case else "utf-8")
    path = write(root / "bad.yaml", text + tail.encode("latin-1"))
    msg = fails("train", "-c", str(path), "--resume", "--no-progress")
    tail_line = text.count(b"\n") + 1
    for part in expected:
        assert part.format(tail=tail_line) in msg, msg
    assert len(msg) < 600
    unchanged(trained)


def test_an_s3_checkpoint_without_credentials(trained):
    root, cfg, _, _ = trained
    bad = copy.deepcopy(cfg)
    bad["checkpoint"]["uri"] = "s3://bucket/good"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    msg = fails("train", "-c", str(write(root / "s3.yaml", bad)), "--resume", env=env)
    assert msg.startswith("checkpoint.uri: s3://bucket/good: no S3 credentials: AWS_ACCESS_KEY_ID")
    unchanged(trained)


def test_a_bad_override_value(trained):
    root, cfg, _, _ = trained
    path = write(root / "ok.yaml", cfg)
    msg = fails("train", "-c", str(path), "--resume", "--override", "slow={lr: 1, lr: 2}")
    assert msg.startswith("--override slow:1:9: duplicate key 'lr' (first at line 1)"), msg
    unchanged(trained)


# ----------------------------------------------------------------------------- fst stream


def stream_doc(root: Path, model: Path, stages: list[dict]) -> dict:
    return {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "TaskStream",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"name": str(model)},
            "outputDir": str(root / "runs"),
            "evalProblems": 0,
            "defaults": {
                "mode": "rl",
                "rollout": {"maxNewTokens": 4, "batchSize": 16},
                "slow": {"problemsPerStep": 1, "groupSize": 2, "lr": 1e-3},
                "metrics": {"klPrompts": 0},
                "checkpoint": {"every": 1, "keepLast": 2},
            },
            "stages": stages,
        },
    }


def stage(name: str, data: Path | None = None) -> dict:
    if data is None:
        return {"name": name, "steps": 1, "task": ARITH}
    task = {"name": "jsonl", "valSize": 1, "testSize": 1, "params": {"path": str(data)}}
    return {"name": name, "steps": 1, "task": task}


@pytest.fixture(scope="module")
def stream(tmp_path_factory, tiny_model_dir):  # noqa: F811
    """A finished two-stage stream; the bad manifests below must leave its state unchanged."""
    root = tmp_path_factory.mktemp("bad-stream")
    qa = root / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(6))
    )
    doc = stream_doc(root, tiny_model_dir, [stage("first"), stage("second", qa)])
    path = write(root / "stream.yaml", doc)
    run_fst("stream", str(path), "--no-progress")
    state = root / "runs" / "tiny" / "stream.json"
    entries = json.loads(state.read_text())["stages"]
    assert [(e["name"], e["status"]) for e in entries] == [
        ("first", "succeeded"),
        ("second", "succeeded"),
    ]
    return root, doc, state.read_bytes()


def stream_unchanged(stream) -> None:
    root, _, before = stream
    assert (root / "runs" / "tiny" / "stream.json").read_bytes() == before
    with sqlite3.connect(root / "runs" / "tiny" / "fst.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = conn.execute('SELECT name, status FROM stages ORDER BY "index"').fetchall()
    assert rows == [("first", "succeeded"), ("second", "succeeded")]


def test_a_renamed_stage_is_refused(stream):
    root, doc, _ = stream
    bad = copy.deepcopy(doc)
    bad["spec"]["stages"][1]["name"] = "second-renamed"
    msg = fails("stream", str(write(root / "renamed.yaml", bad)), "--no-progress")
    assert msg.startswith(
        f"{root / 'renamed.yaml'}: spec.stages: stage 'second' (renamed to 'second-renamed'?) "
        "is gone from the manifest, but it has run (tiny-second, succeeded)"
    ), msg
    stream_unchanged(stream)


def test_reordered_stages_are_refused(stream):
    root, doc, _ = stream
    bad = copy.deepcopy(doc)
    bad["spec"]["stages"].reverse()
    msg = fails("stream", str(write(root / "reordered.yaml", bad)), "--no-progress")
    assert "spec.stages.0 (second): expected stage 'first' here" in msg, msg
    stream_unchanged(stream)


def test_a_missing_data_file_leaves_no_running_stage(stream):
    root, doc, _ = stream
    bad = copy.deepcopy(doc)
    bad["spec"]["stages"].append(stage("third", root / "missing.jsonl"))
    msg = fails("stream", str(write(root / "missing.yaml", bad)), "--no-progress")
    assert msg.startswith(f"{root / 'missing.yaml'}: stage third (run tiny-third): task (jsonl): ")
    assert msg.endswith("missing.jsonl: cannot read: No such file or directory"), msg
    stream_unchanged(stream)  # no `running` entry for a stage that never started


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("manifest of 2 MB", "too large for a stream manifest (at most 1048576 bytes)"),
        ("manifest in Latin-1", "the stream manifest is not UTF-8 text"),
        ("alias bomb", "alias bomb"),
        ("duplicate stage key", "duplicate key 'steps'"),
        ("initialPopulation member of 20 KB", "fast.initialPopulation: member 0: a prompt of"),
    ],
)
def test_bad_manifest(stream, case, expected):
    root, doc, _ = stream
    text = yaml.safe_dump(doc, sort_keys=False)
    if case == "manifest of 2 MB":
        text += "# " + "c" * 2_000_000 + "\n"
    elif case == "alias bomb":
        text += "x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
            f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]\n" for i in range(1, 10)
        )
    elif case == "duplicate stage key":
        text = text.replace("  steps: 1\n", "  steps: 1\n    steps: 2\n", 1)
    elif case == "initialPopulation member of 20 KB":
        bad = copy.deepcopy(doc)
        bad["spec"]["defaults"]["fast"] = {"initialPopulation": ["p" * 20_000]}
        text = yaml.safe_dump(bad, sort_keys=False)
    data = text.encode()
    if case == "manifest in Latin-1":
        data += "# caf\xe9\n".encode("latin-1")
    msg = fails("stream", str(write(root / "bad-stream.yaml", data)), "--no-progress")
    assert str(root / "bad-stream.yaml") in msg and expected in msg, msg
    stream_unchanged(stream)


# ----------------------------------------------------------------------------- secrets


@pytest.mark.integration
def test_the_database_password_is_never_persisted(tmp_path, tiny_model_dir, pg_url):  # noqa: F811
    secret = "s3cret-pw"
    url = pg_url.replace("://fst@", f"://fst:{secret}@")  # the test server trusts any password
    cfg = base_config(tmp_path, tiny_model_dir, database=url, steps=1)
    path = write(tmp_path / "cfg.yaml", cfg)
    run_fst("train", "-c", str(path), "--no-progress")
    run_dir = tmp_path / "runs" / "good"
    written = [run_dir / "config.yaml", *run_dir.glob("checkpoints/step-*/config.yaml")]
    assert len(written) == 2
    for f in written:
        text = f.read_text()
        assert secret not in text and "://fst:***@" in text, f
    from fst.store.db import RunDB

    info = RunDB(url).run_info("good")
    assert info is not None and info["config"]["database"].startswith(
        "postgresql+psycopg://fst:***@"
    )
    assert secret not in json.dumps(info["config"])
    # A resume reads the URL from the user's config again, not from the redacted copies.
    cfg["steps"] = 2
    run_fst("train", "-c", str(write(tmp_path / "cfg.yaml", cfg)), "--resume", "--no-progress")
    assert (run_dir / "checkpoints" / "step-00000002").is_dir()
