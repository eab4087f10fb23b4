"""Shared prefixes in the rollout engine and in training, on and off, side by side in one
process.

    python -m bench.prefix [--new-tokens 1 32] [--sections engine training]

SmolLM2 under bf16 autocast; four system prompts of the kind an FST population holds (the
seed, then the digest reflector's lessons appended to it: 17 to 140 tokens; texts taken from a
`mul` learning-bench run) over `mul` problems, in the three shapes the fast channel makes:
a training step (4 prompts x 4 problems x 2 rollouts), a round's re-scoring (4 prompts x 8
problems) and a minibatch evaluation (4 prompts x 4 problems). Each shape is generated with
`fst.rollout.hf.MIN_SHARED_PREFIX` at its value (prefixes shared) and at infinity (one plain
prefill), alternating, the better of two each; every completion forced to the same length
(1 new token: the prefill alone). Reported: seconds and their ratio.

Training (section `training`): one step's forward + backward of a step's shape (4 prompts x
4 problems x 2 rollouts, completions of 30-127 random tokens, every row with signal) in
micro-batches of 8, three ways: by problem with whole prompts (the trainer's order before
`_micro_batches` sorted by prompt), by system prompt with whole prompts, and by system prompt
with the shared prefix split off (`pack_shared`, the trainer now); and RL's step of the same
shape (the seed prompt only, 4 problems x 8) for reference. The best of three each.
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.record import engine_bench_parser, smollm2_bf16, write_record

SEED = "You are a helpful assistant. Think step by step, then give the final answer."
LESSON = (
    "* Compute {a} * {b}. End your reply with the final answer as an integer. -> Wrong value: "
    "the reply ends with {w}, expected {r}. Worked steps: {a} * {b} = {r}."
)


def population() -> list[str]:
    def lessons(*cases: tuple[int, int, int]) -> str:
        lines = [LESSON.format(a=a, b=b, w=w, r=a * b) for a, b, w in cases]
        return SEED + "\n\nWorked examples from earlier mistakes:\n" + "\n".join(lines)

    return [
        SEED,
        lessons((15, 13, 185)),
        lessons((15, 13, 185), (23, 9, 218)),
        lessons((19, 15, 245), (5, 5, 22)),
    ]


PROBLEMS = [(12, 17), (23, 9), (14, 21), (7, 25), (19, 18), (11, 13), (22, 24), (16, 8)]


def main(argv: list[str] | None = None) -> int:
    p = engine_bench_parser("prefix", __doc__)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[1, 32])
    p.add_argument(
        "--sections", nargs="+", choices=["engine", "training"], default=["engine", "training"]
    )
    a = p.parse_args(argv)

    import torch

    from fst.model import chat_prompt_ids
    from fst.rollout import SamplingParams, hf

    torch.set_num_threads(a.threads)
    started, load_before = time.time(), os.getloadavg()
    model, tok = smollm2_bf16()
    systems = population()
    problems = [
        f"Compute {x} * {y}. End your reply with the final answer as an integer."
        for x, y in PROBLEMS
    ]
    shapes = {
        "step (4 prompts x 4 problems x 2)": [
            chat_prompt_ids(tok, s, q) for s in systems for q in problems[:4] for _ in range(2)
        ],
        "re-scoring (4 prompts x 8 problems)": [
            chat_prompt_ids(tok, s, q) for s in systems for q in problems
        ],
        "minibatch (4 prompts x 4 problems)": [
            chat_prompt_ids(tok, s, q) for s in systems for q in problems[:4]
        ],
    }
    engine = hf.HFRolloutEngine(model, tok, [-1], batch_size=64, autocast_dtype=torch.bfloat16)
    shared_from = hf.MIN_SHARED_PREFIX
    rows = []
    for name, prompts in shapes.items() if "engine" in a.sections else ():
        for new in a.new_tokens:
            seconds: dict[str, list[float]] = {"plain": [], "shared": []}
            for mode in ("plain", "shared") * 2:
                hf.MIN_SHARED_PREFIX = shared_from if mode == "shared" else 10**9
                t0 = time.perf_counter()
                engine.generate(prompts, SamplingParams(max_new_tokens=new), torch.Generator())
                seconds[mode].append(time.perf_counter() - t0)
            row = {
                "shape": name,
                "rows": len(prompts),
                "prompt_tokens": sum(len(x) for x in prompts),
                "new_tokens": new,
                "plain_s": min(seconds["plain"]),
                "shared_s": min(seconds["shared"]),
                "all_s": seconds,
            }
            row["ratio"] = row["shared_s"] / row["plain_s"]
            rows.append(row)
            print(
                f"{name}, {row['rows']} rows, {row['prompt_tokens']} prompt tokens, {new} new: "
                f"plain {row['plain_s']:.2f} s, shared {row['shared_s']:.2f} s, "
                f"ratio {row['ratio']:.2f}",
                flush=True,
            )
    hf.MIN_SHARED_PREFIX = shared_from
    training = training_section(model, tok, systems, problems) if "training" in a.sections else []
    write_record(
        a.out,
        started,
        load_before,
        settings={"new_tokens": a.new_tokens, "threads": a.threads, "sections": a.sections},
        system_prompt_tokens=[len(tok(s)["input_ids"]) for s in systems],
        rows=rows,
        training=training,
    )
    return 0


def training_section(
    model: Any, tok: Any, systems: list[str], problems: list[str]
) -> list[dict[str, Any]]:
    """Seconds of one step's forward + backward, each way (see the module docstring)."""
    import random

    import torch

    from fst.model import autocast, chat_prompt_ids
    from fst.rollout import Rollout
    from fst.slow.trainer import pack_shared, shared_prompt_logprobs

    rng = random.Random(0)

    def step_rows(prompts: list[str], per: int) -> list[Rollout]:
        out = []
        for q in problems[:4]:  # the engine's order: problem-major
            for s in prompts:
                for _ in range(per):
                    c = [rng.randrange(100, 40000) for _ in range(rng.randrange(30, 128))]
                    out.append(Rollout(chat_prompt_ids(tok, s, q), c, [-1.0] * len(c), "", True))
        return out

    def eights(rs: list[Rollout]) -> list[list[Rollout]]:
        return [rs[i : i + 8] for i in range(0, len(rs), 8)]

    def seconds(micro_batches: list[list[Rollout]], split: bool | None) -> float:
        t0 = time.perf_counter()
        for mb in micro_batches:
            with autocast(torch.bfloat16, model.device):
                b = pack_shared(mb, [1.0] * len(mb), 0, model.device, 1, split)
                logp, _ = shared_prompt_logprobs(model, b, 1.0)
            (logp * b.mask).sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    fst = step_rows(systems, 2)
    ways = {
        "rl (seed prompt only)": (eights(step_rows(systems[:1], 8)), None),
        "fst by problem, whole prompts": (eights(fst), False),
        "fst by system prompt, whole prompts": (
            eights(sorted(fst, key=lambda r: r.prompt_ids)),
            False,
        ),
        "fst by system prompt, prefix split": (
            eights(sorted(fst, key=lambda r: r.prompt_ids)),
            None,
        ),
    }
    model.train()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(3):
        for name, (mbs, split) in ways.items():
            times[name].append(seconds(mbs, split))
    rl = min(times["rl (seed prompt only)"])
    out = []
    for name, (mbs, _) in ways.items():
        best = min(times[name])
        tokens = sum(len(r.prompt_ids) + len(r.completion_ids) for mb in mbs for r in mb)
        out.append(
            {"way": name, "s": best, "all_s": times[name], "vs_rl": best / rl, "row_tokens": tokens}
        )
        print(f"training, {name}: {best:.2f} s, {best / rl:.2f}x rl", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
