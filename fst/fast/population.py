"""The fast weights: a population of system prompts, its Pareto front and the top-K kept.

Pure functions over plain data. A prompt's validation scores are a mapping problem id ->
reward; the per-instance Pareto front holds, for each validation problem, every prompt that
reaches the best score on it. The population keeps the K front members that are best on the
most problems ("coverage"): a prompt that is the only one to solve some problems survives
even if its mean is lower, which is what keeps the population diverse.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any


def prompt_id(text: str) -> str:
    """A short, stable id derived from the text: the same prompt has the same id everywhere."""
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass
class PromptRecord:
    """One member of the population, with its lineage and its latest validation scores."""

    text: str
    parents: list[str] = field(default_factory=list)  # ids of the prompts it was derived from
    born_round: int = 0
    val_scores: dict[str, float] = field(default_factory=dict)  # problem id -> reward
    scored_round: int = -1  # the round (policy) those scores were measured under

    @property
    def id(self) -> str:
        return prompt_id(self.text)

    @property
    def mean_score(self) -> float:
        return sum(self.val_scores.values()) / len(self.val_scores) if self.val_scores else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **asdict(self), "mean_score": self.mean_score}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PromptRecord:
        return PromptRecord(
            text=d["text"],
            parents=list(d.get("parents", [])),
            born_round=int(d.get("born_round", 0)),
            val_scores={str(k): float(v) for k, v in d.get("val_scores", {}).items()},
            scored_round=int(d.get("scored_round", -1)),
        )


def pareto_front(scores: list[dict[str, float]]) -> dict[str, set[int]]:
    """Per problem id, the indices of the candidates with the best score on it (ties kept)."""
    front: dict[str, set[int]] = {}
    best: dict[str, float] = {}
    for idx, per_problem in enumerate(scores):
        for pid, s in per_problem.items():
            if pid not in best or s > best[pid]:
                best[pid], front[pid] = s, {idx}
            elif s == best[pid]:
                front[pid].add(idx)
    return front


def top_k_by_coverage(scores: list[dict[str, float]], k: int) -> list[int]:
    """Indices of at most k candidates on the Pareto front, best first.

    Rank: number of problems on whose front the candidate stands (coverage), then mean score,
    then age (lower index first: an incumbent is not displaced by an exact tie).
    """
    front = pareto_front(scores)
    coverage = [0] * len(scores)
    for members in front.values():
        for idx in members:
            coverage[idx] += 1
    on_front = [i for i in range(len(scores)) if coverage[i] > 0] or list(range(len(scores)))

    def mean(i: int) -> float:
        return sum(scores[i].values()) / len(scores[i]) if scores[i] else 0.0

    on_front.sort(key=lambda i: (-coverage[i], -mean(i), i))
    return on_front[:k]
