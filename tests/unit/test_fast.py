"""The fast channel: Pareto front, top-K, the digest reflector, a GEPA round, and the
advantage shared across the prompts of one problem.

The policy is replaced by a scripted rollout engine (a stand-in for our own RolloutEngine)
whose answers depend on the system prompt, so that prompt quality is known exactly.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from fst.config import ConfigError, TaskConfig, TrainConfig, validate_config
from fst.fast.gepa_adapter import (
    COMPONENT,
    MemoisedLM,
    PolicyAdapter,
    RoundInFlight,
    RowsNeeded,
    StepSample,
    run_gepa_round,
)
from fst.fast.population import PromptRecord, pareto_front, prompt_id, top_k_by_coverage
from fst.fast.reflectors import (
    EXAMPLES_HEADER,
    LESSONS_HEADER,
    MAX_EXAMPLES,
    DigestProposer,
    digest_rewrite,
    lessons_from_feedback,
)
from fst.loop import Run, initial_population, prompt_assignment
from fst.rollout import Rollout, SamplingParams
from fst.slow.advantages import group_advantages
from fst.tasks import build_task
from fst.tasks.arithmetic import score_value
from tests.tiny_model import (  # noqa: F401 (fixtures)
    one_torch_thread,
    tiny_model_dir,
    tiny_run_config,
    varied_reward,
)


class CharTokenizer:
    """A tokenizer stand-in: one id per character, a plain-text chat template."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<a>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def expression(problem) -> str:
    return re.search(r"Compute (.*?)\. Give", problem.prompt).group(1)


class ScriptedEngine:
    """Answers an arithmetic prompt correctly (boxed) iff the system prompt says BOXED, and
    except when the answer is a multiple of 3, so a BOXED prompt is good but rarely perfect."""

    def __init__(self) -> None:
        self.calls = 0

    def sync_weights(self) -> None:
        pass

    def generate(self, prompts, params, generator):
        self.calls += 1
        out = []
        for ids in prompts:
            text = "".join(chr(i) for i in ids)
            system = re.search(r"<system>(.*?)</system>", text, re.S)
            expr = re.search(r"Compute (.*?)\. Give", text).group(1)
            value = eval(expr)  # our own generated arithmetic
            good = system and "BOXED" in system.group(1) and value % 3 != 0
            answer = f"\\boxed{{{value}}}" if good else "I am not sure."
            out.append(Rollout(list(ids), [1, 2], [-0.1, -0.1], answer, True))
        return out


@pytest.fixture
def task():
    return build_task(TaskConfig(name="arithmetic", train_size=64, val_size=12, test_size=4))


def scripted_round(
    task, tmp_path, population, round_idx, top_k, metric_calls, engine=None, **options
):
    """One GEPA round of the ScriptedEngine policy (or `engine`); `options` are
    run_gepa_round's: reflection_lm= or proposer=, proposals_per_iteration=..."""
    engine = engine if engine is not None else ScriptedEngine()
    adapter = PolicyAdapter(engine, CharTokenizer(), task, SamplingParams(), seed=0)
    return run_gepa_round(
        population=population,
        adapter=adapter,
        val_problems=task.problems("val"),
        train_problems=task.problems("train"),
        round_idx=round_idx,
        top_k=top_k,
        metric_calls=metric_calls,
        minibatch_size=4,
        round_dir=tmp_path / "round",
        seed=0,
        **options,
    )


# ----------------------------------------------------------------------------- pure parts


def test_pareto_front_keeps_ties_and_per_instance_bests():
    scores = [{"a": 1.0, "b": 0.0, "c": 0.5}, {"a": 0.0, "b": 1.0, "c": 0.5}, {"a": 0.0}]
    assert pareto_front(scores) == {"a": {0}, "b": {1}, "c": {0, 1}}


