"""Float32 attention under bf16 autocast on the CPU, against transformers' stock SDPA.

    python -m bench.attention [--rows 1 4 16 32] [--prompt-tokens 100] [--new-tokens 64]

One process, one SmolLM2 (`model.autocast: bfloat16`, float32 master weights): the rollout
engine generates the same prompts with the same generator under each attention
implementation in turn (`sdpa`, then `fst.model.FLOAT32_ATTENTION`, then both again: the
better of two each), every completion forced to `--new-tokens` (no stop token), so both decode
exactly the same number of steps at every batch size. Then the attention kernel alone: one
decoding step's SDPA call with SmolLM2's head layout, bf16 against float32 inputs.
Reported: seconds per `generate` (prefill + decoding) and their ratio, per batch size.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench.record import engine_bench_parser, smollm2_bf16, write_record


def kernel_us(rows: int, keys: int, dtype: Any, repeats: int = 200) -> float:
    """Microseconds per decoding-step SDPA call: 9 query heads over 3 key-value heads of 64
    (SmolLM2-135M), one query, `keys` keys, a boolean padding mask."""
    import torch
    import torch.nn.functional as F

    q = torch.randn(rows, 9, 1, 64, dtype=dtype)
    k, v = (torch.randn(rows, 3, keys, 64, dtype=dtype) for _ in range(2))
    mask = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
    for _ in range(10):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    t0 = time.perf_counter()
    for _ in range(repeats):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return (time.perf_counter() - t0) / repeats * 1e6


def main(argv: list[str] | None = None) -> int:
    p = engine_bench_parser("attention", __doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=64)
    a = p.parse_args(argv)

    import torch

    from fst.model import FLOAT32_ATTENTION
    from fst.rollout import SamplingParams
    from fst.rollout.hf import HFRolloutEngine

    torch.set_num_threads(a.threads)
    started, load_before = time.time(), os.getloadavg()
    model, tok = smollm2_bf16()
    # No stop token: every row decodes exactly --new-tokens under both implementations.
    engine = HFRolloutEngine(
        model, tok, [-1], batch_size=max(a.rows), autocast_dtype=torch.bfloat16
    )
    params = SamplingParams(max_new_tokens=a.new_tokens)
    rows_out = []
    for rows in a.rows:
        g = torch.Generator().manual_seed(rows)
        prompts = [torch.randint(100, 20_000, (a.prompt_tokens,), generator=g).tolist()]
        prompts = [prompts[0][i:] + prompts[0][:i] for i in range(rows)]  # distinct rows
        seconds: dict[str, list[float]] = {"sdpa": [], FLOAT32_ATTENTION: []}
        for impl in ("sdpa", FLOAT32_ATTENTION) * 2:
            model.set_attn_implementation(impl)
            engine.generate(prompts[:1], SamplingParams(max_new_tokens=2), torch.Generator())
            t0 = time.perf_counter()
            engine.generate(prompts, params, torch.Generator().manual_seed(0))
            seconds[impl].append(time.perf_counter() - t0)
        keys = a.prompt_tokens + a.new_tokens // 2
        row = {
            "rows": rows,
            "sdpa_s": min(seconds["sdpa"]),
            "float32_s": min(seconds[FLOAT32_ATTENTION]),
            "kernel_bf16_us": kernel_us(rows, keys, torch.bfloat16),
            "kernel_fp32_us": kernel_us(rows, keys, torch.float32),
            "all_s": seconds,
        }
        row["ratio"] = row["float32_s"] / row["sdpa_s"]
        rows_out.append(row)
        print(
            f"{rows:>3} rows: generate {row['sdpa_s']:.2f} s (sdpa) -> {row['float32_s']:.2f} s "
            f"(float32 attention), ratio {row['ratio']:.2f}; one attention kernel at {keys} keys "
            f"{row['kernel_bf16_us']:.0f} us bf16, {row['kernel_fp32_us']:.0f} us fp32",
            flush=True,
        )
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    write_record(a.out, started, load_before, settings=settings, rows=rows_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
