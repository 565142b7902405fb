"""Fixed-shape decoding steps on preallocated KV buffers, replayed as CUDA graphs.

A step feeds the root plus a draft tree of fixed shape. Every tensor it touches has a
shape fixed by the tree and the buffers' capacity: the KV entries live in ``FixedCache``
buffers, the context length is a one-element device tensor, the 4D mask is built from it
on the device, verification and the compaction of the accepted path run on the device,
and the host reads one packed tensor (the step's one sync). So on CUDA each tree's step is
captured once per model and capacity (``torch.cuda.CUDAGraph``) and replayed at any
context length: one launch instead of the hundreds of kernel launches that bound a small
model's step. Elsewhere the same step runs eagerly (the tests check it equals the growing
cache's step token for token).

With ``compile`` the step's device work is compiled by ``torch.compile`` (static shapes:
one compilation per tree and buffer size, on the shape's ``COMPILE_AFTER``-th step, at most
``MAX_COMPILED`` per model; on CUDA the compiled step is then captured and replayed as above). Compiled steps give the same tokens
as eager ones (tests on CPU, inductor); a step that fails to compile runs eagerly from then
on, with the reason in ``describe()``.

Greedy decoding only: sampling draws from a ``torch.Generator`` per step and runs eagerly.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from msn.decoding import cache as kv
from msn.decoding.step import fixed_device_step
from msn.decoding.tree import CompiledTree, compiled_on

MIN_CAPACITY = 256         # positions; buffers are the next power of two past a request's need
KEEP_BUCKETS = 6           # buffer sizes (each with its captured trees) kept per model, least recently used
                           # dropped: a request grows through several (256 ... 8192), all kept together
                           # take under twice the largest
MAX_SHAPES = 64            # trees captured per model and capacity; others run eagerly on the same buffers
STEP_ROOM = 128            # room past the context for one step's inputs (the reference tree has 69)
MAX_COMPILED = 16          # step shapes compiled per model (tree x buffer size); others run eagerly
COMPILE_AFTER = 3          # a shape is compiled (and, compiled, captured) on its third step: a shape
                           # ``--tree auto`` tries once, or explores, never pays a compilation

log = logging.getLogger("msn")


@dataclass
class _Buffers:
    """KV buffers of one capacity, the step's device scalars, and the trees captured on them."""

    cache: kv.FixedCache
    ctx: torch.Tensor                    # (1,) the context length
    slots: torch.Tensor                  # (capacity,) 0..capacity-1
    pool: object                         # the CUDA graphs' memory pool (None when not capturing)
    shapes: dict                         # tree paths -> _Shape


@dataclass
class _Shape:
    """One tree's static inputs, and its captured step once it is captured."""

    tree: CompiledTree
    ids: torch.Tensor                    # (n,) root then drafts
    moves: bool                          # whether keeping a path moves entries (not a chain)
    graph: object = None
    outputs: tuple = field(default_factory=tuple)
    compiled: bool = False               # whether its compiled step has run (compiled once)
    uses: int = 0                        # steps run with this shape


def capacity_for(need: int, limit: int | None, start: int = MIN_CAPACITY) -> int:
    """Positions of buffers for ``need``: ``start`` doubled until it fits, cut to the model's
    positions plus one step's room."""
    size = start
    while size < need:
        size *= 2
    if limit is not None:
        size = max(min(size, limit + STEP_ROOM), need)
    return size


