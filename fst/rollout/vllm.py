"""A colocated vLLM rollout engine, for GPU pods (`rollout.engine: vllm`).

NOT RUN HERE: this project was developed on a CPU-only machine, where vLLM cannot run. The
code below is written against vLLM 0.33.0 (read from its released wheel); the unit tests
(tests/unit/test_vllm_engine.py) run without vLLM and cover the import guard, the mapping of
our SamplingParams to vLLM's, the conversion of vLLM's outputs to Rollouts, the weights handed
to vLLM (plain and LoRA-merged; and gathered from an FSDP2-sharded policy, for real, in two
processes on the CPU), the engine's call sequence against a stand-in `LLM` and the arguments
each rank of a (fake) torchrun world would start vLLM with.

Design
------
- *Colocated, in-process.* vLLM runs in the trainer's process on the same GPU
  (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a weight sync is a device-to-device copy of the
  policy's tensors into vLLM's model, with no serialisation.
- *Weights come from the policy, never from disk.* vLLM starts with `load_format="dummy"` from
  a folder holding only the policy's config.json, and the constructor then pushes the policy's
  weights. Every model source `fst` accepts (the built-in GGUF, a checkpoint, s3://, a hub id)
  thus works the same way, and nothing is written but a small JSON file.
- *sync_weights()* after each optimizer step (fst/loop.py) pushes the policy's parameters under
  their Hugging Face names through `LLM.apply_model(model.load_weights(...))`, one decoder
  layer per call (so a LoRA merge or a gather never materialises more than one layer); vLLM's
  model maps them to its fused layout (q/k/v -> qkv_proj, gate/up -> gate_up_proj). LoRA
  adapters are merged into the pushed weights (W + scale·BA) without touching the policy. The
  prefix cache is then dropped: its KV entries were computed by the old weights.
- *Sleep mode* (on by default): after each generate() vLLM's GPU memory (weights and KV cache)
  is released (`LLM.sleep(level=2)`) so the trainer's forward/backward has the GPU; the next
  generate() wakes the weights, reloads them from the policy, then wakes the KV cache. With
  sleep on, sync_weights() has nothing to do: every generate() loads the current policy.
  (One process; under torchrun see below: level 1, and only sync_weights() pushes.)
- *Sampler logprobs.* Rollout.logprobs must be log-probs of the distribution each token was
  drawn from: temperature-scaled, renormalised over the top-p nucleus when top_p < 1 (what
  CISPO's ratio compares against; see fst/rollout/__init__.py, and fst/rollout/hf.py, which
  computes the same). vLLM returns exactly that with `logprobs_mode="processed_logprobs"`
  (vLLM >= 0.10.2) and `SamplingParams(logprobs=0)`: the sampled token's log-prob after
  temperature and top-k/top-p, renormalised over what was kept.
  Greedy requests (temperature 0 in vLLM) get log-probs of the *unscaled* distribution
  (temperature 1); only evaluation decodes greedily, at temperature 1, and it reads only text.
- *Seeds.* Each request gets its own seed drawn from the run's torch.Generator, so the
  generator (which checkpoints save) fully determines the requests. vLLM's GPU kernels are
  not bitwise batch-invariant by default, so a resumed run is reproducible in distribution,
  not token for token as with the HF engine on CPU.
- *Stop tokens.* Exactly our stop ids stop a completion (`ignore_eos=True` switches off vLLM's
  own EOS handling; our stop set already holds the tokenizer's and generation config's EOS).
  The stop token is the last completion id, as in the HF engine; text is decoded by our
  tokenizer (vLLM runs with `skip_tokenizer_init`), exactly as the HF engine does.

Many processes (torchrun, `parallel:`; the pattern of TRL's colocate mode and verl's FSDP
rollout, see docs/memory-plan.md for what it costs)
-------------------------------------------------------------------------------------------
- *One engine per rank*, on the rank's own GPU (cuda:$LOCAL_RANK), started with
  `distributed_executor_backend="external_launcher"`: vLLM joins the process group torchrun
  set up instead of spawning workers, and with tensor parallelism 1 each engine generates
  alone (vLLM's "external data parallel"), so generate() has no collective and rank 0 may
  call it by itself (GEPA, held-out evaluation). Each engine gets its own seed (run seed +
  engine index); the requests are seeded from each rank's own generator anyway.
- *Weights are gathered, not copied whole*: under FSDP2 the policy's parameters are DTensors,
  and policy_weights() gathers them one at a time (`full_tensor()`, cast to vLLM's dtype
  first), handing vLLM one decoder layer at a time. No rank ever holds a full state dict
  beside vLLM's own copy. The gather is a collective, so every weight push runs on every rank
  in the same order: at construction and in sync_weights() (which the loop calls on every
  rank after each update), never inside generate().
- *Sleep level 1 instead of 2*: waking from level 2 needs a fresh push (a collective), which
  generate() on rank 0 alone cannot do; level 1 keeps the weights in pinned CPU memory while
  asleep and copies them back on waking. sync_weights() on a sleeping engine wakes the weights,
  pushes the new ones and leaves them on the GPU until the next generate() ends.
- *Tensor parallelism* (FST_VLLM_TENSOR_PARALLEL_SIZE, default 1): a group of that many ranks
  of one node shares one engine; each rank's requests are pooled over the group (the engines
  of a group must be handed the same requests) and each keeps its own outputs. generate() is
  then a collective of the group, so runs where rank 0 generates alone (modes fst and gepa,
  metrics.evalEvery) are refused.
- With mixed precision (parallel.mixedPrecision: bf16) vLLM runs in bfloat16, the dtype of
  the trainer's forward pass; otherwise in model.dtype, as with one process.

Tuning by environment (no config fields yet): FST_VLLM_GPU_MEMORY_UTILIZATION (fraction of
the GPU vLLM may take while awake, default 0.3; the policy, its gradients and AdamW state need
the rest), FST_VLLM_MAX_MODEL_LEN (default: the model's), FST_VLLM_SLEEP (1/0, default 1),
FST_VLLM_TENSOR_PARALLEL_SIZE (under torchrun; default 1).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, runtime_checkable

import torch

from fst.config import ConfigError
from fst.distributed import SINGLE, World, full_tensor, world_from_env
from fst.rollout import Generators, Rollout, SamplingParams

if TYPE_CHECKING:
    from peft import PeftModel

    from fst.config import TrainConfig

log = logging.getLogger(__name__)

MIN_VLLM = "0.10.2"  # logprobs_mode="processed_logprobs" returns post-temperature logprobs
TARGET_VLLM = "0.33.0"  # the version this code was written against (not run: no GPU here)
INSTALL_HINT = "pip install 'fastslow[gpu]'"
SEED_BOUND = 2**31 - 1  # per-request seeds stay within a signed 32-bit int for any vLLM
TP_ENV = "FST_VLLM_TENSOR_PARALLEL_SIZE"
# What vLLM's external launcher reads to join torchrun's process group (env:// rendezvous).
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- import guard


def import_vllm() -> ModuleType:
    """Import vLLM, or raise a ConfigError that names the setting and the fix."""
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(
            f"rollout.engine: vllm needs the vLLM package, which is not importable here ({e}). "
            f"Install it on a machine with an NVIDIA GPU: {INSTALL_HINT} "
            "(or the trainer image, trainer-image/Dockerfile), or set rollout.engine: hf."
        ) from e
    version = getattr(vllm, "__version__", "0")
    if not version_at_least(version, MIN_VLLM):
        raise ConfigError(
            f"rollout.engine: vllm needs vLLM >= {MIN_VLLM} (found {version}): older versions "
            f"cannot return temperature-scaled sampler logprobs. Upgrade with: {INSTALL_HINT}"
        )
    return vllm


def version_at_least(version: str, minimum: str) -> bool:
    """`version` >= `minimum` by PEP 440 (a pre-release of `minimum` does not count)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) >= Version(minimum)
    except InvalidVersion:
        return False


