"""A colocated vLLM rollout engine, for GPU pods (`rollout.engine: vllm`).

NOT RUN HERE: this project was developed on a CPU-only machine, where vLLM cannot run. The
code below is written against vLLM 0.33.0 (read from its released wheel); the unit tests
(tests/unit/test_vllm_engine.py) run without vLLM and cover the import guard, the mapping of
our SamplingParams to vLLM's, the conversion of vLLM's outputs to Rollouts, the weights handed
to vLLM (plain and LoRA-merged) and the engine's call sequence against a stand-in `LLM`.

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
  their Hugging Face names through `LLM.apply_model(model.load_weights(...))`; vLLM's model
  maps them to its fused layout (q/k/v -> qkv_proj, gate/up -> gate_up_proj). LoRA adapters
  are merged into the pushed weights (W + scale·BA) without touching the policy. The prefix
  cache is then dropped: its KV entries were computed by the old weights.
- *Sleep mode* (on by default): after each generate() vLLM's GPU memory (weights and KV cache)
  is released (`LLM.sleep(level=2)`) so the trainer's forward/backward has the GPU; the next
  generate() wakes the weights, reloads them from the policy, then wakes the KV cache. With
  sleep on, sync_weights() has nothing to do: every generate() loads the current policy.
- *Sampler logprobs.* Rollout.logprobs must be log-probs of the temperature-scaled distribution
  before top-p truncation (what CISPO's ratio compares against; see fst/rollout/__init__.py).
  vLLM returns, with `logprobs_mode="processed_logprobs"` (vLLM >= 0.10.2) and
  `SamplingParams(logprobs=0)`, the sampled token's log-prob after temperature AND after
  top-k/top-p (renormalised over the nucleus). With top_p = 1 that is exactly our quantity;
  with top_p < 1 it is not, so this engine refuses top_p < 1 (use `rollout.engine: hf`).
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

Tuning by environment (no config fields yet): FST_VLLM_GPU_MEMORY_UTILIZATION (fraction of
the GPU vLLM may take while awake, default 0.3; the policy, its gradients and AdamW state need
the rest), FST_VLLM_MAX_MODEL_LEN (default: the model's), FST_VLLM_SLEEP (1/0, default 1).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, runtime_checkable

import torch

from fst.config import ConfigError, RolloutConfig
from fst.rollout import Rollout, SamplingParams

if TYPE_CHECKING:
    from peft import PeftModel

    from fst.config import TrainConfig

log = logging.getLogger(__name__)

MIN_VLLM = "0.10.2"  # logprobs_mode="processed_logprobs" returns post-temperature logprobs
TARGET_VLLM = "0.33.0"  # the version this code was written against (not run: no GPU here)
INSTALL_HINT = "pip install 'fastslow[gpu]'"
SEED_BOUND = 2**31 - 1  # per-request seeds stay within a signed 32-bit int for any vLLM


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


def check_rollout_config(r: RolloutConfig) -> None:
    """Settings this engine cannot honour exactly are errors, not silent approximations."""
    if r.top_p < 1.0:
        raise ConfigError(
            f"rollout.topP: {r.top_p} is not supported with rollout.engine: vllm. vLLM's "
            "sampler logprobs are renormalised over the top-p nucleus, but the slow channel "
            "needs them under the whole temperature-scaled distribution (the one the trainer "
            "recomputes). Set rollout.topP: 1, or use rollout.engine: hf."
        )


# ----------------------------------------------------------------------------- pure mapping


def sampling_kwargs(
    params: SamplingParams, stop_ids: Sequence[int], seed: int | None
) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request.

    `seed` is the request's own seed (ignored for greedy decoding, which draws nothing).
    """
    if not params.greedy and params.top_p < 1.0:
        raise ValueError(
            f"top_p={params.top_p}: vLLM's logprobs would be of the top-p-truncated "
            "distribution; this engine supports top_p = 1 only (see check_rollout_config)"
        )
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


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as (Hugging Face checkpoint name, tensor), what vLLM's
    `model.load_weights` expects.

    Parameters rather than the state_dict: tied weights (lm_head = embed_tokens) come once,
    under the name vLLM loads them by. For a PEFT LoRA model, each adapted layer's weight is
    yielded merged (W + scale·B·A, computed here; the policy is not modified) under the base
    model's name, and the adapter tensors themselves are left out.
    """
    if not _is_peft(model):
        for name, p in model.named_parameters():
            yield name, p.detach()
        return
    base = model.get_base_model()  # the transformers model, LoRA layers injected in place
    modules = dict(base.named_modules())
    with torch.no_grad():
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
                        tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
            yield f"{owner}.{leaf}", tensor


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


def _load_weights(model: Any, weights: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Runs inside vLLM's worker (this process): load, and name vLLM parameters left unset."""
    with torch.no_grad():  # as vLLM's own loaders: plain in-place copies into its parameters
        loaded = model.load_weights(weights=weights)
    if loaded is None:  # models whose load_weights returns nothing cannot be checked
        return []
    return sorted({name for name, _ in model.named_parameters()} - set(loaded))


