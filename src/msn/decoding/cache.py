"""The only module that touches KV-cache internals.

Everything else asks for a fresh cache, its length, or that a tree step's entries be
reduced to the accepted path. Public cache API is used where it exists (``crop`` with
a negative count, ``get_seq_length``); the path compaction writes the kept entries of
each layer's key/value tensors in place, which transformers has no public call for.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache


def new_cache(model) -> DynamicCache:
    """An empty dynamic cache with full (not sliding) layers for every model.

    Tree steps append more entries than they keep; sliding layers refuse to roll back
    past their window. Full layers are exact here because the engine refuses requests
    longer than a model's sliding window.
    """
    return DynamicCache()


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def keep_path(cache, keep: list[int], appended: int) -> None:
    """After a step that appended ``appended`` entries, keeps only the appended entries
    ``keep`` (ascending, starting with 0, relative to the first appended entry), packed
    at the front of the appended block, and drops the rest.

    Offsets are taken per layer from the end of its stored tensors, so layers that store
    fewer past entries (sliding windows) are handled alike.
    """
    contiguous = keep == list(range(len(keep)))
    if not contiguous:
        rel = torch.tensor(keep)
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                start = t.shape[-2] - appended
                t[..., start : start + len(keep), :] = t.index_select(-2, (rel + start).to(t.device))
    drop = appended - len(keep)
    if drop > 0:
        cache.crop(-drop)


@functools.lru_cache(maxsize=64)
def _cache_arg(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """The keyword that passes ``cache`` to ``model.forward``: ``cache`` in transformers
    versions that renamed it, ``past_key_values`` before."""
    return {_cache_arg(type(model)): cache, "use_cache": True}
