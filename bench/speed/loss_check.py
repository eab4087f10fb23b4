"""Same loss, same gradient: fastslow's CISPO step against TRL's, on one fixed batch.

    python -m bench.speed.loss_check [--temperatures 1.0 0.7]

One batch is built once and given to both: 2 problems x 4 completions sampled from SmolLM2,
each cut to its own length (24 down to 10 tokens, so padding is exercised); old logprobs =
the sampler's plus fixed noise, with every 5th token's made 2.5 nats lower (ratio ~12 >
eps_max = 5, so the truncation is exercised); fixed advantages of both signs. Then:
  - fastslow: `SlowTrainer.backward` (the code `step` runs before the optimizer), in
    micro-batches of 3 (so prompt sharing spans micro-batch boundaries);
  - TRL: `GRPOTrainer._compute_loss` (loss_type="cispo", epsilon_high=eps_max, beta=0) on the
    whole batch, inputs laid out as TRL builds them (left-padded prompts, right-padded
    completions, `old_per_token_logps`, `num_items_in_batch` = completion tokens), in train
    mode with one accumulation step so its normaliser is the batch's token count - ours too.
Compared: the loss value (relative difference) and the gradient of every parameter (relative
L2 difference over all parameters, cosine). Exit status 1 if outside the tolerances.

`--precision bf16` runs both with bfloat16 matmuls and float32 weights (fastslow's
model.autocast, TRL's bf16=True under accelerate's autocast) and also reports how far each
moves from its own float32 result, the yardstick for the looser bf16 tolerances.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from typing import Any

import torch

from fst.config import DEFAULT_SEED_PROMPT, ModelConfig, SlowConfig
from fst.model import chat_prompt_ids, load_policy, load_tokenizer, stop_token_ids
from fst.rollout import Rollout, SamplingParams
from fst.rollout.hf import HFRolloutEngine
from fst.slow.advantages import group_advantages
from fst.slow.trainer import SlowTrainer
from fst.tasks import build_task

LOSS_RTOL = 1e-4  # fp32: |loss_fst - loss_trl| / |loss_trl|
GRAD_RTOL = 1e-3  # fp32: ||g_fst - g_trl|| / ||g_trl|| over all parameters
# bf16: each trainer rounds its matmuls to 8 significant bits along its own path (fastslow
# shares each prompt's KV cache, TRL runs every row's prompt), so they can agree only as well
# as each agrees with float32. If both are within d of their float32 result (which agree to
# 1e-4), they are within ~2d of each other: the bf16 check is that bound, measured in the same
# run (d = the larger trainer's distance). Since a broken bf16 path would widen that bound
# itself, two absolute guards go with it: each trainer's bf16 gradient within 0.1 (relative
# L2) of its float32 one (measured: ~0.05 for both), and a fastslow-TRL gradient cosine of at
# least 0.99.
BF16_BOUND = 2.0
BF16_MAX_GRAD_DRIFT = 0.1
BF16_MIN_COSINE = 0.99
EPS_MAX = 5.0
PROBLEMS, GROUP = 2, 4


def fixed_batch(model: Any, tok: Any, temperature: float) -> tuple[list[Rollout], list[float]]:
    from fst.config import TaskConfig

    task = build_task(TaskConfig(name="arithmetic", params={"steps": 1}))
    problems = task.problems("train")[:PROBLEMS]
    prompts = [
        chat_prompt_ids(tok, DEFAULT_SEED_PROMPT, p.prompt) for p in problems for _ in range(GROUP)
    ]
    engine = HFRolloutEngine(model, tok, stop_token_ids(tok, model), batch_size=len(prompts))
    rollouts = engine.generate(
        prompts, SamplingParams(temperature, 1.0, 24), torch.Generator().manual_seed(1234)
    )
    noise = torch.Generator().manual_seed(99)
    for b, r in enumerate(rollouts):
        # Cut each completion to its own length (a prefix of a sample is a valid sample with
        # the same logprobs), so that the padding of both layouts is exercised.
        n = max(1, min(len(r.completion_ids), 24 - 2 * b))
        r.completion_ids, r.logprobs = r.completion_ids[:n], r.logprobs[:n]
        lp = torch.tensor(r.logprobs) + 0.3 * torch.randn(len(r.logprobs), generator=noise)
        lp[::5] -= 2.5
        r.logprobs = lp.tolist()
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.3, 0.9]])
    return rollouts, group_advantages(rewards, 1e-6).flatten().tolist()


def flat_grad(model: Any) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
            for p in model.parameters()
        ]
    )


def fastslow_loss(
    model: Any,
    pad_id: int,
    rollouts: list[Rollout],
    adv: list[float],
    temperature: float,
    precision: str = "fp32",
) -> tuple[float, float, torch.Tensor]:
    trainer = SlowTrainer(
        model,
        SlowConfig(eps_max=EPS_MAX, micro_batch_size=3),
        temperature,
        pad_id,
        autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
    )
    trainer.optimizer.zero_grad(set_to_none=True)
    metrics = trainer.backward(rollouts, adv)
    return metrics["loss"], metrics["clip_frac"], flat_grad(model)


def trl_loss(
    model: Any,
    tok: Any,
    rollouts: list[Rollout],
    adv: list[float],
    temperature: float,
    precision: str = "fp32",
) -> tuple[float, torch.Tensor]:
    import trl
    from datasets import Dataset

    B = len(rollouts)
    with tempfile.TemporaryDirectory() as tmp:
        args = trl.GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=B,
            gradient_accumulation_steps=1,
            num_generations=GROUP,
            temperature=temperature,
            loss_type="cispo",
            epsilon_high=EPS_MAX,
            beta=0.0,
            gradient_checkpointing=False,
            bf16=precision == "bf16",
            use_cpu=True,
            report_to="none",
        )
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "unused"}] * B),
            processing_class=tok,
        )
    pad = tok.pad_token_id
    P = max(len(r.prompt_ids) for r in rollouts)
    C = max(len(r.completion_ids) for r in rollouts)
    prompt_ids = torch.full((B, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    completion_ids = torch.full((B, C), pad, dtype=torch.long)
    completion_mask = torch.zeros((B, C), dtype=torch.long)
    old = torch.zeros((B, C))
    for b, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        prompt_ids[b, P - p :] = torch.tensor(r.prompt_ids)  # TRL left-pads prompts
        prompt_mask[b, P - p :] = 1
        completion_ids[b, :c] = torch.tensor(r.completion_ids)
        completion_mask[b, :c] = 1
        old[b, :c] = torch.tensor(r.logprobs)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(adv),
        "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": old,
    }
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    # What TRL's training loop does with bf16=True: the forward and the loss under
    # accelerate's autocast (a no-op context in fp32), the backward outside it.
    with trainer.accelerator.autocast():
        loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach()), flat_grad(trainer.model)


def grad_rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64: a float32 sum over 135M products is not accurate to the
    digits shown."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def check(temperature: float, precision: str = "fp32") -> dict[str, float]:
    mcfg = ModelConfig()
    tok = load_tokenizer(mcfg)
    base = load_policy(mcfg)
    rollouts, adv = fixed_batch(base, tok, temperature)
    loss_f, clip_frac, grad_f = fastslow_loss(
        copy.deepcopy(base), tok.pad_token_id, rollouts, adv, temperature, precision
    )
    loss_t, grad_t = trl_loss(copy.deepcopy(base), tok, rollouts, adv, temperature, precision)
    result = {
        "temperature": temperature,
        "tokens": sum(len(r.completion_ids) for r in rollouts),
        "clip_frac": clip_frac,
        "loss_fastslow": loss_f,
        "loss_trl": loss_t,
        "loss_rel_diff": abs(loss_f - loss_t) / max(abs(loss_t), 1e-12),
        "grad_rel_l2": grad_rel_l2(grad_f, grad_t),
        "grad_cosine": float(
            torch.nn.functional.cosine_similarity(grad_f.double(), grad_t.double(), dim=0)
        ),
    }
    if precision != "fp32":
        # How far the precision itself moves each trainer from its own float32 result.
        loss_f32, _, grad_f32 = fastslow_loss(
            copy.deepcopy(base), tok.pad_token_id, rollouts, adv, temperature
        )
        loss_t32, grad_t32 = trl_loss(copy.deepcopy(base), tok, rollouts, adv, temperature)
        result |= {
            "fastslow_vs_fp32_loss": abs(loss_f - loss_f32) / max(abs(loss_f32), 1e-12),
            "fastslow_vs_fp32_grad": grad_rel_l2(grad_f, grad_f32),
            "trl_vs_fp32_loss": abs(loss_t - loss_t32) / max(abs(loss_t32), 1e-12),
            "trl_vs_fp32_grad": grad_rel_l2(grad_t, grad_t32),
        }
    return result


def tolerances(r: dict[str, float]) -> tuple[float, float]:
    """(loss, gradient) tolerances for one check's result (see BF16_BOUND)."""
    if "fastslow_vs_fp32_loss" not in r:
        return LOSS_RTOL, GRAD_RTOL
    return (
        BF16_BOUND * max(r["fastslow_vs_fp32_loss"], r["trl_vs_fp32_loss"]),
        BF16_BOUND * max(r["fastslow_vs_fp32_grad"], r["trl_vs_fp32_grad"]),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speed.loss_check", description=__doc__)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    a = p.parse_args(argv)
    ok = True
    print(
        "| T | tokens | truncated | loss fastslow | loss TRL | rel. diff "
        "| grad rel. L2 diff | cosine |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    extra = []
    for t in a.temperatures:
        r = check(t, a.precision)
        loss_rtol, grad_rtol = tolerances(r)
        good = r["loss_rel_diff"] <= loss_rtol and r["grad_rel_l2"] <= grad_rtol
        if a.precision == "bf16":
            good = good and r["grad_cosine"] >= BF16_MIN_COSINE
            drift = max(r["fastslow_vs_fp32_grad"], r["trl_vs_fp32_grad"])
            good = good and drift <= BF16_MAX_GRAD_DRIFT
            extra.append(
                f"| {t} | {r['fastslow_vs_fp32_loss']:.1e} | {r['fastslow_vs_fp32_grad']:.1e} "
                f"| {r['trl_vs_fp32_loss']:.1e} | {r['trl_vs_fp32_grad']:.1e} "
                f"| {loss_rtol:.1e} | {grad_rtol:.1e} |"
            )
        good = good and math.isfinite(r["loss_fastslow"])
        ok &= good
        print(
            f"| {t} | {r['tokens']} | {r['clip_frac']:.0%} | {r['loss_fastslow']:.6f} | "
            f"{r['loss_trl']:.6f} | {r['loss_rel_diff']:.1e} | {r['grad_rel_l2']:.1e} | "
            f"{r['grad_cosine']:.7f} |",
            flush=True,
        )
    if extra:
        print(
            "\neach trainer in bf16 against itself in fp32 (relative differences), and the "
            f"tolerances they give ({BF16_BOUND:g} x the larger; also each gradient within "
            f"{BF16_MAX_GRAD_DRIFT:g} of its fp32 one, cosine >= {BF16_MIN_COSINE:g}):"
        )
        print(
            "| T | fastslow loss | fastslow grad L2 | TRL loss | TRL grad L2 "
            "| loss tol. | grad tol. |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(extra))
    else:
        print(
            f"\ntolerances: loss relative difference <= {LOSS_RTOL:g}, gradient relative L2 "
            f"difference <= {GRAD_RTOL:g}"
        )
    print(f"{a.precision}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