class VLLMRolloutEngine:
    """Samples with a colocated vLLM `LLM`; the weights are pushed from `policy`.

    Built by `from_config` on a GPU. The constructor takes the LLM object and vLLM's
    SamplingParams class, so the engine's own logic runs in tests with stand-ins.
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
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self.policy, self.tokenizer, self.stop_ids = policy, tokenizer, list(stop_ids)
        self.llm, self.sampling_params_cls = llm, sampling_params_cls
        self.sleep_between_calls = sleep
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        self._cleanup = cleanup
        self._asleep = False
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
        """Start vLLM for run `cfg` (rollout.engine: vllm) on the first visible GPU, which
        should be the policy's `model.device` (colocated: one GPU per trainer pod)."""
        check_rollout_config(cfg.rollout)
        # In-process engine core: weight syncs and apply_model share tensors with this
        # process instead of pickling them to a subprocess. Set before vLLM reads its env.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = import_vllm()
        sleep = os.environ.get("FST_VLLM_SLEEP", "1") != "0"
        max_len = os.environ.get("FST_VLLM_MAX_MODEL_LEN")
        log.info("starting vLLM %s (written against %s)", vllm.__version__, TARGET_VLLM)
        folder = Path(tempfile.mkdtemp(prefix="fst-vllm-model-"))
        cleanup = functools.partial(shutil.rmtree, folder, ignore_errors=True)
        try:
            write_model_config(policy, folder)
            llm = cls._start_llm(vllm, cfg, folder, sleep, int(max_len) if max_len else None)
            return cls(
                policy, tokenizer, stop_ids, llm, vllm.SamplingParams, sleep=sleep, cleanup=cleanup
            )
        except BaseException:
            cleanup()
            raise

    @staticmethod
    def _start_llm(
        vllm: ModuleType, cfg: TrainConfig, folder: Path, sleep: bool, max_len: int | None
    ) -> Any:
        return vllm.LLM(
            model=str(folder),
            load_format="dummy",  # the real weights are pushed from the policy
            skip_tokenizer_init=True,  # prompts are token ids; text is decoded by us
            generation_config="vllm",  # no model-side sampling defaults: ours are explicit
            dtype=cfg.model.dtype,
            seed=cfg.seed,
            max_num_seqs=cfg.rollout.batch_size,
            max_model_len=max_len,
            gpu_memory_utilization=float(os.environ.get("FST_VLLM_GPU_MEMORY_UTILIZATION", "0.3")),
            enable_sleep_mode=sleep,
            enable_prefix_caching=True,  # a problem's G rollouts share their prompt
            logprobs_mode="processed_logprobs",
        )

    # -- weights

    def _push_weights(self) -> list[str]:
        weights = list(policy_weights(self.policy))
        results = self.llm.apply_model(functools.partial(_load_weights, weights=weights))
        # Cached prompt KV entries were computed by the old weights.
        self.llm.reset_prefix_cache()
        return sorted({name for missing in results for name in missing or ()})

    def sync_weights(self) -> None:
        """Push the policy's current weights into vLLM (deferred to the next generate() while
        vLLM sleeps: waking it up reloads them anyway)."""
        if not self._asleep:
            self._push_weights()

    def _wake(self) -> None:
        if not self._asleep:
            return
        # Weights first, loaded from the policy (level-2 sleep discarded them), then the KV
        # cache: the two are never both allocated while the old weights are reloaded.
        self.llm.wake_up(tags=["weights"])
        self._push_weights()
        self.llm.wake_up(tags=["kv_cache"])
        self._asleep = False

    def _sleep_if_enabled(self) -> None:
        if self.sleep_between_calls and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True

    # -- sampling

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[Rollout]:
        """One completion per prompt, with the sampler's per-token logprobs."""
        if not prompts:
            return []
        # Greedy decoding draws nothing from the generator, as in the HF engine.
        seeds: list[int | None] = (
            [None] * len(prompts) if params.greedy else list(request_seeds(generator, len(prompts)))
        )
        requests = [
            self.sampling_params_cls(**sampling_kwargs(params, self.stop_ids, s)) for s in seeds
        ]
        self._wake()
        try:
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(p)} for p in prompts], requests, use_tqdm=False
            )
        finally:
            self._sleep_if_enabled()
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [
            to_rollout(p, o, self.stop_ids, self.tokenizer)
            for p, o in zip(prompts, outputs, strict=True)
        ]

    def close(self) -> None:
        """Free vLLM and its scratch folder (the process exiting does the same)."""
        self.llm = None
        if self._cleanup is not None:
            with contextlib.suppress(OSError):
                self._cleanup()
            self._cleanup = None
