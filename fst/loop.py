"""The training loop: rollouts -> rewards -> one advantage group per problem -> CISPO step.

    for step in 1..steps:
        problems  <- next `problemsPerStep` problems of the train split
        for each problem: G rollouts, spread round-robin over the population's K prompts
        rewards (P, G) -> advantages (P, G), one group per problem across all its prompts
        slow step (mode rl/fst): CISPO on all P*G rollouts, `slow.updatesPerBatch` updates
        (mode fst-distill: plus weight x KL(π_θ(.|seed prompt) || sg π_θ(.|best prompt)) on
        completions sampled under the seed prompt, fst/slow/losses.py reverse_kl_loss)
        metrics -> metrics.jsonl ; checkpoint every N steps (manifest last)

    every T steps (modes fst, fst-distill, gepa), BEFORE the step: a GEPA round on the policy
        population <- top-K of the Pareto front (fst/fast/gepa_adapter.py)

In mode `rl` the population is the seed prompt alone and never changes; in mode `gepa` the
weights never change (rollouts are still sampled and scored, to measure the reward).

Under torchrun (several processes, fst/distributed.py) every rank runs this same loop on its
share of each step's problems; rank 0 alone writes (metrics, population, lease, the checkpoint's
model export) and runs the GEPA round, whose population it broadcasts.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from fst.config import ConfigError, TrainConfig, dump_config, public_config, redact_url
from fst.distributed import (
    SINGLE,
    RolloutCopy,
    World,
    barrier,
    broadcast,
    close_world,
    gather_to_main,
    init_world,
    local_share,
    shard,
    transformer_of,
)
from fst.fast.gepa_adapter import (
    MemoisedLM,
    PolicyAdapter,
    RoundInFlight,
    RoundResult,
    StepSample,
    run_gepa_round,
)
from fst.fast.population import PromptRecord
from fst.fast.reflectors import DigestProposer, LocalReflector, OpenAIReflector
from fst.metrics import MetricsSink, kl_to_base
from fst.model import (
    AUTOCAST_DTYPES,
    chat_prompt_ids,
    load_policy,
    load_tokenizer,
    make_reference,
    prompt_tokens,
    resolve_device,
    stop_token_ids,
)
from fst.rollout import Generators, Rollout, RolloutEngine, SamplingParams
from fst.rollout.hf import HFRolloutEngine
from fst.run_state import read_checkpoint_files, write_checkpoint_files
from fst.signals import Terminated
from fst.slow.advantages import group_advantages
from fst.slow.trainer import DistillBatch, DivergedError, SlowTrainer, outputs_finite
from fst.store.checkpoints import (
    BackgroundCommits,
    CheckpointError,
    CheckpointStore,
    check_s3_credentials,
    latest_step,
    open_store,
    prune,
    split_checkpoint_uri,
)
from fst.store.db import DEFAULT_LEASE_S, Lease, RunDB, RunLockedError, database_url
from fst.tasks import Problem, Task, build_task

log = logging.getLogger(__name__)

# The run's writer lease in the database (seconds): heartbeats every quarter of it; a run whose
# lease could not be confirmed for this long stops (another trainer may have taken it over).
LEASE_S = DEFAULT_LEASE_S


class RunError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- pure helpers


def prompt_assignment(group_size: int, num_prompts: int) -> list[int]:
    """Which prompt each of a problem's G rollouts uses: round-robin over the K prompts.

    When K does not divide G the first G mod K prompts get one rollout more; with K > G only
    the first G prompts are used for that problem (callers rotate the population order per
    problem so that every prompt is used across a batch).
    """
    return [g % num_prompts for g in range(group_size)]


def batch_indices(cursor: int, n: int, pool_size: int, seed: int) -> list[int]:
    """Indices of the next `n` problems from position `cursor` of an endless stream of epochs,
    each a seeded permutation of the pool. Pure: a resumed run needs only the cursor."""
    out = []
    for pos in range(cursor, cursor + n):
        epoch, i = divmod(pos, pool_size)
        order = list(range(pool_size))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[i])
    return out


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed large blocks instead of returning them to the kernel.

    By default glibc serves blocks above a threshold (at most 32 MB) with fresh mmap'd pages
    and unmaps them on free. A training micro-batch allocates several (B, C, vocab) float
    tensors of ~200 MB (logits, their softmax, gradients), so every micro-batch paid ~50k page
    faults per tensor, each one a kernel zero-fill: ~10% of a step's time on SmolLM2 (measured
    with getrusage: sys time and minor faults went to ~0). With the thresholds raised, the
    freed blocks stay in the heap and the next micro-batch reuses them. Memory is not given
    back to the system while the process lives, which for a trainer (whose peak recurs every
    step) costs nothing. Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        return libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and ok
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int, rank: int = 0) -> torch.Generator:
    """Seed every global RNG the same on every rank (LoRA's initial adapters are drawn from
    torch's, and must be equal on all ranks); return the rollout sampler's generator, which is
    the rank's own (rank 0's is the single-process one), so ranks sample different tokens."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1_000_003 * rank)


# ----------------------------------------------------------------------------- the run


@dataclass
class StepRollouts:
    problems: list[Problem]
    rollouts: list[Rollout]  # P*G, problem-major
    prompt_ids: list[int]  # P*G: index into the population of the prompt each rollout used
    rewards: torch.Tensor  # (P, G)
    feedback: list[str]  # P*G
    alongside: list[Rollout] = field(default_factory=list)  # a GEPA round's rows (Run.rollout)


