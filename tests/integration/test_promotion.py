"""The promotion gate on a real SmolLM2 stream (`fst stream`, fst/promote.py, fst/bundle.py).

One 3-stage stream, then the same stream edited twice, as a user would:

    add, add-more    trained with a learning rate too small to change a greedy answer: each
                     candidate scores what the promoted model scores, passes the gate
                     (gain 0 >= minGain 0), and is promoted; a bundle is published
    wreck            more additions, trained with a learning rate that wrecks the weights:
                     add's retention collapses: rejected, RegressionOnAdd... (a regression of
                     what is served is named first); serving stays add-more's bundle
    pin add          serving.pin: add -> serving.json names add's bundle (a rollback)
    unpin, recover   the pin removed and a fourth stage added: it starts from the promoted
                     add-more (not the rejected wreck), passes, is promoted and served

Then a bundle, loaded by plain transformers in a fresh process, reproduces its gate score.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fst.store.db import RunDB, database_url
from fst.stream import StreamState, run_stream
from tests.promotion_scenario import ADD, RECOVER, STAGES, stream_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def manifest(tmp_path: Path, stages: list[dict], **spec) -> Path:
    doc = {
        "apiVersion": "fastslow.io/v1alpha1",
        "kind": "TaskStream",
        "metadata": {"name": "gated"},
        "spec": stream_spec(outputDir=str(tmp_path / "runs"), stages=stages, **spec),
    }
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> dict:
    """The stream run three times (see the module docstring); what each left behind."""
    tmp = tmp_path_factory.mktemp("gated")
    folder = tmp / "runs" / "gated"
    seen: dict = {}
    run_stream(manifest(tmp, STAGES), progress=False)
    seen["first"] = json.loads((folder / "serving.json").read_text())
    run_stream(manifest(tmp, STAGES, serving={"pin": "add"}), progress=False)
    seen["pinned"] = json.loads((folder / "serving.json").read_text())
    run_stream(manifest(tmp, [*STAGES, RECOVER]), progress=False)
    seen["last"] = json.loads((folder / "serving.json").read_text())
    seen["state"] = StreamState.load(folder / "stream.json")
    seen["folder"], seen["manifest"] = folder, tmp / "stream.yaml"
    return seen


def test_a_stage_that_regresses_an_earlier_one_is_rejected_and_never_served(stream):
    add, more, wreck, recover = stream["state"].runs
    assert add.gate.promoted and more.gate.promoted, (add.gate.message, more.gate.message)
    # The base model scores something on `add` (else a regression could not show): at least
    # one of its 8 problems, so a drop to 0 exceeds maxRegression 0.1.
    assert add.gate.baseline["add"].pass_rate >= 0.125, add.gate
    assert not wreck.gate.promoted
    assert wreck.gate.reason.startswith("RegressionOnAdd"), wreck.gate.message
    assert wreck.bundle is None and wreck.checkpoint  # kept for inspection, never served
    assert stream["first"]["stage"] == "add-more" and stream["first"]["bundle"] == more.bundle
    assert stream["pinned"]["stage"] == "add" and stream["pinned"]["bundle"] == add.bundle
    # Unpinned, with a passing stage added: it started from the promoted add-more, not from
    # the rejected wreck, and is what is served now.
    assert recover.start_checkpoint == more.checkpoint
    assert recover.gate.promoted, recover.gate.message
    assert stream["last"]["stage"] == "recover" and stream["last"]["bundle"] == recover.bundle
    assert stream["last"]["pinned"] is None
    # The decisions and every number behind them are in the database too.
    db = RunDB(database_url(None, stream["folder"] / "fst.db"))
    rows = {s.name: s for s in db.stages("gated")}
    assert [rows[n].promoted for n in ("add", "add-more", "wreck", "recover")] == [
        True,
        True,
        False,
        True,
    ]
    assert rows["wreck"].gate["reason"] == wreck.gate.reason
    assert rows["wreck"].gate["candidate"]["add"]["pass_rate"] < add.gate.candidate["add"].pass_rate
    assert rows["recover"].bundle_uri == recover.bundle
    db.close()
    # The report opens with the gate's summary.
    from fst.report import write_report

    page = write_report(stream["folder"]).read_text()
    assert "the promotion gate of each stage" in page and "rejected (RegressionOnAdd" in page


def test_fst_lineage_shows_the_chain_the_decisions_and_what_is_served(stream):
    out = subprocess.run(
        [sys.executable, "-m", "fst", "lineage", str(stream["manifest"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "promoted GatePassed" in text and "rejected RegressionOnAdd" in text
    assert "serving: recover" in text
    lines = [ln for ln in text.splitlines() if ln.strip().startswith("recover")]
    assert lines and "from add-more" in lines[0], text


def test_a_bundle_loads_with_plain_transformers_and_reproduces_its_gate_score(stream):
    more = stream["state"].runs[1]
    bundle = Path(more.bundle)
    files = {p.name for p in bundle.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "system_prompt.txt"} <= files
    assert {"fastslow.json", "manifest.json"} <= files
    lineage = json.loads((bundle / "fastslow.json").read_text())
    assert lineage["stage"] == "add-more" and lineage["baseModel"] == "smollm2-135m-instruct"
    assert lineage["gate"]["reason"] == "GatePassed"
    assert [e["stage"] for e in lineage["earlierStages"]] == ["add"]
    assert lineage["klToBase"] is not None and lineage["configDigest"]
    # A fresh process with transformers alone (the task only scores the answers).
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from fst.config import TaskConfig
from fst.tasks import build_task
bundle = {str(bundle)!r}
tok = AutoTokenizer.from_pretrained(bundle)
model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32).eval()
prompt = open(bundle + "/system_prompt.txt").read()
task = build_task(TaskConfig.model_validate({json.dumps({**ADD, "seed": 3})}))
passed = 0
problems = task.problems("test")[:8]
for p in problems:
    messages = [{{"role": "system", "content": prompt}}, {{"role": "user", "content": p.prompt}}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    passed += task.score(p, answer).reward >= 1.0
print(passed / len(problems))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split()[-1]) == more.gate.candidate["add-more"].pass_rate


def test_fst_chat_answers_with_the_served_bundle(stream):
    """`fst chat STREAM PROMPT`: the served bundle's weights and prompt, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "fst", "chat", str(stream["folder"]), "What is 3 + 4?"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), out.stderr[-3000:]
    assert "bundle of stage recover" in out.stderr
