"""Reflectors: what turns a prompt plus its failures into a new prompt, inside GEPA.

Three kinds, each plugged into one of GEPA's hooks:
  - `openai`: an OpenAI-compatible chat-completions endpoint (a vLLM server in the cluster, or
    a hosted API), used as GEPA's `reflection_lm`; GEPA writes the reflection prompt and parses
    the new instruction out of the answer.
  - `local`: a transformers model on this machine as GEPA's `reflection_lm` (default: the base
    policy itself).
  - `digest`: NO language model. A deterministic `custom_candidate_proposer` that appends the
    distinct lessons found in the failed examples' feedback to the parent prompt. It is the
    offline default, so that FST runs anywhere; it is much weaker than a real reflector.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fst.config import ReflectorConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- digest

LESSONS_HEADER = "Rules learned from earlier mistakes:"
# A feedback sentence is a lesson when it tells the model what to do, not what one answer was.
_INSTRUCTIVE = re.compile(r"\b(must|should|always|never|only|put|give|end|write|use)\b", re.I)
# Not after "e.g." / "i.e.": the example that follows belongs to the lesson ("... inside
# \boxed{}, e.g. \boxed{7}"); cut there, the lesson would lose the one thing it shows.
_SENTENCE_SPLIT = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<=[.!?])\s+|;\s+")


def lessons_from_feedback(feedback: Sequence[str]) -> list[str]:
    """Distinct instructive sentences of the feedback, most frequent first.

    Two sentences that differ only in their numbers (problem-specific values) count as the
    same lesson; the first wording seen is kept.
    """
    counts: Counter[str] = Counter()
    wording: dict[str, str] = {}
    for text in feedback:
        for raw in _SENTENCE_SPLIT.split(text):
            sentence = raw.strip().rstrip(".") + "."
            if len(sentence) < 12 or not _INSTRUCTIVE.search(sentence):
                continue
            if sentence.lower().startswith(("correct", "expected", "wrong value")):
                continue
            key = re.sub(r"[+-]?\d+", "#", sentence.lower())  # "\boxed{3}" ~ "\boxed{-5}"
            counts[key] += 1
            wording.setdefault(key, sentence[0].upper() + sentence[1:])
    return [wording[k] for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


EXAMPLES_HEADER = "Worked examples from earlier mistakes:"
MAX_EXAMPLES = 3


def digest_rewrite(
    parent: str,
    feedback: Sequence[str],
    inputs: Sequence[str] = (),
    max_new: int = 2,
    fits: Callable[[str], bool] | None = None,
) -> str:
    """The parent prompt plus up to `max_new` lessons it does not state yet.

    When the feedback holds no new instruction, one failed example is added instead (its
    input and what the checker said), up to MAX_EXAMPLES: a few-shot hint is the next best
    thing a proposer without a language model can offer.

    `fits` (fast.maxPromptTokens): whether a prompt is within the budget. A child over it
    loses its parent's oldest worked examples, then its oldest lessons, until it fits (what
    it adds is what this proposal is for, so that stays); if even that does not fit, the
    parent is returned unchanged.
    """
    known = parent.lower()
    fresh = [s for s in lessons_from_feedback(feedback) if s.lower() not in known][:max_new]
    if fresh:
        child = parent
        if LESSONS_HEADER not in child:
            child = f"{child.rstrip()}\n\n{LESSONS_HEADER}"
        return _within(child + "".join(f"\n- {s}" for s in fresh), parent, len(fresh), fits)
    # Under a budget, an example takes the place of the oldest one instead of stopping at
    # MAX_EXAMPLES: the worked examples rotate toward the current failures.
    if fits is None and parent.count("\n* ") >= MAX_EXAMPLES:
        return parent
    for question, said in zip(inputs, feedback, strict=False):
        example = f"\n* {_first_line(question, 160)} -> {_first_line(said, 160)}"
        if example.lower() not in known:
            child = parent
            if EXAMPLES_HEADER not in child:
                child = f"{child.rstrip()}\n\n{EXAMPLES_HEADER}"
            child = _drop_oldest(child + example, "* ", keep_last=1, at_most=MAX_EXAMPLES)
            return _within(child, parent, 1, fits)
    return parent


def _within(child: str, parent: str, added: int, fits: Callable[[str], bool] | None) -> str:
    """`child` (whose last `added` lines are new) cut to the budget: its oldest worked
    examples go first, then its oldest lessons, never the new lines; `parent` if it cannot
    fit."""
    if fits is None or fits(child):
        return child
    for marker in ("* ", "- "):
        while True:
            shorter = _drop_oldest(child, marker, keep_last=added)
            if shorter == child:
                break
            child = shorter
            if fits(child):
                return child
    return parent


def _drop_oldest(text: str, marker: str, keep_last: int, at_most: int = 0) -> str:
    """`text` without its first line starting with `marker` (and without that line's header
    if it was the last under it), unless that line is among the last `keep_last` lines of the
    text (the ones just added). With `at_most` > 0: only when more than `at_most` lines start
    with `marker`. Pure."""
    lines = text.split("\n")
    items = [i for i, line in enumerate(lines) if line.startswith(marker)]
    if not items or items[0] >= len(lines) - keep_last or (at_most and len(items) <= at_most):
        return text
    first = items[0]
    del lines[first]
    header = first - 1
    if lines[header] in (LESSONS_HEADER, EXAMPLES_HEADER) and (
        header + 1 >= len(lines) or not lines[header + 1].startswith(marker)
    ):
        del lines[header]
        if header > 0 and lines[header - 1] == "":
            del lines[header - 1]
    return "\n".join(lines)


def _first_line(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class DigestProposer:
    """GEPA `custom_candidate_proposer`: rewrite each component from its failures' feedback."""

    label = "digest (offline, no language model)"

    def __init__(self, fits: Callable[[str], bool] | None = None) -> None:
        self.fits = fits  # fast.maxPromptTokens: whether a prompt is within the budget
        if fits is not None:
            self.label += ", prompts within a token budget"

    def __call__(
        self,
        candidate: dict[str, str],
        reflective_dataset: Mapping[str, Sequence[Mapping[str, Any]]],
        components_to_update: list[str],
    ) -> dict[str, str]:
        out = {}
        for name in components_to_update:
            failed = [r for r in reflective_dataset.get(name, []) if float(r.get("Score", 0)) < 1]
            out[name] = digest_rewrite(
                candidate[name],
                [str(r.get("Feedback", "")) for r in failed],
                [str(r.get("Inputs", "")) for r in failed],
                fits=self.fits,
            )
        return out


