"""One GEPA round over the current policy: the fast channel's step.

    population (K prompts, scored under the previous policy)
      -> re-score every prompt on the Pareto set under the CURRENT policy (the weights moved)
      -> a GEPA state holding those K candidates (so GEPA continues from the population,
         not from the seed prompt)
      -> gepa.optimize with a budget of metric calls: reflect on failures, propose, accept
         a child only if it beats its parent on a minibatch, score accepted ones on the Pareto set
      -> per-instance Pareto front over old and new candidates -> top-K by coverage

GEPA's own engine does the search; this module supplies the adapter (how a candidate prompt
is evaluated with the policy and the task) and the population hand-over between rounds.

With `fast.reuseStepRollouts` the round starts from what the last T steps already sampled: each
population prompt wrote G/K completions of every step problem, so the re-scoring and the
parents' minibatch evaluations are served from those rollouts (`StepSample`), and only the
children are sampled (docs/performance.md, round 2 item 4).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import gepa
import torch
from gepa.core.adapter import EvaluationBatch, ProposalFn
from gepa.core.state import GEPAState, ValsetEvaluation
from gepa.proposer.reflective_mutation.base import LanguageModel
from gepa.strategies.eval_policy import FullEvaluationPolicy
from gepa.strategies.proposal_sampling import IndependentSampling

from fst.fast.population import PromptRecord, top_k_by_coverage
from fst.model import chat_prompt_ids, prompt_tokens
from fst.rollout import Rollout, RolloutEngine, SamplingParams
from fst.tasks import Problem, Task

log = logging.getLogger(__name__)

COMPONENT = "system_prompt"  # the one text component GEPA evolves


class Trajectory(TypedDict):
    """One evaluated problem, kept for `make_reflective_dataset`."""

    problem: Problem
    completion: str
    feedback: str
    reward: float


# What `evaluate` returns: per problem, the completion text (GEPA's "output") and its trajectory.
Evaluation = EvaluationBatch[Trajectory, str]


class StepSample(TypedDict):
    """One training rollout, kept for the next GEPA round (fast.reuseStepRollouts)."""

    problem_id: str
    system: str  # the population prompt it was sampled under
    completion: str
    reward: float
    feedback: str


class RowsNeeded(BaseException):
    """A deferred adapter's round needs rows sampled (they are in `adapter.pending`).

    A BaseException, not an Exception: GEPA catches Exception around its proposal and
    evaluation steps (to log it, or to go on without the proposal); this must unwind the
    whole `gepa.optimize` call instead."""


class _Scored(NamedTuple):
    completion: str
    reward: float
    feedback: str


class PolicyAdapter:
    """GEPA adapter: evaluate candidate system prompts with the policy on task problems.

    Every (candidate, problem) row samples from its own generator, seeded from (round seed,
    problem id): a problem gets the same sampling noise under every candidate, so a parent and
    its child (and the population's prompts when re-scored) are compared on common random
    numbers, and a row's sample does not depend on what else shares its batch.

    `batch_evaluate` (GEPA calls it for a whole iteration's parents, its children, and the
    accepted children's Pareto-set evaluations) runs all its rows in ONE engine call: a
    decoding step of a few rows costs a large share of a full batch's (measured on a 2-core
    CPU in bf16: ~40-60 ms for 1-4 rows, ~100 ms for 32), so one call of 16 rows costs much
    less than four of 4 (docs/performance.md, round 2 item 4).

    `step_samples` (fast.reuseStepRollouts): the rollouts the population's prompts wrote in the
    steps since the last round. A (prompt, problem) pair they cover is served from them, not
    sampled: the round's re-scoring and its parents' minibatch evaluations cost no decoding,
    and only the children (new prompts) are sampled. What this gives up: those scores come
    from the policies of the last T steps, not the current one, and from G/K rollouts on
    shared noise with no child (common random numbers hold among the children only).

    `deferred` (fast.overlapRound, driven by RoundInFlight): rows are never sampled here; a
    call that needs some leaves them in `pending` and raises RowsNeeded, and the caller hands
    their rollouts back through `fill`. Every sampled row is remembered (as step samples are):
    a row's generator is seeded by its problem, so sampling a known pair again would only
    repeat it.
    """

    # Proposals come from GEPA's reflection_lm or a custom proposer, not from the adapter.
    propose_new_texts: ProposalFn | None = None

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        task: Task,
        params: SamplingParams,
        seed: int,
        step_samples: Sequence[StepSample] = (),
        max_prompt_tokens: int | None = None,
        deferred: bool = False,
    ) -> None:
        self.engine, self.tokenizer, self.task, self.params, self.seed = (
            engine,
            tokenizer,
            task,
            params,
            seed,
        )
        self.metric_calls = 0  # rows sampled
        self.reused_rows = 0  # rows served from step_samples
        # fast.maxPromptTokens: a candidate over it is never sampled (its rows score 0, so
        # GEPA never accepts it over its parent); tokens counted once per text.
        self.max_prompt_tokens = max_prompt_tokens
        self.over_budget_rows = 0
        self._tokens: dict[str, int] = {}
        # With step samples: (system prompt, problem id) -> every rollout known for it, first
        # the steps', then each row this round samples. A row samples from a generator seeded
        # by (round seed, problem), so sampling a known pair again would only repeat it.
        self.known: dict[tuple[str, str], list[_Scored]] = {}
        for s in step_samples:
            key = (s["system"], s["problem_id"])
            self.known.setdefault(key, []).append(
                _Scored(s["completion"], s["reward"], s["feedback"])
            )
        self.from_steps = set(self.known)
        # fast.overlapRound: rows are not sampled but left here for the caller (see
        # batch_evaluate); every sampled row is then remembered, as with step samples.
        self.deferred = deferred
        self.pending: list[tuple[str, Problem]] = []
        self.asked: list[list[tuple[str, str]]] = []  # every call's rows, in order

    @property
    def remembers(self) -> bool:
        """Whether rows are looked up in `known` before they are sampled."""
        return bool(self.from_steps) or self.deferred

    def evaluate(
        self, batch: list[Problem], candidate: dict[str, str], capture_traces: bool = False
    ) -> Evaluation:
        evaluation = self.batch_evaluate([(candidate, batch)])[0]
        if not capture_traces:
            evaluation.trajectories = None
        return evaluation

    def batch_evaluate(self, items: list[tuple[dict[str, str], list[Problem]]]) -> list[Evaluation]:
        """Each (candidate, problems) pair's evaluation, with trajectories, from one engine call
        over every pair's rows (with step samples, or deferred: every pair not known yet, once).

        A row's score is the mean reward of its rollouts (one when sampled here, G/K from the
        steps) and its trajectory the worst of them: reflection learns from failures.

        Deferred (fast.overlapRound): rows that would need the engine are not sampled here;
        they are left in `pending` and RowsNeeded is raised (the caller samples them beside
        a training step, hands them back through `fill`, and runs the round again)."""
        rows = [(c[COMPONENT], p) for c, batch in items for p in batch]
        self.asked.append([(s, p.id) for s, p in rows])
        over = {s: self._over_budget(s) for s in {s for s, _ in rows}}
        self.over_budget_rows += sum(bool(over[s]) for s, _ in rows)
        if self.remembers:
            self.reused_rows += sum((s, p.id) in self.from_steps for s, p in rows)
            unknown = {
                (s, p.id): (s, p) for s, p in rows if not over[s] and (s, p.id) not in self.known
            }
            todo = list(unknown.values())  # each pair once
        else:
            todo = [(s, p) for s, p in rows if not over[s]]
        if todo and self.deferred:
            self.pending = todo
            raise RowsNeeded(len(todo))
        fresh = iter(self._scored(todo, self._sample(todo)) if todo else [])
        if self.remembers:
            self.fill_known(todo, list(fresh))

        def rollouts_of(s: str, p: Problem) -> list[_Scored]:
            if over[s]:
                return [_Scored("", 0.0, over[s])]
            return self.known[(s, p.id)] if self.remembers else [next(fresh)]

        scored = [rollouts_of(s, p) for s, p in rows]
        out, i = [], 0
        for _, batch in items:
            mine, i = scored[i : i + len(batch)], i + len(batch)
            worst = [min(x, key=lambda x: x.reward) for x in mine]
            out.append(
                EvaluationBatch(
                    outputs=[w.completion for w in worst],
                    scores=[sum(x.reward for x in row) / len(row) for row in mine],
                    trajectories=[
                        Trajectory(
                            problem=p, completion=w.completion, feedback=w.feedback, reward=w.reward
                        )
                        for p, w in zip(batch, worst, strict=True)
                    ],
                )
            )
        return out

    def requests(
        self, rows: Sequence[tuple[str, Problem]]
    ) -> tuple[list[list[int]], list[torch.Generator]]:
        """The engine's inputs for `rows` (system prompt, problem): prompt ids and one
        generator per row, seeded by (round seed, problem)."""
        prompts = [chat_prompt_ids(self.tokenizer, s, p.prompt) for s, p in rows]
        generators = [torch.Generator().manual_seed(self._row_seed(p)) for _, p in rows]
        return prompts, generators

    def fill(self, rollouts: Sequence[Rollout]) -> None:
        """Deferred: `rollouts` of the `pending` rows (in order), sampled by the caller."""
        rows, self.pending = self.pending, []
        self.metric_calls += len(rows)
        self.fill_known(rows, self._scored(rows, rollouts))

    def fill_known(self, rows: Sequence[tuple[str, Problem]], scored: Sequence[_Scored]) -> None:
        self.known.update({(s, p.id): [x] for (s, p), x in zip(rows, scored, strict=True)})

    def _sample(self, rows: Sequence[tuple[str, Problem]]) -> list[Rollout]:
        prompts, generators = self.requests(rows)
        self.metric_calls += len(rows)
        return self.engine.generate(prompts, self.params, generators)

    def _scored(
        self, rows: Sequence[tuple[str, Problem]], rollouts: Sequence[Rollout]
    ) -> list[_Scored]:
        out = []
        for (_, p), r in zip(rows, rollouts, strict=True):
            score = self.task.score(p, r.text)
            out.append(_Scored(r.text, score.reward, score.feedback))
        return out

    def _over_budget(self, system: str) -> str:
        """Why `system` is not run (over fast.maxPromptTokens), or "" when it is."""
        if self.max_prompt_tokens is None:
            return ""
        if system not in self._tokens:
            self._tokens[system] = prompt_tokens(self.tokenizer, system)
        n = self._tokens[system]
        if n <= self.max_prompt_tokens:
            return ""
        return (
            f"Not run: the system prompt is {n} tokens, over the budget of "
            f"{self.max_prompt_tokens} (fast.maxPromptTokens)."
        )

    def _row_seed(self, problem: Problem) -> int:
        return (self.seed * 7919 + int(problem.id.encode().hex()[-8:], 16)) % 2**63

    def make_reflective_dataset(
        self,
        candidate: dict[str, str],
        eval_batch: Evaluation,
        components_to_update: list[str],
    ) -> dict[str, list[dict[str, Any]]]:
        records = [
            {
                "Inputs": t["problem"].prompt,
                "Generated Outputs": t["completion"],
                "Feedback": t["feedback"],
                "Score": t["reward"],
            }
            for t in eval_batch.trajectories or []
        ]
        return {name: records for name in components_to_update}


class _RoundLog:
    """GEPA's log lines go to the round folder's gepa.log and to our logger at DEBUG level
    (GEPA's own file logger would tee everything to stdout, over our progress bar)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def log(self, *parts: object, **_: object) -> None:
        message = " ".join(str(p) for p in parts)
        with self.path.open("a") as f:
            f.write(message + "\n")
        log.debug("gepa: %s", message)


class _ResumeFromPopulation(FullEvaluationPolicy):
    """Full valset evaluation, except that the seed is not re-scored: the round's GEPA state
    (with the whole population already scored) is loaded from the round folder instead."""

    def get_seed_eval_batch(self, loader: Any) -> list[Any]:
        return []


@dataclass
class RoundResult:
    population: list[PromptRecord]
    candidates: list[PromptRecord]  # every candidate of the round, old and new
    metric_calls: int
    seconds: float
    proposed_accepted: int  # new candidates that made it into GEPA's pool


def _initial_state(
    population: list[PromptRecord], val_ids: Sequence[int], round_idx: int
) -> GEPAState:
    def evaluation(rec: PromptRecord) -> ValsetEvaluation:
        scores = {i: rec.val_scores[str(i)] for i in val_ids}
        return ValsetEvaluation(
            outputs_by_val_id={i: "" for i in val_ids},
            scores_by_val_id=scores,
            objective_scores_by_val_id=None,
        )

    state = GEPAState({COMPONENT: population[0].text}, evaluation(population[0]))
    for rec in population[1:]:
        state.update_state_with_new_program([], {COMPONENT: rec.text}, evaluation(rec), None, 0)
    state.num_full_ds_evals = len(population)
    state.total_num_evals = len(population) * len(val_ids)
    return state


def run_gepa_round(
    population: list[PromptRecord],
    adapter: PolicyAdapter,
    val_problems: list[Problem],
    train_problems: list[Problem],
    round_idx: int,
    top_k: int,
    metric_calls: int,
    minibatch_size: int,
    round_dir: Path,
    seed: int,
    reflection_lm: LanguageModel | None = None,
    proposer: ProposalFn | None = None,
    proposals_per_iteration: int = 1,
) -> RoundResult:
    """One GEPA round from `population`; returns the new top-K population (best first).

    `proposals_per_iteration` > 1: each GEPA iteration picks that many (parent, minibatch)
    pairs (GEPA's IndependentSampling), reflects on each, and evaluates the parents, then the
    children, then the accepted children on the Pareto set, each stage as one batch."""
    t0 = time.perf_counter()
    calls_before = adapter.metric_calls
    # 1. Re-score the population under the current policy (GEPA's data ids are list indices),
    #    every prompt in one batch (with step samples: served from them, bar any gaps).
    val_ids = list(range(len(val_problems)))
    scored = adapter.batch_evaluate([({COMPONENT: rec.text}, val_problems) for rec in population])
    for rec, batch in zip(population, scored, strict=True):
        rec.val_scores = {str(i): s for i, s in zip(val_ids, batch.scores, strict=True)}
        rec.scored_round = round_idx

    # 2. Hand GEPA a state that already holds the population, then let it search.
    if round_dir.exists():
        shutil.rmtree(round_dir)  # a re-run round (after a resume) starts clean
    round_dir.mkdir(parents=True)
    state = _initial_state(population, val_ids, round_idx)
    state.save(str(round_dir))
    result = gepa.optimize(
        seed_candidate={COMPONENT: population[0].text},
        trainset=train_problems,
        valset=val_problems,
        adapter=adapter,
        reflection_lm=reflection_lm,
        custom_candidate_proposer=proposer,
        reflection_minibatch_size=minibatch_size,
        max_metric_calls=state.total_num_evals + metric_calls,
        candidate_selection_strategy="pareto",
        frontier_type="instance",
        val_evaluation_policy=_ResumeFromPopulation(),
        run_dir=str(round_dir),
        logger=_RoundLog(round_dir / "gepa.log"),
        seed=seed,
        raise_on_exception=True,
        display_progress_bar=False,
        sampling_strategy=(
            IndependentSampling(proposals_per_iteration) if proposals_per_iteration > 1 else None
        ),
    )

    # 3. Map GEPA's candidates back to records with lineage, and keep the top K.
    by_text = {rec.text: rec for rec in population}
    candidates: list[PromptRecord] = []
    for idx, cand in enumerate(result.candidates):
        text = cand[COMPONENT]
        scores = {str(k): float(v) for k, v in result.val_subscores[idx].items()}
        if text in by_text and idx < len(population):
            rec = by_text[text]
        else:
            parent_ids = [candidates[p].id for p in result.parents[idx] if p is not None]
            rec = PromptRecord(text=text, parents=parent_ids, born_round=round_idx)
        rec.val_scores, rec.scored_round = scores, round_idx
        candidates.append(rec)
    # A reply with no instruction in it (GEPA takes an unfenced reply whole, so an empty or
    # blank one is a blank candidate: a small reflector writes those) stays in the record of
    # candidates but never enters the population: every rollout needs a system prompt.
    usable = [i for i, c in enumerate(candidates) if c.text.strip()]
    ranked = top_k_by_coverage([candidates[i].val_scores for i in usable], top_k)
    keep = [usable[j] for j in ranked]
    new_population, seen = [], set()
    for i in keep:
        if candidates[i].id not in seen:  # the same text proposed twice is one prompt
            seen.add(candidates[i].id)
            new_population.append(candidates[i])
    return RoundResult(
        population=new_population,
        candidates=candidates,
        metric_calls=adapter.metric_calls - calls_before,
        seconds=time.perf_counter() - t0,
        proposed_accepted=len(candidates) - len(population),
    )


class MemoisedLM:
    """A reflection LM that gives a prompt it was asked before its first answer: a round that
    runs again (RoundInFlight) asks its reflector the same questions and must get the same
    proposals, without paying for them twice."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.answers: dict[str, str] = {}

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
        if key not in self.answers:
            self.answers[key] = self.lm(prompt)
        return self.answers[key]


class RoundInFlight:
    """fast.overlapRound: a GEPA round whose rollouts are sampled beside training steps'.

    A round is a function of its inputs and of the rows it samples: every row's generator is
    seeded by (round, problem), GEPA's choices by the round's seed, and the reflection LM's
    answers are memoised (MemoisedLM). So `advance` runs the round from its start until it
    needs rows the engine has not sampled yet (RowsNeeded); the caller samples those in the
    next training step's engine call and hands them back (`fill`); the next `advance` replays
    the round, served from what is known (GEPA's bookkeeping, ~30 ms), up to the next rows
    it needs, or to its end. `finish` samples what is still needed alone.

    Why: a decoding step's cost grows slowly with its rows (on the 2-core CPU in bf16, 32
    rows ~45 ms, 16 ~42 ms), so a round's two engine calls of 16-30 rows, each as long as its
    longest completion, cost almost a training step's decoding each when run alone and a
    fraction of it beside one (docs/performance.md, round 2 item 4). What it changes: the
    population a round leaves is used from the step after its last rows were sampled (two to
    four steps after it started, with the digest reflector and fast.reuseStepRollouts, in that
    document's runs), and its rows come from the policies of those steps rather than the one
    it started on.
    """

    def __init__(
        self, adapter: PolicyAdapter, attempt: Callable[[], RoundResult], index: int = 0
    ) -> None:
        adapter.deferred = True
        self.adapter, self.attempt = adapter, attempt
        self.index = index  # the run's round number (its record's folder, its seed)
        self.seconds = 0.0  # the round's own time: its attempts and the rows it sampled alone
        self.attempts = 0
        self.rows_alongside = 0  # rows sampled in training steps' engine calls

    def advance(self) -> RoundResult | None:
        """Run the round from its start: its result, or None when it needs rows (`requests`)."""
        t0 = time.perf_counter()
        self.attempts += 1
        adapter = self.adapter
        before, adapter.asked = adapter.asked, []
        adapter.reused_rows = adapter.over_budget_rows = 0  # counted by each attempt
        try:
            result = self.attempt()
        except RowsNeeded:
            result = None
        finally:
            self.seconds += time.perf_counter() - t0
        # A replay asks for what the attempt before it asked, then more. If it does not (a
        # reflector whose answers change, a proposer with its own randomness), the round
        # would never end: each attempt would need rows for new candidates.
        if adapter.asked[: len(before)] != before:
            raise RuntimeError(
                "a GEPA round in flight (fast.overlapRound) did not replay as it ran: its "
                "evaluations changed between attempts, so its reflector or proposer is not "
                "deterministic; run it without fast.overlapRound"
            )
        if result is not None:
            result.metric_calls, result.seconds = adapter.metric_calls, self.seconds
        return result

    def requests(self) -> tuple[list[list[int]], list[torch.Generator]]:
        """The engine's inputs for the rows the last attempt needs (none when it finished)."""
        return self.adapter.requests(self.adapter.pending)

    def fill(self, rollouts: Sequence[Rollout]) -> None:
        """The needed rows' rollouts, sampled in a training step's engine call."""
        self.rows_alongside += len(rollouts)
        self.adapter.fill(rollouts)

    def finish(self) -> RoundResult:
        """Run the round to its end, sampling the rows it still needs alone."""
        while (result := self.advance()) is None:
            t0 = time.perf_counter()
            prompts, generators = self.requests()
            rollouts = self.adapter.engine.generate(prompts, self.adapter.params, generators)
            self.adapter.fill(rollouts)
            self.seconds += time.perf_counter() - t0
        return result
