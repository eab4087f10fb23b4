"""Path-finding on star graphs, after Bachmann & Nagarajan 2024 ("The pitfalls of next-token
prediction").

A center node has `degree` arms; each arm is a chain of `path_length - 1` fresh nodes. The
target is the leaf of one arm, the other arms are distractors. Edges are directed away from the
center and listed in random order, so the model must plan: walking forward from the source it
cannot tell which arm to take without looking ahead to the target.
"""

from __future__ import annotations

import random
import re
from itertools import pairwise
from typing import Any

from pydantic import Field, model_validator

from fst.schema import Schema
from fst.tasks import register
from fst.tasks.base import Problem, Score, Split, TaskSettings, extract_boxed, params_of
from fst.tasks.splits import disjoint_splits

NAME = "star_graph"


class StarGraphParams(Schema):
    degree: int = Field(3, ge=2, description="Arms leaving the center (1 right + distractors).")
    path_length: int = Field(
        4, ge=2, description="Nodes on the path from the center to the target, both included."
    )
    node_count: int = Field(50, gt=0, description="Node labels are drawn from 0..nodeCount-1.")

    @model_validator(mode="after")
    def _enough_labels(self) -> StarGraphParams:
        needed = self.degree * (self.path_length - 1) + 1
        if self.node_count < needed:
            raise ValueError(
                f"nodeCount={self.node_count} is too small: a star with degree={self.degree} "
                f"and pathLength={self.path_length} needs {needed} distinct node labels"
            )
        return self


def make_graph(rng: random.Random, p: StarGraphParams) -> dict[str, Any]:
    """One star graph: {edges, source, target, path, arms}. Edges are [parent, child] pairs."""
    arm_len = p.path_length - 1
    labels = rng.sample(range(p.node_count), p.degree * arm_len + 1)
    center, rest = labels[0], labels[1:]
    arms = [rest[i * arm_len : (i + 1) * arm_len] for i in range(p.degree)]
    edges: list[list[int]] = []
    for arm in arms:
        chain = [center, *arm]
        edges.extend([a, b] for a, b in pairwise(chain))
    rng.shuffle(edges)
    chosen = arms[rng.randrange(p.degree)]
    return {
        "edges": edges,
        "source": center,
        "target": chosen[-1],
        "path": [center, *chosen],
        "arms": arms,
    }


def format_prompt(graph: dict[str, Any]) -> str:
    edges = " | ".join(f"{a},{b}" for a, b in graph["edges"])
    return (
        'Below is a directed graph as a list of edges; "a,b" is an edge from node a to node b.\n'
        f"{edges}\n"
        f"Find the path from the source node {graph['source']} to the target node "
        f"{graph['target']}. Give every node on the path, from the source to the target, as "
        "comma-separated node labels inside \\boxed{}, e.g. \\boxed{12,5,33} for the path "
        "12 -> 5 -> 33."
    )


def _parse_path(text: str) -> list[int] | None:
    parts = [s.strip() for s in text.split(",")]
    if not parts or not all(re.fullmatch(r"-?\d+", s) for s in parts):
        return None
    return [int(s) for s in parts]


def score_path(graph: dict[str, Any], completion: str) -> Score:
    """Reward 1 only for the exact source-to-target path; feedback names the first mistake."""
    answer = graph["path"]
    expected = f"Expected \\boxed{{{','.join(map(str, answer))}}}."
    boxed = extract_boxed(completion)
    if boxed is None:
        return Score(
            0.0,
            "No \\boxed{...} answer found; the answer must be the path as "
            f"comma-separated node labels, e.g. \\boxed{{1,2,3}}. {expected}",
        )
    path = _parse_path(boxed)
    if path is None:
        return Score(
            0.0,
            f"Could not read the boxed answer {boxed!r} as a path: it must be "
            f"integer node labels separated by commas. {expected}",
        )
    if path == answer:
        return Score(1.0, f"Correct: the path {' -> '.join(map(str, answer))} reaches the target.")
    source, target = graph["source"], graph["target"]
    if path[0] != source:
        return Score(
            0.0,
            f"Wrong start: the path must start at the source {source}, not at "
            f"{path[0]}. {expected}",
        )
    edges = {(a, b) for a, b in graph["edges"]}
    for i, (a, b) in enumerate(pairwise(path)):
        if (a, b) not in edges:
            why = (
                f"the edge is {b},{a}, which goes from {b} to {a}"
                if (b, a) in edges
                else "it is not an edge of the graph"
            )
            return Score(0.0, f"Wrong path: step {a} -> {b} is invalid because {why}. {expected}")
        if i == 0 and b != answer[1]:
            # A legal first step into a distractor arm: the classic failure this task probes.
            return Score(
                0.0,
                f"Wrong arm: the path goes {source} -> {b}, but that arm is a dead "
                f"end that never reaches the target {target}; the target is reached "
                f"through {source} -> {answer[1]}. {expected}",
            )
    # Every step is an edge on the right arm, and the target is a leaf, so the path stopped early.
    return Score(
        0.0,
        f"Too short: the path stops at {path[-1]} before reaching the target {target}. {expected}",
    )


class StarGraphTask:
    """Star-graph path finding; deterministic given the TaskConfig."""

    name = NAME

    def __init__(self, cfg: TaskSettings) -> None:
        self.cfg = cfg
        self.params = params_of(cfg, StarGraphParams)
        self._splits: dict[Split, list[Problem]] | None = None

    def problems(self, split: Split) -> list[Problem]:
        if self._splits is None:
            self._splits = self._generate()
        return list(self._splits[split])

    def score(self, problem: Problem, completion: str) -> Score:
        return score_path(problem.meta, completion)

    def _generate(self) -> dict[Split, list[Problem]]:
        cfg = self.cfg
        splits = disjoint_splits(
            NAME,
            cfg.seed,
            {"test": cfg.test_size, "val": cfg.val_size, "train": cfg.train_size},
            draw=lambda rng: make_graph(rng, self.params),
            key=format_prompt,
            remedy="lower the split sizes or raise nodeCount",
        )
        return {
            split: [
                Problem(
                    f"{NAME}-{split}-{i}",
                    format_prompt(graph),
                    ",".join(map(str, graph["path"])),
                    graph,
                )
                for i, graph in enumerate(graphs)
            ]
            for split, graphs in splits.items()
        }


def build(cfg: TaskSettings) -> StarGraphTask:
    return StarGraphTask(cfg)


register(NAME, StarGraphParams, build)