class StaticSteps:
    """Fixed-shape steps of one model: its KV buffers and its captured trees.

    Use: ``begin`` with a prefilled one-row cache, then ``step`` / ``advance`` per step.
    One generation at a time (``lock``); a second concurrent one decodes eagerly.

    Buffers come in powers of two (``MIN_CAPACITY`` and up): attention reads every slot of
    the buffers, so a request starts in the smallest that holds its prompt and one step, and
    moves into the next size when it fills (one copy of its entries). Each size keeps its
    captured trees, so later requests replay at every size they pass through.
    """

    def __init__(self, model, capture: bool, min_capacity: int = MIN_CAPACITY, compiled: bool = False):
        self.capture = capture
        self.compiled = compiled
        self.compile_error: str | None = None     # why compilation was given up (eager from then on)
        self.compiles = 0
        self.compile_s = 0.0
        self.min_capacity = min_capacity
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.buf: _Buffers | None = None     # the buffers in use (the most recent of ``buckets``)
        self.buckets: collections.OrderedDict[int, _Buffers] = collections.OrderedDict()
        self.length = 0
        self.max_position: int | None = None
        self.lock = threading.Lock()
        self.error: str | None = None     # why capture was given up (the steps then run eagerly)
        self.captures = 0
        self.replays = 0

    def describe(self) -> dict:
        return {"graphs": bool(self.capture and self.error is None), "captured_trees": self.captures,
                "replays": self.replays, "capacity": self.buf.cache.capacity if self.buf is not None else 0,
                **({"graph_error": self.error} if self.error else {}),
                **({"compiled": self.compile_error is None, "compiled_shapes": self.compiles,
                    "compile_s": round(self.compile_s, 2)} if self.compiled else {}),
                **({"compile_error": self.compile_error} if self.compile_error else {})}

    @torch.inference_mode()
    def begin(self, prefilled, need: int, max_position: int | None) -> None:
        """Loads a prefilled one-row cache into the buffers of the smallest size that holds
        ``need`` positions (made on first use; all dropped if the model's layout changed)."""
        if max_position != self.max_position or (self.buf is not None and not kv.fits(self.buf.cache, prefilled)):
            self.buckets.clear()
            self.max_position = max_position
        self._use(prefilled, capacity_for(need, max_position, self.min_capacity))
        self.length = kv.load_prefix(self.buf.cache, prefilled)

    def _use(self, like, capacity: int) -> None:
        buf = self.buckets.pop(capacity, None)
        if buf is None:
            while len(self.buckets) >= KEEP_BUCKETS:
                self.buckets.popitem(last=False)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            buf = _Buffers(cache=kv.fixed_like(like, capacity),
                           ctx=torch.zeros(1, dtype=torch.long, device=self.device),
                           slots=torch.arange(capacity, device=self.device),
                           pool=torch.cuda.graph_pool_handle() if self.capture else None, shapes={})
        self.buckets[capacity] = buf         # most recently used last
        self.buf = buf

    def advance(self, kept: int) -> None:
        """``kept`` entries of the last step (root and accepted drafts) become context."""
        self.length += kept
        kv.set_length(self.buf.cache, self.length)

    @torch.inference_mode()
    def step(self, model, root: int, paths: tuple, cand: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of ``model`` on ``root`` plus the tree ``paths`` drafted from ``cand``; returns
        (packed verdict and predictions for the host, logits, predictions) on the device. A
        replayed step returns its graph's output tensors: valid until that tree's next step."""
        n = len(paths) + 1
        if self.length + n > self.buf.cache.capacity:
            self._grow(self.length + n + STEP_ROOM)
        shape = self.buf.shapes.get(paths) or self._shape(paths)
        shape.uses += 1
        self.buf.ctx.fill_(self.length)
        shape.ids[:1].fill_(root)
        if n > 1:
            shape.ids[1:].copy_(cand[shape.tree.node_pos, shape.tree.node_col])
        if shape.graph is not None:
            shape.graph.replay()
            self.replays += 1
            return shape.outputs
        # A shape that will be compiled is captured once compiled, not before (its eager graph would stay).
        ready = not self._compiles(shape) or shape.uses >= COMPILE_AFTER
        if self.capture and self.error is None and len(self.buf.shapes) <= MAX_SHAPES and ready:
            out = self._capture(model, shape)
            if out is not None:
                return out
        return self._run(model, shape)

    def _shape(self, paths: tuple) -> _Shape:
        tree = compiled_on(paths, str(self.device))
        host = compiled_on(paths, "cpu")
        n = tree.num_inputs
        shape = _Shape(tree=tree, ids=torch.zeros(n, dtype=torch.long, device=self.device),
                       moves=not (host.leaf_paths.shape[0] == 1 and int(host.leaf_len[0]) == n - 1))
        self.buf.shapes[paths] = shape
        return shape

    def _grow(self, need: int) -> None:
        old, length = self.buf.cache, self.length
        view = kv.FixedCache([kv.FixedLayer(layer.keys[..., :length, :], layer.values[..., :length, :])
                              for layer in old.layers])
        for layer in view.layers:
            layer.length = length
        self._use(view, capacity_for(need, self.max_position, self.min_capacity))
        self.length = kv.load_prefix(self.buf.cache, view)

    def _run(self, model, shape: _Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's device work: compiled where asked and possible, else eager."""
        if not self._compiles(shape) or shape.uses < COMPILE_AFTER:
            return self._body(model, shape)
        first = not shape.compiled
        t0 = time.perf_counter()
        try:
            out = _compiled_body()(self, model, shape, False, kv.cache_kwargs(model, self.buf.cache))
        except Exception as e:      # noqa: BLE001 - a model or op inductor cannot compile: eager from here on
            self.compile_error = _reason(e)
            log.warning("msn: compiling the decoding step failed (%s); steps run eagerly", self.compile_error)
            return self._body(model, shape)
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            shape.compiled = True
            self.compiles += 1
            self.compile_s += seconds
            log.info("msn: compiled the step of %d inputs on %d-position buffers in %.1f s (%d of at most %d)",
                     shape.tree.num_inputs, self.buf.cache.capacity, seconds, self.compiles, MAX_COMPILED)
        return out

    def _compiles(self, shape: _Shape) -> bool:
        """Whether this shape's step is (or will be, once hot) compiled."""
        return self.compiled and self.compile_error is None and (shape.compiled or self.compiles < MAX_COMPILED)

    def _body(self, model, shape: _Shape, kernels: bool = True, cache_kwargs: dict | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's device work; no host sync, no allocation that depends on the context.
        ``kernels``: the CPU kernels of ``cpu.masked_forward`` (module swaps, which a compiled
        step leaves to inductor); ``cache_kwargs``: ``kv.cache_kwargs`` of the buffers, made
        outside a compiled step (it looks the keyword up in a cache dynamo would trace through)."""
        return fixed_device_step(model, self.buf.cache, self.buf.ctx, self.buf.slots, shape.tree, shape.ids,
                                 shape.moves, self.max_position, kernels=kernels, cache_kwargs=cache_kwargs)

    def _capture(self, model, shape: _Shape):
        """Runs the step once on a side stream (its result is this step's), then captures it.
        Returns None, and gives capture up for this model, when the forward cannot be captured."""
        try:
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                out = self._run(model, shape)     # compiles here, outside the capture, when compiled
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.buf.pool):
                outputs = self._run(model, shape)
            shape.graph, shape.outputs = graph, outputs
            self.captures += 1
            return out
        except Exception as e:      # an attention or model that will not capture: eager from here on
            self.error = _reason(e)
            shape.graph = None
            torch.cuda.synchronize(self.device)
            return None


def _reason(e: Exception) -> str:
    """Why capture or compilation was given up, in one line for ``describe()``."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


_COMPILED = None
_COMPILE_LOCK = threading.Lock()


def _compiled_body():
    """``StaticSteps._body`` compiled with static shapes (made once; dynamo keeps one graph
    per step shape, so its recompile limit is raised to what ``MAX_COMPILED`` allows)."""
    global _COMPILED
    with _COMPILE_LOCK:
        if _COMPILED is None:
            import torch._dynamo

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 4 * MAX_COMPILED))
                    break
            _COMPILED = torch.compile(StaticSteps._body, dynamic=False)
        return _COMPILED


_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STEPS_LOCK = threading.Lock()


def wanted(graphs: str, device: torch.device, sampling: bool) -> bool:
    """Whether a generation captures its fixed-shape steps: ``on`` and ``auto`` on CUDA, greedy only."""
    return graphs != "off" and device.type == "cuda" and not sampling


def compiles(compile: str, device: torch.device, sampling: bool) -> bool:
    """Whether a generation compiles its fixed-shape steps: ``auto`` on CUDA, ``on`` anywhere, greedy only."""
    return not sampling and (compile == "on" or (compile == "auto" and device.type == "cuda"))


def steps_for(model, capture: bool = True, compiled: bool = False) -> StaticSteps:
    """The model's ``StaticSteps`` of that kind (kept while the model lives)."""
    with _STEPS_LOCK:
        kinds = _STEPS.setdefault(model, {})
        if (capture, compiled) not in kinds:
            kinds[(capture, compiled)] = StaticSteps(model, capture=capture, compiled=compiled)
        return kinds[(capture, compiled)]
