"""`python -m fst ...` with the arithmetic task scored by tests.tiny_model.varied_score, for
runs in subprocesses (torchrun's ranks) that a pytest monkeypatch cannot reach: the tiny
random model almost never solves arithmetic, and without reward variance nothing trains.

    torchrun --standalone --nproc-per-node 2 -m tests.varied_fst train -c cfg.yaml
"""

from __future__ import annotations

import sys

from fst.cli import main
from fst.tasks.arithmetic import ArithmeticTask
from tests.tiny_model import varied_score

ArithmeticTask.score = varied_score  # type: ignore[method-assign]

sys.exit(main())
