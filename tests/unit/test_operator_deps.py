"""The operator installs and imports no training stack (torch, transformers, ...).

The operator image installs exactly `.[operator]` (operator/Dockerfile): the core
dependencies plus the operator extra. Two checks keep it slim:
- pyproject.toml: neither list names a package of the `train` extra;
- the import graph: a fresh interpreter that imports every module of fst_operator loads none
  of the `train` extra's packages (an `import torch` reached from fst/ through the operator
  would break the operator image at start, which no other test would notice: the dev venv
  has torch).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def train_packages() -> set[str]:
    return {requirement_name(r) for r in project()["optional-dependencies"]["train"]}


def test_the_operator_install_names_no_training_package():
    meta = project()
    operator_install = meta["dependencies"] + meta["optional-dependencies"]["operator"]
    names = {requirement_name(r) for r in operator_install}
    assert "torch" in train_packages() and "transformers" in train_packages()
    assert names & train_packages() == set()
    assert not any(name == "fastslow" for name in names)  # no self-reference pulling extras


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import fst_operator
for info in pkgutil.walk_packages(fst_operator.__path__, "fst_operator."):
    importlib.import_module(info.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_importing_every_operator_module_loads_no_training_package():
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL],
        cwd=REPO,
        env={"PYTHONPATH": f"{REPO}:{REPO / 'operator'}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = {name.lower().replace("_", "-") for name in json.loads(proc.stdout)}
    assert "kopf" in loaded and "fst" in loaded  # it did import the operator
    # Import names of the train extra's packages (PyPI name -> module name where they differ).
    modules = {"pyyaml": "yaml", "scipy": "scipy", "gepa": "gepa"}
    heavy = {modules.get(name, name) for name in train_packages()}
    assert loaded & heavy == set()


def test_the_cli_names_the_train_extra_when_torch_is_missing():
    from fst.cli import TRAIN_MODULES, user_error

    assert {requirement_name(r) for r in project()["optional-dependencies"]["train"]} == {
        "pyyaml" if m == "yaml" else m for m in TRAIN_MODULES
    }
    message = user_error(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert message is not None and "pip install 'fastslow[train]'" in message
    assert user_error(ModuleNotFoundError("No module named 'x'", name="x")) is None  # a bug
