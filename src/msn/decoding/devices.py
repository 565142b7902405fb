"""Where a model runs: its device, its positions and vocabulary, and waiting for the device."""

from __future__ import annotations

import torch


def sync_device(device: torch.device) -> None:
    """Waits until ``device`` has run everything queued (a timing's edges; nothing on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def model_device(model) -> torch.device:
    """The device of the model's first parameter (msn runs a model on one device)."""
    return next(model.parameters()).device


def vocab_size(model) -> int | None:
    """Rows of the input embedding (the ids a prompt may hold), else the config's; None if unknown."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(emb, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    return int(size) if size else None


def context_limit(model) -> int | None:
    """The model's positions (the first of its config's usual names), None if it has no limit."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
