"""`python -m fst ...` with the arithmetic task scored by tests.tiny_model.varied_score, for
runs in subprocesses (torchrun's ranks) that a pytest monkeypatch cannot reach: the tiny
random model almost never solves arithmetic, and without reward variance nothing trains.

    torchrun --standalone --nproc-per-node 2 -m tests.varied_fst train -c cfg.yaml

With FST_TEST_HANG_AFTER=RUN:STEP in the environment, the process stops (sleeps until it is
killed) right after run RUN has committed its checkpoint of step STEP: a kill test then kills
it at a known point. The tiny model takes a step in a fraction of a second, so a test that
polls for the checkpoint and then kills would otherwise land anywhere after it, or after the
end of the run. FST_TEST_HANG_AFTER_SCORES=RUN:N does the same once the promotion gate of run
RUN has measured N scores (fst/gate.py StageGate.score), and FST_TEST_HANG_IN_UPLOAD=TEXT:N
once N files whose S3 key contains TEXT have been uploaded (a commit's files go up one by one,
the manifest last). FST_TEST_HANG_MARKER names a file created when a hang begins.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from fst.cli import main
from fst.tasks.arithmetic import ArithmeticTask
from tests.tiny_model import varied_score

ArithmeticTask.score = varied_score  # type: ignore[method-assign]

HANG_AFTER = os.environ.get("FST_TEST_HANG_AFTER")
if HANG_AFTER:
    import fst.loop

    _save_checkpoint = fst.loop.save_checkpoint

    def _save_then_hang(run: Any, extra_state: Any = None) -> str:
        uri = _save_checkpoint(run, extra_state)
        if f"{run.cfg.run}:{run.step}" == HANG_AFTER:
            while True:
                time.sleep(60)
        return uri

    fst.loop.save_checkpoint = _save_then_hang

HANG_AFTER_SCORES = os.environ.get("FST_TEST_HANG_AFTER_SCORES")
if HANG_AFTER_SCORES:
    # RUN:N: hang once the gate of run RUN has measured (not read from the cache) N scores.
    import fst.gate

    gating, measured = {"run": ""}, {"n": 0}
    _evaluate, _score = fst.gate.StageGate.evaluate, fst.gate.StageGate.score

    def _evaluate_noting_the_run(self: Any, run: Any, cfg: Any) -> Any:
        gating["run"], measured["n"] = run.run, 0
        return _evaluate(self, run, cfg)

    def _score_then_hang(self: Any, weights: Any, prompt: str, stage: str) -> Any:
        saved = self.cache.put_score
        new: list[str] = []
        self.cache.put_score = lambda key, score: (new.append(key), saved(key, score))
        try:
            result = _score(self, weights, prompt, stage)
        finally:
            self.cache.put_score = saved
        if new:
            measured["n"] += 1
            if f"{gating['run']}:{measured['n']}" == HANG_AFTER_SCORES:
                if os.environ.get("FST_TEST_HANG_MARKER"):  # tells the test it is time
                    open(os.environ["FST_TEST_HANG_MARKER"], "w").close()
                while True:
                    time.sleep(60)
        return result

    fst.gate.StageGate.evaluate = _evaluate_noting_the_run  # type: ignore[method-assign]
    fst.gate.StageGate.score = _score_then_hang  # type: ignore[method-assign]

HANG_IN_UPLOAD = os.environ.get("FST_TEST_HANG_IN_UPLOAD")
if HANG_IN_UPLOAD:
    from fst.store.s3 import S3CheckpointStore

    text, count = HANG_IN_UPLOAD.rsplit(":", 1)
    uploaded: list[str] = []
    _upload = S3CheckpointStore._upload

    def _upload_then_hang(self: Any, path: Any, key: str, info: Any) -> Any:
        result = _upload(self, path, key, info)
        if text in key:
            uploaded.append(key)
            if len(uploaded) == int(count):
                if os.environ.get("FST_TEST_HANG_MARKER"):
                    open(os.environ["FST_TEST_HANG_MARKER"], "w").close()
                while True:
                    time.sleep(60)
        return result

    S3CheckpointStore._upload = _upload_then_hang  # type: ignore[method-assign]

sys.exit(main())
