from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from fst.config import TaskConfig
from fst.tasks import build_task
from fst.tasks.codeio import (
    TEMPLATES,
    CodeIOTask,
    SandboxUnavailableError,
    run_sandboxed,
    score_output,
)


def make_task(seed: int = 0, sizes: tuple[int, int, int] = (8, 8, 4), **params) -> CodeIOTask:
    train, val, test = sizes
    cfg = TaskConfig(
        name="codeio", seed=seed, train_size=train, val_size=val, test_size=test, params=params
    )
    task = build_task(cfg)
    assert isinstance(task, CodeIOTask)
    return task


# ----------------------------------------------------------------------------- sandbox


def test_sandbox_runs_normal_code() -> None:
    res = run_sandboxed("def f(x):\n    return x * x\nprint(repr(f(7)))\n")
    assert res.ok and res.error is None
    assert res.stdout == "49\n"


def test_sandbox_reports_exceptions() -> None:
    res = run_sandboxed("print('partial')\nraise KeyError('boom')")
    assert not res.ok
    assert res.stdout == "partial\n"
    assert res.error is not None and "KeyError" in res.error and "boom" in res.error


def test_sandbox_stops_infinite_loop() -> None:
    start = time.monotonic()
    res = run_sandboxed("while True:\n    pass\n", timeout_s=0.5)
    assert time.monotonic() - start < 4.0
    assert not res.ok and res.error is not None and "timeout" in res.error


@pytest.mark.parametrize(
    "code",
    [
        'import socket\nsocket.create_connection(("127.0.0.1", 9))',
        'import urllib.request\nurllib.request.urlopen("http://127.0.0.1:9")',
        "import _socket\n_socket.socket()",
    ],
)
def test_sandbox_blocks_network(code: str) -> None:
    res = run_sandboxed(code)
    assert not res.ok and res.error is not None
    assert "blocked" in res.error and "network" in res.error


@pytest.mark.parametrize(
    "code",
    [
        "x = bytearray(4 * 1024 ** 3)",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))",
    ],
)
def test_sandbox_stops_memory_bomb(code: str) -> None:
    res = run_sandboxed(code, timeout_s=5.0, memory_mb=128)
    assert not res.ok and res.error is not None
    assert "memory" in res.error.lower()


@pytest.mark.parametrize(
    "code",
    [
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.fork()",
        "import ctypes",
    ],
)
def test_sandbox_blocks_processes_and_native_code(code: str) -> None:
    res = run_sandboxed(code)
    assert not res.ok and res.error is not None and "blocked" in res.error


def test_sandbox_confines_writes(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    res = run_sandboxed(f"open({str(target)!r}, 'w').write('x')")
    assert not res.ok and res.error is not None and "blocked" in res.error
    assert not target.exists()
    # Scratch files in the sandbox's own working directory are fine.
    res = run_sandboxed("open('scratch.txt', 'w').write('hi')\nprint(open('scratch.txt').read())")
    assert res.ok and res.stdout == "hi\n"


def test_sandbox_environment_is_empty() -> None:
    res = run_sandboxed("import os, sys\nprint(sorted(os.environ), sys.flags.isolated)")
    assert res.ok
    assert "HOME" not in res.stdout and res.stdout.strip().endswith("1")


def test_sandbox_hook_cannot_be_dodged() -> None:
    res = run_sandboxed("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert not res.ok and "blocked" in (res.error or "")
    res = run_sandboxed("import gc\ngc.get_objects()")
    assert not res.ok and "blocked" in (res.error or "")


def test_sandbox_caps_output() -> None:
    res = run_sandboxed("while True:\n    print('x' * 100000)", timeout_s=5.0)
    assert not res.ok and "output limit" in (res.error or "")


# ----------------------------------------------------------------------------- problems


def test_answers_match_in_process_evaluation() -> None:
    task = make_task(sizes=(80, 4, 4))
    problems = task.problems("train")
    assert set(Counter(p.meta["template"] for p in problems)) == set(TEMPLATES)
    for p in problems:
        ns: dict = {}
        exec(p.meta["code"], ns)
        assert repr(eval(p.meta["call"], ns)) == p.answer
        assert p.meta["code"] in p.prompt and p.meta["call"] in p.prompt
        assert task.score(p, f"It returns \\boxed{{{p.answer}}}").reward == 1.0


def test_problems_fail_closed_without_a_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap here: never run the code unsandboxed
    with pytest.raises(SandboxUnavailableError, match=r"bubblewrap \('bwrap'\) not found"):
        make_task().problems("test")


def test_template_selection() -> None:
    task = make_task(templates=["recursion", "dict_count"])
    assert {p.meta["template"] for p in task.problems("val")} <= {"recursion", "dict_count"}
    with pytest.raises(ValidationError, match=r"params\.templates"):
        TaskConfig(name="codeio", params={"templates": ["nope"]})
    with pytest.raises(ValidationError, match=r"params\.timeoutS"):
        TaskConfig(name="codeio", params={"timeoutS": 0})


def test_deterministic_and_disjoint() -> None:
    a, b = make_task(seed=5), make_task(seed=5)
    prompts = []
    for split in ("train", "val", "test"):
        assert a.problems(split) == b.problems(split) == a.problems(split)
        prompts += [p.prompt for p in a.problems(split)]
    assert len(prompts) == len(set(prompts)) == 20
    assert a.problems("test")[0].id == "codeio-test-0"


# ----------------------------------------------------------------------------- scoring


def test_score_correct_variants() -> None:
    for completion in [
        "\\boxed{[1, 4, 9]}",
        "\\boxed{[1,4,9]}",
        "\\boxed{`[1, 4, 9]`}",
        "first \\boxed{[0]} then \\boxed{ [1, 4, 9] }",
    ]:
        assert score_output("[1, 4, 9]", completion).reward == 1.0, completion
    assert score_output("{'a': 1, 'b': 2}", "\\boxed{{'b': 2, 'a': 1}}").reward == 1.0
    assert score_output("'abc'", '\\boxed{"abc"}').reward == 1.0


def test_score_wrong_value() -> None:
    s = score_output("[1, 4, 9]", "\\boxed{[1, 4]}")
    assert s.reward == 0.0
    assert "expected [1, 4, 9], got [1, 4]" in s.feedback


def test_score_type_mismatch_and_format_failures() -> None:
    s = score_output("(3, 5)", "\\boxed{[3, 5]}")
    assert s.reward == 0.0 and "tuple" in s.feedback
    assert score_output("1", "\\boxed{True}").reward == 0.0
    assert score_output("4", "\\boxed{4.0}").reward == 0.0
    s = score_output("'abc'", "\\boxed{abc}")
    assert s.reward == 0.0 and "not a valid Python literal" in s.feedback
    s = score_output("[1]", "[1]")
    assert s.reward == 0.0 and "No \\boxed" in s.feedback
