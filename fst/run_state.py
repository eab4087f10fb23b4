"""What a checkpoint holds, and how a run is restored from one.

model/            a loadable transformers model folder (safetensors + config + tokenizer): how
                  the next stage of a stream, `fst eval` and a server start from this one
dcp/              the trained parameters and AdamW state, as torch.distributed.checkpoint writes
                  them: one file per rank that saved (`__<rank>_0.distcp`) and `.metadata`,
                  which says where every shard of every tensor is. Loading reshards: a checkpoint
                  saved by 2 ranks loads into 1 process or 4, sharded or not (fst/distributed.py)
trainer.pt        the LR-schedule state
rng.pt            every random stream of rank 0: the rollout sampler's generator, torch, python,
rng-<r>.pt        numpy; and of each other rank r that saved
state.json        step, data cursor, population, anything the loop needs to continue
config.yaml       the run's configuration, for the record

Checkpoints written before dcp/ existed hold `adapter/` (LoRA) and the optimizer inside
trainer.pt; a single process still resumes them (`_read_legacy`).

LoRA runs: `model/` is the MERGED model, W + (alpha/r)·B·A in every adapted layer, and the
adapters are saved again in `adapter/`.
  - Merged, rather than the adapter alone, because a checkpoint must be loadable on its own:
    an adapter is only meaningful on top of its exact base, which may be a GGUF file inside a
    Python package, another stage's checkpoint or an s3:// URI on another machine. The next
    stage, evaluation and serving (vLLM included) then load a plain model and need no peft.
    A next stage that uses LoRA again starts new adapters on top of these merged weights.
  - the adapters alone in dcp/ as well (the frozen base is not saved there), because a resume
    must continue EXACTLY: the resumed run rebuilds its policy as it started (the run's own
    base + fresh adapters) and loads the adapters into it, which restores the trained
    parameters bit for bit and matches the optimizer's state (one Adam moment per adapter
    parameter). Resuming from the merged weights with new adapters would give another
    trajectory. The adapters are small (a few MB for SmolLM2 at rank 16).
"""

from __future__ import annotations

import enum
import json
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fst.config import TrainConfig, dump_config
from fst.distributed import SINGLE, World, barrier, reshard
from fst.model import is_lora, save_model_folder
from fst.slow.trainer import SlowTrainer

MODEL_DIR = "model"
DCP_DIR = "dcp"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name inside an adapter folder


# A checkpoint is data, never code: trainer.pt and rng.pt are read with torch.load(
# weights_only=True), whose unpickler builds only tensors, containers and numbers, plus the
# numpy classes np.random.get_state() needs (a uint32 array). A planted pickle with a
# rewritten manifest (the manifest's sha256 proves integrity, not authorship) is refused
# instead of run.
_NUMPY_RNG_GLOBALS: list[Any] = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    np.zeros(1).__reduce__()[0],  # numpy's array _reconstruct, wherever this numpy keeps it
]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds more than tensors and plain data: it is not loaded."""


def load_data_file(path: Path) -> Any:
    """torch.load of a checkpoint's data file (trainer.pt, rng.pt) that never runs code."""
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[-1][:300]
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain data, "
            f"as a tampered checkpoint would ({first_line})"
        ) from None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "sampler": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["sampler"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def rng_file(rank: int) -> str:
    """Rank 0's random streams in rng.pt (what a single process has always written)."""
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


def _train_state(model: torch.nn.Module, trainer: SlowTrainer) -> tuple[Any, Any, Any]:
    """(model, optimizer) state dicts keyed by parameter name, as DCP saves and loads them:
    DTensor shards under FSDP, whole tensors otherwise. A LoRA model's frozen base is left out
    (it is rebuilt from the run's base model, not trained)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    reshard(model)  # the shards themselves (a unit left gathered would be its compute copy)

    options = StateDictOptions(
        # strict=False: a LoRA model's frozen base is not in the checkpoint (dcp.load already
        # fails on any requested tensor the checkpoint lacks).
        ignore_frozen_params=is_lora(model),
        strict=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
        model_sd, optim_sd = get_state_dict(model, trainer.optimizer, options=options)
    return model_sd, optim_sd, options


def write_checkpoint_files(
    folder: Path,
    cfg: TrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    trainer: SlowTrainer,
    generator: torch.Generator,
    state: dict[str, Any],
    world: World = SINGLE,
    export: PreTrainedModel | None = None,
) -> None:
    """Every rank calls this with the same `folder` (on its node). `export` is the full model
    that rank 0 writes as `model/` (the policy itself with one process; under FSDP the
    gathered rollout copy, which holds exactly the trained weights)."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd, _ = _train_state(model, trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder / DCP_DIR)
    torch.save(rng_state(generator), folder / rng_file(world.rank))
    if world.main:
        save_model_folder(export if export is not None else model, tokenizer, folder / MODEL_DIR)
        torch.save({"scheduler": trainer.scheduler.state_dict()}, folder / "trainer.pt")
        (folder / "state.json").write_text(json.dumps(state, indent=1))
        (folder / "config.yaml").write_text(dump_config(cfg))
    barrier(world)


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(shard))
    return state


