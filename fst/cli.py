"""The `fst` command line.

fst train -c CONFIG [--override key=value ...] [--resume]
fst eval  -c CONFIG [--checkpoint latest|PATH] [--split test] [--limit N]
fst prompts show RUN
fst prompts diff RUN A B
fst lineage STREAM                 stages, data versions, gate decisions, what is served
fst chat BUNDLE [PROMPT]           answer with a bundle's weights and prompt
fst gate GATE.json                 a cluster stream's promotion gate (the operator's gate Job)

Errors: a problem with the input (config, manifest, data, model folder, checkpoint, a run held
by another trainer, a diverged run) ends with ONE line `error: <what, naming the field, file or
line>` on stderr and exit code 2; anything else is a bug, reported as one `internal error:` line
with exit code 1. `--debug` (or FST_DEBUG=1) also prints the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from fst.config import ConfigError, TrainConfig, load_config
from fst.signals import Terminated, stop_on_sigterm

if TYPE_CHECKING:  # imported where used: `fst --help` should not wait for transformers
    from transformers import PreTrainedModel

log = logging.getLogger("fst")

EPILOG = """\
Config files are YAML with camelCase keys (the same schema as a FastSlowRun spec and a
TaskStream stage). Override any field from the command line with dotted keys, e.g.
  fst train -c examples/train-rl.yaml --override steps=40 --override slow.lr=2e-5
"""


def _setup_logging(verbose: bool) -> None:
    """fastslow's own INFO lines (stage, step, GEPA round, gate); libraries only at WARNING,
    and Python warnings (deprecations of libraries) off: a newcomer should see what the run
    does, not the database migration tool's plugin set-up. --verbose shows everything."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("fst").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        import warnings

        warnings.simplefilter("ignore")
    # transformers is chatty about GGUF de-quantisation and deprecations; and never reach
    # for the hub unless the user asks for a hub model.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


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


# ----------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.override)
    from fst.loop import train

    run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run finished: {run_dir} (metrics: {run_dir / 'metrics.jsonl'})")
    return 0


# ----------------------------------------------------------------------------- stream, report


def cmd_stream(args: argparse.Namespace) -> int:
    from fst.report import write_report
    from fst.stream import run_stream

    stream_dir = run_stream(args.file, watch=args.watch, progress=not args.no_progress)
    page = write_report(stream_dir)
    serving = json.loads((stream_dir / "serving.json").read_text())
    served = (
        f"stage {serving['stage']}: {serving['bundle']}"
        if serving["bundle"]
        else f"the base model {serving['model']} (no stage promoted)"
    )
    print(
        f"stream finished: {stream_dir}\nreport: {page}\nserving: {served}\n"
        f"lineage: fst lineage {args.file}"
    )
    return 0


def _stream_dir(path: str) -> Path:
    """A stream's folder from its folder, its manifest, or its name under ./runs."""
    p = Path(path)
    if p.is_file():
        from fst.stream import load_stream

        stream = load_stream(p)
        p = Path(stream.spec.output_dir) / stream.metadata.name
    elif not p.is_dir():
        p = Path("runs") / path
    if not (p / "stream.json").is_file():
        raise ConfigError(f"{path}: not a stream (no stream.json in {p})")
    return p


