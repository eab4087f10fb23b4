"""python -m bench.learning run|analyze|compare [options] — see bench/learning/README.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.learning.run import DEFAULT_OUT, RECORD, run_all
from bench.learning.spec import SEEDS, STEPS


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.learning")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) every job; finished jobs are skipped")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT)
    r.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    r.add_argument("--steps", type=int, default=STEPS)
    r.add_argument("--workers", type=int, default=2, help="jobs side by side")
    r.add_argument("--no-streams", action="store_true")
    r.add_argument("--no-plasticity", action="store_true", help="skip the plasticity probe")
    r.add_argument("--only", nargs="+", help="job names, e.g. mul-fst-s0 stream-rl-s0")
    r.add_argument(
        "--record",
        type=Path,
        default=RECORD,
        help="where finished jobs are recorded without weights (default: the repo's "
        "bench/learning/results); jobs recorded there are restored and skipped",
    )
    r.add_argument("--no-record", action="store_true", help="neither restore nor record")
    a = sub.add_parser("analyze", help="tables and plots into docs/")
    a.add_argument(
        "--out",
        type=Path,
        default=RECORD,
        help="the runs to analyse: the record (default) or a runner's --out (with --partial)",
    )
    a.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[2] / "docs")
    a.add_argument(
        "--partial", action="store_true", help="also analyse running runs, up to their last step"
    )
    c = sub.add_parser(
        "compare",
        help="two modes or variants of one record, paired by task and seed: a markdown table",
    )
    c.add_argument("a", help="a mode or variant, e.g. fst-p4-reuse-max96-overlap")
    c.add_argument("b", help="the one it is compared with, e.g. fst-p4-reuse-max96")
    c.add_argument("--record", type=Path, default=RECORD)
    c.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = p.parse_args()
    if args.cmd == "run":
        run_all(
            args.out,
            tuple(args.seeds),
            args.steps,
            args.workers,
            not args.no_streams,
            args.only,
            not args.no_plasticity,
            None if args.no_record else args.record,
        )
    elif args.cmd == "compare":
        from bench.learning.analyze import compare

        print(compare(args.record, args.a, args.b, tuple(args.seeds)))
    else:
        from bench.learning.analyze import analyze

        analyze(args.out, args.docs, args.partial)


if __name__ == "__main__":
    main()
