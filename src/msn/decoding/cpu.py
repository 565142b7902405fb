"""CPU fast paths for the multi-input forwards of a decoding step (a tree, or a batch).

A step feeds 2 to a few dozen inputs. For that many rows, ``F.linear`` (x @ W^T) on this
project's CPU runs a general GEMM that is far slower per row than its matrix-vector
product; the same product computed as (W @ x^T)^T (then made contiguous) takes another
kernel. Measured on SmolLM2-135M (float32, 2 threads, medians of 6 steps, the two kinds
interleaved step by step): a one-row tree step of 2 inputs 166 -> 93 ms, 4 inputs
165 -> 80 ms, 8 inputs 165 -> 108 ms, 16 inputs 172 -> 131 ms; a batched ``ar`` step of
8 rows 215 -> 169 ms; a batched step of 35 inputs gained nothing (503 against 485 ms),
hence ``MAX_ROWS``. One input is left alone (a matrix-vector product either way).

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
_LINEARS: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return os.environ.get("MSN_CPU_GEMM", "1") != "0"


def _skinny(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if x.dim() < 2 or not 1 < rows <= MAX_ROWS or x.dtype != torch.float32:
        return F.linear(x, module.weight, module.bias)
    y = torch.mm(module.weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], module.weight.shape[0])


def _linears(model) -> list:
    """(module, its few-row forward) for each plain float32 CPU ``nn.Linear`` of the model, found once."""
    found = _LINEARS.get(model)
    if found is None:
        found = [(m, functools.partial(_skinny, m)) for m in model.modules() if type(m) is torch.nn.Linear
                 and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
        _LINEARS[model] = found
    return found


@contextlib.contextmanager
def skinny_linears(model):
    """Within the block, the model's float32 CPU ``nn.Linear`` layers compute 2..MAX_ROWS
    rows as (W @ x^T)^T. A no-op on other devices and dtypes, or with ``MSN_CPU_GEMM=0``;
    a layer whose ``forward`` something else has replaced is left alone."""
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