def cmd_lineage(args: argparse.Namespace) -> int:
    from fst.stream import StreamState, lineage_rows

    folder = _stream_dir(args.stream)
    state = StreamState.load(folder / "stream.json")
    serving_file = folder / "serving.json"
    serving = json.loads(serving_file.read_text()) if serving_file.is_file() else None
    rows = lineage_rows(state.runs)
    if args.json:
        print(json.dumps({"stages": rows, "serving": serving}, indent=1))
        return 0
    print(f"stream {folder.name} ({folder})")
    for row in rows:
        scores = row["scores"] or ""
        print(
            f"  {row['stage']:<14} {row['status']:<9} {row['decision']:<26} "
            f"data {row['dataVersion'] or '-':<16} from {row['from']}"
        )
        if scores:
            print(f"  {'':<14} {scores}")
        if row["bundle"]:
            print(f"  {'':<14} bundle {row['bundle']}")
    if serving is not None:
        what = serving["stage"] or f"the base model {serving['model']} with the seed prompt"
        pin = f" (pinned to {serving['pinned']})" if serving.get("pinned") else ""
        print(f"serving: {what}{pin}" + (f"\n  {serving['bundle']}" if serving["bundle"] else ""))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from fst.bundle import read_bundle

    uri = args.bundle
    if not uri.startswith("s3://") and (
        Path(uri).is_file() or (Path(uri) / "stream.json").is_file()
    ):
        serving = json.loads((_stream_dir(uri) / "serving.json").read_text())
        if not serving.get("bundle"):
            raise ConfigError(f"{uri}: the stream serves no bundle yet (nothing promoted)")
        uri = serving["bundle"]
    folder, system_prompt, lineage = read_bundle(uri)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fst.model import chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    stage, base = lineage.get("stage"), lineage.get("baseModel")
    print(f"bundle of stage {stage} ({uri}), base model {base}", file=sys.stderr)
    questions = [args.prompt] if args.prompt else (line.strip() for line in sys.stdin)
    for question in questions:
        if not question:
            continue
        # The prompt exactly as the gate scored it (fst/evaluate.py): chat template, system.
        ids = torch.tensor([chat_prompt_ids(tok, system_prompt, question)])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        answer = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        print(str(answer).strip())
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from fst.gate import GateJob, run_gate_job
    from fst.handover import checkpoint_population

    try:
        job = GateJob.model_validate_json(Path(args.file).read_text())
    except ValueError as e:
        raise ConfigError(f"{args.file}: not a gate Job's input: {e}") from None
    decision = run_gate_job(job, checkpoint_population)
    print(json.dumps(decision.model_dump(mode="json") if decision else None))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fst.report import write_report

    print(f"report: {write_report(_run_dir(args.path))}")
    return 0


# ----------------------------------------------------------------------------- eval


def _checkpoint_folder(cfg: TrainConfig, which: str) -> Path:
    from fst.loop import latest_checkpoint

    if which != "latest":
        return Path(which)
    folder = latest_checkpoint(cfg)
    if folder is None:
        raise ConfigError(f"run {cfg.run!r} has no checkpoint; train first or use --checkpoint")
    return folder


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.override)
    from fst.evaluate import channel_decomposition
    from fst.loop import load_task
    from fst.model import AUTOCAST_DTYPES, load_policy, load_tokenizer, stop_token_ids
    from fst.rollout.hf import HFRolloutEngine
    from fst.run_state import load_weights_into

    task = load_task(cfg)
    folder = _checkpoint_folder(cfg, args.checkpoint)
    state = json.loads((folder / "state.json").read_text())
    best = state["population"][0]  # the population is kept best first
    tok = load_tokenizer(cfg.model)
    base = load_policy(cfg.model)
    trained = load_policy(cfg.model)
    load_weights_into(trained, folder)
    stop = stop_token_ids(tok, base)

    def engine(model: PreTrainedModel) -> HFRolloutEngine:
        # model.autocast as in training: the eval scores what the run's own evals score.
        dtype = AUTOCAST_DTYPES[cfg.model.autocast]
        return HFRolloutEngine(model, tok, stop, cfg.rollout.batch_size, dtype)

    problems = task.problems(args.split)[: args.limit]
    print(
        f"{cfg.task.name}: {len(problems)} {args.split} problems, greedy decoding; "
        f"trained weights from {folder}"
    )
    result = channel_decomposition(
        engine(base),
        engine(trained),
        tok,
        task,
        problems,
        cfg.fast.seed_prompt,
        best["text"],
        cfg.rollout.max_new_tokens,
    )
    print(result.table())
    print(f"FST prompt = best of the population ({best['id']}):")
    print("  " + best["text"].replace("\n", "\n  "))
    if args.json:
        rows = {f"{w} weights + {p}": r.__dict__ for w, p, r in result.rows()}
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


# ----------------------------------------------------------------------------- prompts


def _run_dir(run: str) -> Path:
    path = Path(run)
    if not path.is_dir() and (Path("runs") / run).is_dir():
        path = Path("runs") / run
    if not path.is_dir():
        raise ConfigError(f"{run}: no such run folder (give a path, or a run name under ./runs)")
    return path


def _prompt_history(run_dir: Path) -> tuple[list[dict], dict[str, dict]]:
    """(the latest population, every prompt the run has seen, by id) from population.jsonl."""
    path = run_dir / "population.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no population.jsonl (was the run in mode fst or gepa?)")
    rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    seen: dict[str, dict] = {}
    for r in rounds:
        for p in r.get("candidates", []) + r["members"]:
            seen[p["id"]] = p
    return (rounds[-1]["members"] if rounds else []), seen