def load_weights_into(model: PreTrainedModel, folder: Path) -> None:
    """Make an already-built model (same architecture) compute what the checkpoint in `folder`
    computes, from its `model/` weights: what evaluation needs.

    A LoRA model gets the merged weights in its base layers and its adapters zeroed (B = 0, so
    they add nothing), whichever base it was built on: a stage's checkpoint holds weights
    trained on top of the previous stages, which adapters on the stream's base cannot express.
    To continue training a run, use `restore_policy` instead (exact adapters)."""
    model_dir = folder / MODEL_DIR
    if (model_dir / ADAPTER_WEIGHTS).is_file() and not (model_dir / "config.json").is_file():
        # A checkpoint of an older version: the adapters alone, on the run's own base.
        _load_adapters(model, model_dir)
        return
    state = _read_safetensors(model_dir)
    target: torch.nn.Module = model
    if is_lora(model):
        target = _zero_adapters(model)
        # The base layers of adapted modules are named `<module>.base_layer.<param>` inside
        # peft; the merged checkpoint names them like the plain model, `<module>.<param>`.
        names = {
            k.replace(".base_layer.", "."): k for k in target.state_dict() if ".lora_" not in k
        }
        state = {names.get(k, k): v for k, v in state.items()}
    missing, unexpected = target.load_state_dict(state, strict=False)
    # Tied embeddings are saved once (the tied lm_head is legitimately "missing"), and a LoRA
    # model's adapters are not in a merged checkpoint.
    missing = [k for k in missing if not k.endswith("lm_head.weight") and ".lora_" not in k]
    if missing or unexpected:
        raise RuntimeError(
            f"{model_dir}: weights do not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def _zero_adapters(model: PreTrainedModel) -> torch.nn.Module:
    """Set every LoRA B matrix to 0 (the adapters then add nothing); return the base model."""
    peft_model: Any = model  # peft's PeftModel: its methods are untyped
    base: torch.nn.Module = peft_model.get_base_model()
    with torch.no_grad():
        for name, param in base.named_parameters():
            if ".lora_B." in name or ".lora_embedding_B." in name:
                param.zero_()
    return base


def _load_adapters(model: PreTrainedModel, adapter_dir: Path) -> None:
    """Load the adapter weights saved by peft in `adapter_dir` into the LoRA model `model`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not is_lora(model):
        raise RuntimeError(
            f"{adapter_dir}: the checkpoint holds LoRA adapters (it was written by a LoRA run); "
            "load or resume it with the same model.lora settings"
        )
    # torch's _IncompatibleKeys (missing_keys, unexpected_keys); peft annotates it `namedtuple`.
    result: Any = set_peft_model_state_dict(model, load_file(adapter_dir / ADAPTER_WEIGHTS))
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{adapter_dir}: adapters do not match the model's model.lora settings "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )


def restore_policy(model: PreTrainedModel, folder: Path) -> None:
    """Put the checkpoint's trained parameters into the run's freshly built policy, exactly.

    Full fine-tuning: every weight from `model/`. LoRA: the adapters from `adapter/`; the base
    weights are the ones the run was built on (unchanged by training), so together they are
    the trained policy bit for bit. (dcp/ holds exactly those trained parameters.)"""
    if (folder / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
        )

        options = StateDictOptions(
            # strict=False: a LoRA model's frozen base is not in the checkpoint (dcp.load already
            # fails on any requested tensor the checkpoint lacks).
            ignore_frozen_params=is_lora(model),
            strict=False,
        )
        loaded = {"model": get_model_state_dict(model, options=options)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
            _dcp_load(dcp, loaded, folder)
            set_model_state_dict(model, loaded["model"], options=options)
        return
    adapter_dir = folder / ADAPTER_DIR
    if not adapter_dir.is_dir() and (folder / MODEL_DIR / ADAPTER_WEIGHTS).is_file():
        adapter_dir = folder / MODEL_DIR  # an older LoRA checkpoint: the adapters in model/
    if adapter_dir.is_dir():
        _load_adapters(model, adapter_dir)
    elif is_lora(model):
        raise RuntimeError(
            f"{folder}: the checkpoint has no {ADAPTER_DIR}/ (it was written by a full "
            "fine-tuning run); resume it without model.lora"
        )
    else:
        load_weights_into(model, folder)


def read_checkpoint_files(
    folder: Path,
    model: PreTrainedModel,
    trainer: SlowTrainer,
    generator: torch.Generator,
    world: World = SINGLE,
) -> dict[str, Any]:
    """Restore a run from the checkpoint in `folder`: the policy's trained parameters, the
    optimizer and schedule, every RNG. Returns the loop's state (state.json).

    Any world size reads a dcp/ checkpoint, whatever world size wrote it. A rank that has no
    saved random streams (more ranks now than then) starts its sampler from the run's seed,
    its rank and the step, so the resumed run is reproducible but samples differently from an
    uninterrupted one at the old size."""
    state: dict[str, Any] = json.loads((folder / "state.json").read_text())
    if not (folder / DCP_DIR).is_dir():
        if world.distributed:
            raise RuntimeError(
                f"{folder}: written by an older version (no {DCP_DIR}/); resume it once with a "
                "single process (plain `fst train --resume`), then under torchrun"
            )
        _read_legacy(folder, model, trainer, generator)
        return state
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, optim_sd, options = _train_state(model, trainer)
    loaded = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
        _dcp_load(dcp, loaded, folder)
        set_state_dict(
            model,
            trainer.optimizer,
            model_state_dict=loaded["model"],
            optim_state_dict=loaded["optim"],
            options=options,
        )
    trainer.scheduler.load_state_dict(load_data_file(folder / "trainer.pt")["scheduler"])
    rng = folder / rng_file(world.rank)
    if rng.is_file():
        restore_rng(load_data_file(rng), generator)
    else:
        generator.manual_seed(hash((state.get("seed", 0), world.rank, state["step"])) % 2**63)
    return state


def _read_legacy(
    folder: Path, model: PreTrainedModel, trainer: SlowTrainer, generator: torch.Generator
) -> None:
    """A checkpoint of an older version: model/ (+ adapter/) and the whole trainer.pt."""
    restore_policy(model, folder)
    trainer.load_state_dict(load_data_file(folder / "trainer.pt"))
    restore_rng(load_data_file(folder / "rng.pt"), generator)


def _dcp_load(dcp: Any, state: dict[str, Any], folder: Path) -> None:
    """dcp.load into `state`, with a one-line error when the checkpoint's tensors are not the
    model's (another model, or LoRA settings other than the run's)."""
    # Read (and vet) the index first: inside dcp.load an UnsafeCheckpointError would come back
    # wrapped in DCP's per-rank CheckpointException.
    SafeFileSystemReader(folder / DCP_DIR).read_metadata()
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(folder / DCP_DIR))
    except dcp.CheckpointException as e:
        first = " ".join(str(e).split())[:300]
        raise RuntimeError(
            f"{folder / DCP_DIR}: the checkpoint's tensors do not match this model (resume it "
            f"with the model and model.lora settings it was trained with): {first}"
        ) from None


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader, except that `.metadata` is unpickled with an allow-list of DCP's own
    metadata classes: torch's reader uses plain pickle.load there, which would run whatever a
    tampered checkpoint planted (the tensors themselves are raw bytes, and DCP reads its other
    objects with weights_only=True)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(f"{path}: refused to load: {e}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# (module, name) pairs a DCP .metadata file may reference: DCP's metadata dataclasses, the
# filesystem writer's storage records, and the torch types their fields hold.
_DCP_METADATA_GLOBALS = (
    {
        ("torch.distributed.checkpoint.metadata", n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a lookup of torch's layouts by name
        ("pathlib", "PosixPath"),  # the checkpoint id recorded in storage_meta
        ("collections", "OrderedDict"),
    }
    | {
        ("torch", str(d).removeprefix("torch."))
        for d in (
            torch.float32,
            torch.float64,
            torch.float16,
            torch.bfloat16,
            torch.int64,
            torch.int32,
            torch.int16,
            torch.int8,
            torch.uint8,
            torch.bool,
        )
    }
)


def _enum_member(cls: Any, name: str) -> Any:
    """What `builtins.getattr` may do in DCP metadata: look up a member of an allowed Enum.
    Some Python builds pickle enum members as `getattr(EnumClass, "NAME")` (measured: Debian
    12's Python 3.11.2, the trainer image's, does for DCP's _MEM_FORMAT_ENCODING; the 3.11.7
    of the dev install does not). An unrestricted getattr would let a crafted pickle walk from
    any allowed class to arbitrary callables."""
    members = getattr(cls, "__members__", None) if isinstance(cls, enum.EnumMeta) else None
    if not isinstance(name, str) or members is None or name not in members:
        raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not allowed in DCP metadata")
    return members[name]


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")