# ----------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class EnginePlacement:
    """Which vLLM engine this process runs: one per rank, or one per tensor-parallel group of
    `tp` consecutive ranks (torchrun numbers the ranks of a node consecutively, and vLLM's
    own layout, ExternalDP x DP x PP x TP, makes the same groups)."""

    world: World = SINGLE
    tp: int = 1

    @property
    def engine(self) -> int:
        """Index of this rank's engine (its tensor-parallel group)."""
        return self.world.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.world.rank % self.tp

    def tp_groups(self) -> list[list[int]]:
        """Every group's ranks, in the order torch.distributed.new_subgroups_by_enumeration
        wants them (every rank passes the same list)."""
        return [list(range(g, g + self.tp)) for g in range(0, self.world.size, self.tp)]


def engine_placement(world: World, tp: int = 1) -> EnginePlacement:
    """Check a tensor-parallel size against the world: groups stay within a node (a group's
    all-reduces run every generated token: NVLink, not the network) and split it evenly."""
    if tp < 1:
        raise ConfigError(f"{TP_ENV}={tp}: must be 1 or more")
    if tp > 1 and not world.distributed:
        raise ConfigError(
            f"{TP_ENV}={tp} needs torchrun (one process per GPU, each rank joins a group of "
            f"{tp}); with one process vLLM would run its tensor-parallel workers in other "
            "processes, where the policy's weights cannot be pushed in place"
        )
    if world.local_size % tp:
        raise ConfigError(
            f"{TP_ENV}={tp} must divide the processes per node ({world.local_size}): a "
            "tensor-parallel group stays within one node"
        )
    return EnginePlacement(world, tp)


