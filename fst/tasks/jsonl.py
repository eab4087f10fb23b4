"""User data from a JSON Lines file: one problem per line.

Formats (params.format, default "auto" = detected from the first record's keys):

- gsm8k: {"question", "answer"} where the answer ends with "#### <number>" (GSM8K style). The
  reference is that number; the model's answer is the number in its last \\boxed{}, or else the
  last number in the completion; values are compared numerically ("18" = "18.0" = "$18").
- claims: {"claim", "label", "evidence"?} (HoVer style). label is SUPPORTED or NOT_SUPPORTED;
  the optional evidence (a string or a list) is shown in the prompt. The model must box its
  label; case, spaces and underscores do not matter.
- qa: {"question", "answer"} where the answer is a string or a list of acceptable strings.
  Normalised exact match (lowercase, no punctuation or articles, folded whitespace) against the
  last \\boxed{}, or else the completion's last line.

Auto-detection: question + answer containing "####" -> gsm8k; claim + label -> claims;
question + answer -> qa.

Splits: records with identical prompts are kept once (the first one), so splits never share a
prompt. The records are shuffled with `random.Random(cfg.seed)`; the first testSize go to test,
the next valSize to val, and ALL the rest to train (trainSize is ignored: the file decides).
A small file is clamped so that train keeps at least one record: test gets
min(testSize, n - 1), then val gets min(valSize, n - 1 - test), so val (then test) may be empty.

Bad input raises DataError naming the file and line, e.g. "data.jsonl:7: invalid JSON: ...".
Blank lines are skipped (line numbers still count them). A record (line) is at most
MAX_RECORD_CHARS characters and a file at most MAX_DATA_FILE_BYTES (fst/schema.py): a record
becomes a prompt, and a file is read whole into memory.
"""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field

from fst.schema import MAX_DATA_FILE_BYTES, MAX_RECORD_CHARS, Schema
from fst.tasks import register
from fst.tasks.base import Problem, Score, Split, TaskSettings, extract_boxed, params_of

NAME = "jsonl"

Format = Literal["gsm8k", "claims", "qa"]


class DataError(ValueError):
    """The data file is unreadable or malformed; the message names the file (and line)."""


class JsonlParams(Schema):
    path: str = Field(
        description="A local .jsonl file, or s3://bucket/key (an object, or a prefix whose "
        "objects are read in key order)."
    )
    format: Literal["auto", "gsm8k", "claims", "qa"] = Field(
        "auto", description="Record format; auto detects it from the first record's keys."
    )