def _lineage(pid: str, seen: dict[str, dict]) -> list[str]:
    chain = [pid]
    while seen.get(chain[-1], {}).get("parents") and len(chain) < 100:
        chain.append(seen[chain[-1]]["parents"][0])
    return chain


def cmd_prompts_show(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args.run)
    population, seen = _prompt_history(run_dir)
    print(f"{run_dir}: population of {len(population)}, best first; val = mean Pareto-set reward")
    print(f"{'id':<11} {'born':>4} {'val':>6}  parents")
    for p in population:
        parents = ", ".join(p["parents"]) or "(seed)"
        print(f"{p['id']:<11} {p['born_round']:>4} {p['mean_score']:>6.3f}  {parents}")
    for p in population:
        print(f"\n--- {p['id']}  lineage: {' <- '.join(_lineage(p['id'], seen))}")
        print(p["text"])
    return 0


def cmd_prompts_diff(args: argparse.Namespace) -> int:
    import difflib

    _, seen = _prompt_history(_run_dir(args.run))

    def find(prefix: str) -> dict:
        hits = [p for pid, p in seen.items() if pid.startswith(prefix)]
        if len(hits) != 1:
            raise ConfigError(f"prompt id {prefix!r}: {len(hits)} matches in this run")
        return hits[0]

    a, b = find(args.a), find(args.b)
    diff = difflib.unified_diff(
        a["text"].splitlines(), b["text"].splitlines(), a["id"], b["id"], lineterm=""
    )
    print("\n".join(diff) or "(identical)")
    return 0


# ----------------------------------------------------------------------------- parser


DEBUG_HELP = "on an error, also print the Python traceback"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fst",
        description="fastslow: continual LLM post-training with Fast-Slow Training "
        "(CISPO RL on the weights + GEPA-evolved system prompts).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `fst train --debug ...` works too: SUPPRESS keeps the main parser's value when absent.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)

    p = sub.add_parser(
        "train",
        parents=[common],
        help="train one run (mode rl, fst or gepa)",
        description="Train one run. Writes <outputDir>/<run>/metrics.jsonl, population.jsonl "
        "(modes fst, gepa) and checkpoints; --resume continues from the latest checkpoint "
        "exactly (weights, optimizer, RNG, data position, prompt population).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's latest checkpoint (starts fresh if there is none)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "stream",
        parents=[common],
        help="run a TaskStream manifest's stages in order on this machine",
        description="Run the stages of a TaskStream (the same file `kubectl apply` takes) one "
        "after another: each starts from the previous stage's final checkpoint and prompt "
        "population. Running it again resumes; finished stages are skipped. Writes "
        "<outputDir>/<stream>/stream.json and report.html.",
    )
    p.add_argument("file", type=Path, help="TaskStream YAML")
    p.add_argument(
        "--watch",
        action="store_true",
        help="keep running: start a new stage when a stage is added to the file or a data "
        "source changes",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser(
        "lineage",
        parents=[common],
        help="a stream's chain of stages: data versions, gate decisions, what is served",
        description="Show a stream's stages in order (base model -> stage -> stage): what each "
        "started from, the version of its data, its promotion gate's decision with the scores "
        "behind it, its bundle, and which bundle is served now.",
    )
    p.add_argument("stream", help="the stream's folder, its manifest, or its name under ./runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser(
        "chat",
        parents=[common],
        help="answer a prompt with a bundle's weights and system prompt (CPU, greedy)",
        description="Load a promoted bundle (a folder, an s3:// URI, or a stream: its served "
        "bundle) with plain transformers and answer PROMPT, or each line of stdin, with the "
        "bundle's system prompt: a look at the adapted model before serving it.",
    )
    p.add_argument("bundle", help="bundle folder or s3:// URI, or a stream folder/manifest")
    p.add_argument("prompt", nargs="?", help="the question (default: one per line of stdin)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "gate",
        parents=[common],
        help="the promotion gate of one stage run of a cluster's stream (the operator's Job)",
        description="Score a finished stage run (its final weights + best prompt) and the "
        "promoted model on the stage's test split and every earlier stage's retention set, "
        "decide by the stream's spec.promotion, publish the bundle if promoted, and record the "
        "decision in the database's stages table. The operator writes GATE.json (the stream, "
        "its runs, the run to gate) into the gate Job's ConfigMap; scores are kept in the "
        "database, so a killed gate resumes. `fst stream` runs the same gate in-process.",
    )
    p.add_argument("file", help="GATE.json (fst.gate.GateJob)")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser(
        "report", parents=[common], help="HTML report with plots for a run or a stream"
    )
    p.add_argument("path", help="a run or stream folder, or a name under ./runs")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "eval",
        parents=[common],
        help="four-way channel decomposition of a checkpoint (greedy)",
        description="Evaluate base and trained weights, each with the seed prompt and with the "
        "best evolved (FST) prompt, on a split with greedy decoding: the channel decomposition "
        "of the FST paper.",
    )
    _add_config_args(p)
    p.add_argument(
        "--checkpoint", default="latest", help="'latest' (of the config's run) or a folder"
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N problems")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prompts", parents=[common], help="inspect a run's prompt population")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser(
        "show", parents=[common], help="the latest population with scores and lineage"
    )
    q.add_argument("run", help="run folder, or a run name under ./runs")
    q.set_defaults(func=cmd_prompts_show)
    q = actions.add_parser(
        "diff", parents=[common], help="unified diff of two prompts (ids or id prefixes)"
    )
    q.add_argument("run", help="run folder, or a run name under ./runs")
    q.add_argument("a", help="prompt id (or unique prefix)")
    q.add_argument("b", help="prompt id (or unique prefix)")
    q.set_defaults(func=cmd_prompts_diff)
    return parser


