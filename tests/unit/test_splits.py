"""disjoint_splits: the train/val/test draw shared by the generated tasks."""

from __future__ import annotations

import random

import pytest

from fst.tasks.splits import disjoint_splits


def draw_below(n: int):
    return lambda rng: rng.randrange(n)


def split(sizes: dict, n: int = 1000, seed: int = 0, **kwargs) -> dict:
    return disjoint_splits("toy", seed, sizes, draw_below(n), key=lambda x: x, **kwargs)


def test_splits_have_their_sizes_and_share_nothing() -> None:
    out = split({"train": 50, "val": 10, "test": 20}, n=100)
    assert {s: len(items) for s, items in out.items()} == {"test": 20, "val": 10, "train": 50}
    drawn = [x for items in out.values() for x in items]
    assert len(set(drawn)) == len(drawn) == 80


def test_same_arguments_same_items_and_seeds_differ() -> None:
    sizes = {"train": 30, "val": 5, "test": 5}
    assert split(sizes, seed=1) == split(sizes, seed=1)
    assert split(sizes, seed=1) != split(sizes, seed=2)


def test_each_split_has_its_own_generator_test_first() -> None:
    out = split({"train": 3, "val": 3, "test": 3})
    # test is drawn first, from an untouched generator named after the task, seed and split.
    rng = random.Random("toy:0:test")
    assert out["test"] == [rng.randrange(1000) for _ in range(3)]
    # So the test set does not depend on the other splits' sizes.
    assert split({"train": 40, "val": 9, "test": 3})["test"] == out["test"]


def test_later_splits_skip_what_earlier_ones_drew() -> None:
    # 6 possible items for 6 places: train gets exactly what test and val left over.
    out = split({"train": 2, "val": 2, "test": 2}, n=6)
    assert sorted(out["test"] + out["val"] + out["train"]) == list(range(6))


def test_too_few_distinct_items_is_a_clear_error() -> None:
    with pytest.raises(ValueError) as e:
        split({"train": 5, "val": 2, "test": 2}, n=5, remedy="raise n")
    assert str(e.value) == "toy: could only generate 1 distinct train problems of 5; raise n"


def test_key_decides_what_counts_as_the_same_item() -> None:
    # Items differ but share keys: only one item per key can be drawn.
    with pytest.raises(ValueError, match="distinct"):
        disjoint_splits(
            "toy", 0, {"train": 3, "val": 1, "test": 1}, draw_below(100), key=lambda x: x % 4
        )
