"""CPU fast paths for the multi-input forwards of a decoding step (a tree, or a batch).

A step feeds 2 to a few dozen inputs. For that many rows, ``F.linear`` (x @ W^T) on this
project's CPU runs a general GEMM that is far slower per row than its matrix-vector
product; the same product computed as (W @ x^T)^T (then made contiguous) takes another
kernel, faster up to a few dozen rows and not beyond (hence ``MAX_ROWS``; the figures are
in ``docs/results/cpu-kernels.md``).

One input (``ar``, a step that drafts nothing) runs a matrix-vector product. On this
project's CPU that can stream the weights more slowly than a two-row product (W @ [x; x]^T,
one column kept) does, and with wide rows (2048 inputs) it can be the other way round. So
whether one row is computed as two is decided per model by timing one-token
forwards both ways (``msn.decoding.engine.one_row_kernel``); the padded row's product is
the same up to float rounding.

A few rows can still be faster with ``F.linear``: on this project's CPU (torch 2.13) a tree
step of 2 or 3 inputs took 40-44 ms with it against 51-54 ms prepacked (one input: 39 ms), and
4 or more were faster prepacked. So the row count up to which ``F.linear`` is kept is decided
per model by timing steps both ways (``msn.decoding.timing.few_row_kernel``, kept on disk like
the one-row decision); ``plain_rows(model)`` is that count (1: the kernel for every row count
above one).

The results differ from ``F.linear``'s by float rounding only (max |logit| difference
4e-5 to 7e-5 on SmolLM2; each is as close to a float64 forward as the other).
``DecodeConfig(cpu_kernels="off")`` turns it off (``MSN_CPU_GEMM=0`` sets that default).

How the kernels reach the layers: the first time a model takes a step here, each of its
plain float32 CPU ``nn.Linear`` layers becomes a ``FewRowLinear`` (its class changed in
place, as peft and bitsandbytes replace layers: same parameters, hooks and state dict; a
layer whose ``forward`` something else owns, such as accelerate's hooks, is left alone).
Outside msn's steps a ``FewRowLinear`` computes ``F.linear`` exactly; inside one
(``skinny_linears``, a context variable naming the model's layers and kernel), it computes
the kernel's product. Nothing is swapped per step. ``restore(model)`` turns them back.

Two or more rows, where this torch has oneDNN's prepacked linear
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what inductor's CPU
freezing emits): the weight is reordered once into oneDNN's blocked layout and every later
product reads that copy, with no per-call packing (the gain grows with the rows; figures in
``docs/results/cpu-kernels.md``). It costs a second copy of
the weights, so it is used only where those fit in a quarter of the memory available when
the model is first stepped, and ``DecodeConfig(cpu_prepack="off")`` (default from
``MSN_CPU_PACK=0``) turns it off; a torch without the ops, or
whose packed product strays from ``F.linear`` beyond float rounding on a probe, keeps
(W @ x^T)^T.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import weakref

import torch
import torch.nn.functional as F

from msn.decoding.attention import shared_kv_heads

MAX_ROWS = 32          # rows of a (W @ x^T)^T product above which F.linear's own kernel is kept
PACK_HINT = 16         # the row count oneDNN's weight layout is chosen for (2..512 rows measured alike)
_LINEARS: "weakref.WeakKeyDictionary[torch.nn.Module, frozenset]" = weakref.WeakKeyDictionary()
_PADDED: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
_PACKS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_FITS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
_OPTIONS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[bool, bool]]" = weakref.WeakKeyDictionary()
_PLAIN: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


def configure(model, kernels: bool = True, prepack: bool = True) -> None:
    """The kernel switches of ``DecodeConfig`` (``cpu_kernels``, ``cpu_prepack``) for ``model``'s
    later steps; a model never configured uses both where they apply."""
    _OPTIONS[model] = (bool(kernels), bool(prepack))


def enabled(model) -> bool:
    """Whether ``model``'s steps may use the kernels here (``DecodeConfig.cpu_kernels``)."""
    return _OPTIONS.get(model, (True, True))[0]


