"""The reflectors against a real language model, each through a whole GEPA round:

- `openai` against `transformers serve` (Hugging Face's OpenAI-compatible server: FastAPI +
  uvicorn, not written here) serving SmolLM2-135M-Instruct on loopback;
- `local` on SmolLM2 in this process.

The policy in the round is the scripted one of tests/unit/test_fast.py (what is under test is
the reflector, not the policy). A 135M reflector writes poor prompts: what is tested is the
path — requests the server accepts, its replies turned into candidates (fenced or not), a model
name it refuses, timeouts retried then reported — not the prompts' quality."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fst.config import ModelConfig, ReflectorConfig, TaskConfig
from fst.fast.population import PromptRecord
from fst.fast.reflectors import LocalReflector, OpenAIReflector
from fst.tasks import build_task
from tests.unit.test_fast import scripted_round

pytestmark = pytest.mark.slow

SMOLLM2 = ModelConfig(name="smollm2-135m-instruct")
SEED = PromptRecord("You are a helpful assistant.")


@pytest.fixture(scope="module")
def smollm2():
    from fst.model import load_policy, load_tokenizer

    return load_policy(SMOLLM2), load_tokenizer(SMOLLM2)


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    """`transformers serve` on a free loopback port, pinned to SmolLM2 saved as a Hugging Face
    folder (its GGUF loader wants a hub repo id, and nothing here may reach a hub). Yields
    (base URL, the model name the server answers to)."""
    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("smollm2-hf")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Path(sys.executable).parent / "transformers"
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    serve = [str(cli), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*serve, "--device", "cpu"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start:\n{Path(log.name).read_text()}")
            time.sleep(0.5)
        yield f"{base}/v1", str(folder)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


class Recording:
    """A reflection LM that records what it was asked and what it answered."""

    def __init__(self, lm) -> None:
        self.lm, self.prompts, self.replies = lm, [], []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        reply = self.lm(prompt)
        self.replies.append(reply)
        return reply


def reflector_config(**kw) -> ReflectorConfig:
    # 96 new tokens: a reflection takes seconds on 2 cores, and its length is not under test.
    return ReflectorConfig(**{"max_new_tokens": 96, "temperature": 0.7, **kw})


def arithmetic():
    return build_task(TaskConfig(name="arithmetic", train_size=32, val_size=8, test_size=4))


def assert_a_sound_round(result, reflector: Recording) -> None:
    assert reflector.replies, "GEPA must have asked the reflector"
    assert all(isinstance(r, str) for r in reflector.replies)
    # GEPA's reflection prompt carries the instruction it wants improved.
    first = reflector.prompts[0]
    text = first if isinstance(first, str) else first[-1]["content"]
    assert SEED.text in text
    # Whatever came back (a fenced instruction, bare prose, an empty string), the population
    # is a valid one: non-empty prompts, scored, the best first.
    assert result.population and all(p.text.strip() for p in result.population)
    scores = [p.mean_score for p in result.population]
    assert scores == sorted(scores, reverse=True)


def test_the_openai_reflector_through_a_gepa_round_on_transformers_serve(served, tmp_path):
    url, model = served
    lm = Recording(OpenAIReflector(reflector_config(kind="openai", base_url=url, model=model)))
    result = scripted_round(arithmetic(), tmp_path, [SEED], 1, 2, 12, reflection_lm=lm)
    assert_a_sound_round(result, lm)


def test_a_model_the_server_does_not_serve_is_refused_at_once(served):
    url, _ = served
    lm = OpenAIReflector(reflector_config(kind="openai", base_url=url, model="not-served"))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"HTTP 4\d\d: .*not-served"):
        lm("Improve: be helpful.")
    assert time.monotonic() - t0 < 5  # a client error is not retried


def test_a_server_too_slow_for_the_timeout_is_retried_then_reported(served):
    url, model = served
    lm = OpenAIReflector(
        reflector_config(kind="openai", base_url=url, model=model, max_new_tokens=64),
        timeout_s=0.05,
        retries=2,
    )
    with pytest.raises(RuntimeError, match=r"failed after 2 tries: .*timed out"):
        lm("Write a long story about a robot.")
    # The server itself is fine: with a sane timeout the same request is answered.
    lm.timeout_s = 120.0
    assert isinstance(lm("Say hello."), str)


def test_the_local_reflector_on_smollm2_through_a_gepa_round(smollm2, tmp_path):
    model, tokenizer = smollm2
    lm = Recording(LocalReflector(model, tokenizer, reflector_config(kind="local"), seed=0))
    result = scripted_round(arithmetic(), tmp_path, [SEED], 1, 2, 12, reflection_lm=lm)
    assert_a_sound_round(result, lm)
