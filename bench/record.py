"""What the small engine benches share: their command line's common flags, the model they
load, and what their JSON record says about the machine and its load."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def engine_bench_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """`python -m bench.<name>`'s parser with --threads and --out (default: a time-stamped
    file under runs/bench-<name>/)."""
    p = argparse.ArgumentParser(
        prog=f"python -m bench.{name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "runs" / f"bench-{name}" / f"{time.strftime('%Y%m%d-%H%M%S')}.json",
    )
    return p


def smollm2_bf16() -> tuple[Any, Any]:
    """(model, tokenizer): SmolLM2 as a `model.autocast: bfloat16` run loads it."""
    from fst.config import ModelConfig
    from fst.model import load_policy, load_tokenizer

    cfg = ModelConfig(name="smollm2-135m-instruct", autocast="bfloat16")
    return load_policy(cfg), load_tokenizer(cfg)


def machine(load_before: tuple[float, ...]) -> dict[str, Any]:
    """The machine, torch, and the load averages before the run and now."""
    import torch

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def started_at(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def write_record(out: Path, started: float, load_before: tuple[float, ...], **fields: Any) -> None:
    """The bench's JSON record at `out`: its `fields`, when it started, the machine."""
    record = {**fields, "started": started_at(started), "machine": machine(load_before)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"records: {out}")
