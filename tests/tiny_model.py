"""A whole training run in seconds: a tiny random Llama with a character-level chat tokenizer,
saved as an ordinary transformers model folder, so `model.name: <folder>` goes through the
same loading, training, checkpoint and resume code as SmolLM2.

A random model almost never solves a task, and without reward variance nothing is trained;
`varied_reward` replaces the arithmetic task's scorer with a deterministic reward that varies
with the completion's text, so every step updates the weights.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer() -> Any:
    """One token per printable ASCII character, SmolLM2's chat markers as special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        chat_template=CHAT_TEMPLATE,
    )


def write_tiny_model(folder: Path) -> Path:
    """Save a tiny random Llama (tied embeddings, like SmolLM2) and its tokenizer in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def one_torch_thread():
    """torch on one thread while the test runs: the tiny model's matrices are so small that a
    second thread only adds synchronisation (20x slower on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def varied_score(self: Any, problem: Any, completion: str) -> Any:
    """Arithmetic rewards from the completion's characters: 1 when the sum of their codes is
    even. Deterministic (a resumed run scores exactly as the original) and varied."""
    from fst.tasks import Score

    reward = float(sum(map(ord, completion)) % 2 == 0)
    return Score(reward, "even" if reward else "odd")


@pytest.fixture
def varied_reward(monkeypatch):
    """The arithmetic task scored by `varied_score` while the test runs (in this process; a
    subprocess runs `python -m tests.varied_fst`)."""
    from fst.tasks.arithmetic import ArithmeticTask

    monkeypatch.setattr(ArithmeticTask, "score", varied_score)


def tiny_run_config(tmp_path: Path, model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """tests.conftest.tiny_config on the tiny model: a few steps take seconds."""
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, **{"model.name": str(model_dir), **overrides})
    cfg["rollout"]["maxNewTokens"] = 6
    cfg["slow"]["lr"] = 1e-2  # the random model moves visibly
    return cfg
