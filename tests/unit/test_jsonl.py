from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from fst.config import TaskConfig
from fst.tasks import build_task
from fst.tasks.jsonl import (
    DataError,
    JsonlTask,
    normalize_answer,
    score_claim,
    score_gsm8k,
    score_qa,
    split_counts,
)

GSM8K = [
    {
        "question": "Janet has 3 apples and buys 15 more. How many apples?",
        "answer": "She has 3 + 15 = <<3+15=18>>18 apples.\n#### 18",
    },
    {
        "question": "A pen costs $2. How much do 600 pens cost?",
        "answer": "600 * 2 = <<600*2=1200>>1200\n#### 1,200",
    },
    {"question": "Tom runs 5 km a day. How far in 4 days?", "answer": "5 * 4 = 20\n#### 20"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_task(
    path: Path, sizes: tuple[int, int, int] = (1, 1, 1), seed: int = 0, **params
) -> JsonlTask:
    train, val, test = sizes
    cfg = TaskConfig(
        name="jsonl",
        seed=seed,
        train_size=train,
        val_size=val,
        test_size=test,
        params={"path": str(path), **params},
    )
    task = build_task(cfg)
    assert isinstance(task, JsonlTask)
    return task


def all_problems(task: JsonlTask) -> list:
    return [p for s in ("train", "val", "test") for p in task.problems(s)]


# ----------------------------------------------------------------------------- gsm8k


def test_gsm8k_file_and_scoring(tmp_path: Path) -> None:
    task = make_task(write_jsonl(tmp_path / "data.jsonl", GSM8K))
    assert task.format == "gsm8k"
    problems = all_problems(task)
    assert sorted(p.answer for p in problems) == ["1200", "18", "20"]
    p = next(p for p in problems if p.answer == "18")
    assert "Janet" in p.prompt and "\\boxed{}" in p.prompt and "####" not in p.prompt
    assert task.score(p, "3 + 15 = 18. The answer is 18").reward == 1.0
    assert task.score(p, "\\boxed{18}").reward == 1.0
    wrong = task.score(p, "The answer is 17.")
    assert wrong.reward == 0.0 and "expected 18, got 17" in wrong.feedback
    assert task.score(next(p for p in problems if p.answer == "1200"), "\\boxed{1,200}").reward == 1


@pytest.mark.parametrize(
    "completion,reward",
    [
        ("18", 1.0),
        ("\\boxed{18}", 1.0),
        ("\\boxed{18.0}", 1.0),
        ("It costs $18.", 1.0),
        ("\\boxed{\\$18}", 1.0),
        ("\\boxed{18 \\text{ apples}}", 1.0),
        ("\\boxed{17}", 0.0),
        ("17", 0.0),
        ("I got 18 first but then 17", 0.0),
        ("\\boxed{17} no wait \\boxed{18}", 1.0),
        ("\\boxed{18} is wrong, it is 17", 1.0),  # a box beats a later bare number
    ],
)
def test_score_gsm8k(completion: str, reward: float) -> None:
    assert score_gsm8k("blah blah\n#### 18", completion).reward == reward


def test_score_gsm8k_feedback() -> None:
    s = score_gsm8k("#### 18", "I don't know.")
    assert s.reward == 0.0 and "No answer found" in s.feedback and "18" in s.feedback
    s = score_gsm8k("#### 18", "\\boxed{eighteen}")
    assert s.reward == 0.0 and "contains no number" in s.feedback
    s = score_gsm8k("#### 18", "Total: 17")
    assert "expected 18, got 17" in s.feedback and "last number" in s.feedback
    assert score_gsm8k("#### -2,500", "\\boxed{-2500}").reward == 1.0
    assert score_gsm8k("0.5", "\\boxed{.5}").reward == 1.0


# ----------------------------------------------------------------------------- claims


def test_claims_format(tmp_path: Path) -> None:
    rows = [
        {
            "claim": "The Eiffel Tower is in Paris.",
            "label": "SUPPORTED",
            "evidence": ["The Eiffel Tower is a tower in Paris, France."],
        },
        {
            "claim": "The Moon is made of cheese.",
            "label": "NOT_SUPPORTED",
            "evidence": "The Moon is a rocky body.",
        },
        {"claim": "Water is wet.", "label": "not supported"},
    ]
    task = make_task(write_jsonl(tmp_path / "claims.jsonl", rows))
    assert task.format == "claims"
    by_claim = {p.prompt.splitlines()[0]: p for p in all_problems(task)}
    eiffel = by_claim["Claim: The Eiffel Tower is in Paris."]
    assert "- The Eiffel Tower is a tower in Paris, France." in eiffel.prompt
    assert eiffel.answer == "SUPPORTED"
    assert task.score(eiffel, "\\boxed{SUPPORTED}").reward == 1.0
    assert task.score(eiffel, "\\boxed{supported}").reward == 1.0
    s = task.score(eiffel, "\\boxed{NOT_SUPPORTED}")
    assert s.reward == 0.0 and "SUPPORTED" in s.feedback
    moon = by_claim["Claim: The Moon is made of cheese."]
    assert "The Moon is a rocky body." in moon.prompt
    for ok in [
        "\\boxed{NOT SUPPORTED}",
        "\\boxed{not_supported}",
        "\\boxed{\\text{Not Supported}}",
    ]:
        assert task.score(moon, ok).reward == 1.0, ok
    assert by_claim["Claim: Water is wet."].answer == "NOT_SUPPORTED"


def test_score_claim_failures() -> None:
    s = score_claim("SUPPORTED", "It is supported.")
    assert s.reward == 0.0 and "No \\boxed" in s.feedback
    s = score_claim("SUPPORTED", "\\boxed{maybe}")
    assert s.reward == 0.0 and "not a label" in s.feedback
    s = score_claim("NOT_SUPPORTED", "\\boxed{SUPPORTED}")
    assert s.reward == 0.0 and "the claim is NOT_SUPPORTED" in s.feedback


# ----------------------------------------------------------------------------- qa


def test_qa_format(tmp_path: Path) -> None:
    rows = [
        {"question": "Where is the Eiffel Tower?", "answer": ["Paris", "Paris, France"]},
        {"question": "What is the tallest mountain?", "answer": "Mount Everest"},
        {"question": "In what year did Apollo 11 land?", "answer": 1969},
    ]
    task = make_task(write_jsonl(tmp_path / "qa.jsonl", rows))
    assert task.format == "qa"
    by_q = {p.prompt.splitlines()[0]: p for p in all_problems(task)}
    paris = by_q["Where is the Eiffel Tower?"]
    assert task.score(paris, "\\boxed{paris, france.}").reward == 1.0
    assert task.score(paris, "Let me think.\nAnswer: Paris.").reward == 1.0
    s = task.score(paris, "\\boxed{London}")
    assert s.reward == 0.0 and "'Paris'" in s.feedback and "'London'" in s.feedback
    everest = by_q["What is the tallest mountain?"]
    assert task.score(everest, "\\boxed{the mount   everest}").reward == 1.0
    assert task.score(by_q["In what year did Apollo 11 land?"], "\\boxed{1969}").reward == 1.0


def test_score_qa_and_normalize() -> None:
    assert normalize_answer("  The  U.S.  Army! ") == "us army"
    assert score_qa("Paris", "").reward == 0.0
    assert "No answer found" in score_qa("Paris", "\\boxed{ }").feedback
    assert score_qa(["a", "Rome"], "The answer is \\boxed{rome}").reward == 1.0
    # An unboxed final sentence ending with the answer counts; one that merely mentions it
    # elsewhere, or a boxed sentence, does not.
    assert score_qa("Lisbon", "The capital of Portugal is Lisbon.").reward == 1.0
    assert score_qa("Lisbon", "Lisbon? No, the capital is Porto.").reward == 0.0
    assert score_qa("Lisbon", "\\boxed{The capital is Lisbon}").reward == 0.0
    assert score_qa("New Delhi", "It is New Delhi.").reward == 1.0
    assert score_qa("Delhi", "It is NewDelhi.").reward == 0.0


# ----------------------------------------------------------------------------- errors


def error_of(tmp_path: Path, rows: list, name: str = "data.jsonl", **params) -> str:
    path = write_jsonl(tmp_path / name, rows)
    with pytest.raises(DataError) as info:
        make_task(path, **params)
    return str(info.value)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GSM8K[0], "", '{"question": "x", "answer": '])
    assert "data.jsonl:3:" in msg and "invalid JSON" in msg


