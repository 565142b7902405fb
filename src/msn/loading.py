"""Loading checkpoints, with one clear error for a wrong path."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from msn.errors import MsnError


def load_tokenizer(path: str):
    """The tokenizer of a checkpoint folder or hub id; an adapter folder without one has its base's."""
    from transformers import AutoTokenizer

    from msn.adapter import base_of, is_adapter_folder

    if is_adapter_folder(path) and not (Path(path) / "tokenizer_config.json").exists():
        path = base_of(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MsnError(f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection quickly."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _corrupt_weights(path: str) -> str | None:
    """The first ``*.safetensors`` file of a checkpoint folder that cannot be opened, with why."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                st.keys()
        except Exception as e:      # safetensors raises its own error type for truncated or corrupt files
            return f"{f} is truncated or corrupt ({str(e).splitlines()[0]})"
    return None


def load_model(path: str, dtype=None, **kwargs):
    """Loads a causal LM, turning a wrong path, an unreachable hub or a corrupt file into one clear error.
    An adapter folder (peft's ``adapter_config.json``, no ``config.json``) loads as its base with the
    adapter merged."""
    from transformers import AutoModelForCausalLM

    from msn.adapter import is_adapter_folder

    local = os.path.isdir(path)
    if local and is_adapter_folder(path):
        return merged_model(path, dtype=dtype, **kwargs)
    if not local and (path.startswith((os.sep, ".", "~")) or os.path.exists(path)):
        raise MsnError(f"model path {path} does not exist or is not a folder; run `msn fetch` or give a checkpoint folder")
    if not local and not _hub_reachable():
        from huggingface_hub import snapshot_download

        try:        # a hub id already in the local Hugging Face cache loads without the network
            path, local = snapshot_download(path, local_files_only=True), True
        except Exception:       # not cached (huggingface_hub raises its own error types)
            raise MsnError(f"model {path!r} is not a local folder, not in the Hugging Face cache, and the hub "
                           "cannot be reached; give a checkpoint folder (`msn fetch smollm2-135m-instruct` "
                           "prints one)") from None
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except Exception as e:
        bad = _corrupt_weights(path) if local else None      # safetensors raises its own error type
        if bad:
            raise MsnError(f"cannot load model {path!r}: {bad}; save or copy the checkpoint again") from None
        if not isinstance(e, (OSError, ValueError)):
            raise
        where = "" if local else " (not a local folder, and not loadable from the hub; `msn fetch` prints a folder)"
        raise MsnError(f"cannot load model {path!r}{where}: {str(e).splitlines()[0]}") from None


def resolve_device(device: str | None):
    """``auto`` (or None): CUDA when available, else CPU."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MsnError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MsnError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}); "
                           "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MsnError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise MsnError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    return dev


def resolve_dtype(dtype: str | None, device):
    """``auto``: float32 on CPU, bfloat16 on CUDA."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise MsnError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return table[dtype]


def load_for_inference(path: str, device: str | None = "auto", dtype: str | None = "auto"):
    """(model, tokenizer) in eval mode with sdpa attention (eager where transformers has no
    sdpa for the architecture: Gemma 2, gpt-oss) on the chosen device."""
    dev = resolve_device(device)
    try:
        model = load_model(path, dtype=resolve_dtype(dtype, dev), attn_implementation="sdpa")
    except MsnError as e:
        if "scaled_dot_product_attention" not in str(e):
            raise
        model = load_model(path, dtype=resolve_dtype(dtype, dev), attn_implementation="eager")
    tokenizer = load_tokenizer(path)
    return model.to(dev).eval(), tokenizer


def merged_model(path: str | os.PathLike, dtype=None, base: str | None = None, **kwargs):
    """The model of an adapter folder: its base (``base``, else the one it names) with the adapter
    merged in float32, then cast to ``dtype``."""
    import torch
    from peft import PeftModel

    from safetensors import SafetensorError

    from msn.adapter import ADAPTER_WEIGHTS, base_of

    model = load_model(base or base_of(path), dtype=torch.float32, **kwargs)
    try:
        with warnings.catch_warnings():     # the tied-embedding warning: merging keeps the tie
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MsnError(f"cannot apply the adapter {path}: {first} (is {ADAPTER_WEIGHTS} complete?)") from None
    return model.to(dtype) if dtype is not None else model