def applies(model) -> bool:
    """Whether the kernels here can serve ``model``: float32 on CPU, not switched off."""
    p = next(model.parameters(), None)
    return enabled(model) and p is not None and p.device.type == "cpu" and p.dtype == torch.float32


def padded(model) -> bool:
    """Whether ``model``'s one-row products are computed as two rows (as decided for it)."""
    return enabled(model) and _PADDED.get(model, False)


def decided(model) -> bool:
    """Whether ``padded(model)`` was decided (``set_padded``), rather than defaulting to False."""
    return model in _PADDED


def set_padded(model, on: bool | None) -> None:
    """Decides (True/False) or forgets (None) whether ``model`` computes one row as two."""
    if on is None:
        _PADDED.pop(model, None)
    else:
        _PADDED[model] = bool(on)


def plain_rows(model) -> int:
    """The most rows ``model``'s products keep ``F.linear`` for inside msn's steps (as decided
    for it by ``set_plain_rows``; 1 until then: the kernel for every count above one)."""
    return _PLAIN.get(model, 1)


def plain_decided(model) -> bool:
    """Whether ``plain_rows(model)`` was decided, rather than defaulting to 1."""
    return model in _PLAIN


def set_plain_rows(model, rows: int | None) -> None:
    """Decides (a row count, at least 1) or forgets (None) up to how many rows ``model`` keeps ``F.linear``."""
    if rows is None:
        _PLAIN.pop(model, None)
    else:
        _PLAIN[model] = max(1, int(rows))


def packing(model=None) -> bool:
    """Whether several-row products may use oneDNN's prepacked linear: the ops exist in this
    torch, a probe product matched ``F.linear`` (tried once), and ``model`` (if given) was not
    configured without it (``DecodeConfig.cpu_prepack``)."""
    return (model is None or _OPTIONS.get(model, (True, True))[1]) and _probe()


def prepacked(model) -> bool:
    """Whether ``model``'s several-row products read prepacked weights: the kernels here
    serve it (``applies``), ``packing(model)``, and a second copy of its weights fitted when
    first asked (decided once per model)."""
    if not (applies(model) and packing(model)):
        return False
    if model not in _FITS:
        _FITS[model] = _fits_twice(model)
    return _FITS[model]


@functools.cache
def _probe() -> bool:
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        w, b, x = (torch.randn(*s, generator=g) for s in ((96, 40), (96,), (5, 40)))
        with torch.inference_mode():
            got = ops._linear_pointwise(x, ops._reorder_linear_weight(w, PACK_HINT), b, "none", [], "")
            return bool(torch.allclose(got, torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _linear_pointwise(*args):
    return torch.ops.mkldnn._linear_pointwise(*args)


def _packed_weight(module: torch.nn.Linear) -> torch.Tensor:
    """The module's weight in oneDNN's layout, reordered again whenever the weight changed."""
    w = module.weight
    stamp = (w.data_ptr(), None if w.is_inference() else w._version)   # inference tensors keep no version
    held = _PACKS.get(module)
    if held is None or held[0] != stamp:
        with torch.inference_mode():
            held = _PACKS[module] = (stamp, torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_HINT))
    return held[1]


def _fits_twice(model) -> bool:
    """Whether a second copy of the model's linear weights fits in a quarter of the memory
    available now (unknown: assumed to fit)."""
    need = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is torch.nn.Linear)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return True
    return need <= free // 4