def test_missing_field_names_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GSM8K[0], GSM8K[1], {"question": "no answer"}])
    assert "data.jsonl:3:" in msg and "missing field 'answer'" in msg and "gsm8k" in msg
    msg = error_of(tmp_path, [{"claim": "c", "label": "SUPPORTED"}, {"label": "SUPPORTED"}])
    assert "data.jsonl:2:" in msg and "missing field 'claim'" in msg


def test_gsm8k_answer_without_marker(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GSM8K[0], {"question": "q", "answer": "just 5"}])
    assert "data.jsonl:2:" in msg and "####" in msg
    msg = error_of(tmp_path, [GSM8K[0], {"question": "q", "answer": "x\n#### five"}])
    assert "data.jsonl:2:" in msg and "not a number" in msg


def test_bad_label(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [{"claim": "c", "label": "SUPPORTED"}, {"claim": "d", "label": 1}])
    assert "data.jsonl:2:" in msg and "SUPPORTED or NOT_SUPPORTED" in msg


def test_empty_missing_and_unknown(tmp_path: Path) -> None:
    msg = error_of(tmp_path, ["", "   "], name="empty.jsonl")
    assert "empty.jsonl" in msg and "empty" in msg
    with pytest.raises(DataError, match=r"nowhere\.jsonl: cannot read"):
        make_task(tmp_path / "nowhere.jsonl")
    msg = error_of(tmp_path, [{"prompt": "p", "completion": "c"}])
    assert "data.jsonl:1:" in msg and "cannot detect" in msg
    msg = error_of(tmp_path, [[1, 2]])
    assert "data.jsonl:1:" in msg and "JSON object" in msg
    msg = error_of(tmp_path, [GSM8K[0]], format="claims")
    assert "data.jsonl:1:" in msg and "missing field 'claim'" in msg


