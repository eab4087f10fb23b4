"""Code output prediction: what does a small generated Python function return?

Functions come from templates (loops with accumulators, string edits, filtered comprehensions,
dict counting, small recursion, sorting with keys, while loops, zips) filled with random
constants and inputs. The reference answer is never computed by hand-written logic: the
generated code is executed in `run_sandboxed` (fst/tasks/sandbox.py: bubblewrap namespaces, a
read-only minimal filesystem, seccomp and resource limits), and the `repr` of the returned value
is the answer. Templates only return values whose repr is deterministic (no sets, no floats
from hashing order), so the same config always yields the same answers. Where the sandbox
cannot be built, building problems raises SandboxUnavailableError: the code never runs
unsandboxed (FST_SANDBOX=process opts into a weaker subprocess sandbox).
"""

from __future__ import annotations

import ast
import json
import random
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from fst.schema import Schema
from fst.tasks import register
from fst.tasks.base import Problem, Score, Split, TaskSettings, extract_boxed, params_of
from fst.tasks.sandbox import SandboxResult as SandboxResult  # re-exported
from fst.tasks.sandbox import SandboxUnavailableError as SandboxUnavailableError  # re-exported
from fst.tasks.sandbox import run_sandboxed
from fst.tasks.splits import disjoint_splits

NAME = "codeio"

# ----------------------------------------------------------------------------- templates

_WORDS = (
    "apple",
    "bird",
    "cat",
    "dune",
    "echo",
    "fig",
    "gate",
    "hill",
    "iris",
    "jam",
    "kite",
    "lamp",
    "moon",
    "nest",
    "oak",
    "pear",
    "quiz",
    "rose",
    "sun",
    "tree",
    "urn",
    "vine",
)
_FUNC_NAMES = ("f", "g", "solve", "compute", "transform", "mystery")


@dataclass(frozen=True)
class Snippet:
    """A generated function definition and the call whose value is asked for."""

    template: str
    code: str
    call: str


def _code(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def _word(rng: random.Random, lo: int = 4, hi: int = 8) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def t_accumulate(rng: random.Random, fn: str) -> tuple[str, str]:
    k = rng.randint(2, 4)
    code = _code(f"""
        def {fn}(n):
            total = {rng.randint(0, 10)}
            for i in range(n):
                if i % {k} == {rng.randrange(k)}:
                    total += i * {rng.randint(1, 5)}
                else:
                    total -= {rng.randint(0, 3)}
            return total
    """)
    return code, f"{fn}({rng.randint(3, 12)})"


def t_string_ops(rng: random.Random, fn: str) -> tuple[str, str]:
    vowels = "".join(sorted(rng.sample("aeiou", rng.randint(1, 3))))
    tail = rng.choice(["", "[::-1]", ".strip('*')"])
    code = _code(f"""
        def {fn}(s):
            out = []
            for i, ch in enumerate(s):
                if i % {rng.randint(2, 4)} == 0:
                    out.append(ch.upper())
                elif ch in "{vowels}":
                    out.append("{rng.choice("*#-+")}")
                else:
                    out.append(ch)
            return "".join(out){tail}
    """)
    return code, f"{fn}({_word(rng)!r})"


def t_comprehension(rng: random.Random, fn: str) -> tuple[str, str]:
    k = rng.randint(2, 5)
    expr = f"x {rng.choice('+-*')} {rng.randint(1, 9)}"
    cond = f"x % {k} {rng.choice(['==', '!='])} {rng.randrange(k)}"
    code = _code(f"""
        def {fn}(xs):
            return [{expr} for x in xs if {cond}]
    """)
    xs = [rng.randint(-5, 20) for _ in range(rng.randint(4, 8))]
    return code, f"{fn}({xs!r})"


def t_dict_count(rng: random.Random, fn: str) -> tuple[str, str]:
    key = rng.choice(["w[0]", "len(w)", "w[-1]", "len(w) % 3"])
    code = _code(f"""
        def {fn}(words):
            counts = {{}}
            for w in words:
                key = {key}
                counts[key] = counts.get(key, 0) + 1
            return counts
    """)
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 8))]
    return code, f"{fn}({words!r})"