def _skinny(module: torch.nn.Linear, x: torch.Tensor, one_row: bool = False, packed: bool = False,
            plain: int = 1) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if 1 < rows <= plain:
        return F.linear(x, module.weight, module.bias)
    if packed and rows > 1 and x.dtype == torch.float32:
        y = _linear_pointwise(x.reshape(rows, x.shape[-1]), _packed_weight(module), module.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], module.weight.shape[0])
    if x.dim() < 2 or x.dtype != torch.float32 or not (1 < rows <= MAX_ROWS or (rows == 1 and one_row)):
        return F.linear(x, module.weight, module.bias)
    flat = x.reshape(rows, x.shape[-1])
    y = torch.mm(module.weight, (torch.cat([flat, flat]) if rows == 1 else flat).t())[:, :rows].t().contiguous()
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], module.weight.shape[0])


# Inside a step: (the ids of the stepping model's FewRowLinear layers, one row as two, prepacked,
# the most rows kept on F.linear).
_STEP: contextvars.ContextVar[tuple[frozenset, bool, bool, int] | None] = contextvars.ContextVar("msn_cpu_step",
                                                                                                default=None)


class FewRowLinear(torch.nn.Linear):
    """An ``nn.Linear`` that computes the CPU kernel's product inside msn's steps of its model
    (``skinny_linears``) and ``F.linear`` everywhere else (in a compiled graph too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = None if torch.compiler.is_compiling() else _STEP.get()
        if step is None or id(self) not in step[0]:
            return F.linear(x, self.weight, self.bias)
        return _skinny(self, x, one_row=step[1], packed=step[2], plain=step[3])


def _linears(model) -> frozenset:
    """The ids of ``model``'s ``FewRowLinear`` layers: its plain float32 CPU ``nn.Linear``
    layers whose ``forward`` nothing else owns, turned into ``FewRowLinear`` the first time."""
    found = _LINEARS.get(model)
    if found is None:
        layers = [m for m in model.modules() if type(m) in (torch.nn.Linear, FewRowLinear)
                  and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
                  and "forward" not in m.__dict__]
        for m in layers:
            m.__class__ = FewRowLinear
        found = _LINEARS[model] = frozenset(id(m) for m in layers)
    return found


def restore(model) -> None:
    """Turns ``model``'s ``FewRowLinear`` layers back into ``nn.Linear`` (msn's steps turn
    them again when they next run)."""
    for m in model.modules():
        if type(m) is FewRowLinear:
            m.__class__ = torch.nn.Linear
    _LINEARS.pop(model, None)


def _layers(model) -> list:
    ids = _linears(model)
    return [m for m in model.modules() if id(m) in ids]


def prepack(model) -> None:
    """Reorders every weight ``skinny_linears`` will read prepacked now, not at the first
    several-input step (SmolLM2-135M: about 0.3 s, once per model and weight version), so
    that cost lands before a generation's timing rather than inside its first tree step.
    Nothing where prepacking does not apply."""
    if prepacked(model):
        for m in _layers(model):
            _packed_weight(m)


@contextlib.contextmanager
def skinny_linears(model):
    """Within the block, the model's float32 CPU linear layers compute several rows with
    the prepacked weight (``prepacked(model)``; otherwise 2..MAX_ROWS rows as (W @ x^T)^T)
    except up to ``plain_rows(model)`` rows (``F.linear``), and one row as two where
    ``padded(model)``. A no-op on other devices and dtypes, or with the kernels switched off;
    a layer whose ``forward`` something else has replaced is left alone."""
    if not applies(model):
        yield
        return
    token = _STEP.set((_linears(model), padded(model), prepacked(model), plain_rows(model)))
    try:
        yield
    finally:
        _STEP.reset(token)


def one_row_linears(model):
    """``skinny_linears`` for a one-input forward where the model computes one row as two;
    otherwise nothing."""
    return skinny_linears(model) if padded(model) else contextlib.nullcontext()


@contextlib.contextmanager
def masked_forward(model, device: torch.device):
    """The context of every forward with several inputs and a custom mask (a tree step,
    a batched step): on CPU, grouped-query attention inside sdpa (``shared_kv_heads``)
    and the linear layers' kernel for a few rows (``skinny_linears``)."""
    if device.type != "cpu":
        yield
        return
    with shared_kv_heads(device), skinny_linears(model):
        yield
