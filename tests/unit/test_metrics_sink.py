"""The metrics sink keeps one trajectory: on resume, records after the checkpoint go."""

from __future__ import annotations

import json

from fst.fast.population import PromptRecord
from fst.metrics import MetricsSink, read_metrics


def test_truncate_drops_steps_and_rounds_after_the_checkpoint(tmp_path):
    sink = MetricsSink(tmp_path)
    pop = [PromptRecord("p")]
    for step in (1, 2, 3):
        sink.write({"step": step, "reward_mean": 0.1 * step, "kl": float("nan")})
    sink.write_population(1, 0, pop, pop)  # round 0, before step 1
    sink.write_population(3, 1, pop, pop)  # round 1, before step 3 (after checkpoint 2)
    sink.truncate_after(2)  # resume from the checkpoint of step 2
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
    assert read_metrics(tmp_path)[0]["kl"] is None  # NaN is written as null
    lines = (tmp_path / "population.jsonl").read_text().splitlines()
    rounds = [json.loads(x)["round"] for x in lines]
    assert rounds == [0]  # round 1 ran after the checkpoint: it will run again
