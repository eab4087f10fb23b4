"""The `fst` command line.

fst train -c CONFIG [--override key=value ...] [--resume]
fst eval  -c CONFIG [--checkpoint latest|base|PATH] [--split test] [--limit N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fst.config import ConfigError, load_config

log = logging.getLogger("fst")

EPILOG = """\
Config files are YAML with camelCase keys (the same schema as a FastSlowRun spec and a
TaskStream stage). Override any field from the command line with dotted keys, e.g.
  fst train -c examples/train-rl.yaml --override steps=40 --override slow.lr=2e-5
"""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # transformers is chatty about GGUF de-quantisation and deprecations.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, type=Path, help="YAML config file")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config field, dotted path (repeatable), e.g. slow.lr=1e-5",
    )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.override)
    from fst.loop import train

    run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run finished: {run_dir} (metrics: {run_dir / 'metrics.jsonl'})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.override)
    from fst.evaluate import evaluate_prompt
    from fst.model import load_policy, load_tokenizer, stop_token_ids
    from fst.rollout.hf import HFRolloutEngine
    from fst.run_state import load_weights_into
    from fst.store.checkpoints import latest_step, open_store
    from fst.tasks import build_task

    task = build_task(cfg.task)
    tok = load_tokenizer(cfg.model)
    policy = load_policy(cfg.model)
    source = "base weights"
    if args.checkpoint != "base":
        if args.checkpoint == "latest":
            store = open_store(cfg.checkpoint.uri or str(cfg.run_dir / "checkpoints"))
            step = latest_step(store)
            if step is None:
                raise ConfigError(f"no checkpoint found in {store.uri}; use --checkpoint base")
            folder = store.materialize(step)
        else:
            folder = Path(args.checkpoint)
        load_weights_into(policy, folder)
        source = str(folder)
    engine = HFRolloutEngine(policy, tok, stop_token_ids(tok, policy), cfg.rollout.batch_size)
    problems = task.problems(args.split)[: args.limit]
    res = evaluate_prompt(
        engine, tok, task, problems, cfg.fast.seed_prompt, cfg.rollout.max_new_tokens
    )
    print(
        f"{cfg.task.name} [{args.split}, n={res.n}] {source} + seed prompt: "
        f"pass rate {res.pass_rate:.3f}, mean reward {res.reward_mean:.3f}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fst",
        description="fastslow: continual LLM post-training with Fast-Slow Training "
        "(CISPO RL on the weights + GEPA-evolved system prompts).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train one run (rl, fst or gepa mode)",
        description="Train one run. Writes <outputDir>/<run>/metrics.jsonl and "
        "checkpoints; --resume continues from the latest checkpoint exactly.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's latest checkpoint (starts fresh if none)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="pass rate of a checkpoint on a split (greedy)",
        description="Evaluate weights + the seed prompt on a split with greedy decoding.",
    )
    _add_config_args(p)
    p.add_argument(
        "--checkpoint",
        default="latest",
        help="'latest' (of the config's run), 'base', or a checkpoint folder",
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N problems")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    except Exception as e:
        from fst.loop import RunError

        if isinstance(e, RunError | FileNotFoundError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
