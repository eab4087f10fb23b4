"""One run on two processes (torchrun, gloo on the CPU, FSDP2): the same step as one process,
and checkpoints that resume at another world size. Real SmolLM2 (one step) and the tiny Llama
(every test), real torchrun subprocesses; a SIGKILL takes down the whole process group, as a
pod's end would.

What the CPU can prove is equivalence and resharding; its timings say nothing about GPUs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import comparable, wait_for_checkpoint, write_config
from tests.tiny_model import tiny_model_dir, tiny_run_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

# The CISPO loss is a mean of A * log pi over tokens whose advantages sum to ~0 per group: the
# loss itself can be ~1e-5 while its terms are ~1, so a relative tolerance on it measures
# cancellation, not the step. An absolute 1e-7 is still float rounding of terms of size ~1
# (measured: 2.3e-9 apart for a loss of 1.2e-5, which rel 1e-5 alone failed on one machine).
LOSS_ABS = 1e-7


@pytest.fixture(autouse=True)
def _temp_in_tmp_path(tmp_path, monkeypatch) -> None:
    """torchrun leaves a `torchelastic_*` folder in $TMPDIR per launch: keep them (and every
    other temporary file of the runs) in the test's own folder, not in /tmp."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    # A rank that aborts in C++ (SIGABRT) prints every thread's Python stack: where it was.
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *args,
    ]


def run(cmd: list[str], timeout: float = 1200) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[2:])} exited {proc.returncode}:\n{proc.stderr[-5000:]}")


def train_cmd(nproc: int, cfg: Path, *extra: str) -> list[str]:
    """`fst train` on the tiny model, with its varied reward (tests/varied_fst.py)."""
    args = ("-m", "tests.varied_fst", "train", "-c", str(cfg), "--no-progress", *extra)
    return torchrun(nproc, *args) if nproc > 1 else [sys.executable, *args]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- one step


@pytest.mark.parametrize(
    ("model", "lora"),
    [("tiny", False), ("tiny", True), ("smollm2", False)],
    ids=["tiny-full", "tiny-lora", "smollm2-full"],
)
def test_two_ranks_take_the_same_step_as_one_process(tmp_path, tiny_model_dir, model, lora):  # noqa: F811
    """The same fixed batch (4 problems x 4 rollouts): one process trains on all of it; two
    FSDP2 ranks each on 2 problems, with the token normaliser all-reduced and gradients summed.
    Loss and grad norm agree to float rounding (rel 1e-5), and so do the weights after one
    AdamW step at lr 1e-3: at most 1e-5 apart, 1% of one step's update (Adam divides a
    gradient by its own magnitude, so where a gradient is ~0 its rounding shows).
    SmolLM2 with LoRA agreed as closely when measured (1.6e-7); it is left out of the suite
    for time (~70 s), the tiny model's LoRA step covers that path."""
    name = str(tiny_model_dir) if model == "tiny" else "smollm2-135m-instruct"
    flag = ["--lora"] if lora else []
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run([sys.executable, "-m", "tests.spmd_probe", str(one), name, *flag])
    run(torchrun(2, "-m", "tests.spmd_probe", str(two), name, *flag))
    a, b = torch.load(one), torch.load(two)
    assert a["names"] == b["names"] and a["names"]
    if lora:
        assert all(".lora_" in n for n in a["names"]), "only the adapters are trained"
    for key in ("loss", "grad_norm", "entropy", "ratio_mean"):
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-5, abs=LOSS_ABS), key
    for key in ("trained_tokens", "trained_seqs"):
        assert b["metrics"][key] == a["metrics"][key]
    assert a["metrics"]["trained_seqs"] > 0 and a["metrics"]["updated"] == 1.0
    moved = max(float((a["after"][n] - a["before"][n]).abs().max()) for n in a["names"])
    assert moved > 5e-4, "the step should move the weights by about lr"
    for n in a["names"]:
        assert torch.equal(a["before"][n], b["before"][n]), n  # same start on both sides
        diff = float((a["after"][n] - b["after"][n]).abs().max())
        assert diff <= 1e-5, (n, diff)