def test_top_k_by_coverage_prefers_unique_solvers_over_mean():
    scores = [
        {"1": 1, "2": 1, "3": 0, "4": 0},  # 0: mean .5, front on 1,2
        {"1": 1, "2": 1, "3": 0, "4": 0},  # 1: same as 0 (tie -> older first)
        {"1": 0, "2": 0, "3": 1, "4": 0},  # 2: mean .25, the only one solving 3
        {"1": 0, "2": 0, "3": 0, "4": 0},  # 3: dominated, never on the front (4 is all-0 tie)
    ]
    # coverage: 0 -> {1,2,4} = 3, 1 -> 3, 2 -> {3,4} = 2, 3 -> {4} = 1
    assert top_k_by_coverage(scores, 3) == [0, 1, 2]
    assert top_k_by_coverage(scores, 1) == [0]


def test_prompt_record_round_trip_and_stable_id():
    rec = PromptRecord("be brief", parents=["abc"], born_round=2, val_scores={"0": 1.0})
    again = PromptRecord.from_dict(rec.to_dict())
    assert again == rec and again.id == prompt_id("be brief") and rec.mean_score == 1.0


def test_digest_extracts_distinct_instructive_lessons():
    feedback = [
        "No \\boxed{...} answer found; the final answer must be an integer inside \\boxed{}. "
        "Expected 7.",
        "No \\boxed{...} answer found; the final answer must be an integer inside \\boxed{}. "
        "Expected 12.",
        "Wrong value: expected 3, got 4.",
    ]
    lessons = lessons_from_feedback(feedback)
    assert lessons[0] == "The final answer must be an integer inside \\boxed{}."
    assert not any(lesson.lower().startswith(("expected", "wrong value")) for lesson in lessons)
    child = digest_rewrite("Be helpful.", feedback)
    assert child.startswith("Be helpful.") and "must be an integer inside \\boxed{}" in child
    # Deterministic, and a lesson already stated is not added twice.
    assert digest_rewrite("Be helpful.", feedback) == child
    assert digest_rewrite(child, feedback) == child


def test_digest_keeps_the_example_of_a_lesson():
    # The arithmetic task's own feedback for a reply without \boxed{}: the lesson must keep
    # its "e.g." example, the only place the proposer can show the format.
    feedback = [score_value(n, "The answer is 1.").feedback for n in (7, 12, -5)]
    lessons = lessons_from_feedback(feedback)
    # One lesson: the three differ only in their (signed) numbers.
    assert lessons == ["The final answer must be an integer inside \\boxed{}, e.g. \\boxed{7}."]
    assert "\\boxed{7}" in digest_rewrite("Be helpful.", feedback)


# ----------------------------------------------------------------------------- a GEPA round


def test_scripted_reflection_better_prompt_accepted_worse_rejected(task, tmp_path):
    better = "Solve it. Write the result BOXED: inside \\boxed{}."
    worse = "Just chat about numbers."
    proposals = iter([better, worse, worse, worse, worse, worse])
    asked = []

    def reflection_lm(prompt: str) -> str:
        asked.append(prompt)
        return f"```\n{next(proposals)}\n```"

    seed = PromptRecord("You are a helpful assistant.")
    result = scripted_round(task, tmp_path, [seed], 1, 4, 40, reflection_lm=reflection_lm)
    texts = [c.text for c in result.candidates]
    assert len(asked) >= 2, "GEPA should have reflected at least twice"
    assert better in texts, "the better prompt must be accepted into GEPA's pool"
    assert worse not in texts, "the worse prompt must be rejected"
    assert result.population[0].text == better  # best first
    assert result.population[0].parents == [seed.id] and result.population[0].born_round == 1
    assert result.population[0].mean_score > 0 and seed.mean_score == 0
    assert result.metric_calls > 0


class BlankLovingEngine(ScriptedEngine):
    """Answers correctly iff the system prompt is blank: a policy under which GEPA accepts a
    reflector's empty reply."""

    def generate(self, prompts, params, generator):
        out = []
        for ids in prompts:
            text = "".join(chr(i) for i in ids)
            system = re.search(r"<system>(.*?)</system>", text, re.S)
            value = eval(re.search(r"Compute (.*?)\. Give", text).group(1))
            good = system is None or not system.group(1).strip()
            answer = f"\\boxed{{{value}}}" if good else "I am not sure."
            out.append(Rollout(list(ids), [1, 2], [-0.1, -0.1], answer, True))
        return out