def test_path_is_required() -> None:
    with pytest.raises(ValidationError, match=r"params\.path"):
        TaskConfig(name="jsonl")
    with pytest.raises(ValidationError, match=r"params\.format"):
        TaskConfig(name="jsonl", params={"path": "x.jsonl", "format": "csv"})


# ----------------------------------------------------------------------------- splits


def numbered_rows(n: int) -> list[dict]:
    return [
        {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
        for i in range(n)
    ]


def test_splits_deterministic_disjoint_and_sized(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", ["", *numbered_rows(20), ""])
    a = make_task(path, sizes=(999, 4, 5), seed=1)
    b = make_task(path, sizes=(999, 4, 5), seed=1)
    sizes = [len(a.problems(s)) for s in ("train", "val", "test")]
    assert sizes == [11, 4, 5]  # train gets the rest; trainSize does not cap a file
    ids = [p.prompt for p in all_problems(a)]
    assert len(set(ids)) == 20
    for split in ("train", "val", "test"):
        assert a.problems(split) == b.problems(split) == a.problems(split)
    assert a.problems("val")[0].id == "jsonl-val-0"
    assert make_task(path, sizes=(999, 4, 5), seed=2).problems("test") != a.problems("test")
    assert {p.meta["line"] for p in all_problems(a)} == set(range(2, 22))  # blank line 1 counted


def test_small_file_clamps_val_and_test(tmp_path: Path) -> None:
    assert split_counts(1, 32, 64) == (1, 0, 0)
    assert split_counts(3, 32, 64) == (1, 0, 2)
    assert split_counts(10, 2, 64) == (1, 0, 9)
    assert split_counts(100, 32, 64) == (4, 32, 64)
    task = make_task(write_jsonl(tmp_path / "d.jsonl", numbered_rows(1)), sizes=(1, 32, 64))
    assert len(task.problems("train")) == 1 and task.problems("test") == []


def test_duplicate_prompts_are_kept_once(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GSM8K[0], GSM8K[1], GSM8K[0]])
    assert len(all_problems(make_task(path))) == 2
