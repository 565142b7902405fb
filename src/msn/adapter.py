"""Adapter folders: what makes a folder a peft LoRA adapter, and the base model it names.

Exporting adapters is ``msn.adapter_export``; loading one merged is ``msn.loading.merged_model``
(msn always merges: unmerged, peft would add a tied embedding's pair to the input side only).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from msn.errors import MsnError

log = logging.getLogger("msn.adapter")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT = "export_report.json"


def is_adapter_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def base_of(path: str | os.PathLike) -> str:
    """The base checkpoint an adapter folder names, resolved: a folder (absolute, or relative to the
    adapter), a model ``msn fetch`` knows (fetched once) or a hub id."""
    try:
        ref = json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise MsnError(f"{path}: {ADAPTER_CONFIG} is unreadable or names no base model ({e})") from None
    if not ref:
        raise MsnError(f"{path}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    for candidate in (Path(ref).expanduser(), Path(path) / ref):
        if candidate.is_dir():
            return str(candidate)
    return resolve(ref)


def resolve(ref: str) -> str:
    """A model reference as a loadable one: a base model ``msn fetch`` knows becomes its folder
    (fetched once); anything else (a folder, a hub id) stays as it is."""
    from msn.models import KNOWN_MODELS, fetch_model

    if not os.path.isdir(ref) and ref.lower() in KNOWN_MODELS:
        return str(fetch_model(ref, log=lambda m: log.info(m)))
    return ref