def test_a_blank_proposal_is_a_candidate_but_never_a_population_member(task, tmp_path):
    """A small reflector's empty reply (GEPA takes an unfenced reply whole: here "") is
    accepted by GEPA when it scores better, recorded as a candidate, and kept out of the
    population: every rollout needs a system prompt."""
    seed = PromptRecord("You are a helpful assistant.")
    result = scripted_round(
        task, tmp_path, [seed], 1, 4, 24, BlankLovingEngine(), reflection_lm=lambda prompt: "   "
    )
    blank = [c for c in result.candidates if not c.text.strip()]
    assert blank and blank[0].mean_score > seed.mean_score  # accepted by GEPA, the better one
    assert [p.text for p in result.population] == [seed.text]


def test_round_continues_from_the_population_not_the_seed(task, tmp_path):
    """A second round starts with both prompts of the first, re-scored under the policy."""
    a = PromptRecord("plain prompt")
    b = PromptRecord("BOXED prompt", parents=[a.id], born_round=1)
    result = scripted_round(task, tmp_path, [b, a], 2, 2, 8, proposer=DigestProposer())
    assert [c.text for c in result.candidates[:2]] == [b.text, a.text]
    assert all(c.scored_round == 2 for c in result.candidates)
    assert result.population[0].text == b.text


class NoisyEngine(ScriptedEngine):
    """The scripted policy, except that a row whose own generator draws below 0.3 fails: the
    result depends on each row's random stream, as sampling does."""

    def generate(self, prompts, params, generator):
        assert not isinstance(generator, torch.Generator), "the adapter seeds every row"
        out = super().generate(prompts, params, generator)
        for r, g in zip(out, generator, strict=True):
            if float(torch.rand(1, generator=g)) < 0.3:
                r.text = "I am not sure."
        return out


def test_batch_evaluate_is_one_engine_call_equal_to_separate_evaluations(task):
    """Several (candidate, problems) pairs in one engine call give each pair exactly what it
    gets evaluated alone: every row has its own (round seed, problem) generator."""
    engine = NoisyEngine()
    adapter = PolicyAdapter(engine, CharTokenizer(), task, SamplingParams(), seed=3)
    val, train = task.problems("val"), task.problems("train")
    good, plain = {COMPONENT: "Answer BOXED."}, {COMPONENT: "Chat."}
    items = [(good, val), (plain, val[:4]), (good, train[:4])]
    together = adapter.batch_evaluate(items)
    assert engine.calls == 1 and adapter.metric_calls == 12 + 4 + 4
    alone = [adapter.evaluate(batch, cand, capture_traces=True) for cand, batch in items]
    assert engine.calls == 4
    for a, b in zip(together, alone, strict=True):
        assert a.outputs == b.outputs and a.scores == b.scores
    # Common random numbers: a problem's noise is the same under every candidate, so a
    # problem the good prompt fails by noise is failed under it in any batch.
    assert 0 < sum(together[0].scores) < 12
    assert adapter.evaluate(val, good).trajectories is None  # traces only when asked


