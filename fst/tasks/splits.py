"""Train/val/test splits of a generated task that never share a problem."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

from fst.tasks.base import Split

T = TypeVar("T")

# Test first: see disjoint_splits.
SPLIT_ORDER: tuple[Split, ...] = ("test", "val", "train")


def disjoint_splits(
    name: str,
    seed: int,
    sizes: Mapping[Split, int],
    draw: Callable[[random.Random], T],
    key: Callable[[T], Hashable],
    *,
    remedy: str = "lower the split sizes",
) -> dict[Split, list[T]]:
    """Draw `sizes[split]` items per split with `draw`; no `key` occurs twice across splits.

    Splits are drawn test first, then val, then train, each from its own generator
    `random.Random(f"{name}:{seed}:{split}")`. So the test set depends only on the seed, its
    size and the generator, never on the train or val size: runs that differ there are
    evaluated on the same problems. A later split skips what an earlier one drew, which keeps
    the splits disjoint (a task's key is its prompt, what the model sees).

    Raises ValueError, ending with `remedy`, when `draw` cannot produce enough distinct items:
    a split gives up after 100 draws per item it needs, plus 1000.
    """
    seen: set[Hashable] = set()
    out: dict[Split, list[T]] = {}
    for split in SPLIT_ORDER:
        size = sizes[split]
        rng = random.Random(f"{name}:{seed}:{split}")
        items: list[T] = []
        attempts = 0
        while len(items) < size:
            attempts += 1
            if attempts > 100 * size + 1000:
                raise ValueError(
                    f"{name}: could only generate {len(items)} distinct {split} problems of "
                    f"{size}; {remedy}"
                )
            item = draw(rng)
            k = key(item)
            if k not in seen:
                seen.add(k)
                items.append(item)
        out[split] = items
    return out
