"""CPU fast paths for the multi-input forwards of a decoding step (a tree, or a batch).

A step feeds 2 to a few dozen inputs. For that many rows, ``F.linear`` (x @ W^T) on this
project's CPU runs a general GEMM that is far slower per row than its matrix-vector
product; the same product computed as (W @ x^T)^T (then made contiguous) takes another
kernel. Measured on SmolLM2-135M (float32, 2 threads, medians of 6 steps, the two kinds
interleaved step by step): a one-row tree step of 2 inputs 166 -> 93 ms, 4 inputs
165 -> 80 ms, 8 inputs 165 -> 108 ms, 16 inputs 172 -> 131 ms; a batched ``ar`` step of
8 rows 215 -> 169 ms; a batched step of 35 inputs gained nothing (503 against 485 ms),
hence ``MAX_ROWS``.

One input (``ar``, a step that drafts nothing) runs a matrix-vector product. On this
project's CPU that streams the weights more slowly than a two-row product does: SmolLM2's
49152 x 576 ``lm_head`` took 15 ms as ``F.linear`` and 10 ms as (W @ [x; x]^T) keeping one
column; its 30 layers' linears, weights read from memory, 54-68 against 47-53 ms. With 2048
inputs per row the two-row product was slower instead (a 32000 x 2048 head: 18 against 24
ms). So whether one row is computed as two is decided per model by timing one-token
forwards both ways (``msn.decoding.engine.one_row_kernel``); the padded row's product is
the same up to float rounding.

The results differ from ``F.linear``'s by float rounding only (max |logit| difference
4e-5 to 7e-5 on SmolLM2; each is as close to a float64 forward as the other). ``MSN_CPU_GEMM=0``
turns it off. Modules are swapped only for the duration of a step's forward and only
where nothing else (accelerate hooks, compiled modules) owns their ``forward``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref

import torch
import torch.nn.functional as F

MAX_ROWS = 32          # rows of a product above which F.linear's own kernel is kept
_LINEARS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_PADDED: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return os.environ.get("MSN_CPU_GEMM", "1") != "0"


def applies(model) -> bool:
    """Whether the kernels here can serve ``model``: float32 on CPU, not switched off."""
    p = next(model.parameters(), None)
    return enabled() and p is not None and p.device.type == "cpu" and p.dtype == torch.float32


def padded(model) -> bool:
    """Whether ``model``'s one-row products are computed as two rows (as decided for it)."""
    return enabled() and _PADDED.get(model, False)


def decided(model) -> bool:
    """Whether ``padded(model)`` was decided (``set_padded``), rather than defaulting to False."""
    return model in _PADDED


def set_padded(model, on: bool | None) -> None:
    """Decides (True/False) or forgets (None) whether ``model`` computes one row as two."""
    if on is None:
        _PADDED.pop(model, None)
    else:
        _PADDED[model] = bool(on)


def _skinny(module: torch.nn.Linear, x: torch.Tensor, one_row: bool = False) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if x.dim() < 2 or x.dtype != torch.float32 or not (1 < rows <= MAX_ROWS or (rows == 1 and one_row)):
        return F.linear(x, module.weight, module.bias)
    flat = x.reshape(rows, x.shape[-1])
    y = torch.mm(module.weight, (torch.cat([flat, flat]) if rows == 1 else flat).t())[:, :rows].t().contiguous()
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], module.weight.shape[0])


def _linears(model) -> list:
    """(module, its few-row forward) for each plain float32 CPU ``nn.Linear`` of the model, found once."""
    one_row = padded(model)
    found = _LINEARS.setdefault(model, {})
    if one_row not in found:
        found[one_row] = [(m, functools.partial(_skinny, m, one_row=one_row)) for m in model.modules()
                          if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
                          and m.weight.dtype == torch.float32]
    return found[one_row]


@contextlib.contextmanager
def skinny_linears(model):
    """Within the block, the model's float32 CPU ``nn.Linear`` layers compute 2..MAX_ROWS
    rows as (W @ x^T)^T, and one row as two where ``padded(model)``. A no-op on other devices
    and dtypes, or with ``MSN_CPU_GEMM=0``; a layer whose ``forward`` something else has
    replaced is left alone."""
    swapped = []
    for m, fast in _linears(model) if enabled() else ():
        if "forward" not in m.__dict__:
            m.forward = fast
            swapped.append(m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


def one_row_linears(model):
    """``skinny_linears`` for a one-input forward where the model computes one row as two;
    otherwise nothing (no forwards swapped)."""
    return skinny_linears(model) if padded(model) else contextlib.nullcontext()