def t_recursion(rng: random.Random, fn: str) -> tuple[str, str]:
    if rng.random() < 0.5:
        base = rng.randint(2, 9)
        code = _code(f"""
            def {fn}(n):
                if n < {base}:
                    return n
                return {fn}(n // {base}) + n % {base}
        """)
        return code, f"{fn}({rng.randint(10, 999)})"
    code = _code(f"""
        def {fn}(n):
            if n <= 1:
                return {rng.randint(0, 3)}
            return {rng.randint(1, 3)} * {fn}(n - 1) + n
    """)
    return code, f"{fn}({rng.randint(2, 7)})"


def t_sort_key(rng: random.Random, fn: str) -> tuple[str, str]:
    m = rng.randint(2, 5)
    key = rng.choice([f"(p[1] % {m}, p[0])", "(len(p[0]), -p[1])", "(p[0][-1], p[1])"])
    code = _code(f"""
        def {fn}(items):
            return sorted(items, key=lambda p: {key}, reverse={rng.choice([False, True])})
    """)
    names = rng.sample(_WORDS, rng.randint(3, 5))
    items = [(w, rng.randint(0, 20)) for w in names]
    return code, f"{fn}({items!r})"


def t_while_loop(rng: random.Random, fn: str) -> tuple[str, str]:
    cap = rng.randint(5, 15)
    code = _code(f"""
        def {fn}(n):
            steps = 0
            while n != 1 and steps < {cap}:
                if n % 2 == 0:
                    n //= 2
                else:
                    n = {rng.choice([3, 5])} * n + 1
                steps += 1
            return (n, steps)
    """)
    return code, f"{fn}({rng.randint(2, 40)})"


def t_zip_pairs(rng: random.Random, fn: str) -> tuple[str, str]:
    code = _code(f"""
        def {fn}(a, b):
            result = []
            for x, y in zip(a, b):
                if x > y:
                    result.append(x - y)
                else:
                    result.append(x * y % {rng.randint(3, 11)})
            return result
    """)
    n = rng.randint(3, 6)
    a = [rng.randint(0, 15) for _ in range(n)]
    b = [rng.randint(0, 15) for _ in range(n + rng.randint(0, 2))]
    return code, f"{fn}({a!r}, {b!r})"


TEMPLATES: dict[str, Callable[[random.Random, str], tuple[str, str]]] = {
    "accumulate": t_accumulate,
    "string_ops": t_string_ops,
    "comprehension": t_comprehension,
    "dict_count": t_dict_count,
    "recursion": t_recursion,
    "sort_key": t_sort_key,
    "while_loop": t_while_loop,
    "zip_pairs": t_zip_pairs,
}


def make_snippet(rng: random.Random, templates: list[str]) -> Snippet:
    template = rng.choice(templates)
    code, call = TEMPLATES[template](rng, rng.choice(_FUNC_NAMES))
    return Snippet(template, code, call)


def format_prompt(s: Snippet) -> str:
    return (
        "What does the following Python function return for the call below?\n\n"
        f"```python\n{s.code}```\n\n"
        f"Call: `{s.call}`\n\n"
        "Give the exact returned value as a Python literal inside \\boxed{}, e.g. "
        "\\boxed{[1, 2]} or \\boxed{'abc'}."
    )


# Evaluates a batch of snippets in ONE sandboxed process and prints a JSON list of reprs.
_BATCH = """
import json
_fst_out = []
for _fst_code, _fst_call in json.loads({payload!r}):
    _fst_ns = {{"__name__": "__fst_snippet__"}}
    exec(_fst_code, _fst_ns)
    _fst_out.append(repr(eval(_fst_call, _fst_ns)))
print(json.dumps(_fst_out))
"""


def evaluate_snippets(
    snippets: list[Snippet], timeout_s: float = 2.0, memory_mb: int = 256, batch: int = 256
) -> list[str]:
    """The repr of each snippet's call, computed in the sandbox, `batch` snippets per process.

    Each process gets the full `timeout_s`. A snippet takes well under a millisecond to compile
    and run, while starting a sandbox costs tens of milliseconds (namespaces, about 50 read-only
    binds, the interpreter), hence large batches: 256 snippets run in ~0.1 s."""
    answers: list[str] = []
    for i in range(0, len(snippets), batch):
        chunk = snippets[i : i + batch]
        payload = json.dumps([[s.code, s.call] for s in chunk])
        res = run_sandboxed(_BATCH.format(payload=payload), timeout_s, memory_mb)
        if not res.ok:
            raise RuntimeError(f"{NAME}: evaluating generated code failed: {res.error}")
        answers.extend(json.loads(res.stdout))
    return answers


