from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from fst.config import TaskConfig
from fst.tasks import Problem, build_task
from fst.tasks.star_graph import StarGraphParams, StarGraphTask


def make_task(seed: int = 0, sizes: tuple[int, int, int] = (20, 5, 5), **params) -> StarGraphTask:
    train, val, test = sizes
    cfg = TaskConfig(
        name="star_graph", seed=seed, train_size=train, val_size=val, test_size=test, params=params
    )
    task = build_task(cfg)
    assert isinstance(task, StarGraphTask)
    return task


def simple_paths(edges: list[list[int]], source: int, target: int) -> list[list[int]]:
    """All simple paths from source to target in the UNDIRECTED version of the graph."""
    adj: dict[int, set[int]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    found: list[list[int]] = []

    def walk(path: list[int]) -> None:
        if path[-1] == target:
            found.append(list(path))
            return
        for nxt in sorted(adj[path[-1]]):
            if nxt not in path:
                walk([*path, nxt])

    walk([source])
    return found


def other_arm_path(problem: Problem) -> list[int]:
    g = problem.meta
    arm = next(a for a in g["arms"] if a[-1] != g["target"])
    return [g["source"], *arm]


def boxed(path: list[int]) -> str:
    return "\\boxed{" + ",".join(map(str, path)) + "}"


@pytest.mark.parametrize("degree,path_length", [(2, 2), (3, 4), (5, 3), (4, 6)])
@pytest.mark.parametrize("seed", range(5))
def test_graph_invariants(seed: int, degree: int, path_length: int) -> None:
    task = make_task(seed, degree=degree, path_length=path_length)
    for split in ("train", "val", "test"):
        for p in task.problems(split):
            g = p.meta
            edges, source, target = g["edges"], g["source"], g["target"]
            assert len(edges) == degree * (path_length - 1)
            nodes = [n for e in edges for n in e]
            labels = set(nodes)
            assert len(labels) == degree * (path_length - 1) + 1  # all labels distinct
            assert all(0 <= n < 50 for n in labels)
            out_deg = Counter(a for a, _ in edges)
            in_deg = Counter(b for _, b in edges)
            assert out_deg[source] == degree  # the center has `degree` arms
            assert in_deg[source] == 0 and max(in_deg.values()) == 1
            assert target != source and out_deg[target] == 0  # the target is a leaf
            paths = simple_paths(edges, source, target)
            assert paths == [g["path"]]  # exactly one path
            assert len(g["path"]) == path_length
            assert p.answer == ",".join(map(str, g["path"]))
            assert str(source) in p.prompt and str(target) in p.prompt
            assert task.score(p, f"So the path is {boxed(g['path'])}").reward == 1.0


def test_answer_scores_one_and_tolerates_spaces() -> None:
    p = make_task().problems("test")[0]
    spaced = "\\boxed{ " + " , ".join(p.answer.split(",")) + " }"
    s = make_task().score(p, spaced)
    assert s.reward == 1.0 and s.feedback.startswith("Correct")


def test_wrong_arm_scores_zero_and_says_so() -> None:
    task = make_task()
    for p in task.problems("train"):
        s = task.score(p, boxed(other_arm_path(p)))
        assert s.reward == 0.0
        assert "Wrong arm" in s.feedback and "dead end" in s.feedback
        assert f"\\boxed{{{p.answer}}}" in s.feedback


def test_missing_box_scores_zero() -> None:
    task = make_task()
    p = task.problems("val")[0]
    s = task.score(p, f"The path is {p.answer}.")
    assert s.reward == 0.0
    assert "No \\boxed" in s.feedback and p.answer in s.feedback


def test_last_box_counts() -> None:
    task = make_task()
    p = task.problems("val")[0]
    assert task.score(p, f"Format: \\boxed{{1,2,3}}. Answer: \\boxed{{{p.answer}}}").reward == 1.0
    assert task.score(p, f"\\boxed{{{p.answer}}} or maybe \\boxed{{1,2}}").reward == 0.0


def test_feedback_names_the_first_problem() -> None:
    task = make_task(path_length=4)
    p = task.problems("test")[0]
    path = p.meta["path"]
    src, tgt = p.meta["source"], p.meta["target"]
    stranger = next(n for n in range(50) if n not in {x for e in p.meta["edges"] for x in e})

    def fb(completion: str) -> str:
        s = task.score(p, completion)
        assert s.reward == 0.0
        return s.feedback

    assert "Wrong start" in fb(boxed([path[1], *path[1:]]))
    assert f"step {path[1]} -> {stranger} is invalid" in fb(boxed([src, path[1], stranger, tgt]))
    assert "not an edge" in fb(boxed([src, path[1], stranger, tgt]))
    assert "not an edge" in fb(boxed([src, path[2], path[3]]))  # a skipped node
    assert f"goes from {path[1]} to {path[2]}" in fb(boxed([src, path[1], path[2], path[1]]))
    assert "Too short" in fb(boxed(path[:-1]))
    assert "Could not read" in fb("\\boxed{a,b,c}")
    assert "Could not read" in fb("\\boxed{}")
    assert "not an edge" in fb(boxed([*path, stranger]))  # walking past the target


def test_deterministic_and_cached() -> None:
    a, b = make_task(seed=7), make_task(seed=7)
    for split in ("train", "val", "test"):
        assert a.problems(split) == b.problems(split)
        assert a.problems(split) == a.problems(split)
    assert make_task(seed=8).problems("test") != a.problems("test")


def test_splits_disjoint_sized_and_ids() -> None:
    task = make_task(sizes=(40, 10, 12), degree=2, path_length=2, node_count=9)
    prompts = {s: [p.prompt for p in task.problems(s)] for s in ("train", "val", "test")}
    assert [len(prompts[s]) for s in ("train", "val", "test")] == [40, 10, 12]
    all_prompts = [x for v in prompts.values() for x in v]
    assert len(set(all_prompts)) == len(all_prompts)
    assert [p.id for p in task.problems("val")][:2] == ["star_graph-val-0", "star_graph-val-1"]


def test_test_split_independent_of_train_size() -> None:
    assert make_task(sizes=(5, 5, 5)).problems("test") == make_task(sizes=(50, 5, 5)).problems(
        "test"
    )


def test_too_small_space_is_a_clear_error() -> None:
    # 3 labels, degree 2, length 2: 3 centers x 2 targets x 2 edge orders = 12 prompts.
    task = make_task(sizes=(20, 1, 1), degree=2, path_length=2, node_count=3)
    with pytest.raises(ValueError, match="distinct"):
        task.problems("train")


def test_params_validation() -> None:
    with pytest.raises(ValidationError, match=r"params\.degre"):
        TaskConfig(name="star_graph", params={"degre": 3})
    with pytest.raises(ValidationError, match="nodeCount=10 is too small"):
        TaskConfig(name="star_graph", params={"degree": 4, "pathLength": 4, "nodeCount": 10})
    with pytest.raises(ValidationError, match=r"params\.degree"):
        TaskConfig(name="star_graph", params={"degree": 1})
    cfg = TaskConfig(name="star_graph", params={"degree": 3, "pathLength": 5})
    assert cfg.typed_params == StarGraphParams(degree=3, path_length=5)
    assert cfg.params == {"degree": 3, "pathLength": 5, "nodeCount": 50}
    assert build_task(TaskConfig(name="star_graph", params={"degree": 3})).name == "star_graph"