# Error messages longer than this are cut (one line on a terminal, a few in a narrow one).
MAX_ERROR_CHARS = 1000


def one_line(text: str) -> str:
    """`text` on one line (newlines become `; `), cut to MAX_ERROR_CHARS characters."""
    line = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


# The import names of the `train` extra (pyproject.toml): missing one is an install to do,
# not a bug.
TRAIN_MODULES = frozenset(
    {"torch", "transformers", "gguf", "accelerate", "safetensors", "peft", "tqdm", "numpy"}
    | {"gepa", "matplotlib", "scipy"}
)

# The error classes of the input, by module: an exception can only be an instance of a class
# whose module is imported, so the check imports nothing (a config error stays instant).
USER_ERRORS = (
    ("fst.schema", "ConfigError"),  # also fst.model.ModelLoadError
    ("fst.tasks.jsonl", "DataError"),
    ("fst.loop", "RunError"),
    ("fst.store.db", "RunLockedError"),
    ("fst.store.layout", "CheckpointError"),
    ("fst.run_state", "UnsafeCheckpointError"),
    ("fst.handover", "HandoverError"),
    ("fst.slow.trainer", "DivergedError"),
)


def user_error(e: BaseException) -> str | None:
    """The message of an error caused by the input (config, manifest, data, model, checkpoint,
    a run held by another trainer, a diverged run), or None for anything else (a bug)."""
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return str(e)
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in TRAIN_MODULES:
        return (
            f"{e.name} is not installed: training needs the `train` extra "
            "(pip install 'fastslow[train]'); the core install is the operator's"
        )
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(e, pydantic.ValidationError):
        from fst.schema import format_validation_error

        return format_validation_error(e, e.title)
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(e, yaml.YAMLError):
        return f"YAML error: {e}"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    if isinstance(e, OSError):
        if e.filename is not None:
            target = f" -> {e.filename2}" if e.filename2 is not None else ""
            return f"{e.filename}{target}: {e.strerror or type(e).__name__}"
        return str(e) or type(e).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    debug = args.debug or os.environ.get("FST_DEBUG", "") not in ("", "0")
    stop_on_sigterm()  # a deleted pod's trainer releases its run (fst/signals.py)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Terminated:
        print("stopped (SIGTERM); continue with --resume", file=sys.stderr)
        return 143
    except Exception as e:
        if debug:
            traceback.print_exc()
        try:
            message = user_error(e)
        except Exception:  # never let the error report hide the error
            message = None
        if message is not None:
            print(f"error: {one_line(message)}", file=sys.stderr)
            return 2
        print(
            f"internal error: {one_line(f'{type(e).__name__}: {e}')} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