# ----------------------------------------------------------------------------- scoring


def _literal(text: str) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def same_value(a: Any, b: Any) -> bool:
    """Equal values of the same types, recursively: 1 != 1.0 != True, (1,) != [1]."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return bool(a == b)


def _clean(text: str) -> str:
    # Models often wrap the literal in inline-code backticks inside the box.
    return text.strip().strip("`").strip()


def score_output(expected_repr: str, completion: str) -> Score:
    """Reward 1 iff the boxed literal equals the reference value (types included)."""
    boxed = extract_boxed(completion)
    if boxed is None:
        return Score(
            0.0,
            "No \\boxed{...} answer found; the returned value must be given as "
            "a Python literal inside \\boxed{}. "
            f"Expected \\boxed{{{expected_repr}}}.",
        )
    got = _clean(boxed)
    ok_exp, exp_val = _literal(expected_repr)
    ok_got, got_val = _literal(got)
    if ok_exp and ok_got:
        if same_value(exp_val, got_val):
            return Score(1.0, f"Correct: the call returns {expected_repr}.")
        hint = ""
        if type(exp_val) is not type(got_val):
            hint = (
                f" The value should be a {type(exp_val).__name__}, not a {type(got_val).__name__}."
            )
        return Score(0.0, f"Wrong value: expected {expected_repr}, got {got}.{hint}")
    if " ".join(got.split()) == " ".join(expected_repr.split()):
        return Score(1.0, f"Correct: the call returns {expected_repr}.")
    if not ok_got:
        return Score(
            0.0,
            f"The boxed answer {got!r} is not a valid Python literal; write the "
            f"value exactly as Python would print it. Expected {expected_repr}.",
        )
    return Score(0.0, f"Wrong value: expected {expected_repr}, got {got}.")


# ----------------------------------------------------------------------------- task


class CodeIOParams(Schema):
    templates: list[str] = Field(
        default_factory=lambda: list(TEMPLATES),
        description=f"Function templates to draw from; any of {', '.join(TEMPLATES)}.",
    )
    timeout_s: float = Field(2.0, gt=0.0, description="Wall-clock limit per sandbox process.")
    memory_mb: int = Field(256, ge=64, description="Address-space limit per sandbox process.")

    @field_validator("templates")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("at least one template is required")
        unknown = [n for n in names if n not in TEMPLATES]
        if unknown:
            raise ValueError(f"unknown template(s) {unknown}; known: {', '.join(TEMPLATES)}")
        return list(dict.fromkeys(names))


class CodeIOTask:
    """Predict a generated function's return value; answers come from sandboxed execution."""

    name = NAME

    def __init__(self, cfg: TaskSettings) -> None:
        self.cfg = cfg
        self.params = params_of(cfg, CodeIOParams)
        self._snippets: dict[Split, list[Snippet]] | None = None
        self._problems: dict[Split, list[Problem]] = {}

    def problems(self, split: Split) -> list[Problem]:
        # Prompts for all splits are generated together (disjointness needs all of them), but
        # only the requested split is executed: `fst eval` never pays for the train split.
        if split not in self._problems:
            snippets = self._all_snippets()[split]
            answers = evaluate_snippets(snippets, self.params.timeout_s, self.params.memory_mb)
            self._problems[split] = [
                Problem(
                    f"{NAME}-{split}-{i}",
                    format_prompt(s),
                    ans,
                    {"template": s.template, "code": s.code, "call": s.call},
                )
                for i, (s, ans) in enumerate(zip(snippets, answers, strict=True))
            ]
        return list(self._problems[split])

    def score(self, problem: Problem, completion: str) -> Score:
        return score_output(problem.answer, completion)

    def _all_snippets(self) -> dict[Split, list[Snippet]]:
        if self._snippets is None:
            cfg = self.cfg
            self._snippets = disjoint_splits(
                NAME,
                cfg.seed,
                {"test": cfg.test_size, "val": cfg.val_size, "train": cfg.train_size},
                draw=lambda rng: make_snippet(rng, self.params.templates),
                key=format_prompt,
            )
        return self._snippets


def build(cfg: TaskSettings) -> CodeIOTask:
    return CodeIOTask(cfg)


register(NAME, CodeIOParams, build)