def tensor_parallel_size(env: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if env is None else env).get(TP_ENV, "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{TP_ENV}={raw!r}: not an integer") from None


def check_torchrun(
    cfg: TrainConfig, placement: EnginePlacement, env: Mapping[str, str] | None = None
) -> None:
    """What one engine per rank needs from the run and from torchrun's environment."""
    from fst.model import resolve_device

    e = os.environ if env is None else env
    world = placement.world
    device = resolve_device(cfg.model.device)
    want = torch.device("cuda", world.local_rank)
    if device.type == "cuda" and device.index is None:  # a bare cuda: this rank's own GPU
        device = want
    if device != want:
        # The external launcher puts rank r's engine on cuda:$LOCAL_RANK; a policy elsewhere
        # would make every weight push a copy between GPUs (or from the CPU).
        raise ConfigError(
            f"model.device: {cfg.model.device} is {device} on rank {world.rank}, but "
            f"rollout.engine: vllm runs each rank's engine on its own GPU ({want}); set "
            "model.device: cuda (or auto on GPU nodes)"
        )
    missing = [k for k in TORCHRUN_ENV if k not in e]
    if missing:
        raise ConfigError(
            f"rollout.engine: vllm with WORLD_SIZE={world.size} needs torchrun's environment "
            f"({', '.join(TORCHRUN_ENV)}); missing: {', '.join(missing)}. Start the run with "
            "torchrun."
        )
    if placement.tp > 1:
        alone = []
        if cfg.mode != "rl":
            alone.append(f"mode: {cfg.mode} (GEPA rounds)")
        if cfg.metrics.eval_every:
            alone.append(f"metrics.evalEvery: {cfg.metrics.eval_every}")
        if alone:
            raise ConfigError(
                f"{TP_ENV}={placement.tp}: rank 0 generates alone for {' and '.join(alone)}, "
                "but a tensor-parallel engine generates only when every rank of its group "
                f"does; unset {TP_ENV} (one engine per GPU) or switch those off"
            )


