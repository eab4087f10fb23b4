"""This CPU's matrix-multiply peak, measured with a plain matmul in the benchmark's own run.

The training phase's arithmetic rate is reported as a fraction of this peak (in the precision
the trainers compute in), so "how far from the hardware's limit" is a number, not a guess. A
square (n x n) @ (n x n) product is the friendliest case for the BLAS (oneDNN for bfloat16):
no real layer reaches it, so the fraction is an upper-bound yardstick, not an efficiency of 1.
"""

from __future__ import annotations

import time

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_gflops(dtype: torch.dtype, threads: int, n: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of repeated (n x n) @ (n x n) products in `dtype` on `threads` threads: the best
    of ~`seconds` of one-second rounds (a round that other processes slowed is not the peak)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        for _ in range(2):  # warm-up: packing buffers, thread pool
            torch.mm(a, b, out=out)
        best, start = 0.0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0, k = time.perf_counter(), 0
            while time.perf_counter() - t0 < 1.0 or k == 0:
                torch.mm(a, b, out=out)
                k += 1
            best = max(best, 2 * n**3 * k / (time.perf_counter() - t0) / 1e9)
        return best
    finally:
        torch.set_num_threads(saved)


def matmul_params(model: torch.nn.Module) -> int:
    """Weights that take part in a matrix multiply per token: every nn.Linear's (the LM head
    included; with tied embeddings the lookup itself is not a multiply). A training token costs
    ~6 FLOPs per such weight (2 forward, 4 backward), the usual 6·N·tokens estimate."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