@dataclass
class Run:
    """Everything a training run holds in memory."""

    cfg: TrainConfig
    task: Task
    tokenizer: Any
    policy: Any
    reference: Any
    engine: RolloutEngine
    trainer: SlowTrainer
    generator: torch.Generator
    store: CheckpointStore
    sink: MetricsSink
    population: list[PromptRecord]
    step: int = 0
    cursor: int = 0
    kl_prompts: list[list[int]] = field(default_factory=list)
    fast_s: float = 0.0  # wall time spent in GEPA rounds, whole run (resumes included)
    slow_s: float = 0.0  # wall time spent in RL steps, whole run
    reflector: Any = None  # GEPA reflection_lm (openai/local) or custom proposer (digest)
    lease: Lease | None = None  # the run's writer lease (train() sets it)
    world: World = SINGLE  # this process among the run's processes (torchrun)
    rollout_copy: RolloutCopy | None = None  # under FSDP: the full weights this rank samples
    ood_task: Task | None = None  # metrics.oodTask: scored in the periodic eval, never trained
    # checkpoint.backgroundUpload to S3 (rank 0 of a single-node run): commits in flight.
    commits: BackgroundCommits | None = None
    # fast.reuseStepRollouts (rank 0): the rollouts sampled since the last GEPA round, under
    # the population that round left; the next round starts from them. Checkpointed.
    step_samples: list[StepSample] = field(default_factory=list)
    # fast.overlapRound (rank 0): the GEPA round whose rows ride along with the steps'.
    # Never in a checkpoint: finished before every save.
    round_in_flight: RoundInFlight | None = None
    round_waiting: bool = False  # a round is due and starts once the one in flight ends

    def sync_sampler(self) -> None:
        """After the weights changed: the sampler must see the new ones."""
        if self.rollout_copy is not None:
            self.rollout_copy.sync_from(self.policy)
        # A separate sampler (vLLM) holds its own copy of the weights: push the new ones.
        # A no-op for the HF engine, which samples from the policy (or the copy above).
        self.engine.sync_weights()

    def ensure_writer(self) -> None:
        """Raise RunLockedError if this process is no longer the run's writer. Called at every
        step boundary and right before every write (metrics, population, checkpoint): a run
        that lost its lease writes nothing more."""
        if self.lease is not None:
            self.lease.check()

    @property
    def sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(r.temperature, r.top_p, r.max_new_tokens)

    def rollout(
        self,
        problems: list[Problem],
        population: list[PromptRecord],
        first: int = 0,
        alongside: tuple[list[list[int]], list[torch.Generator]] | None = None,
    ) -> StepRollouts:
        """G rollouts of each problem; `first` is the index of problems[0] in the step's batch
        (a rank's share starts there), so prompts rotate as they would in one process.
        `alongside` (fast.overlapRound): a GEPA round's rows (prompts, one generator each),
        sampled in the same engine call; their rollouts come back in `StepRollouts.alongside`."""
        G, K = self.cfg.slow.group_size, len(population)
        slots = prompt_assignment(G, K)
        prompts, used = [], []
        for p_idx, problem in enumerate(problems, start=first):
            for g in range(G):
                k = (slots[g] + p_idx) % K  # rotate so every prompt is used when K > G
                used.append(k)
                prompts.append(chat_prompt_ids(self.tokenizer, population[k].text, problem.prompt))
        extra, extra_generators = alongside or ([], [])
        generators: Generators = self.generator
        if extra:  # the step's rows draw from the run's generator, the round's from their own
            generators = [self.generator] * len(prompts) + extra_generators
        try:
            rollouts = self.engine.generate(prompts + extra, self.sampling, generators)
        except (RuntimeError, IndexError, ValueError) as e:
            # NaN/Inf logits surface in the sampler as index or probability errors: say so.
            if not outputs_finite(self.policy, prompts[0]):
                raise DivergedError(
                    "the model's outputs are NaN or infinite, so nothing can be sampled: its "
                    "weights are broken (e.g. a checkpoint saved after a diverged step by an "
                    "older version); start from an earlier checkpoint"
                ) from e
            raise
        rollouts, round_rows = rollouts[: len(prompts)], rollouts[len(prompts) :]
        rewards, feedback = [], []
        for i, r in enumerate(rollouts):
            score = self.task.score(problems[i // G], r.text)
            rewards.append(score.reward)
            feedback.append(score.feedback)
        return StepRollouts(
            problems,
            rollouts,
            used,
            torch.tensor(rewards).view(len(problems), G),
            feedback,
            round_rows,
        )


def load_task(cfg: TrainConfig) -> Task:
    """Build the task and generate its splits now, before the (slow) model load, so a data
    problem is reported at once and names the task."""
    try:
        task = build_task(cfg.task)
        for split in ("train", "val", "test"):
            task.problems(split)
    except (ValueError, OSError) as e:
        raise ConfigError(f"task ({cfg.task.name}): {e}") from e
    return task


def load_ood_task(cfg: TrainConfig) -> Task | None:
    """metrics.oodTask, built and its test split generated (errors name the field)."""
    if cfg.metrics.ood_task is None:
        return None
    try:
        task = build_task(cfg.metrics.ood_task)
        task.problems("test")
    except (ValueError, OSError) as e:
        raise ConfigError(f"metrics.oodTask ({cfg.metrics.ood_task.name}): {e}") from e
    return task


def initial_population(
    cfg: TrainConfig, count_tokens: Callable[[str], int] | None = None
) -> list[PromptRecord]:
    """The prompts a run starts from: `fast.initialPopulation` (a stream's hand-over), else the
    seed prompt. Mode rl trains the weights under the seed prompt ALONE, whatever the
    population says: an rl run (or an rl stage after an fst one) is the weights-only baseline,
    and evolved prompts would mix the fast channel into it.

    With `fast.maxPromptTokens` (and `count_tokens`, a prompt's length in tokens): a seed
    prompt over the budget is a ConfigError; population members over it are dropped (a stream
    stage may lower the budget its predecessor's population grew under)."""
    seed = [PromptRecord(cfg.fast.seed_prompt)]
    members = cfg.fast.initial_population
    if cfg.mode == "rl":
        if members:
            log.info(
                "mode rl: fast.initialPopulation (%d prompts) is ignored; every rollout uses "
                "fast.seedPrompt",
                len(members),
            )
        return seed
    budget = cfg.fast.max_prompt_tokens
    if budget is not None and count_tokens is not None:
        n = count_tokens(cfg.fast.seed_prompt)
        if n > budget:
            raise ConfigError(
                f"fast.seedPrompt is {n} tokens, over fast.maxPromptTokens ({budget})"
            )
        members = [t for t in members if count_tokens(t) <= budget]
        if len(members) < len(cfg.fast.initial_population):
            log.warning(
                "fast.initialPopulation: %d of %d prompts are over fast.maxPromptTokens (%d) "
                "and are dropped",
                len(cfg.fast.initial_population) - len(members),
                len(cfg.fast.initial_population),
                budget,
            )
    return [PromptRecord(t) for t in members] or seed


def sharded(cfg: TrainConfig, world: World) -> bool:
    """Whether this run shards its models with FSDP2 (parallel.strategy)."""
    return cfg.parallel.strategy == "fsdp" or (
        cfg.parallel.strategy == "auto" and world.distributed
    )


def check_parallel(cfg: TrainConfig, world: World) -> None:
    """What the world size asks of the config: a ConfigError naming the field, on every rank."""
    if not world.distributed:
        if cfg.parallel.strategy == "fsdp":
            log.info("parallel.strategy fsdp with one process: the model is not sharded")
        return
    if cfg.parallel.strategy == "none":
        raise ConfigError(
            f"parallel.strategy: none cannot train with {world.size} processes; use fsdp "
            "(or auto), or start one process"
        )
    local_share(cfg.slow.problems_per_step, world)
    if world.nodes > 1 and not (cfg.checkpoint.uri or "").startswith("s3://"):
        raise ConfigError(
            f"checkpoint.uri: a run on {world.nodes} nodes saves each node's shards from its "
            "own disk, so its checkpoints must go to a store all of them reach (s3://...)"
        )


def build_run(
    cfg: TrainConfig,
    run_dir: Path,
    db: RunDB | None = None,
    task: Task | None = None,
    world: World = SINGLE,
) -> Run:
    keep_freed_memory()
    generator = seed_everything(cfg.seed, world.rank)
    task = task if task is not None else load_task(cfg)
    store = checkpoint_store(cfg)  # before the (slow) model load: a bad URI is reported now
    tokenizer = load_tokenizer(cfg.model)
    policy = load_policy(cfg.model)
    if cfg.parallel.activation_checkpointing:
        transformer_of(policy).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    # The reference and the rollout copy are taken from the whole model, before sharding.
    reference = make_reference(policy, cfg.model) if cfg.metrics.kl_prompts > 0 else None
    stop = stop_token_ids(tokenizer, policy)
    compute_dtype = AUTOCAST_DTYPES[cfg.model.autocast]  # the engine's and the trainer's
    rollout_copy = None
    if sharded(cfg, world):
        if cfg.rollout.engine == "hf":
            rollout_copy = RolloutCopy(policy)
        shard(policy, cfg.parallel)
        if reference is not None:
            # Frozen and sharded like the policy: 1/N of a copy per rank, never a whole one.
            shard(reference, cfg.parallel, offload=cfg.parallel.reference == "offload")
    if cfg.rollout.engine == "vllm":
        # GPU pods: a colocated vLLM samples, the policy above trains; vLLM is imported only
        # here, so a CPU install never needs it (fst/rollout/vllm.py).
        from fst.rollout.vllm import VLLMRolloutEngine

        engine: RolloutEngine = VLLMRolloutEngine.from_config(cfg, policy, tokenizer, stop)
    else:
        sampler = rollout_copy.model if rollout_copy is not None else policy
        engine = HFRolloutEngine(sampler, tokenizer, stop, cfg.rollout.batch_size, compute_dtype)
    trainer = SlowTrainer(
        policy,
        cfg.slow,
        cfg.rollout.temperature,
        engine.pad_id,
        world,
        shared_prompt=not cfg.parallel.activation_checkpointing,
        autocast_dtype=compute_dtype,
    )
    sink = MetricsSink(run_dir, cfg.metrics.tensorboard and world.main, db, cfg.run)
    run = Run(
        cfg,
        task,
        tokenizer,
        policy,
        reference,
        engine,
        trainer,
        generator,
        store,
        sink,
        population=initial_population(cfg, lambda text: prompt_tokens(tokenizer, text)),
        world=world,
        rollout_copy=rollout_copy,
        ood_task=load_ood_task(cfg),
    )
    if cfg.mode != "rl" and world.main:  # the GEPA round runs on rank 0 alone
        base: PreTrainedModel | None = reference if reference is not None else policy
        if rollout_copy is not None:
            # The sharded models answer only when every rank calls them: rank 0's local
            # reflector gets a whole base model of its own.
            base = None
        run.reflector = make_reflector(cfg, tokenizer, base)
        log.info(
            "fast channel: GEPA every %d steps, top-K %d, reflector %s",
            cfg.fast.every_steps,
            cfg.fast.top_k,
            run.reflector.label,
        )
        if cfg.fast.overlap_round and cfg.fast.proposals_per_iteration == 1:
            log.warning(
                "fast.overlapRound with fast.proposalsPerIteration 1: each evaluation GEPA's "
                "sequential search waits on costs a training step, so a round's population "
                "comes many steps late (a 32-call round was still in flight after 9 steps); "
                "set proposalsPerIteration to 4 or so"
            )
    held_out = task.problems("test")[: cfg.metrics.kl_prompts]
    run.kl_prompts = [chat_prompt_ids(tokenizer, cfg.fast.seed_prompt, p.prompt) for p in held_out]
    return run


def make_reflector(cfg: TrainConfig, tokenizer: Any, base_model: Any) -> Any:
    """GEPA's reflection LM (or proposer). A local reflector is `fast.reflector.model`, else
    `base_model`, else (None) a fresh load of the run's base."""
    r = cfg.fast.reflector
    if r.kind == "openai":
        return OpenAIReflector(r)
    if r.kind == "local":
        from fst.config import ModelConfig

        if r.model:
            mcfg = ModelConfig(name=r.model, device=cfg.model.device)
            return LocalReflector(load_policy(mcfg), load_tokenizer(mcfg), r, cfg.seed)
        if base_model is None:
            name = cfg.model.reference or cfg.model.name
            mcfg = cfg.model.model_copy(update={"name": name, "lora": None, "reference": None})
            base_model = load_policy(mcfg)
        return LocalReflector(base_model, tokenizer, r, cfg.seed)
    budget = cfg.fast.max_prompt_tokens
    if budget is None:
        return DigestProposer()
    return DigestProposer(fits=lambda text: prompt_tokens(tokenizer, text) <= budget)


def gepa_round(run: Run) -> dict[str, Any]:
    """One GEPA round before step `run.step + 1`; returns the round's metrics."""
    adapter, attempt, round_idx = _prepare_round(run, deferred=False)
    return _install_round(run, round_idx, adapter, attempt())


def _prepare_round(
    run: Run, deferred: bool
) -> tuple[PolicyAdapter, Callable[[], RoundResult], int]:
    """The round due before step `run.step + 1`: its adapter, the call that runs it (again,
    when deferred: RoundInFlight), and its index. Takes the step samples it starts from."""
    cfg = run.cfg
    round_idx = run.step // cfg.fast.every_steps
    samples, run.step_samples = run.step_samples, []  # the population changes now
    val, train = run.task.problems("val")[: cfg.fast.pareto_size], run.task.problems("train")
    if samples:  # fast.reuseStepRollouts: the Pareto set and minibatches are the recent problems
        by_id = {p.id: p for p in train}
        recent = list(dict.fromkeys(s["problem_id"] for s in samples))
        if deferred:
            # The last round ended within the last T steps, so the problems before that lack
            # its new prompts' rollouts: sampling those would cost a step's wait before GEPA
            # could start. The problems every population prompt wrote for, if there are any.
            wrote: dict[str, set[str]] = {}
            for s in samples:
                wrote.setdefault(s["problem_id"], set()).add(s["system"])
            prompts = {rec.text for rec in run.population}
            recent = [i for i in recent if prompts <= wrote[i]] or recent
        val = train = [by_id[i] for i in recent[-cfg.fast.pareto_size :]]
    adapter = PolicyAdapter(
        run.engine,
        run.tokenizer,
        run.task,
        run.sampling,
        seed=cfg.seed * 1000 + round_idx,
        step_samples=samples,
        max_prompt_tokens=cfg.fast.max_prompt_tokens,
        deferred=deferred,
    )
    is_proposer = isinstance(run.reflector, DigestProposer)
    reflection_lm = None if is_proposer else run.reflector
    if deferred and reflection_lm is not None:
        reflection_lm = MemoisedLM(reflection_lm)  # a replayed round asks the same questions
    attempt = functools.partial(
        run_gepa_round,
        population=run.population,
        adapter=adapter,
        val_problems=val,
        train_problems=train,
        round_idx=round_idx,
        top_k=cfg.fast.top_k,
        metric_calls=cfg.fast.metric_calls,
        minibatch_size=cfg.fast.minibatch_size,
        round_dir=cfg.run_dir / "gepa" / f"round-{round_idx:04d}",
        seed=cfg.seed * 1000 + round_idx,
        reflection_lm=reflection_lm,
        proposer=run.reflector if is_proposer else None,
        proposals_per_iteration=cfg.fast.proposals_per_iteration,
    )
    return adapter, attempt, round_idx


def _install_round(
    run: Run, round_idx: int, adapter: PolicyAdapter, result: RoundResult
) -> dict[str, Any]:
    """The round's population becomes the run's, before step `run.step + 1`; its record is
    written and its metrics returned."""
    run.population = result.population
    run.fast_s += result.seconds
    # Recorded under the step it precedes (run.step + 1): a checkpoint at run.step was saved
    # BEFORE this round, so a resume from it must drop this record and run the round again.
    run.ensure_writer()
    run.sink.write_population(run.step + 1, round_idx, run.population, result.candidates)
    scores = [p.mean_score for p in run.population]
    log.info(
        "GEPA round %d: %d candidates (%d new), population %d, best val %.3f, %.0f s",
        round_idx,
        len(result.candidates),
        result.proposed_accepted,
        len(scores),
        max(scores),
        result.seconds,
    )
    return {
        "round": round_idx,
        "population_size": len(run.population),
        "population_best_val": max(scores),
        "population_mean_val": sum(scores) / len(scores),
        "population_ids": [p.id for p in run.population],
        "gepa_candidates": len(result.candidates),
        "gepa_new_candidates": result.proposed_accepted,
        "gepa_metric_calls": result.metric_calls,
        "gepa_reused_rows": adapter.reused_rows,
        "gepa_over_budget_rows": adapter.over_budget_rows,
        "gepa_s": result.seconds,
    }


def saves_checkpoint(cfg: TrainConfig, step: int) -> bool:
    """Whether the loop saves a checkpoint after step `step`."""
    return step % cfg.checkpoint.every == 0 or step == cfg.final_step


def fast_channel(run: Run, due: bool, checkpoint_next: bool) -> dict[str, Any]:
    """Rank 0, before step `run.step + 1`: the GEPA round's work. Returns the metrics of the
    last round that ended here, or {}.

    Without fast.overlapRound: the round due (`due`) runs whole. With it, a round runs up to
    the rows it needs next, which the step then samples beside its own; at the next boundary
    it goes on from there. A round due while another is in flight waits for that one to end
    and starts at the next boundary (rounds may then come later than every T steps, never two
    at once; running the one in flight to its end alone instead cost a step's decoding on
    this CPU). Before a step that ends in a checkpoint (`checkpoint_next`) both
    are finished alone: a checkpoint never holds a round in flight, and each round's record
    (under the step it precedes) is kept by a resume from that checkpoint."""
    if not run.cfg.fast.overlap_round:
        return gepa_round(run) if due else {}
    run.round_waiting = run.round_waiting or due
    ended: dict[str, Any] = {}
    while True:
        if run.round_in_flight is None:
            # A round does not start where one ended (unless a checkpoint is next): the
            # population that one left has no step rollouts yet, and every member would be
            # sampled again for the re-scoring (fast.reuseStepRollouts).
            if not run.round_waiting or (ended and not checkpoint_next):
                return ended
            run.round_waiting = False
            adapter, attempt, round_idx = _prepare_round(run, deferred=True)
            run.round_in_flight = RoundInFlight(adapter, attempt, round_idx)
        in_flight = run.round_in_flight
        result = in_flight.finish() if checkpoint_next else in_flight.advance()
        if result is None:
            return ended  # it needs rows: this step samples them
        run.round_in_flight = None
        this_round = {
            **_install_round(run, in_flight.index, in_flight.adapter, result),
            "gepa_attempts": in_flight.attempts,
            "gepa_rows_alongside_steps": in_flight.rows_alongside,
            "gepa_rounds_ended": 1,
        }
        ended = merge_round_metrics(ended, this_round) if ended else this_round


# What two rounds that end at one step boundary (fast.overlapRound: the one in flight, then
# the waiting one finished alone before a checkpoint) did together; the rest is the later
# round's (the population it left).
_ADDED_OVER_ROUNDS = (
    "gepa_new_candidates",
    "gepa_metric_calls",
    "gepa_reused_rows",
    "gepa_over_budget_rows",
    "gepa_s",
    "gepa_attempts",
    "gepa_rows_alongside_steps",
    "gepa_rounds_ended",
)


def merge_round_metrics(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """The step record of two rounds ended before one step: their counts and seconds added,
    the population's state the later one's. Pure."""
    return {**later, **{k: earlier[k] + later[k] for k in _ADDED_OVER_ROUNDS}}


def rl_step(run: Run) -> dict[str, Any]:
    """One RL step: sample, score, advantages, optimizer step. Returns the step's metrics."""
    cfg = run.cfg
    t0 = time.perf_counter()
    train = run.task.problems("train")
    idx = batch_indices(run.cursor, cfg.slow.problems_per_step, len(train), cfg.task.seed)
    share = local_share(len(idx), run.world)  # all of them with one process
    problems = [train[i] for i in idx[share]]

    in_flight = run.round_in_flight
    alongside = in_flight.requests() if in_flight is not None else None
    out = run.rollout(problems, run.population, first=share.start, alongside=alongside)
    if in_flight is not None:
        in_flight.fill(out.alongside)
    if cfg.mode != "rl" and cfg.fast.reuse_step_rollouts:
        keep_for_next_round(run, out)
    distill = distill_batch(run, problems) if cfg.mode == "fst-distill" else None
    t_gen = time.perf_counter() - t0
    adv = group_advantages(out.rewards, cfg.slow.adv_eps)  # (P_rank, G): whole groups per rank

    t1 = time.perf_counter()
    if cfg.mode == "gepa":  # weights frozen: measure only, on the tokens a step would train
        train_metrics: dict[str, float] = {
            "updated": 0.0,
            **run.trainer.measure_entropy(out.rollouts, adv.flatten().tolist()),
        }
    else:
        try:
            train_metrics = run.trainer.step(out.rollouts, adv.flatten().tolist(), distill)
        except DivergedError as e:
            raise DivergedError(diverged_message(run, str(e))) from None
        if train_metrics.get("updated"):
            run.sync_sampler()  # before the next rollout
    t_train = time.perf_counter() - t1
    run.cursor += len(idx)
    run.step += 1

    # The step's numbers over the WHOLE batch: every rank's rewards and completions.
    shares = gather_to_main(
        (out.rewards, [(len(x.completion_ids), x.finished) for x in out.rollouts]), run.world
    )
    r = torch.cat([rewards for rewards, _ in shares])  # (P, G)
    completions = [c for _, rank_completions in shares for c in rank_completions]
    gen_tokens = sum(n for n, _ in completions)
    record: dict[str, Any] = {
        "step": run.step,
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()),
        "pass_rate": float((r >= 1.0).float().mean()),
        "solved_any": float((r >= 1.0).any(dim=1).float().mean()),
        "zero_var_groups": float((r.max(1).values == r.min(1).values).float().mean()),
        "completion_len": gen_tokens / len(completions),
        "truncated_frac": sum(not finished for _, finished in completions) / len(completions),
        **train_metrics,
        "gen_tokens": gen_tokens,
        "gen_tokens_per_s": gen_tokens / t_gen if t_gen > 0 else 0.0,
        "train_tokens_per_s": train_metrics.get("trained_tokens", 0.0) / t_train
        if t_train > 0
        else 0.0,
        "gen_s": t_gen,
        "train_s": t_train,
    }
    if out.alongside:  # fast.overlapRound: a GEPA round's rows shared this step's engine call
        record["gen_round_rows"] = len(out.alongside)
    if cfg.metrics.kl_prompts > 0 and run.step % cfg.metrics.kl_every == 0:
        t2 = time.perf_counter()
        record["kl"] = kl_to_base(
            run.policy, run.reference, run.engine, run.kl_prompts, run.sampling, run.trainer.pad_id
        )
        record["kl_s"] = time.perf_counter() - t2
    record["step_s"] = time.perf_counter() - t0
    run.slow_s += record["step_s"]
    return record


def keep_for_next_round(run: Run, out: StepRollouts) -> None:
    """fast.reuseStepRollouts: rank 0 keeps every rank's rollouts of this step (which prompt,
    which problem, what it wrote and scored) for the next GEPA round."""
    G = run.cfg.slow.group_size
    flat_rewards = out.rewards.flatten().tolist()  # (P*G,), problem-major like the rollouts
    mine = [
        StepSample(
            problem_id=out.problems[i // G].id,
            system=run.population[k].text,
            completion=r.text,
            reward=flat_rewards[i],
            feedback=out.feedback[i],
        )
        for i, (r, k) in enumerate(zip(out.rollouts, out.prompt_ids, strict=True))
    ]
    shares = gather_to_main(mine, run.world)
    if run.world.main:
        run.step_samples.extend(s for share in shares for s in share)


def distill_batch(run: Run, problems: list[Problem]) -> DistillBatch | None:
    """FST-distill's data for this step: `distill.samplesPerProblem` completions of each problem
    sampled under the seed prompt (the student's own samples), each paired with the same
    problem under the population's best prompt (the teacher). None while the best prompt is
    the seed prompt: the two contexts are then one, and the term is exactly zero."""
    cfg = run.cfg
    seed, best = cfg.fast.seed_prompt, run.population[0].text
    if best == seed:
        return None
    n = cfg.distill.samples_per_problem
    asked = [p for p in problems for _ in range(n)]
    students = run.engine.generate(
        [chat_prompt_ids(run.tokenizer, seed, p.prompt) for p in asked],
        run.sampling,
        run.generator,
    )
    teachers = [chat_prompt_ids(run.tokenizer, best, p.prompt) for p in asked]
    return DistillBatch(students, teachers, cfg.distill.weight_at(run.step))


def diverged_message(run: Run, what: str) -> str:
    """One line: which step diverged, what was seen, what is saved, and the likely cause."""
    lr = run.cfg.slow.lr
    try:
        last = latest_step(run.store)
    except CheckpointError:
        last = None
    saved = f"the latest checkpoint is step {last}" if last is not None else "no checkpoint exists"
    if lr > LARGE_LR:
        cause = f"slow.lr={lr:g} too large? (usual values: 1e-6 to 1e-4)"
    else:
        cause = (
            f"check slow.lr={lr:g}, slow.gradClip={run.cfg.slow.grad_clip:g} and "
            f"model.dtype={run.cfg.model.dtype} (float16 overflows easily)"
        )
    return (
        f"step {run.step + 1}: training diverged: {what}. The run stopped; nothing of step "
        f"{run.step + 1} was saved ({saved}). Likely cause: {cause}"
    )


# A learning rate above this is reported as the likely cause of a divergence, and warned about.
LARGE_LR = 1e-2


def heldout_eval(run: Run) -> dict[str, Any]:
    """Greedy pass rate of (current weights, best prompt) on the first `evalProblems` test
    problems, and on metrics.oodTask's. The test split, not val: val is GEPA's Pareto set,
    which the fast channel selects on, so only test is held out from both channels."""
    t0 = time.perf_counter()
    res = _greedy_test_eval(run, run.task)
    out: dict[str, Any] = {
        "eval_pass_rate": res.pass_rate,
        "eval_reward": res.reward_mean,
        "eval_n": float(res.n),
        # Which problems passed ("1" / "0", in test order): a paired bootstrap across modes
        # and seeds resamples these (fst/analysis.py bootstrap_diff).
        "eval_passed": "".join("1" if p else "0" for p in res.passed),
    }
    if run.ood_task is not None:
        ood = _greedy_test_eval(run, run.ood_task)
        out["ood_pass_rate"] = ood.pass_rate
        out["ood_passed"] = "".join("1" if p else "0" for p in ood.passed)
    out["eval_s"] = time.perf_counter() - t0
    return out


def _greedy_test_eval(run: Run, task: Task) -> Any:
    """evaluate_prompt of the population's best prompt on `task`'s first evalProblems tests."""
    from fst.evaluate import evaluate_prompt

    problems = task.problems("test")[: run.cfg.metrics.eval_problems]
    prompt = run.population[0].text
    return evaluate_prompt(
        run.engine, run.tokenizer, task, problems, prompt, run.cfg.rollout.max_new_tokens
    )


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run, extra_state: dict[str, Any] | None = None) -> str:
    """Every rank calls this. Each writes its shards into a staging folder on its node; rank 0
    adds the model export and the loop's state, and commits (manifest last). On several nodes
    (S3 only: check_parallel) each node first uploads its own folder's files."""
    world = run.world
    if world.distributed:
        # One name from rank 0, each rank's own staging root: the same folder for the ranks of
        # a node, one per node (each pod its own disk and cache).
        name = broadcast(uuid.uuid4().hex[:12] if world.main else "", world)
        staging = run.store.staging_dir(name)
        barrier(world)  # every node's folder exists before anyone writes into it
    else:
        staging = run.store.staging_dir()
    state = {
        "step": run.step,
        "cursor": run.cursor,
        "fast_s": run.fast_s,
        "slow_s": run.slow_s,
        "population": [p.to_dict() for p in run.population],
        "step_samples": run.step_samples,
        **(extra_state or {}),
    }
    export = run.rollout_copy.model if run.rollout_copy is not None else None
    write_checkpoint_files(
        staging,
        run.cfg,
        run.policy,
        run.tokenizer,
        run.trainer,
        run.generator,
        state,
        world,
        export,
    )
    meta = {"run": run.cfg.run, "mode": run.cfg.mode, "world_size": world.size}
    uri = ""
    if world.nodes > 1:
        uri = _commit_across_nodes(run, staging, meta)
    elif world.main and run.commits is not None:
        # The snapshot is on disk (every rank's shards: write_checkpoint_files ends with a
        # barrier); upload it while training goes on. Its URI is reported once committed.
        store, step, keep = run.store, run.step, run.cfg.checkpoint.keep_last

        def commit() -> str:
            committed = store.commit(step, staging, meta)
            prune(store, keep)
            return committed

        run.commits.submit(commit)
    elif world.main:
        uri = run.store.commit(run.step, staging, meta)
    if world.main and run.commits is None:
        prune(run.store, run.cfg.checkpoint.keep_last)
    barrier(world)  # nobody saves again, or reads the store, before the commit (or its start)
    return broadcast(uri, world)


def _commit_across_nodes(run: Run, staging: Path, meta: dict[str, Any]) -> str:
    """Several nodes (S3 only: check_parallel): each other node's local rank 0 uploads the
    files on its own disk, then rank 0 commits its own with a manifest that lists them all.
    Returns the URI on rank 0, "" elsewhere."""
    from fst.store.s3 import S3CheckpointStore

    store, world = run.store, run.world
    assert isinstance(store, S3CheckpointStore)
    uploader = world.local_rank == 0 and not world.main
    parts = gather_to_main(store.upload_part(run.step, staging) if uploader else {}, world)
    if world.main:
        uploaded = {rel: info for part in parts for rel, info in part.items()}
        return store.commit(run.step, staging, meta, uploaded=uploaded)
    if uploader:
        shutil.rmtree(staging, ignore_errors=True)  # uploaded: nothing on this node to keep
    return ""


def checkpoint_store(cfg: TrainConfig) -> CheckpointStore:
    """The run's checkpoint store: `checkpoint.uri`, default <outputDir>/<run>/checkpoints."""
    try:
        return open_store(cfg.checkpoint.uri or str(cfg.run_dir / "checkpoints"))
    except CheckpointError as e:
        if cfg.checkpoint.uri:
            raise CheckpointError(f"checkpoint.uri: {e}") from None
        raise


def check_output_dir(output_dir: str | Path, field: str = "outputDir") -> None:
    """A ConfigError naming `field` when the folder cannot be one: an existing file, or a path
    under a file. Nothing is created."""
    path = Path(output_dir).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is" if p == path else f"is under {p}, which is"
                raise ConfigError(f"{field}: {path} {what} a file, not a folder")
            return


def preflight(cfg: TrainConfig) -> Task:
    """What can be checked before anything is written (run folder, database): the output
    folder, the S3 credentials a remote checkpoint or model needs, and the task's data (built
    here and handed to build_run). Errors name the field."""
    check_output_dir(cfg.output_dir)
    for field_name, uri in (
        ("checkpoint.uri", cfg.checkpoint.uri),
        ("model.name", cfg.model.name),
        ("continueFrom", cfg.continue_from),
    ):
        if uri and uri.startswith("s3://"):
            try:
                check_s3_credentials(uri)
            except CheckpointError as e:
                raise ConfigError(f"{field_name}: {e}") from None
    if cfg.slow.lr > LARGE_LR and cfg.mode != "gepa":
        log.warning(
            "slow.lr=%g is unusually large (usual values: 1e-6 to 1e-4); training may diverge",
            cfg.slow.lr,
        )
    load_ood_task(cfg)  # its errors now, not after the model load
    return load_task(cfg)


def latest_checkpoint(cfg: TrainConfig) -> Path | None:
    """A local folder with the run's latest complete checkpoint, or None if it has none."""
    store = checkpoint_store(cfg)
    step = latest_step(store)
    return None if step is None else store.materialize(step)


def restore_latest(run: Run) -> dict[str, Any] | None:
    """Every rank calls this; rank 0 decides which step (the store might change meanwhile)."""
    step = broadcast(latest_step(run.store) if run.world.main else None, run.world)
    if step is None:
        return None
    folder = run.store.materialize(step)
    state = read_checkpoint_files(folder, run.policy, run.trainer, run.generator, run.world)
    run.step, run.cursor = state["step"], state["cursor"]
    run.fast_s, run.slow_s = state.get("fast_s", 0.0), state.get("slow_s", 0.0)
    run.population = [PromptRecord.from_dict(d) for d in state["population"]]
    run.step_samples = state.get("step_samples", []) if run.world.main else []
    run.sync_sampler()  # the checkpoint's weights, not the start model's, are sampled
    return state


def announce_restored_checkpoint(run: Run, db: RunDB) -> None:
    """The checkpoint an attempt resumed from is the run's latest: say so unless the run's
    last "checkpoint" event already does. A background upload can commit after its attempt
    last reported one (killed while the upload finished): without this, the operator's
    status.checkpointUri kept the checkpoint before it for good."""
    uri = run.store.step_uri(run.step)
    progress = db.progress(run.cfg.run)
    if progress is None or progress.checkpoint_uri != uri:
        db.log_event(run.cfg.run, "checkpoint", uri)


def continue_trajectory(run: Run, uri: str) -> None:
    """Start `run` where the checkpoint `uri` (another run's, e.g. the stream's previous stage)
    left its trajectory: weights, AdamW and schedule state, RNG, step counter and population.
    What is new is the data: the cursor restarts on this run's task, and the next GEPA round
    (at the step counter's usual cadence, not at once) re-scores the carried population on
    this task's validation split, so the Pareto front follows the data. Every rank calls it."""
    store_uri, step = split_checkpoint_uri(uri)
    assert step is not None  # TrainConfig checked it
    folder = open_store(store_uri).materialize(step)
    state = read_checkpoint_files(folder, run.policy, run.trainer, run.generator, run.world)
    run.step, run.cursor = state["step"], 0
    run.fast_s, run.slow_s = state.get("fast_s", 0.0), state.get("slow_s", 0.0)
    if run.cfg.mode != "rl":  # mode rl trains under the seed prompt alone (initial_population)
        run.population = [PromptRecord.from_dict(d) for d in state["population"]]
    run.sync_sampler()


class RunLock:
    """An exclusive lock on a run folder: two trainers never write one run."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.fd = self.path.open("w")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fd.close()
            raise RunError(f"{run_dir} is in use by another process (lock {self.path})") from None

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.fd.close()


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    on_start: Callable[[], None] | None = None,
) -> Path:
    """Run `cfg` to `cfg.steps` steps. With `resume`, continue from the latest checkpoint.

    `on_start` is called once the run is built (task, model, checkpoint restored) and about to
    train: an error before that point means the run never started.

    Under torchrun every process calls this; rank 0 holds the run's lock, lease and database,
    the others only train (fst/distributed.py)."""
    task = preflight(cfg)
    world = init_world(resolve_device(cfg.model.device))
    finished = False
    try:
        check_parallel(cfg, world)
        if world.main:
            _train_main(cfg, resume, progress, on_start, task, world)
        else:
            _train_worker(cfg, resume, task, world)
        finished = True
        return cfg.run_dir
    finally:
        close_world(world, finished)


def _train_worker(cfg: TrainConfig, resume: bool, task: Task, world: World) -> None:
    """A rank other than 0: the same run, nothing written but its checkpoint shards."""
    run = build_run(cfg, cfg.run_dir, None, task, world)
    restored = restore_latest(run) if resume else None  # the same collectives as rank 0's
    if restored is None and cfg.continue_from is not None:
        continue_trajectory(run, cfg.continue_from)
    if not broadcast(True, world):  # rank 0's go: its checks passed (else it exits, and so do we)
        return
    _loop(run, False, None)


def _train_main(
    cfg: TrainConfig,
    resume: bool,
    progress: bool,
    on_start: Callable[[], None] | None,
    task: Task,
    world: World,
) -> Path:
    run_dir = cfg.run_dir
    lock = RunLock(run_dir)  # one trainer per run folder on this machine
    db = RunDB(database_url(cfg.database, Path(cfg.output_dir) / "fst.db"))
    lease, finished, started, stopped = None, False, False, False
    run: Run | None = None
    previous: str | None = None  # the run's status before this attempt
    try:
        db.upgrade()
        # One writer per run across machines (pods): a lease in the database, kept alive by a
        # heartbeat; a second trainer of the same run gets RunLockedError, and this one stops
        # (writing nothing more) if it loses the lease (Run.ensure_writer).
        config = public_config(cfg)  # the database URL's password redacted
        info = db.run_info(cfg.run)
        previous = info["status"] if info else None
        # A writer that went silent (a crashed pod) is waited out; a live one is refused.
        lease = db.acquire_run(cfg.run, cfg.mode, config, lease_s=LEASE_S, wait_s=LEASE_S + 10)
        lease.keep_alive()
        run = build_run(cfg, run_dir, db, task, world)
        run.lease = lease
        if cfg.checkpoint.background_upload and run.store.uri.startswith("s3://"):
            # Several nodes commit together (each uploads its own files): synchronously.
            run.commits = BackgroundCommits() if world.nodes == 1 else None
        existing = latest_step(run.store)
        if existing is not None and not resume:
            raise RunError(
                f"run {cfg.run!r} already has a checkpoint (step {existing}) in "
                f"{run.store.uri}; pass --resume to continue it, or pick another "
                "run name. Nothing was overwritten."
            )
        run.ensure_writer()  # loading the model can take a while
        if resume and restore_latest(run) is not None:
            log.info("resumed %s at step %d", cfg.run, run.step)
            db.log_event(cfg.run, "resumed", f"from step {run.step}")
            announce_restored_checkpoint(run, db)
            run.sink.truncate_after(run.step)
        elif cfg.continue_from is not None:
            continue_trajectory(run, cfg.continue_from)
            log.info("%s continues %s at step %d", cfg.run, cfg.continue_from, run.step)
            db.log_event(cfg.run, "continued", f"{cfg.continue_from}, {cfg.steps} steps")
            # An earlier attempt's records, its base eval at the first step included, go: the
            # loop writes that base point again (keeping it made two of it per restart).
            run.sink.truncate_after(run.step - 1)
        else:
            db.log_event(cfg.run, "started", f"{cfg.mode}, {cfg.steps} steps")
            run.sink.truncate_after(-1)  # likewise: nothing of an attempt killed before step 1
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        started = True
        broadcast(True, world)  # the other ranks start training
        if on_start is not None:
            on_start()
        _loop(run, progress, db)
        db.log_event(cfg.run, "finished", f"step {run.step}")
        lease.release("finished")
        finished = True
        return run_dir
    except RunLockedError as e:
        raise RunError(str(e)) from None
    except BaseException as e:
        stopped = isinstance(e, Terminated)
        # The run's last error, where the operator (and `fst` users) can read it: a pod's
        # log is gone with the pod, the database row is not.
        if lease is not None:
            with contextlib.suppress(Exception):
                db.log_event(cfg.run, "error", redact_url(f"{type(e).__name__}: {e}")[:2000])
        raise
    finally:
        if run is not None and run.commits is not None and not finished:
            # A snapshot taken before the failure still goes up (training stopped, its upload
            # need not): the next attempt resumes from it rather than from the one before.
            try:
                run.commits.wait()
            except Exception as e:
                log.warning("run %r: its last checkpoint upload failed: %s", cfg.run, e)
        if lease is not None and not finished:
            # An attempt that failed before training (a bad model, a refused resume) leaves the
            # run as it was: a finished run stays finished.
            keep = not started and previous not in (None, "created", "running")
            status = previous if keep and previous is not None else "failed"
            if stopped:
                status = "stopped"  # not a failure of the run: its pod went away
            try:
                lease.release(status)
            except Exception as e:  # the database may be why we are here: keep the first error
                log.warning("run %r: could not release its lease: %s", cfg.run, e)
        db.close()
        lock.release()


def _loop(run: Run, progress: bool, db: RunDB | None) -> None:
    """Steps until cfg.final_step. Every write is preceded by a lease check (Run.ensure_writer), so
    a run that lost its lease to another trainer stops without writing anything more. Only
    rank 0 writes (`main`); every rank trains, measures KL and saves its checkpoint shards."""
    cfg, world = run.cfg, run.world
    main = world.main
    bar = tqdm(
        total=cfg.final_step,
        initial=run.step,
        desc=f"{cfg.run} [{cfg.mode}]",
        disable=not progress or not main,
        unit="step",
        dynamic_ncols=True,
    )
    last_kl = None
    last_round: dict[str, Any] = {}
    every = cfg.metrics.eval_every
    if every and run.step == cfg.first_step and main:
        point = {"step": run.step, **heldout_eval(run)}  # the base point of the curve
        run.ensure_writer()
        run.sink.write(point)
    while run.step < cfg.final_step:
        run.ensure_writer()  # the step boundary: stop here once the lease is lost
        round_metrics: dict[str, Any] = {}
        due = cfg.mode != "rl" and run.step % cfg.fast.every_steps == 0
        # With fast.overlapRound a round can end before any step: rank 0 decides, every step.
        if due or (cfg.mode != "rl" and cfg.fast.overlap_round):
            bar.set_description(f"{cfg.run} [{cfg.mode}] GEPA round")
            if main:  # (checks the lease before the round's record)
                round_metrics = fast_channel(run, due, saves_checkpoint(cfg, run.step + 1))
            # The other ranks wait here for rank 0's new population.
            run.population, run.fast_s = broadcast((run.population, run.fast_s), world)
            bar.set_description(f"{cfg.run} [{cfg.mode}]")
        record = {**rl_step(run), **round_metrics}
        if every and (run.step % every == 0 or run.step == cfg.final_step) and main:
            record.update(heldout_eval(run))
        total = run.fast_s + run.slow_s
        record["fast_time_share"] = run.fast_s / total if total > 0 else 0.0
        if main:
            run.ensure_writer()  # the step took a while: still the run's writer?
            run.sink.write(record)
        bar.update(1)
        last_kl = record.get("kl", last_kl)
        last_round = round_metrics or last_round
        shown = {
            "reward": f"{record['reward_mean']:.3f}",
            "kl": "-" if last_kl is None else f"{last_kl:.4f}",
            "s_step": f"{record['step_s']:.1f}",
        }
        if last_round:  # the fast channel: its last GEPA round and the best prompt's val score
            shown["gepa"] = f"r{last_round['round']} +{last_round['gepa_new_candidates']}"
            shown["best_val"] = f"{last_round['population_best_val']:.2f}"
        bar.set_postfix(shown)
        if saves_checkpoint(cfg, run.step):
            run.ensure_writer()  # never write a checkpoint after losing the run
            uri = save_checkpoint(run)
            if uri:
                _checkpoint_committed(run, db, uri)
            elif main and run.commits is not None:
                log.info(
                    "step %d: checkpoint snapshot taken, uploading in the background", run.step
                )
        _report_commits(run, db)
    if run.commits is not None:
        run.commits.wait()  # the last checkpoint is in the store before the run is finished
        _report_commits(run, db)
    bar.close()
    run.sink.close()


def _checkpoint_committed(run: Run, db: RunDB | None, uri: str) -> None:
    if db is not None:
        db.log_event(run.cfg.run, "checkpoint", uri)  # the operator mirrors it into status
    log.info("checkpoint %s", uri)


def _report_commits(run: Run, db: RunDB | None) -> None:
    """Announce the background uploads that finished (checkpoint.backgroundUpload)."""
    if run.commits is not None:
        for uri in run.commits.committed():
            _checkpoint_committed(run, db, uri)