# ----------------------------------------------------------------------------- reading


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; DataError on any malformed line.

    `path` may be an s3:// object, or a prefix whose objects are read in key order."""
    try:
        if str(path).startswith("s3://"):
            from fst.store.checkpoints import check_s3_credentials
            from fst.store.s3 import fetch_text

            try:
                check_s3_credentials(str(path))
            except Exception as e:
                raise DataError(str(e)) from None
            try:
                text = fetch_text(str(path))
            except Exception as e:  # minio's errors are not OSErrors
                raise DataError(f"{path}: cannot read from S3: {e}") from e
        else:
            size = Path(path).stat().st_size
            if size > MAX_DATA_FILE_BYTES:
                raise DataError(
                    f"{path}: {size} bytes; a data file is at most {MAX_DATA_FILE_BYTES}"
                )
            data = Path(path).read_bytes()
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                at = data[: e.start].count(b"\n") + 1
                raise DataError(
                    f"{path}:{at}: not UTF-8 text ({e.reason} at byte {e.start})"
                ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    records = []
    # split("\n"), not splitlines(): JSON strings may legally contain U+2028 and friends.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if len(line) > MAX_RECORD_CHARS:
            raise DataError(
                f"{path}:{lineno}: a record of {len(line)} characters; at most {MAX_RECORD_CHARS}"
            )
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
        except RecursionError:
            raise DataError(f"{path}:{lineno}: invalid JSON: nested too deeply") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append((lineno, obj))
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def detect_format(record: dict[str, Any], where: str) -> Format:
    if "question" in record and "answer" in record:
        answer = record["answer"]
        return "gsm8k" if isinstance(answer, str) and "####" in answer else "qa"
    if "claim" in record and "label" in record:
        return "claims"
    raise DataError(
        f"{where}: cannot detect the format from keys {sorted(record)}; expected "
        "question+answer (gsm8k or qa) or claim+label (claims), or set params.format"
    )


def _text_field(record: dict[str, Any], key: str, where: str, fmt: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (format {fmt})")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.80}")
    return value


# ----------------------------------------------------------------------------- gsm8k

_NUM = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def _to_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_reference(answer_text: str) -> str:
    """The number after the last '####' (commas removed), or the whole text if there is none."""
    ref = answer_text.rsplit("####", 1)[-1]
    return ref.strip().replace(",", "")


def _number_in(text: str) -> str | None:
    """The number a boxed answer or completion states: the whole text if it is a number (after
    dropping $, LaTeX spacing and units), otherwise its last number."""
    s = re.sub(r"\\[a-zA-Z]+\{([^{}]*)\}", r"\1", text)  # \text{18} -> 18
    s = s.replace("\\$", "").replace("$", "").replace("\\,", "").replace("\\!", "").strip()
    s = s.rstrip(".")
    if _NUM.fullmatch(s):
        return s
    found = _NUM.findall(s)
    return found[-1] if found else None


def score_gsm8k(reference_answer_text: str, completion: str) -> Score:
    """Numeric match against the reference ('... #### 18' or just '18')."""
    ref_text = gsm8k_reference(reference_answer_text)
    ref = _to_number(ref_text)
    if ref is None:
        raise ValueError(f"reference answer {ref_text!r} is not a number")
    boxed = extract_boxed(completion)
    got_text = _number_in(boxed if boxed is not None else completion)
    if got_text is None:
        if boxed is not None:
            return Score(
                0.0,
                f"The boxed answer {boxed!r} contains no number; the box must hold "
                f"only the final number. Expected {ref_text}.",
            )
        return Score(
            0.0,
            "No answer found: the final answer must be a number inside \\boxed{}, "
            f"e.g. \\boxed{{{ref_text}}}. Expected {ref_text}.",
        )
    got = _to_number(got_text)
    unboxed = (
        ""
        if boxed is not None
        else (" (no \\boxed{} found, so the last number in the completion was taken)")
    )
    if got == ref:
        return Score(1.0, f"Correct: {ref_text}{unboxed}.")
    return Score(0.0, f"Wrong answer: expected {ref_text}, got {got_text}{unboxed}.")


def _gsm8k_problem(record: dict[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    question = _text_field(record, "question", where, "gsm8k")
    answer = _text_field(record, "answer", where, "gsm8k")
    if "####" not in answer:
        raise DataError(
            f"{where}: field 'answer' has no '#### <number>' final answer (format gsm8k)"
        )
    ref = gsm8k_reference(answer)
    if _to_number(ref) is None:
        raise DataError(f"{where}: the answer after '####' is not a number: {ref!r}")
    prompt = f"{question.strip()}\n\nGive the final answer as a number inside \\boxed{{}}."
    return prompt, ref, {"solution": answer}


# ----------------------------------------------------------------------------- claims

LABELS = ("SUPPORTED", "NOT_SUPPORTED")


def normalize_label(text: str) -> str | None:
    """SUPPORTED / NOT_SUPPORTED from free text such as 'not supported' or '\\text{Supported}'."""
    s = re.sub(r"\\[a-zA-Z]+\{([^{}]*)\}", r"\1", text)
    s = re.sub(r"[^A-Za-z]+", "_", s).strip("_").upper()
    if s == "SUPPORTED":
        return "SUPPORTED"
    if s in ("NOT_SUPPORTED", "NOTSUPPORTED"):
        return "NOT_SUPPORTED"
    return None


def score_claim(label: str, completion: str) -> Score:
    """Reward 1 iff the boxed label equals `label` (SUPPORTED or NOT_SUPPORTED)."""
    boxed = extract_boxed(completion)
    if boxed is None:
        return Score(
            0.0,
            "No \\boxed{...} answer found; answer with \\boxed{SUPPORTED} or "
            f"\\boxed{{NOT_SUPPORTED}}. Expected \\boxed{{{label}}}.",
        )
    got = normalize_label(boxed)
    if got is None:
        return Score(
            0.0,
            f"The boxed answer {boxed!r} is not a label; it must be exactly "
            f"SUPPORTED or NOT_SUPPORTED. Expected {label}.",
        )
    if got == label:
        return Score(1.0, f"Correct: the claim is {label}.")
    return Score(0.0, f"Wrong label: the claim is {label}, but the answer was {got}.")


def _evidence_lines(evidence: Any, where: str) -> list[str]:
    if evidence is None:
        return []
    if isinstance(evidence, str):
        return [evidence] if evidence.strip() else []
    if isinstance(evidence, list):
        return [e if isinstance(e, str) else json.dumps(e) for e in evidence]
    raise DataError(
        f"{where}: field 'evidence' must be a string or a list, got {type(evidence).__name__}"
    )


def _claims_problem(record: dict[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    claim = _text_field(record, "claim", where, "claims")
    if "label" not in record:
        raise DataError(f"{where}: missing field 'label' (format claims)")
    raw = record["label"]
    label = normalize_label(raw) if isinstance(raw, str) else None
    if label is None:
        raise DataError(f"{where}: field 'label' must be SUPPORTED or NOT_SUPPORTED, got {raw!r}")
    evidence = _evidence_lines(record.get("evidence"), where)
    parts = [f"Claim: {claim.strip()}"]
    if evidence:
        parts.append("Evidence:\n" + "\n".join(f"- {e}" for e in evidence))
        question = "Based on the evidence, is the claim supported?"
    else:
        question = "Is the claim supported by the facts?"
    parts.append(
        f"{question} Answer SUPPORTED or NOT_SUPPORTED inside \\boxed{{}}, "
        "e.g. \\boxed{NOT_SUPPORTED}."
    )
    return "\n\n".join(parts), label, {"evidence": evidence}


# ----------------------------------------------------------------------------- qa

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, fold whitespace (SQuAD-style)."""
    s = re.sub(r"[^\w\s]|_", "", text.lower())
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _qa_answer(completion: str) -> str:
    boxed = extract_boxed(completion)
    if boxed is not None:
        return re.sub(r"\\[a-zA-Z]+\{([^{}]*)\}", r"\1", boxed).strip()
    lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    # "Answer: Paris" on the last line means "Paris".
    return re.sub(r"^(final\s+)?answer\s*(is)?\s*[:\-]?\s*", "", lines[-1], flags=re.I)


def score_qa(answers: str | list[str], completion: str) -> Score:
    """Reward 1 iff the answer matches any acceptable answer after normalisation."""
    accepted = [answers] if isinstance(answers, str) else list(answers)
    expected = " or ".join(repr(a) for a in accepted[:3])
    got = _qa_answer(completion)
    if not normalize_answer(got):
        return Score(
            0.0, f"No answer found; give the final answer inside \\boxed{{}}. Expected {expected}."
        )
    wanted = {normalize_answer(a) for a in accepted}
    if normalize_answer(got) in wanted:
        return Score(1.0, f"Correct: {got!r}.")
    # Without a box, a final sentence that ENDS with the answer counts ("The capital of
    # Portugal is Lisbon."): exact match on an unformatted sentence would score a right
    # answer as wrong. A boxed answer is held to exact match.
    if extract_boxed(completion) is None and any(
        w and (normalize_answer(got) + " ").endswith(" " + w + " ") for w in wanted
    ):
        return Score(1.0, f"Correct: {got!r} (put the bare answer in \\boxed{{}} next time).")
    return Score(0.0, f"Wrong answer: expected {expected}, got {got!r}.")


def _as_text(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _qa_problem(record: dict[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    question = _text_field(record, "question", where, "qa")
    if "answer" not in record:
        raise DataError(f"{where}: missing field 'answer' (format qa)")
    raw = record["answer"]
    # Numbers are accepted as their text: {"answer": 1969} means "1969".
    answers = [_as_text(a) for a in raw] if isinstance(raw, list) else [_as_text(raw)]
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and normalize_answer(a) for a in answers)
    ):
        raise DataError(
            f"{where}: field 'answer' must be a non-empty string or a list of them, got {raw!r:.80}"
        )
    prompt = f"{question.strip()}\n\nGive a short final answer inside \\boxed{{}}."
    return prompt, answers[0], {"answers": answers}


_BUILDERS = {"gsm8k": _gsm8k_problem, "claims": _claims_problem, "qa": _qa_problem}


# ----------------------------------------------------------------------------- task


def load_items(path: str, fmt: str) -> tuple[Format, list[tuple[str, str, dict[str, Any]]]]:
    """Parse a file into (prompt, answer, meta) items, deduplicated by prompt, in file order."""
    records = read_records(path)
    first_line, first = records[0]
    resolved = detect_format(first, f"{path}:{first_line}") if fmt == "auto" else cast(Format, fmt)
    items, seen = [], set()
    for lineno, record in records:
        prompt, answer, meta = _BUILDERS[resolved](record, f"{path}:{lineno}")
        if prompt in seen:
            continue
        seen.add(prompt)
        items.append((prompt, answer, {"format": resolved, "line": lineno, **meta}))
    return resolved, items


def split_counts(n: int, val_size: int, test_size: int) -> tuple[int, int, int]:
    """(train, val, test) sizes for n records: train keeps at least one, test is served first."""
    test = min(test_size, n - 1)
    val = min(val_size, n - 1 - test)
    return n - test - val, val, test


class JsonlTask:
    """Problems read from a local JSONL file; see the module docstring for formats and splits."""

    name = NAME

    def __init__(self, cfg: TaskSettings) -> None:
        self.cfg = cfg
        self.params = params_of(cfg, JsonlParams)
        self.format, items = load_items(self.params.path, self.params.format)
        order = list(range(len(items)))
        random.Random(cfg.seed).shuffle(order)
        _, n_val, n_test = split_counts(len(items), cfg.val_size, cfg.test_size)
        chunks = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        self._splits = {
            split: [Problem(f"{NAME}-{split}-{i}", *items[j]) for i, j in enumerate(idx)]
            for split, idx in chunks.items()
        }

    def problems(self, split: Split) -> list[Problem]:
        return list(self._splits[split])

    def score(self, problem: Problem, completion: str) -> Score:
        fmt = problem.meta.get("format", self.format)
        if fmt == "gsm8k":
            return score_gsm8k(problem.answer, completion)
        if fmt == "claims":
            return score_claim(problem.answer, completion)
        return score_qa(problem.meta.get("answers", problem.answer), completion)


def build(cfg: TaskSettings) -> JsonlTask:
    return JsonlTask(cfg)


register(NAME, JsonlParams, build)