def test_activation_checkpointing_and_an_offloaded_reference(tmp_path, tiny_model_dir):  # noqa: F811
    """parallel.activationCheckpointing (the trainer's one-forward-per-row path, layers
    recomputed in backward) on 2 ranks gives the one-process step, to the same tolerance; a
    reference sharded with parallel.reference: offload answers as the unsharded copy does."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run([sys.executable, "-m", "tests.spmd_probe", str(one), str(tiny_model_dir)])
    run(
        torchrun(
            2, "-m", "tests.spmd_probe", str(two), str(tiny_model_dir), "--ac", "--offload-ref"
        )
    )
    a, b = torch.load(one), torch.load(two)
    for key in ("loss", "grad_norm"):
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-5, abs=LOSS_ABS), key
    assert max(float((a["after"][n] - b["after"][n]).abs().max()) for n in a["names"]) <= 1e-5
    assert b["metrics"]["ref_diff"] == 0.0


def test_bf16_mixed_precision_keeps_fp32_master_weights(tmp_path, tiny_model_dir):  # noqa: F811
    """parallel.mixedPrecision bf16: the forward and backward in bfloat16, the sharded master
    weights, AdamW and the gradient reduction in fp32. The step stays close to the fp32 one
    (loss and grad norm within 1%; measured ~3e-4 and ~1e-3), and the weights stay fp32."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run([sys.executable, "-m", "tests.spmd_probe", str(one), str(tiny_model_dir)])
    run(torchrun(2, "-m", "tests.spmd_probe", str(two), str(tiny_model_dir), "--bf16"))
    a, b = torch.load(one), torch.load(two)
    for key in ("loss", "grad_norm"):
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-2), key
        assert b["metrics"][key] != a["metrics"][key], "bf16 compute should round differently"
    for n in a["names"]:
        assert b["after"][n].dtype == torch.float32, n
        assert torch.isfinite(b["after"][n]).all(), n
    moved = max(float((b["after"][n] - b["before"][n]).abs().max()) for n in a["names"])
    assert moved > 5e-4


# ----------------------------------------------------------------------------- resume


def fst_config(root: Path, model_dir: Path) -> dict:
    """Mode fst on the tiny Llama: every step trains (varied reward) and GEPA's rounds run on
    the policy's own rollouts, so the population depends on the weights it is given. (SmolLM2
    takes ~10x longer on 2 CPU ranks; its 2-rank step is checked by the probe above.)"""
    cfg = tiny_run_config(root, model_dir, mode="fst")
    cfg["steps"] = 3
    cfg["checkpoint"] = {"every": 2}
    cfg["metrics"] = {"klPrompts": 1, "klEvery": 1}
    return cfg


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant at once, as a pod's end would: torchrun starts
    its ranks in sessions of their own, so its process group is not enough."""
    import psutil  # a dependency of peft

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


def kill_group_after(cmd: list[str], manifest: Path, timeout: float = 1200) -> None:
    """Start `cmd`; SIGKILL it and every rank as soon as `manifest` exists."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_checkpoint(proc, manifest, timeout)
        kill_tree(proc.pid)  # reaps torchrun too (so its Popen sees no exit status)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def assert_same_records(want: list[dict], got: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(want, got, strict=True):
        a, b = comparable(a), comparable(b)
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
            else:
                assert b[key] == a[key], (a["step"], key)


def members(run_dir: Path) -> list[list[dict]]:
    return [r["members"] for r in read_jsonl(run_dir / "population.jsonl")]