def vllm_dtype(cfg: TrainConfig, world: World) -> str:
    """vLLM's dtype: the trainer's compute dtype, so π_old and π_θ see the same weights.
    Under FSDP mixed precision that is bfloat16 (the fp32 parameters are AdamW's master
    copy); otherwise model.dtype, as with one process."""
    if world.distributed and cfg.parallel.mixed_precision == "bf16":
        return "bfloat16"
    return cfg.model.dtype


def llm_kwargs(
    cfg: TrainConfig,
    model_dir: Path,
    placement: EnginePlacement,
    *,
    sleep: bool,
    max_model_len: int | None,
    memory_utilization: float,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for run `cfg` on this rank."""
    kw: dict[str, Any] = {
        "model": str(model_dir),
        "load_format": "dummy",  # the real weights are pushed from the policy
        "skip_tokenizer_init": True,  # prompts are token ids; text is decoded by us
        "generation_config": "vllm",  # no model-side sampling defaults: ours are explicit
        "dtype": vllm_dtype(cfg, placement.world),
        "seed": cfg.seed,
        "max_num_seqs": cfg.rollout.batch_size,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": memory_utilization,
        "enable_sleep_mode": sleep,
        "enable_prefix_caching": True,  # a problem's G rollouts share their prompt
        "logprobs_mode": "processed_logprobs",
    }
    if placement.world.distributed:
        kw.update(
            # Join torchrun's processes (env:// rendezvous) instead of spawning workers: one
            # engine in each rank's own process, so weights are pushed in place.
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=placement.tp,
            # Its own seed per engine, the same within a tensor-parallel group (whose
            # engines must sample alike): as TRL's colocate mode (process_index // tp).
            # vLLM's worker also seeds the process-global random/numpy/torch generators with
            # it at start-up (set_random_seed); in-process, that is this trainer's process.
            seed=cfg.seed + placement.engine,
            # A group's engine serves the requests of all its ranks.
            max_num_seqs=cfg.rollout.batch_size * placement.tp,
        )
    return kw


# ----------------------------------------------------------------------------- pure mapping


def sampling_kwargs(
    params: SamplingParams, stop_ids: Sequence[int], seed: int | None
) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request.

    `seed` is the request's own seed (ignored for greedy decoding, which draws nothing).
    """
    kw: dict[str, Any] = {
        "n": 1,
        "max_tokens": params.max_new_tokens,
        # Our stop set, and only it: vLLM's own EOS notion may differ (or be unknown without
        # a tokenizer), and the HF engine stops exactly on these ids.
        "stop_token_ids": list(stop_ids),
        "ignore_eos": True,
        # 0 = the sampled token's logprob only (no top-k alternatives).
        "logprobs": 0,
        # Text is decoded by our tokenizer, as in the HF engine.
        "detokenize": False,
    }
    if params.greedy:
        kw["temperature"] = 0.0  # vLLM's argmax decoding
    else:
        kw["temperature"] = params.temperature
        kw["top_p"] = params.top_p
        kw["seed"] = seed
    return kw


def request_seeds(generator: torch.Generator, n: int) -> list[int]:
    """One seed per request, drawn from the run's generator (so checkpoints cover them)."""
    return torch.randint(0, SEED_BOUND, (n,), generator=generator).tolist()


def share_of(sizes: Sequence[int], index: int) -> slice:
    """Where member `index`'s requests sit in a group's pooled batch (members in order)."""
    start = sum(sizes[:index])
    return slice(start, start + sizes[index])


def to_rollout(
    prompt_ids: list[int], output: Any, stop_ids: Sequence[int], tokenizer: Any
) -> Rollout:
    """Convert one vLLM `RequestOutput` (n=1) to our Rollout.

    Reads `output.outputs[0]` (a `CompletionOutput`): `token_ids`, `logprobs` (one mapping
    token id -> `Logprob` per position; the sampled token is always present) and
    `finish_reason` ('stop' or 'length').
    """
    got_prompt = getattr(output, "prompt_token_ids", None)
    if got_prompt is not None and list(got_prompt) != list(prompt_ids):
        raise RuntimeError("vLLM returned outputs out of order (prompt ids differ)")
    comp = output.outputs[0]
    ids = [int(t) for t in comp.token_ids]
    if comp.logprobs is None or len(comp.logprobs) != len(ids):
        raise RuntimeError(
            f"vLLM returned {0 if comp.logprobs is None else len(comp.logprobs)} logprob "
            f"positions for {len(ids)} tokens (was the request made with logprobs=0?)"
        )
    logprobs = [
        float(position[tok].logprob) for position, tok in zip(comp.logprobs, ids, strict=True)
    ]
    finished = bool(ids) and ids[-1] in set(stop_ids)
    if comp.finish_reason not in ("stop", "length") or (comp.finish_reason == "stop") != finished:
        # 'stop' without one of our stop ids (e.g. vLLM's repetition detection) or an abort:
        # the completion would be trained on as if the policy chose to end it.
        raise RuntimeError(
            f"vLLM ended a completion with finish_reason={comp.finish_reason!r}, "
            f"stop_reason={getattr(comp, 'stop_reason', None)!r}, last token "
            f"{ids[-1] if ids else None}; expected one of our stop ids {list(stop_ids)} or "
            "the length limit"
        )
    body = ids[:-1] if finished else ids
    text = tokenizer.decode(body, skip_special_tokens=True)
    return Rollout(list(prompt_ids), ids, logprobs, text, finished)


# ----------------------------------------------------------------------------- weights


def _is_peft(model: torch.nn.Module) -> TypeGuard[PeftModel]:
    """Whether `model` is a PEFT (LoRA) wrapper, told by its attribute so that a plain model
    does not make us import peft."""
    return hasattr(model, "peft_config")


@runtime_checkable
class _LoraLayer(Protocol):
    """What `policy_weights` uses of a peft LoRA layer (lora.Linear, lora.Embedding, ...)."""

    active_adapters: list[str]
    lora_A: torch.nn.ModuleDict

    def get_delta_weight(self, adapter: str) -> torch.Tensor: ...


# Wrappers that insert a level into parameter names and that vLLM's names do not have:
# torch's checkpoint_wrapper (activation checkpointing) and torch.compile.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def hf_name(name: str) -> str:
    """The Hugging Face checkpoint name of a parameter (wrapper levels removed)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, tensor), LoRA merged; DTensors stay DTensors (sharded) here."""
    if not _is_peft(model):
        for name, p in model.named_parameters():
            yield name, p.detach()
        return
    base = model.get_base_model()  # the transformers model, LoRA layers injected in place
    modules = dict(base.named_modules())
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            yield name, p.detach()
            continue
        owner, leaf = name.rsplit(".base_layer.", 1)
        layer = modules[owner]
        tensor = p.detach()
        if leaf == "weight" and not getattr(layer, "merged", False):
            if not isinstance(layer, _LoraLayer):
                raise TypeError(
                    f"{owner}: a {type(layer).__name__} adapter cannot be merged into the "
                    "weights pushed to vLLM (LoRA adapters only)"
                )
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    # Under FSDP2 this is DTensor arithmetic on the shards (B·A gathers only
                    # the small A): the merged weight is itself a shard until gathered.
                    # no_grad around the arithmetic only: a `with` around a `yield` would
                    # leave gradients off in the caller while this generator is suspended.
                    with torch.no_grad():
                        tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield f"{owner}.{leaf}", tensor


def policy_weights(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as (Hugging Face checkpoint name, whole tensor), what vLLM's
    `model.load_weights` expects.

    Parameters rather than the state_dict: tied weights (lm_head = embed_tokens) come once,
    under the name vLLM loads them by. For a PEFT LoRA model, each adapted layer's weight is
    yielded merged (W + scale·B·A, computed here; the policy is not modified) under the base
    model's name, and the adapter tensors themselves are left out.

    Under FSDP2 the parameters are DTensors (each rank holds a shard): each is gathered whole
    (`full_tensor()`) as the iterator reaches it, one at a time. That is a collective: every
    rank must run this iterator to its end, and in the same order (named_parameters' order,
    the same on every rank). `dtype` (vLLM's) casts each shard BEFORE it is gathered: under
    bf16 mixed precision the fp32 master shards travel, and are held whole, at half the size.
    """
    for name, tensor in _named_weights(model):  # detached: nothing here records a graph
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield hf_name(name), full_tensor(tensor)


_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def _chunk_key(item: tuple[str, torch.Tensor]) -> str:
    m = _LAYER.match(item[0])
    return m.group(1) if m else item[0]


def weight_chunks(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive weights grouped by decoder layer (`...layers.<i>.`; any other weight alone):
    what one push hands vLLM at a time. Gathered or merged tensors thus exist for one layer at
    a time (~0.4 GB for an 8B model in bf16; the largest chunk is the embedding matrix)."""
    for _, group in itertools.groupby(weights, key=_chunk_key):
        yield list(group)


def write_model_config(model: torch.nn.Module, folder: Path) -> Path:
    """Write the policy's config.json into `folder` (all vLLM needs to build the model before
    its weights are pushed). Returns the folder."""
    from transformers import PreTrainedModel  # loaded already: the policy is one

    base = model.get_base_model() if _is_peft(model) else model
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"vLLM needs a transformers model as the policy, got {type(base)}")
    config = copy.deepcopy(base.config)
    # Models loaded from GGUF may lack `architectures`, which vLLM uses to pick its class.
    config.architectures = [type(base).__name__]
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- the engine


def _load_weights(model: Any, weights: list[tuple[str, torch.Tensor]]) -> list[str] | None:
    """Runs inside vLLM's worker (this process): load some weights, and name the vLLM
    parameters they set (None: this model's load_weights does not say)."""
    with torch.no_grad():  # as vLLM's own loaders: plain in-place copies into its parameters
        loaded = model.load_weights(weights=weights)
    return None if loaded is None else sorted(loaded)


def _unset(model: Any, loaded: frozenset[str]) -> list[str]:
    """Runs inside vLLM's worker: its parameters that no load set."""
    return sorted({name for name, _ in model.named_parameters()} - loaded)


# (this rank's requests) -> (every group member's requests in member order, this rank's index)
TPExchange = Callable[[list[Any]], tuple[list[list[Any]], int]]


def _group_exchange(placement: EnginePlacement) -> TPExchange:
    """Pool requests over this rank's tensor-parallel group (creating the groups is a
    collective of the whole world: every rank calls this, in from_config)."""
    import torch.distributed as dist

    # gloo: the requests are small pickled lists, exchanged on the CPU, apart from the NCCL
    # communicators vLLM and FSDP use.
    group, _ = dist.new_subgroups_by_enumeration(placement.tp_groups(), backend="gloo")
    if not isinstance(group, dist.ProcessGroup):  # every rank is in a group (tp divides N)
        raise RuntimeError(f"rank {placement.world.rank} got no tensor-parallel group")

    def exchange(batch: list[Any]) -> tuple[list[list[Any]], int]:
        out: list[Any] = [None] * placement.tp
        dist.all_gather_object(out, batch, group=group)
        return out, dist.get_rank(group)

    return exchange


class VLLMRolloutEngine:
    """Samples with a colocated vLLM `LLM`; the weights are pushed from `policy`.

    Built by `from_config` on a GPU. The constructor takes the LLM object and vLLM's
    SamplingParams class, so the engine's own logic runs in tests with stand-ins.

    `sleep_level` 2 (one process): asleep, vLLM discards its weights and the next generate()
    pushes them again. 1 (torchrun): asleep, vLLM keeps them in CPU memory; only the
    constructor and sync_weights() push, since a push is a collective that generate() (which
    rank 0 may call alone) must not contain. `dtype`: vLLM's, what each pushed tensor is cast
    to before it is gathered. `tp_exchange`: pools requests over a tensor-parallel group.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        stop_ids: list[int],
        llm: Any,
        sampling_params_cls: Callable[..., Any],
        *,
        sleep: bool = True,
        sleep_level: int = 2,
        dtype: torch.dtype | None = None,
        tp_exchange: TPExchange | None = None,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={sleep_level}: vLLM's levels are 1 and 2")
        self.policy, self.tokenizer, self.stop_ids = policy, tokenizer, list(stop_ids)
        self.llm, self.sampling_params_cls = llm, sampling_params_cls
        self.sleep_between_calls, self.sleep_level = sleep, sleep_level
        self.dtype, self.tp_exchange = dtype, tp_exchange
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        self._cleanup = cleanup
        # vLLM's two kinds of GPU memory sleep and wake separately (tags "weights", "kv_cache");
        # waking or sleeping a kind twice is an error in vLLM, so their states are tracked.
        self._weights_asleep = self._kv_asleep = False
        # vLLM starts from dummy weights: load the real ones now, and insist that every vLLM
        # parameter was set (a silently random layer would sample garbage).
        missing = self._push_weights()
        if missing:
            raise RuntimeError(
                f"vLLM's model has {len(missing)} parameters the policy's weights did not set "
                f"(e.g. {missing[:5]}): its architecture's names differ from the policy's"
            )
        self._sleep_if_enabled()

    @classmethod
    def from_config(
        cls, cfg: TrainConfig, policy: torch.nn.Module, tokenizer: Any, stop_ids: list[int]
    ) -> VLLMRolloutEngine:
        """Start vLLM for run `cfg` (rollout.engine: vllm) on this process's GPU: the first
        visible one with one process, cuda:$LOCAL_RANK under torchrun (one engine per rank,
        every rank calls this together)."""
        world = world_from_env()
        placement = engine_placement(world, tensor_parallel_size())
        if world.distributed:
            check_torchrun(cfg, placement)
        # In-process engine core: weight syncs and apply_model share tensors with this
        # process instead of pickling them to a subprocess (and the external launcher
        # requires it). Set before vLLM reads its env.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = import_vllm()
        sleep = os.environ.get("FST_VLLM_SLEEP", "1") != "0"
        max_len = os.environ.get("FST_VLLM_MAX_MODEL_LEN")
        log.info(
            "starting vLLM %s (written against %s), engine %d, tensor parallel %d",
            vllm.__version__,
            TARGET_VLLM,
            placement.engine,
            placement.tp,
        )
        folder = Path(tempfile.mkdtemp(prefix="fst-vllm-model-"))
        cleanup = functools.partial(shutil.rmtree, folder, ignore_errors=True)
        try:
            write_model_config(policy, folder)
            kwargs = llm_kwargs(
                cfg,
                folder,
                placement,
                sleep=sleep,
                max_model_len=int(max_len) if max_len else None,
                memory_utilization=float(os.environ.get("FST_VLLM_GPU_MEMORY_UTILIZATION", "0.3")),
            )
            # Every rank starts its engine here at the same time: vLLM's start-up agrees on
            # the free memory over all ranks (a collective).
            llm = cls._start_llm(vllm, kwargs)
            exchange = _group_exchange(placement) if placement.tp > 1 else None
            return cls(
                policy,
                tokenizer,
                stop_ids,
                llm,
                vllm.SamplingParams,
                sleep=sleep,
                sleep_level=1 if world.distributed else 2,
                dtype=getattr(torch, kwargs["dtype"]),
                tp_exchange=exchange,
                cleanup=cleanup,
            )
        except BaseException:
            cleanup()
            raise

    @staticmethod
    def _start_llm(vllm: ModuleType, kwargs: dict[str, Any]) -> Any:
        return vllm.LLM(**kwargs)

    # -- weights

    def _push_weights(self) -> list[str]:
        """Load the policy's current weights into vLLM, one decoder layer per call; returns
        the vLLM parameters no weight set (empty when the model does not report them)."""
        loaded: set[str] = set()
        reported = True
        for chunk in weight_chunks(policy_weights(self.policy, self.dtype)):
            for names in self.llm.apply_model(functools.partial(_load_weights, weights=chunk)):
                if names is None:
                    reported = False
                else:
                    loaded.update(names)
        missing: list[str] = []
        if reported:
            unset = self.llm.apply_model(functools.partial(_unset, loaded=frozenset(loaded)))
            missing = sorted({name for names in unset for name in names})
        # Cached prompt KV entries were computed by the old weights.
        self.llm.reset_prefix_cache()
        return missing

    def sync_weights(self) -> None:
        """Push the policy's current weights into vLLM. Under torchrun every rank calls this
        together (the push gathers sharded weights). With one process and level-2 sleep it is
        deferred to the next generate(), whose wake-up reloads the weights anyway."""
        if self._weights_asleep:
            if self.sleep_level == 2:
                return
            # Level 1: the push must happen now (it is a collective), into mapped memory.
            # Waking restores the old weights first: a host-to-device copy thrown away.
            self._wake_up("weights")
            self._weights_asleep = False
        self._push_weights()

    def _wake(self) -> None:
        # Weights first (level 2: loaded from the policy, their memory having been dropped),
        # then the KV cache: the two are never both allocated while the old weights reload.
        if self._weights_asleep:
            self._wake_up("weights")
            self._weights_asleep = False
            if self.sleep_level == 2:
                self._push_weights()
        if self._kv_asleep:
            self._wake_up("kv_cache")
            self._kv_asleep = False

    def _wake_up(self, tag: str) -> None:
        # PyTorch's caching allocator keeps the training step's freed blocks reserved, and
        # vLLM maps its memory outside that cache: hand the free blocks back to the driver
        # first, or the wake-up can run out of memory that the trainer no longer uses (TRL and
        # verl empty the cache at the same point).
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        self.llm.wake_up(tags=[tag])

    def _sleep_if_enabled(self) -> None:
        if self.sleep_between_calls and not (self._weights_asleep or self._kv_asleep):
            self.llm.sleep(level=self.sleep_level)
            self._weights_asleep = self._kv_asleep = True

    # -- sampling

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: Generators
    ) -> list[Rollout]:
        """One completion per prompt, with the sampler's per-token logprobs."""
        # Greedy decoding draws nothing from the generator, as in the HF engine.
        seeds: list[int | None]
        if params.greedy:
            seeds = [None] * len(prompts)
        elif isinstance(generator, torch.Generator):
            seeds = list(request_seeds(generator, len(prompts)))
        else:  # one generator per prompt: each request's seed from its own
            if len(generator) != len(prompts):
                raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts")
            seeds = [request_seeds(g, 1)[0] for g in generator]
        batch = [(list(p), s) for p, s in zip(prompts, seeds, strict=True)]
        mine = slice(0, len(batch))
        if self.tp_exchange is not None:
            # The engines of a tensor-parallel group run as one: each must be handed the same
            # requests. Pool the group's (seeds included), keep this rank's outputs.
            batches, index = self.tp_exchange(batch)
            mine = share_of([len(b) for b in batches], index)
            batch = [request for b in batches for request in b]
        if not batch:
            return []
        requests = [
            self.sampling_params_cls(**sampling_kwargs(params, self.stop_ids, s)) for _, s in batch
        ]
        self._wake()
        try:
            outputs = self.llm.generate(
                [{"prompt_token_ids": p} for p, _ in batch], requests, use_tqdm=False
            )
        finally:
            self._sleep_if_enabled()
        if len(outputs) != len(batch):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(batch)} prompts")
        return [
            to_rollout(p, o, self.stop_ids, self.tokenizer)
            for (p, _), o in zip(batch[mine], outputs[mine], strict=True)
        ]

    def close(self) -> None:
        """Free vLLM and its scratch folder (the process exiting does the same)."""
        self.llm = None
        if self._cleanup is not None:
            with contextlib.suppress(OSError):
                self._cleanup()
            self._cleanup = None
