"""Save + upload of a real SmolLM2 checkpoint: MinIO (S3) against a local folder, side by side.

    python bench/storage_save.py [--repeats 3]

Starts a MinIO server on loopback (tests/servers.py builds it once into the cache), writes the
same checkpoint files (model safetensors + tokenizer, optimizer, RNG, state) through both
stores, alternating, and reports the median wall time of each and their ratio; then what a
training step waits for when the S3 upload runs in the background (checkpoint.backgroundUpload:
the local snapshot only) against a local save. Also times a load (materialize) from each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fst.config import SlowConfig, TrainConfig
from fst.model import load_policy, load_tokenizer
from fst.run_state import write_checkpoint_files
from fst.slow.trainer import SlowTrainer
from fst.store.checkpoints import BackgroundCommits, LocalCheckpointStore
from fst.store.s3 import S3CheckpointStore
from tests.servers import minio_server


def save(store, step: int, cfg, model, tok, trainer, gen) -> float:
    t0 = time.perf_counter()
    staging = store.staging_dir()
    write_checkpoint_files(staging, cfg, model, tok, trainer, gen, {"step": step})
    store.commit(step, staging, {})
    return time.perf_counter() - t0


def save_in_background(store, commits, step: int, cfg, model, tok, trainer, gen) -> float:
    """What a training step waits for with checkpoint.backgroundUpload (fst/loop.py
    save_checkpoint): the local snapshot, then handing the upload to the background thread.
    The previous upload has finished by then (waited for below, outside the timing): a
    training interval longer than an upload, as in a real run, where steps take ~30 s."""
    commits.wait()
    t0 = time.perf_counter()
    staging = store.staging_dir()
    write_checkpoint_files(staging, cfg, model, tok, trainer, gen, {"step": step})
    commits.submit(lambda: store.commit(step, staging, {}))
    blocked = time.perf_counter() - t0
    commits.wait()
    return blocked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = TrainConfig(task={"name": "arithmetic"})
    tok, model = load_tokenizer(cfg.model), load_policy(cfg.model)
    trainer = SlowTrainer(model, SlowConfig(), 1.0, pad_id=0)
    # One real optimizer step so the AdamW state (2x the weights) is in the checkpoint.
    for p in trainer.params:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, minio_server() as minio:
        os.environ.update(minio.env())
        os.environ["FST_CACHE"] = str(Path(tmp) / "cache")
        local = LocalCheckpointStore(Path(tmp) / "local")
        s3 = S3CheckpointStore("s3://fst-test/bench")
        times: dict[str, list[float]] = {"local": [], "s3": [], "s3-background": []}
        load: dict[str, list[float]] = {"local": [], "s3": []}
        background = S3CheckpointStore("s3://fst-test/bench-background")
        commits = BackgroundCommits()
        # One unmeasured save of each first: the first write of a process pays for warm-ups
        # (allocations, imports, page cache) that no later save does.
        save(local, 1000, cfg, model, tok, trainer, gen)
        save_in_background(background, commits, 1000, cfg, model, tok, trainer, gen)
        for i in range(args.repeats):
            # The order rotates, so that no kind always follows the same one (the disk is
            # still writing back the previous save's 2 GB).
            kinds = ["local", "s3", "s3-background"]
            kinds = kinds[i % 3 :] + kinds[: i % 3]
            for name in kinds:
                # The previous save's 2 GB reach the disk first (outside the timing): in a run,
                # minutes of training separate two saves, so none pays for the last one's
                # write-back, and here back-to-back saves would, at random.
                os.sync()
                if name == "s3-background":
                    times[name].append(
                        save_in_background(
                            background, commits, i + 1, cfg, model, tok, trainer, gen
                        )
                    )
                    continue
                store = local if name == "local" else s3
                times[name].append(save(store, i + 1, cfg, model, tok, trainer, gen))
                t0 = time.perf_counter()
                if name == "s3":
                    shutil.rmtree(Path(tmp) / "cache", ignore_errors=True)  # a cold download
                store.materialize(i + 1)
                load[name].append(time.perf_counter() - t0)
        size = sum(f["size"] for f in local.manifest(1)["files"].values())
    med = {k: statistics.median(v) for k, v in times.items()}
    print("raw:", {k: [round(x, 2) for x in v] for k, v in times.items()})
    lmed = {k: statistics.median(v) for k, v in load.items()}
    print(f"checkpoint size {size / 2**20:.0f} MiB, {args.repeats} saves each, medians:")
    print(
        f"  save  local {med['local']:.2f} s   s3 {med['s3']:.2f} s   "
        f"ratio s3/local {med['s3'] / med['local']:.2f}"
    )
    print(
        f"  training blocked by a save: local {med['local']:.2f} s   s3 in the background "
        f"{med['s3-background']:.2f} s   ratio {med['s3-background'] / med['local']:.2f} "
        "(target <= 1.1)"
    )
    print(
        f"  load  local {lmed['local']:.2f} s   s3 {lmed['s3']:.2f} s   "
        f"ratio s3/local {lmed['s3'] / lmed['local']:.2f}"
    )


if __name__ == "__main__":
    main()
