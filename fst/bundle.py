"""A promoted stage's bundle: what a server needs, weights AND the prompt they are served with.

FST adapts two things, the weights and the system prompt: a model served without its prompt
loses what the fast channel learned. A bundle keeps them together, next to the run's
checkpoints, in the same store (a local folder or S3) and with the same commit protocol:

    <checkpoints>/bundle/step-<N>/config.json, model.safetensors, generation_config.json
                                  tokenizer.json, tokenizer_config.json, chat_template.jinja...
                                  (the Hugging Face model folder: merged when the run was LoRA)
                                  system_prompt.txt    the system prompt to serve it with
                                  fastslow.json        lineage: base model, earlier stages,
                                                       data versions, config digest, gate, KL
                                  manifest.json        written LAST: every file's size, sha256

so `AutoModelForCausalLM.from_pretrained(<bundle>)` and `vllm serve <bundle>` load it (they
ignore the extra files), and a bundle is listed only once complete. Torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from fst.store.checkpoints import open_store, split_checkpoint_uri
from fst.store.layout import MANIFEST, CheckpointError, step_name, verify_folder

BUNDLE_STORE = "bundle"  # below the run's checkpoint store
PROMPT_FILE = "system_prompt.txt"
LINEAGE_FILE = "fastslow.json"
MODEL_DIR = "model"  # in a checkpoint: the loadable Hugging Face folder


def bundle_uri_of(checkpoint_uri: str) -> str:
    """The bundle of the checkpoint `.../checkpoints/step-N`: `.../checkpoints/bundle/step-N`."""
    store, step = split_checkpoint_uri(checkpoint_uri)
    if step is None:
        raise CheckpointError(f"{checkpoint_uri}: not the URI of one checkpoint (…/step-N)")
    return f"{store}/{BUNDLE_STORE}/{step_name(step)}"


def publish_bundle(
    checkpoint_uri: str, checkpoint_folder: Path, prompt: str, lineage: dict[str, Any]
) -> str:
    """Publish the bundle of a checkpoint (its local copy `checkpoint_folder`) with `prompt`
    and `lineage`; returns its URI. Idempotent: a bundle already complete is kept as is."""
    uri = bundle_uri_of(checkpoint_uri)
    store_uri, step = split_checkpoint_uri(uri)
    assert step is not None
    store = open_store(store_uri)
    if step in store.steps():
        return uri
    model = checkpoint_folder / MODEL_DIR
    if not (model / "config.json").is_file():
        raise CheckpointError(f"{checkpoint_uri}: its checkpoint has no model/ to bundle")
    staging = store.staging_dir()
    try:
        for f in sorted(model.iterdir()):
            if f.is_file():
                _link_or_copy(f, staging / f.name)
        (staging / PROMPT_FILE).write_text(prompt)
        (staging / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True) + "\n")
        store.commit(step, staging, {"kind": "fastslow-bundle"})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return uri


def fetch_bundle(uri: str) -> Path:
    """A local, verified copy of the bundle at `uri` (downloaded into the cache if remote), or
    the folder itself when `uri` is a bundle's folder copied elsewhere (checked if it kept its
    manifest)."""
    store_uri, step = split_checkpoint_uri(uri)
    if not uri.startswith("s3://") and (Path(uri) / LINEAGE_FILE).is_file():
        folder = Path(uri)
        if (folder / MANIFEST).is_file():
            verify_folder(folder, json.loads((folder / MANIFEST).read_text()), hashes=True)
    elif step is None:
        raise CheckpointError(f"{uri}: not a bundle (…/bundle/step-N, or a bundle's folder)")
    else:
        folder = open_store(store_uri).materialize(step)
    for name in (PROMPT_FILE, LINEAGE_FILE, "config.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{uri}: not a bundle: no {name}")
    return folder


def read_bundle(uri: str) -> tuple[Path, str, dict[str, Any]]:
    """(local folder, system prompt, lineage) of the bundle at `uri`."""
    folder = fetch_bundle(uri)
    lineage: dict[str, Any] = json.loads((folder / LINEAGE_FILE).read_text())
    return folder, (folder / PROMPT_FILE).read_text(), lineage


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link where the staging folder shares the checkpoint's disk (no 500 MB copy):
    the stores never modify a committed file, they replace whole folders."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
