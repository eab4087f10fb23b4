"""A checkpoint is data, never code (issue 16, item 2): resuming from a checkpoint whose
trainer.pt, rng.pt or DCP's dcp/.metadata was replaced by a pickle that runs something, with
its manifest rewritten to match (the sha256 proves integrity, not authorship), refuses to load
it and runs nothing. An honest checkpoint still resumes (numpy's RNG state is allowlisted by
its exact classes)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import fst.loop
from fst.config import validate_config
from fst.run_state import UnsafeCheckpointError, load_data_file
from tests.tiny_model import (  # noqa: F401 (fixtures)
    one_torch_thread,
    tiny_model_dir,
    tiny_run_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Planted:
    """What an attacker writes: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def rewrite_manifest(folder: Path, name: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["rng.pt", "trainer.pt", "dcp/.metadata"])
def test_a_planted_pickle_is_refused_and_runs_nothing(tmp_path, tiny_model_dir, name):  # noqa: F811
    raw = tiny_run_config(tmp_path, tiny_model_dir, steps=1, **{"checkpoint.every": 1})
    cfg = validate_config(raw)
    fst.loop.train(cfg, progress=False)
    folder = cfg.run_dir / "checkpoints" / "step-00000001"
    # The honest files load as data (numpy's RNG state included).
    assert set(load_data_file(folder / "rng.pt")) == {"sampler", "torch", "python", "numpy"}

    marker = tmp_path / "pwned"
    if name.endswith(".metadata"):
        # DCP's index of the shards: torch reads it with plain pickle.load; ours refuses.
        (folder / name).write_bytes(pickle.dumps(Planted(marker)))
    else:
        torch.save({"numpy": Planted(marker)}, folder / name)
    rewrite_manifest(folder, name)
    longer = validate_config({**raw, "steps": 2})
    with pytest.raises(UnsafeCheckpointError, match=name):
        fst.loop.train(longer, resume=True, progress=False)
    assert not marker.exists()


class _Reduced:
    """Pickles as `fn(*args)`: how a Python build may write an object into DCP metadata."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_dcp_metadata_may_name_enum_members_by_getattr_and_nothing_else():
    """Debian 12's Python 3.11.2 (the trainer image's) pickles enum members as
    getattr(EnumClass, "NAME"); the metadata unpickler allows exactly that lookup."""
    import io

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from fst.run_state import _MetadataUnpickler

    def load(obj) -> object:
        return _MetadataUnpickler(io.BytesIO(pickle.dumps(obj))).load()

    member = next(iter(_MEM_FORMAT_ENCODING))
    data = pickle.dumps(_Reduced(getattr, _MEM_FORMAT_ENCODING, member.name))
    assert b"getattr" in data
    assert load(_Reduced(getattr, _MEM_FORMAT_ENCODING, member.name)) is member
    # Any other getattr is a way out of the allow-list: refused.
    for target, name in ((Path, "__class__"), (_MEM_FORMAT_ENCODING, "__class__")):
        with pytest.raises(pickle.UnpicklingError, match="not allowed in DCP metadata"):
            load(_Reduced(getattr, target, name))
