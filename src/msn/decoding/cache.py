"""The only module that touches KV-cache internals.

Everything else asks for a fresh cache, its length, or that a tree step's entries be
reduced to the accepted path. Public cache API is used where it exists (``crop`` with
a negative count, ``get_seq_length``); the path compaction writes the kept entries of
each layer's key/value tensors in place, which transformers has no public call for.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose ``keys``/``values`` are views into buffers with
    spare room, which grow by half when full.

    ``DynamicLayer`` concatenates on every update, re-allocating and copying the whole
    layer each step; here an append writes only the new entries, and dropping entries
    (``crop``) only shortens the views: the copy grows with the context, the append does not
    (figures: ``docs/results/cpu-kernels.md``).
    """

    starts: torch.Tensor | None = None    # (B,): a batched step writes row r's entries from starts[r] (``rows_at``)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self._len = 0

    def _views(self) -> None:
        self.keys = self._k[..., : self._len, :]
        self.values = self._v[..., : self._len, :]

    def _reserve(self, need: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        room = 0 if self._k is None else self._k.shape[-2]
        if need <= room:
            return
        size = need + max(256, need // 2)
        # Zeros, not garbage: a batch row's attention reads (masked) entries it never wrote.
        k = key_like.new_zeros((*key_like.shape[:-2], size, key_like.shape[-1]))
        v = value_like.new_zeros((*value_like.shape[:-2], size, value_like.shape[-1]))
        if self._len:
            k[..., : self._len, :] = self._k[..., : self._len, :]
            v[..., : self._len, :] = self._v[..., : self._len, :]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(self._len + n, key_states, value_states)
        if self.starts is None:
            self._k[..., self._len : self._len + n, :] = key_states
            self._v[..., self._len : self._len + n, :] = value_states
        else:
            at = (self.starts[:, None] + torch.arange(n, device=self.starts.device))[:, None, :, None]
            self._k.scatter_(2, at.expand(key_states.shape), key_states)
            self._v.scatter_(2, at.expand(value_states.shape), value_states)
        self._len += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("GrowingLayer.crop takes a negative count (entries to drop from the end)")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._len = max(0, self._len + tokens_to_remove)
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def assemble(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Makes the (H, T_r, D) keys/values of ``rows`` the layer's batch, row r's entries
        at [0, T_r) and zeros after them."""
        length = max(k.shape[-2] for k, _ in rows)
        k0, v0 = rows[0]
        size = length + max(256, length // 2)
        keys = k0.new_zeros((len(rows), *k0.shape[:-2], size, k0.shape[-1]))
        values = v0.new_zeros((len(rows), *v0.shape[:-2], size, v0.shape[-1]))
        for r, (k, v) in enumerate(rows):
            keys[r, ..., : k.shape[-2], :], values[r, ..., : v.shape[-2], :] = k, v
        self._k, self._v, self._len = keys, values, length
        self._views()


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` made of ``GrowingLayer`` s (full attention in every layer)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


class FixedLayer(DynamicLayer):
    """A layer of preallocated (1, H, capacity, D) key/value buffers, for fixed-shape steps.

    An update writes the step's entries at the positions of the device tensor
    ``write_at`` (set by ``writing_at``) and returns the whole buffers: attention reads
    every slot and the step's mask hides the unused ones. Nothing reads a device value on
    the host and nothing is allocated, so a forward through it can be captured as a CUDA
    graph and replayed at any context length. ``length`` is the host's count of valid
    entries (what ``get_seq_length`` reports).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True
        self.length = 0
        self.write_at: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.write_at, key_states)
        self.values.index_copy_(2, self.write_at, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a FixedLayer keeps its entries in place; set its length instead")


class FixedCache(Cache):
    """One ``FixedLayer`` per model layer, all of one capacity."""

    def __init__(self, layers: list[FixedLayer]):
        super().__init__(layers=layers)

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[-2]


def fixed_like(cache, capacity: int) -> FixedCache:
    """Empty fixed buffers of ``capacity`` positions shaped like the layers of a filled one-row ``cache``."""
    layers = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        layers.append(FixedLayer(k.new_zeros((*k.shape[:-2], capacity, k.shape[-1])),
                                 v.new_zeros((*v.shape[:-2], capacity, v.shape[-1]))))
    return FixedCache(layers)


def fits(fixed: FixedCache, cache) -> bool:
    """Whether ``fixed``'s buffers have the layer count, heads, width and dtype of ``cache``'s layers."""
    if len(fixed.layers) != len(cache.layers):
        return False
    for a, b in zip(fixed.layers, cache.layers):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            if x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1] or x.dtype != y.dtype:
                return False
    return True


def load_prefix(fixed: FixedCache, cache) -> int:
    """Copies every entry of the one-row ``cache`` (a prefill) to the front of ``fixed``; returns its length."""
    length = cache_length(cache)
    for a, b in zip(fixed.layers, cache.layers):
        a.keys[..., :length, :] = b.keys
        a.values[..., :length, :] = b.values
        a.length = length
    return length


def set_length(fixed: FixedCache, length: int) -> None:
    for layer in fixed.layers:
        layer.length = length


@contextlib.contextmanager
def writing_at(fixed: FixedCache, positions: torch.Tensor):
    """Within the block, a forward writes its inputs' entries at ``positions`` ((N,) long, on the device)."""
    for layer in fixed.layers:
        layer.write_at = positions
    try:
        yield
    finally:
        for layer in fixed.layers:
            layer.write_at = None


def move_entries(fixed: FixedCache, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Entries at positions ``src`` are copied to ``dst`` ((M,) long device tensors) in every
    layer: all read before any is written, with no host sync (a tree step keeping its path)."""
    for layer in fixed.layers:
        for t in (layer.keys, layer.values):
            t.index_copy_(2, dst, t.index_select(2, src))


def new_cache(model) -> DynamicCache:
    """An empty cache with full (not sliding) layers for every model.

    Tree steps append more entries than they keep; sliding layers refuse to roll back
    past their window. Full layers are exact here because the engine refuses requests
    longer than a model's sliding window.
    """
    return GrowingCache()


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes of the entries held, bytes allocated) over every layer's keys and values."""
    live = allocated = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if t is None:
                continue
            live += t.numel() * t.element_size()
            buf = getattr(layer, "_k" if name == "keys" else "_v", None)
            allocated += (buf if buf is not None else t).numel() * t.element_size()
    return live, allocated


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


# Batches. Rows of a batch share one cache; row r's entries are positions [0, lengths[r])
# (left-aligned, each row prefilled alone). A batched step writes row r's N inputs at
# [lengths[r], lengths[r] + N) (``rows_at``), so that every row's entries stay contiguous;
# entries beyond a row's own are stale (or zero) and hidden by the step's mask. The cache's
# length is the longest row's.


def _layer_tensors(cache):
    for layer in cache.layers:
        for name in ("keys", "values"):
            yield layer, name, getattr(layer, name)


def crop_to(cache, length: int) -> None:
    """Drops every entry at or after ``length`` (all rows)."""
    extra = cache_length(cache) - length
    if extra > 0:
        cache.crop(-extra)


def merge_rows(batch, singles: list, order: list[int]):
    """One batch cache of the rows of ``batch`` (None: no rows yet) followed by the one-row
    caches ``singles``, arranged so that its row i is row ``order[i]`` of that sequence.
    Every entry is copied once; positions past a row's own length are zero (stale entries,
    hidden by the step's mask). Returns the batch cache."""
    sources = [(batch, i) for i in range(batch.layers[0].keys.shape[0])] if batch is not None else []
    sources += [(c, 0) for c in singles]
    picked = [sources[i] for i in order]
    target = batch if batch is not None else singles[0]
    for index, layer in enumerate(target.layers):
        layer.assemble([(c.layers[index].keys[r], c.layers[index].values[r]) for c, r in picked])
    return target


def select_rows(cache, rows: list[int], length: int) -> None:
    """Keeps only batch rows ``rows`` (in that order) and entries before ``length``."""
    cache.batch_select_indices(torch.tensor(rows, device=next(_layer_tensors(cache))[2].device))
    crop_to(cache, length)


@contextlib.contextmanager
def rows_at(cache, lengths: torch.Tensor):
    """Within the block, a forward writes batch row r's new entries from position
    ``lengths[r]`` (a (B,) tensor on the cache's device) instead of after the longest row."""
    layers = list(cache.layers)
    for layer in layers:
        layer.starts = lengths
    try:
        yield
    finally:
        for layer in layers:
            layer.starts = None


def keep_paths(cache, lengths: list[int], keeps: list[list[int]]) -> None:
    """After a batched step (``rows_at``) that wrote row r's inputs from ``lengths[r]``,
    row r keeps its inputs ``keeps[r]`` (ascending, starting with 0, relative to its first
    input), packed from ``lengths[r]`` onwards; the cache is then cut to the longest row.

    Nothing moves when every row keeps a prefix of its inputs (a chain, or the root alone);
    otherwise one gather and one scatter per key/value tensor, whatever the batch size.
    """
    end = max(start + len(keep) for start, keep in zip(lengths, keeps))
    if all(keep == list(range(len(keep))) for keep in keeps):
        crop_to(cache, end)
        return
    width = max(len(k) for k in keeps)
    src = torch.tensor(lengths, dtype=torch.long)[:, None].repeat(1, width)
    dst = src.clone()       # padding copies a row's first kept entry onto itself
    for r, (start, keep) in enumerate(zip(lengths, keeps)):
        src[r, : len(keep)] = start + torch.tensor(keep, dtype=torch.long)
        dst[r, : len(keep)] = start + torch.arange(len(keep))
    moved = {}
    for layer, name, t in _layer_tensors(cache):
        key = t.device
        if key not in moved:
            moved[key] = (src.to(t.device), dst.to(t.device))
        s, d = moved[key]
        shape = (t.shape[0], t.shape[1], width, t.shape[3])
        vals = t.gather(2, s[:, None, :, None].expand(shape))
        t.scatter_(2, d[:, None, :, None].expand(shape), vals)
    crop_to(cache, end)


@functools.lru_cache(maxsize=64)
def _cache_arg(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """The keyword that passes ``cache`` to ``model.forward``: ``cache`` in transformers
    versions that renamed it, ``past_key_values`` before."""
    return {_cache_arg(type(model)): cache, "use_cache": True}