def test_sigkilled_two_rank_run_resumes_at_two_and_at_one(tmp_path, tiny_model_dir):  # noqa: F811
    """The tiny Llama, mode fst, 3 steps, a checkpoint at step 2. Killed right after it and resumed:
    at world size 2 every record and the population match the uninterrupted 2-rank run; at
    world size 1 the records up to the checkpoint are kept, GEPA's round after the resume (on
    the restored weights, one process) gives the identical population (its validation scores
    come from the policy's own rollouts), and step 3 trains.
    The 2-rank run's step 3 is not expected to match the 1-process one: each rank samples its
    own share with its own random stream, which one process lays out differently."""
    straight = fst_config(tmp_path / "a", tiny_model_dir)
    run(train_cmd(2, write_config(tmp_path, straight, "a.yaml")))
    run_a = Path(straight["outputDir"]) / "t"

    killed = fst_config(tmp_path / "b", tiny_model_dir)
    cfg_b = write_config(tmp_path, killed, "b.yaml")
    run_b = Path(killed["outputDir"]) / "t"
    kill_group_after(train_cmd(2, cfg_b), run_b / "checkpoints" / "step-00000002" / "manifest.json")
    ckpt = run_b / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert (ckpt / "rng.pt").is_file() and (ckpt / "rng-1.pt").is_file()

    # The same folder, resumed at world size 1 (a copy, with its database).
    one = tmp_path / "c"
    shutil.copytree(tmp_path / "b", one)
    cfg_c = write_config(tmp_path, {**killed, "outputDir": str(one / "runs")}, "c.yaml")

    run(train_cmd(2, cfg_b, "--resume"))
    assert_same_records(read_jsonl(run_a / "metrics.jsonl"), read_jsonl(run_b / "metrics.jsonl"))
    assert members(run_b) == members(run_a)
    assert len(members(run_a)) == 2  # rounds before steps 1 and 3
    assert members(run_a)[1] != members(run_a)[0], "round 2 scores the trained policy anew"

    run(train_cmd(1, cfg_c, "--resume"))
    run_c = one / "runs" / "t"
    records_a, records_c = read_jsonl(run_a / "metrics.jsonl"), read_jsonl(run_c / "metrics.jsonl")
    assert_same_records(records_a[:2], records_c[:2])
    assert members(run_c) == members(run_a)
    assert records_c[2]["step"] == 3

    # The checkpoint's model/ is a plain transformers model holding the trained weights: the
    # same as the sharded dcp/ state, gathered (loaded into one process).
    from transformers import AutoModelForCausalLM

    from fst.config import ModelConfig
    from fst.model import load_policy
    from fst.run_state import restore_policy

    exported = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    gathered = load_policy(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    restore_policy(gathered, ckpt)
    want = gathered.state_dict()
    got = exported.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    start = load_policy(ModelConfig(name=str(tiny_model_dir), device="cpu")).state_dict()
    assert not all(torch.equal(start[k], want[k]) for k in want), "training moved the weights"


def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path, tiny_model_dir):  # noqa: F811
    """The reverse: 2 steps in one process, resumed by 2 FSDP ranks (the checkpoint resharded
    on load). GEPA's round after the resume runs on rank 0's gathered weights; its population
    equals the one an uninterrupted one-process run gets at that round, so the loaded shards
    are the saved weights."""
    straight = fst_config(tmp_path / "a", tiny_model_dir)
    run(train_cmd(1, write_config(tmp_path, straight, "a.yaml")))
    run_a = Path(straight["outputDir"]) / "t"

    first = {**fst_config(tmp_path / "b", tiny_model_dir), "steps": 2}
    cfg_b = write_config(tmp_path, first, "b.yaml")
    run(train_cmd(1, cfg_b))
    run(train_cmd(2, cfg_b, "--resume", "--override=steps=3"))
    run_b = Path(first["outputDir"]) / "t"
    records_a, records_b = read_jsonl(run_a / "metrics.jsonl"), read_jsonl(run_b / "metrics.jsonl")
    assert_same_records(records_a[:2], records_b[:2])
    assert members(run_b) == members(run_a)
    assert records_b[2]["step"] == 3
    dcp = run_b / "checkpoints" / "step-00000003" / "dcp"
    assert (dcp / "__1_0.distcp").is_file(), "step 3 was saved by two ranks"
