"""TRL's side of the benchmark: `GRPOTrainer(loss_type="cispo", beta=0)` on the same problems.

TRL is configured for speed and for the same computation as fastslow:
  - the same model object (SmolLM2 from the same GGUF, float32), the same tokenizer and chat
    template (system = fastslow's seed prompt, user = the problem);
  - P·G completions generated together (generation batch = P·G), trained in micro-batches of
    `micro_batch_size`, ONE optimizer step per generation batch (gradient_accumulation_steps =
    steps_per_generation = P·G / micro_batch_size), so no old-logprob forward is needed
    (TRL then uses the detached current logprobs, ratio 1 - fastslow's sampler logprobs give the
    same ratio up to float error);
  - loss_type="cispo" with epsilon_high = ε_max, beta=0 (no reference model), token-level IS;
  - AdamW with the same lr, betas, no weight decay, constant schedule, grad-norm clip 1.0;
  - no gradient checkpointing (TRL's default would recompute the forward pass), and the
    settings' precision: float32, or bf16=True (accelerate's autocast around the model's
    forward, float32 master weights) against fastslow's model.autocast: bfloat16;
  - logging every step to a file (fastslow writes metrics.jsonl every step too).
The trainer's loop runs as usual; a callback hands control back to the orchestrator at the end
of every optimizer step.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.speed.settings import BenchSettings, bench_reward, problem_sequence, prompts_hash
from fst.config import DEFAULT_SEED_PROMPT, ModelConfig
from fst.loop import load_task
from fst.model import load_policy, load_tokenizer


class TrlSide:
    def __init__(self, settings: BenchSettings) -> None:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback

        from bench.speed.settings import train_config

        self.settings = s = settings
        if s.trl_keep_freed_memory:
            from fst.loop import keep_freed_memory

            keep_freed_memory()
        self.tmp = Path(tempfile.mkdtemp(prefix="trl-bench-speed-"))
        self.task = load_task(train_config(s, self.tmp))
        train = self.task.problems("train")
        order = problem_sequence(s, self.task, s.max_steps + 1)
        dataset = Dataset.from_list(
            [
                {
                    "prompt": [
                        {"role": "system", "content": DEFAULT_SEED_PROMPT},
                        {"role": "user", "content": train[i].prompt},
                    ],
                    "problem_index": i,
                }
                for i in order
            ]
        )

        def reward(completions: list, problem_index: list[int], **_: Any) -> list[float]:
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [
                bench_reward(self.task, train[i], t)
                for i, t in zip(problem_index, texts, strict=True)
            ]

        batch = s.problems_per_step * s.group_size
        if batch % s.micro_batch_size:
            raise ValueError("P*G must be a multiple of micro_batch_size")
        accumulation = batch // s.micro_batch_size
        args = trl.GRPOConfig(
            output_dir=str(self.tmp / "out"),
            per_device_train_batch_size=s.micro_batch_size,
            gradient_accumulation_steps=accumulation,
            steps_per_generation=accumulation,
            num_generations=s.group_size,
            max_completion_length=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=0,
            generation_kwargs={"min_new_tokens": s.max_new_tokens},
            loss_type="cispo",
            epsilon_high=s.eps_max,
            importance_sampling_level="token",
            beta=0.0,
            num_iterations=1,
            scale_rewards="group",
            mask_truncated_completions=False,
            learning_rate=s.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            max_grad_norm=1.0,
            max_steps=s.max_steps + 1,
            shuffle_dataset=False,
            gradient_checkpointing=False,
            bf16=s.precision == "bf16",  # accelerate's autocast, float32 master weights
            fp16=False,
            use_cpu=True,
            seed=s.seed,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            log_completions=False,
        )
        # The same model object fastslow's side trains: with bf16, model.autocast makes
        # load_policy pick the float32 attention (fst.model.FLOAT32_ATTENTION) for TRL's model
        # too, so both run the same attention kernels (the autocast itself is accelerate's).
        autocast = "bfloat16" if s.precision == "bf16" else "none"
        mcfg = ModelConfig(name=s.model, autocast=autocast)
        model = load_policy(mcfg)
        self.trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=dataset,
            processing_class=load_tokenizer(mcfg),
        )
        self._instrument()
        side = self

        class Handoff(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                side._end_of_step()
                if side.conn.recv() != "step":
                    control.should_training_stop = True
                else:
                    side._start_of_step()
                return control

        self.trainer.add_callback(Handoff())
        self.trl_version = trl.__version__

    def _instrument(self) -> None:
        """Time TRL's generation and its rollout phase, count tokens and record the loss, by
        wrapping (not changing) three of the trainer's methods on this instance."""
        tr = self.trainer
        generate, rollout, compute_loss = (
            tr._generate_single_turn,
            tr._generate_and_score_completions,
            tr._compute_loss,
        )

        def _generate_single_turn(prompt_ids, *a, **k):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            completion_ids, logprobs = generate(prompt_ids, *a, **k)
            self.info["decode_s"] = time.perf_counter() - t0
            self.info["prompts_hash"] = prompts_hash(prompt_ids)
            self.info["gen_tokens"] = sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

        def _generate_and_score_completions(inputs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = rollout(inputs)
            self.info["rollout_s"] = time.perf_counter() - t0
            return out

        def _compute_loss(model, inputs):  # type: ignore[no-untyped-def]
            loss = compute_loss(model, inputs)
            mask = inputs["completion_mask"]
            self.info["trained_tokens"] = self.info.get("trained_tokens", 0) + int(mask.sum())
            self.info["loss"] = self.info.get("loss", 0.0) + float(loss.detach())
            return loss

        tr._generate_single_turn = _generate_single_turn
        tr._generate_and_score_completions = _generate_and_score_completions
        tr._compute_loss = _compute_loss

    def describe(self) -> dict[str, Any]:
        return {"trainer": "trl", "trl_version": self.trl_version}

    def _start_of_step(self) -> None:
        self.info: dict[str, Any] = {}
        self.meter.start()

    def _end_of_step(self) -> None:
        m = self.meter.stop()
        self.conn.send({**m, **self.info})

    def run(self, conn: Connection, meter: Any) -> None:
        self.conn, self.meter = conn, meter
        if conn.recv() != "step":
            return
        self._start_of_step()
        self.trainer.train()

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