@pytest.mark.parametrize("proposals", [1, 3])
def test_a_round_with_several_proposals_per_iteration(task, tmp_path, proposals):
    """GEPA's IndependentSampling: each iteration reflects on `proposals` parents, whose
    evaluations go to the engine as one batch per stage; the better prompt still wins."""
    better = "Solve it. Write the result BOXED: inside \\boxed{}."
    engine = ScriptedEngine()
    seed = PromptRecord("You are a helpful assistant.")
    asked = []

    def reflection_lm(prompt: str) -> str:
        asked.append(prompt)
        return f"```\n{better if len(asked) == 1 else 'Just chat.'}\n```"

    result = scripted_round(
        task,
        tmp_path,
        [seed],
        1,
        4,
        48,
        engine,
        reflection_lm=reflection_lm,
        proposals_per_iteration=proposals,
    )
    assert result.population[0].text == better
    # Re-scoring is one call; per iteration: parents, children, accepted children's Pareto
    # set. With 3 proposals per iteration, 3 reflections per round of engine calls.
    iterations = -(-len(asked) // proposals)
    assert engine.calls <= 1 + 3 * iterations
    if proposals > 1:
        assert len(asked) >= proposals and len(asked) % proposals == 0


class RecordingEngine(ScriptedEngine):
    """The scripted policy, recording the system prompt of every row it samples."""

    def __init__(self) -> None:
        super().__init__()
        self.systems: list[str] = []

    def generate(self, prompts, params, generator):
        for ids in prompts:
            text = "".join(chr(i) for i in ids)
            self.systems.append(re.search(r"<system>(.*?)</system>", text, re.S).group(1))
        return super().generate(prompts, params, generator)


def step_samples(problems, system: str, rewards: tuple[float, float]) -> list[StepSample]:
    """Two training rollouts of `system` on each problem, scored `rewards`."""
    return [
        StepSample(
            problem_id=p.id,
            system=system,
            completion=f"step rollout {i} of {p.id}",
            reward=r,
            feedback="Write the final answer inside \\boxed{}." if r < 1 else "Correct.",
        )
        for p in problems
        for i, r in enumerate(rewards)
    ]


def test_step_samples_are_served_and_only_new_pairs_are_sampled(task):
    """A (prompt, problem) pair the steps sampled is served from their rollouts: its score is
    their mean reward, its trajectory the worst of them. Any other pair is sampled once,
    however often it is asked for."""
    train = task.problems("train")
    known = step_samples(train[:4], "Chat.", (1.0, 0.0))
    engine = RecordingEngine()
    adapter = PolicyAdapter(
        engine, CharTokenizer(), task, SamplingParams(), seed=0, step_samples=known
    )
    chat, boxed = {COMPONENT: "Chat."}, {COMPONENT: "Answer BOXED."}
    served, fresh, again = adapter.batch_evaluate(
        [(chat, train[:4]), (boxed, train[:4]), (boxed, train[2:6])]
    )
    assert served.scores == [0.5] * 4  # the steps' mean, not the scripted policy's 0
    assert [t["completion"] for t in served.trajectories] == [
        f"step rollout 1 of {p.id}" for p in train[:4]
    ]
    assert all(t["reward"] == 0.0 for t in served.trajectories)  # the failure, to reflect on
    # Boxed on train[:6], each problem once, in the one call; train[2:4] asked twice.
    assert engine.calls == 1 and engine.systems == ["Answer BOXED."] * 6
    assert adapter.metric_calls == 6 and adapter.reused_rows == 4
    assert (
        again.scores == fresh.scores[2:] + adapter.batch_evaluate([(boxed, train[4:6])])[0].scores
    )
    assert engine.calls == 1  # all known now: no call at all
    # Without step samples nothing is remembered: every row is sampled, as before.
    plain = PolicyAdapter(RecordingEngine(), CharTokenizer(), task, SamplingParams(), seed=0)
    plain.batch_evaluate([(boxed, train[:4]), (boxed, train[:4])])
    assert plain.metric_calls == 8 and plain.reused_rows == 0


def round_on(adapter, population, problems, metric_calls, proposal, tmp_path):
    """Round 1 of `adapter` from `population` (texts), `problems` as both the Pareto set and
    the minibatch pool, with a reflector that always proposes `proposal`."""
    return run_gepa_round(
        population=[PromptRecord(text) for text in population],
        adapter=adapter,
        val_problems=problems,
        train_problems=problems,
        round_idx=1,
        top_k=2,
        metric_calls=metric_calls,
        minibatch_size=4,
        round_dir=tmp_path / "round",
        seed=0,
        reflection_lm=lambda prompt: f"```\n{proposal}\n```",
    )


def test_a_round_from_step_samples_samples_only_its_children(task, tmp_path):
    """fast.reuseStepRollouts: the population's re-scoring and the parents' minibatches come
    from the step rollouts (the steps' problems are the Pareto set and the minibatch pool), so
    every row the round samples is a child's; a better child still wins."""
    # Problems the scripted BOXED prompt solves (its answer is no multiple of 3).
    solvable = [p for p in task.problems("train") if eval(expression(p)) % 3]
    recent = solvable[:8]
    plain, chatty = "You are a helpful assistant.", "Chat about it."
    samples = step_samples(recent, plain, (0.0, 0.0)) + step_samples(recent, chatty, (1.0, 0.0))
    better = "Solve it. Write the result BOXED: inside \\boxed{}."
    engine = RecordingEngine()
    adapter = PolicyAdapter(
        engine, CharTokenizer(), task, SamplingParams(), seed=0, step_samples=samples
    )
    result = round_on(adapter, [chatty, plain], recent, 24, better, tmp_path)
    old = {c.text: c for c in result.candidates[:2]}
    assert set(old[chatty].val_scores.values()) == {0.5}  # the steps' means
    assert set(old[plain].val_scores.values()) == {0.0}
    assert result.population[0].text == better
    assert engine.systems and set(engine.systems) == {better}  # only the child was sampled
    # The child: its minibatch, then the rest of the Pareto set; no problem twice.
    assert len(engine.systems) == len(recent) == result.metric_calls
    assert adapter.reused_rows >= 2 * len(recent)  # the re-scoring, at least


class CountingReflector:
    """A reflection LM whose answer says how often it was asked: only a memo (MemoisedLM) makes
    a replayed round hear the same answers."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.asked.append(prompt)
        return (
            f"```\nSolve it. Write the result BOXED: inside \\boxed{{}}. ({len(self.asked)})\n```"
        )


def two_prompt_round(adapter, problems, round_dir, reflection_lm, proposals=1):
    """Round 1 of `adapter` from two prompts, `problems` as the Pareto set and the minibatch
    pool: the call that runs it (once, or again and again under a RoundInFlight)."""
    return functools.partial(
        run_gepa_round,
        population=[PromptRecord("Chat about it."), PromptRecord("You are a helpful assistant.")],
        adapter=adapter,
        val_problems=problems,
        train_problems=problems,
        round_idx=1,
        top_k=3,
        metric_calls=24,
        minibatch_size=4,
        round_dir=round_dir,
        seed=0,
        reflection_lm=reflection_lm,
        proposals_per_iteration=proposals,
    )


def in_flight_round(task, tmp_path, deferred, samples, problems, proposals):
    """`two_prompt_round` with the noisy policy, run at once or (deferred) as a RoundInFlight
    whose rows the test samples between attempts. Returns (result, adapter, RoundInFlight or
    None)."""
    engine = NoisyEngine()
    adapter = PolicyAdapter(
        engine, CharTokenizer(), task, SamplingParams(), seed=0, step_samples=samples
    )
    reflector = CountingReflector()
    attempt = two_prompt_round(
        adapter,
        problems,
        tmp_path / ("deferred" if deferred else "at-once"),
        MemoisedLM(reflector) if deferred else reflector,
        proposals,
    )
    if not deferred:
        return attempt(), adapter, None
    in_flight = RoundInFlight(adapter, attempt)
    while (result := in_flight.advance()) is None:
        prompts, generators = in_flight.requests()
        assert prompts and engine.calls == in_flight.attempts - 1  # only the caller samples
        in_flight.fill(engine.generate(prompts, SamplingParams(), generators))
    assert not in_flight.requests()[0]
    return result, adapter, in_flight


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "reuse"])
@pytest.mark.parametrize("proposals", [1, 2])
def test_a_round_in_flight_ends_as_the_round_run_at_once(task, tmp_path, reuse, proposals):
    """fast.overlapRound: a round that stops where it needs rows, gets them sampled by its
    caller and runs again from its start ends exactly as the round run at once: the same
    candidates, scores and population. Every row it samples is sampled once."""
    problems = [p for p in task.problems("train") if eval(expression(p)) % 3][:8]
    samples = step_samples(problems, "Chat about it.", (1.0, 0.0)) if reuse else []
    at_once, adapter_a, _ = in_flight_round(task, tmp_path, False, samples, problems, proposals)
    deferred, adapter_d, in_flight = in_flight_round(
        task, tmp_path, True, samples, problems, proposals
    )
    assert [c.text for c in deferred.candidates] == [c.text for c in at_once.candidates]
    assert [c.val_scores for c in deferred.candidates] == [c.val_scores for c in at_once.candidates]
    assert [p.text for p in deferred.population] == [p.text for p in at_once.population]
    assert deferred.proposed_accepted == at_once.proposed_accepted >= 1
    assert in_flight.attempts >= 3  # re-scoring, children, accepted children's Pareto set
    assert in_flight.rows_alongside == adapter_d.metric_calls == deferred.metric_calls
    # The same rows, each once: at once, GEPA's re-evaluations of a known pair are sampled
    # again (the same sample: a row's generator is seeded by its problem) unless remembered.
    assert len(adapter_d.known) - len(adapter_d.from_steps) == deferred.metric_calls
    assert deferred.metric_calls <= at_once.metric_calls
    if reuse:
        assert deferred.metric_calls == at_once.metric_calls
        assert adapter_d.reused_rows == adapter_a.reused_rows > 0  # counted by the last attempt


def test_a_round_in_flight_finishes_alone(task, tmp_path):
    """RoundInFlight.finish: the rows still needed are sampled alone (a checkpoint, or the
    next round, is due); the round ends as it does at once. A reflector whose answers change
    between replays is an error, not a round that never ends."""
    problems = [p for p in task.problems("train") if eval(expression(p)) % 3][:8]
    at_once, *_ = in_flight_round(task, tmp_path, False, [], problems, 1)
    engine = NoisyEngine()
    adapter = PolicyAdapter(engine, CharTokenizer(), task, SamplingParams(), seed=0, deferred=True)
    with pytest.raises(RowsNeeded):
        adapter.batch_evaluate([({COMPONENT: "Chat."}, problems[:2])])
    assert [p.id for _, p in adapter.pending] == [problems[0].id, problems[1].id]
    assert engine.calls == 0
    reflector = CountingReflector()

    def in_flight(lm) -> RoundInFlight:
        adapter = PolicyAdapter(engine, CharTokenizer(), task, SamplingParams(), seed=0)
        return RoundInFlight(adapter, two_prompt_round(adapter, problems, tmp_path / "alone", lm))

    memo = MemoisedLM(reflector)
    alone = in_flight(memo)
    result = alone.finish()
    assert [c.text for c in result.candidates] == [c.text for c in at_once.candidates]
    assert [p.text for p in result.population] == [p.text for p in at_once.population]
    assert alone.rows_alongside == 0 and engine.calls == alone.attempts - 1 >= 2
    assert len(reflector.asked) == len(memo.answers)  # each question once, however it replayed

    # Without the memo the replays hear new answers, propose new children and would need rows
    # for ever: a replay that asks for other rows than the attempt before it is an error.
    with pytest.raises(RuntimeError, match="did not replay as it ran"):
        in_flight(reflector).finish()


# ----------------------------------------------------------------------------- one advantage group


def test_prompt_assignment_round_robin():
    assert prompt_assignment(8, 4) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert prompt_assignment(5, 2) == [0, 1, 0, 1, 0]  # K does not divide G: prompt 0 gets 3


def test_advantage_is_shared_across_the_prompts_of_one_problem(task):
    cfg = TrainConfig(
        task={"name": "arithmetic"}, mode="fst", slow={"groupSize": 4, "problemsPerStep": 2}
    )
    population = [PromptRecord("BOXED good prompt"), PromptRecord("plain prompt")]
    run = Run(
        cfg,
        task,
        CharTokenizer(),
        None,
        None,
        ScriptedEngine(),
        None,
        torch.Generator().manual_seed(0),
        None,
        None,
        population,
    )
    odd = [p for p in task.problems("train") if int(p.answer) % 3 != 0][:2]
    out = run.rollout(odd, population)
    # Each problem: 2 rollouts per prompt; the BOXED prompt's rollouts succeed.
    assert out.rewards.shape == (2, 4)
    used = torch.tensor(out.prompt_ids).view(2, 4)
    assert torch.equal(out.rewards, (used == 0).float())
    adv = group_advantages(out.rewards)
    # ONE group per problem: the baseline is the mean over all 4 rollouts (both prompts),
    # so the good prompt's rollouts get +, the other's -, and they sum to zero per problem.
    for row, prompts in zip(adv, used, strict=True):
        assert (row[prompts == 0] > 0).all() and (row[prompts == 1] < 0).all()
        assert row.sum().abs() < 1e-6
    # Per-prompt groups would give all-zero advantages here (each prompt's rewards are flat).
    per_prompt = group_advantages(out.rewards[:, used[0] == 0])
    assert per_prompt.abs().sum() == 0


# ----------------------------------------------------------------------------- a prompt budget


def at_most(n: int):
    """fast.maxPromptTokens as the digest proposer sees it, in CharTokenizer's tokens."""
    return lambda text: len(text) <= n


NEW_LESSON = "The final answer must be an integer inside \\boxed{}."


def test_digest_under_a_budget_drops_the_oldest_lines_never_the_new_ones():
    base = "Be helpful."
    parent = f"{base}\n\n{LESSONS_HEADER}\n- Always show the work.\n- Never guess."
    unbounded = digest_rewrite(parent, [NEW_LESSON])
    assert unbounded == f"{parent}\n- {NEW_LESSON}"  # no budget: appended, as before
    # Room for one old lesson: the oldest goes.
    child = digest_rewrite(parent, [NEW_LESSON], fits=at_most(len(unbounded) - 10))
    assert child == f"{base}\n\n{LESSONS_HEADER}\n- Never guess.\n- {NEW_LESSON}"
    # Room for the new lesson alone.
    alone = f"{base}\n\n{LESSONS_HEADER}\n- {NEW_LESSON}"
    assert digest_rewrite(parent, [NEW_LESSON], fits=at_most(len(alone))) == alone
    # No room even for it: the parent, unchanged (GEPA then gets no new candidate).
    assert digest_rewrite(parent, [NEW_LESSON], fits=at_most(len(alone) - 1)) == parent


def test_digest_under_a_budget_rotates_its_worked_examples():
    """Feedback with no instruction in it adds a worked example. Without a budget they stop
    at MAX_EXAMPLES; under one, a new example takes the oldest one's place (and the lessons,
    older than the examples' budget, make room too)."""
    unbounded = bounded = tight = f"Be helpful.\n\n{LESSONS_HEADER}\n- Never guess."
    for i in range(1, 6):
        question, said = f"Compute {i} * 7.", f"Wrong value: expected {7 * i}."
        unbounded = digest_rewrite(unbounded, [said], [question])
        bounded = digest_rewrite(bounded, [said], [question], fits=at_most(10_000))
        tight = digest_rewrite(tight, [said], [question], fits=at_most(110))
    assert unbounded.count("\n* ") == MAX_EXAMPLES and "Compute 1 * 7" in unbounded
    examples = [line for line in bounded.split("\n") if line.startswith("* ")]
    assert [e.split(" -> ")[0] for e in examples] == [f"* Compute {i} * 7." for i in (3, 4, 5)]
    assert "- Never guess." in bounded
    # 110 characters hold the base, the examples' header and one example: the lesson and its
    # header went.
    assert tight == (
        f"Be helpful.\n\n{EXAMPLES_HEADER}\n* Compute 5 * 7. -> Wrong value: expected 35."
    )
    assert len(tight) <= 110


def test_a_candidate_over_the_token_budget_is_never_sampled(task, tmp_path):
    """fast.maxPromptTokens in a round: a child over the budget scores 0 without a rollout,
    so GEPA rejects it even when it would have won; the population and its parents run."""
    solvable = [p for p in task.problems("train") if eval(expression(p)) % 3][:8]
    short = "Answer BOXED."
    long_better = "Solve it. Write the result BOXED: inside \\boxed{}. " + "Take care. " * 8
    engine = RecordingEngine()
    adapter = PolicyAdapter(
        engine, CharTokenizer(), task, SamplingParams(), seed=0, max_prompt_tokens=40
    )
    ok, over = adapter.batch_evaluate(
        [({COMPONENT: short}, solvable[:4]), ({COMPONENT: long_better}, solvable[:4])]
    )
    assert engine.systems == [short] * 4 and adapter.metric_calls == 4
    assert adapter.over_budget_rows == 4 and ok.scores == [1.0] * 4
    assert over.scores == [0.0] * 4
    assert f"{len(long_better)} tokens, over the budget of 40" in over.trajectories[0]["feedback"]

    engine = RecordingEngine()
    adapter = PolicyAdapter(
        engine, CharTokenizer(), task, SamplingParams(), seed=0, max_prompt_tokens=40
    )
    result = round_on(adapter, ["Chat about it."], solvable, 16, long_better, tmp_path)
    assert [p.text for p in result.population] == ["Chat about it."]
    assert long_better not in engine.systems and adapter.over_budget_rows >= 4


def test_initial_population_under_a_budget():
    """A seed prompt over fast.maxPromptTokens is a config error naming both fields; handed
    over prompts over it are dropped (a stage may lower its predecessor's budget)."""
    raw = {
        "task": {"name": "arithmetic"},
        "mode": "fst",
        "fast": {"seedPrompt": "Be brief.", "maxPromptTokens": 12},
    }
    raw["fast"]["initialPopulation"] = ["A short one.", "One that is far too long for it."]
    cfg = validate_config(raw)
    assert [p.text for p in initial_population(cfg, len)] == ["A short one."]
    raw["fast"]["initialPopulation"] = ["One that is far too long for it."]
    assert [p.text for p in initial_population(validate_config(raw), len)] == ["Be brief."]
    raw["fast"]["seedPrompt"] = "A seed prompt of many words."
    with pytest.raises(
        ConfigError, match=r"fast.seedPrompt is 28 tokens, over fast.maxPromptTokens \(12\)"
    ):
        initial_population(validate_config(raw), len)
    raw["mode"] = "rl"  # trains under the seed prompt; no fast channel to budget
    assert [p.text for p in initial_population(validate_config(raw), len)] == [
        raw["fast"]["seedPrompt"]
    ]
    with pytest.raises(ConfigError, match="maxPromptTokens"):
        validate_config({"task": {"name": "arithmetic"}, "fast": {"maxPromptTokens": 0}})


# ----------------------------------------------------------------------------- rounds in flight


@pytest.mark.usefixtures("one_torch_thread", "varied_reward")
def test_rounds_in_flight_wait_for_each_other_and_end_before_checkpoints(
    tmp_path,
    tiny_model_dir,  # noqa: F811
):
    """fast.overlapRound in the training loop (the tiny model, a round due before every step):
    a round's rows ride in the steps' engine calls; a round due while another is in flight
    waits for it, so rounds never overlap and come less often than due; before a step that
    ends in a checkpoint every round is finished alone, so none rides in that step."""
    import json

    from fst.loop import train

    overrides = {
        "mode": "fst",
        "steps": 6,
        "fast.everySteps": 1,
        "fast.reuseStepRollouts": True,
        "fast.overlapRound": True,
        "checkpoint.every": 3,
    }
    cfg = validate_config(tiny_run_config(tmp_path, tiny_model_dir, **overrides))
    train(cfg, progress=False)

    def jsonl(name: str) -> list[dict]:
        return [json.loads(x) for x in (cfg.run_dir / name).read_text().splitlines()]

    steps = {m["step"]: m for m in jsonl("metrics.jsonl") if "reward_mean" in m}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    ended = [m for m in steps.values() if "round" in m]
    populations = jsonl("population.jsonl")
    # A round's records are under the step it precedes, in the metrics (the last round that
    # ended before a step) and the population records alike; indices grow (a waiting round
    # takes the index of the step it starts at).
    assert ended and {(m["step"], m["round"]) for m in ended} <= {
        (r["step"], r["round"]) for r in populations
    }
    rounds = [r["round"] for r in populations]
    assert rounds == sorted(set(rounds)) and 2 <= len(rounds) < 6, rounds
    assert any(m["gepa_rows_alongside_steps"] > 0 for m in ended)
    riding = [s for s, m in steps.items() if m.get("gen_round_rows", 0) > 0]
    assert riding and not {3, 6} & set(riding), riding  # finished before the checkpoints
    assert {3, 6} <= {r["step"] for r in populations}  # those rounds ended right before
    # Two rounds may end before one step (the one in flight, then the waiting one, finished
    # alone before a checkpoint): the step's record counts both, and adds what they sampled.
    assert sum(m["gepa_rounds_ended"] for m in ended) == len(populations)
    assert any(m["gepa_rounds_ended"] == 2 for m in ended)
