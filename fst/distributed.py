"""One run over many processes: what torchrun starts, and the little the loop needs of it.

    torchrun --nproc_per_node N [--nnodes M --node_rank i --master_addr ...] -m fst train -c cfg

Every process (rank) runs the same `fst train`. torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and
LOCAL_WORLD_SIZE; with WORLD_SIZE > 1 the ranks join one process group (NCCL on GPUs, gloo on
the CPU) and the policy is sharded with FSDP2 (`fully_shard`: one unit per decoder layer, then
the root), so each rank holds 1/N of the parameters, gradients and AdamW state. With one
process (plain `fst train`) nothing here runs: no process group, no sharding, the same numbers.

The split of work (fst/loop.py):
  - data: every rank computes the same step batch; rank r takes the r-th slice of its problems
    (whole problems: a problem's G rollouts and its advantage group stay on one rank);
  - sampling: each rank from its own full copy of the weights (see `RolloutCopy`);
  - training: FSDP2 forward/backward on the rank's rollouts, the loss normalised by the WHOLE
    step's token count (all-reduced), gradients SUMMED across ranks (not averaged);
  - rank 0 alone: the database lease, metrics, the GEPA round (its population is broadcast),
    held-out evaluation, the Hugging Face export of a checkpoint.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from fst.config import ParallelConfig
from fst.schema import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process sits among the run's processes (torchrun's environment)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes metrics, runs GEPA and holds the lease."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))


SINGLE = World()


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The World torchrun describes in the environment; one process without it."""
    e = os.environ if env is None else env
    size = int(e.get("WORLD_SIZE", "1"))
    return World(
        rank=int(e.get("RANK", "0")),
        size=size,
        local_rank=int(e.get("LOCAL_RANK", "0")),
        local_size=int(e.get("LOCAL_WORLD_SIZE", str(size))),
    )


def init_world(device: torch.device) -> World:
    """Join the run's process group when torchrun started several processes.

    On the CPU each rank gets an equal share of the cores as torch threads: N ranks with all
    cores each would oversubscribe the machine N times over."""
    world = world_from_env()
    if not world.distributed:
        return world
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
    log.info(
        "rank %d of %d (%d node(s)), device %s, backend %s",
        world.rank,
        world.size,
        world.nodes,
        device,
        dist.get_backend(),
    )
    return world


# How long a rank that finished waits at the end for the others (rank 0 still writes its
# database records after the last checkpoint).
LEAVE_TIMEOUT_S = 600


def close_world(world: World, finished: bool = False) -> None:
    """Leave the process group. After a run that `finished` on this rank, first wait for every
    rank to finish too, so that no rank tears down its connections while a peer still holds
    them: in CI a worker that left while rank 0 was still writing its records once died at
    exit with SIGABRT ("terminate called without an active exception", gloo, torch 2.15).
    After an error nobody waits: torchrun stops the other ranks."""
    if not (world.distributed and dist.is_initialized()):
        return
    if finished:
        timeout = datetime.timedelta(seconds=LEAVE_TIMEOUT_S)
        if dist.get_backend() == "gloo":  # names the rank that did not come, if one does not
            dist.monitored_barrier(timeout=timeout)
        else:
            barrier(world)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives
# Thin wrappers that are no-ops with one process, so the loop reads the same either way.


def broadcast(obj: T, world: World) -> T:
    """Rank 0's `obj` on every rank (pickled: small Python objects only)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: T, world: World) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank (all ranks call; small objects)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def sum_all(values: list[float], world: World) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def max_all(value: int, world: World) -> int:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def min_max_all(lo: float, hi: float, world: World) -> tuple[float, float]:
    """(min over ranks of lo, max over ranks of hi)."""
    if not world.distributed:
        return lo, hi
    t = torch.tensor([-lo, hi], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return -float(t[0]), float(t[1])


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank calls it); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_share(n: int, world: World, what: str = "slow.problemsPerStep") -> slice:
    """The slice of a step's `n` problems this rank samples and trains on: contiguous, equal.

    Equal shares keep every rank's work (and its number of FSDP collectives) in step."""
    if n % world.size:
        raise ConfigError(
            f"{what}={n} must be a multiple of the number of processes ({world.size}): each "
            "process takes an equal share of whole problems"
        )
    per = n // world.size
    return slice(world.rank * per, (world.rank + 1) * per)


# ----------------------------------------------------------------------------- sharding


def transformer_of(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft model (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) and hasattr(model, "peft_config") else model
    return cast(PreTrainedModel, inner)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's stack of layers (`model.model.layers` in Llama/Qwen/Mistral...)."""
    for name, module in transformer_of(model).named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] == "layers":
            return module
    raise ValueError(f"{type(model).__name__}: no decoder layer stack (a ModuleList 'layers')")


def shard(model: torch.nn.Module, parallel: ParallelConfig, offload: bool = False) -> None:
    """FSDP2 in place: each decoder layer a unit, then the root (embeddings, final norm and the
    LM head, tied or not). The root is the transformers model, also under peft: peft's wrappers
    call it, and its parameters (LoRA's included) are what gets sharded.

    Gradients are SUMMED across ranks: the loss is already normalised by the whole step's
    token count (fst/slow/trainer.py), and FSDP's default would divide by the world size."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    mp = MixedPrecisionPolicy()
    if parallel.mixed_precision == "bf16":
        # bf16 compute; the sharded parameters (AdamW's master copy) stay fp32, and gradients
        # are reduced in fp32 so a sum over many ranks does not lose the small ones.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Pinned host memory (faster copies to the GPU) needs CUDA; on a CPU-only run the "offload"
    # is where the model already is, and the path still runs (tested).
    off = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, offload_policy=off)
    root = transformer_of(model)
    fully_shard(root, mp_policy=mp, offload_policy=off)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # A plain SUM collective (gloo has no pre-multiplied sum; NCCL is zero-copy with it).
            m.set_force_sum_reduction_for_comms(True)


def reshard(model: torch.nn.Module) -> None:
    """Free every FSDP unit's gathered parameters, so the module holds its shards again.

    FSDP2 leaves the root unit gathered after a forward outside backward (the loop's no-grad
    probes): its parameters are then whole tensors in the compute dtype (bf16 with mixed
    precision), not the fp32 shards; reading them would read the rounded copy."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


class RolloutCopy:
    """A full, unsharded copy of the policy that this rank samples from.

    Why a gathered copy rather than sampling from the sharded model: an FSDP forward
    all-gathers every layer's parameters, so decoding from it would be one collective per
    layer per generated token, and every rank would have to decode in lockstep (same number of
    tokens) or deadlock; GEPA and held-out evaluation run on rank 0 alone, which a sharded
    model cannot do. The copy costs one full set of weights per rank, exactly what a colocated
    vLLM engine holds (fst/rollout/vllm.py), and is refreshed after every update by gathering
    the trainable parameters one at a time (`.full_tensor()`, the same collective order on
    every rank). LoRA: only the adapters change, so only they are gathered."""

    def __init__(self, policy: PreTrainedModel) -> None:
        # Taken BEFORE sharding, so it is an ordinary model with the same parameter names.
        self.model = copy.deepcopy(policy)
        self.model.eval()
        self.model.requires_grad_(False)
        self.names = [n for n, p in policy.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def sync_from(self, policy: torch.nn.Module) -> None:
        reshard(policy)  # read the fp32 shards, not a unit left gathered in bf16
        mine = dict(self.model.named_parameters())
        for name, param in policy.named_parameters():
            if param.requires_grad:
                mine[name].copy_(full_tensor(param.detach()))