# ----------------------------------------------------------------------------- openai


class OpenAIReflector:
    """GEPA `reflection_lm` over an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(self, cfg: ReflectorConfig, timeout_s: float = 120.0, retries: int = 3) -> None:
        if not cfg.base_url or not cfg.model:
            raise ValueError("fast.reflector: kind 'openai' needs baseUrl and model")
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.cfg, self.timeout_s, self.retries = cfg, timeout_s, retries
        self.label = f"openai ({cfg.model} at {cfg.base_url})"

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        body = json.dumps(
            {
                "model": self.cfg.model,
                "messages": messages,
                "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_new_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last: Exception | None = None
        for attempt in range(self.retries):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                last = e
                if e.code < 500 and e.code != 429:  # a client error will not fix itself
                    detail = e.read().decode(errors="replace")[:300]
                    raise RuntimeError(f"reflector {self.url}: HTTP {e.code}: {detail}") from e
            except (urllib.error.URLError, TimeoutError, KeyError, json.JSONDecodeError) as e:
                last = e
            time.sleep(min(2**attempt, 10))
        raise RuntimeError(f"reflector {self.url}: failed after {self.retries} tries: {last}")


# ----------------------------------------------------------------------------- local


class LocalReflector:
    """GEPA `reflection_lm` generating with a transformers model on this machine."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cfg: ReflectorConfig,
        seed: int = 0,
    ) -> None:
        from fst.model import stop_token_ids
        from fst.rollout.hf import HFRolloutEngine

        self.engine = HFRolloutEngine(model, tokenizer, stop_token_ids(tokenizer, model), 1)
        self.tokenizer, self.cfg = tokenizer, cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.label = f"local ({cfg.model or 'base policy'})"

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        from fst.rollout import SamplingParams

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        greedy = self.cfg.temperature == 0.0
        params = SamplingParams(
            max(self.cfg.temperature, 1e-5), 1.0, self.cfg.max_new_tokens, greedy=greedy
        )
        return self.engine.generate([ids], params, self.generator)[0].text
