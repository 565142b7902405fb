"""Attention for a batch of rows with different context lengths.

In a batched step (``msn.decoding.batch``) row r's cache entries are positions
[0, length_r) followed by the step's N inputs at [length_r, length_r + N) (``cache`` owns
that layout); the cache is as long as its longest row, ``past``. One attention call reads
every row's keys and values up to ``past + N`` and masks what the row does not see, so a
batch with a few long prompts reads the short rows' padding as if it were context: for
decoding, attention reads memory and little else, and the padding costs as much as real
entries.

``grouped_attention(plan)`` splits the batch into groups of consecutive rows of similar
length for the duration of a forward. Each group calls sdpa (through msn's attention
function, ``msn.decoding.attention``) on its rows, with views of its keys, values and mask cut to its longest row plus the
step's inputs; the outputs are put back together in row order. The result is that of one
call up to float rounding of the kernel's blocks. ``plan`` chooses the groups from the
row lengths by an estimate of the memory read (``group_rows``); one group is the plain
call. The batch keeps its rows longest first, so that similar lengths are neighbours.

Rows of very different lengths gain most (figures: ``docs/results/cpu-kernels.md``).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

# The estimate's unit is reading one (row, position) of keys and values; each group's call
# costs about as much as reading this many positions.
_CALL = 160.0


@dataclass(frozen=True)
class Plan:
    """Groups of consecutive rows: ``bounds[g]`` = (first row, end row, context kept)."""

    rows: int
    past: int
    width: int
    bounds: tuple[tuple[int, int, int], ...]


def group_rows(lengths: list[int], width: int) -> tuple[tuple[int, int, int], ...]:
    """The partition of the rows (in their order) into consecutive groups with the least
    estimated attention cost (a dynamic programme over the cut points); each group keeps
    the context of its longest row and reads it plus the step's ``width`` inputs."""
    rows = len(lengths)
    best = [0.0] + [float("inf")] * rows       # best[b]: cost of rows [0, b)
    cut = [0] * (rows + 1)
    for b in range(1, rows + 1):
        longest = 0
        for a in range(b - 1, -1, -1):
            longest = max(longest, lengths[a])
            cost = best[a] + _CALL + (b - a) * (longest + width)
            if cost < best[b]:
                best[b], cut[b] = cost, a
    bounds, b = [], rows
    while b > 0:
        a = cut[b]
        bounds.append((a, b, max(lengths[a:b])))
        b = a
    return tuple(reversed(bounds))


def plan(lengths: list[int], past: int, width: int) -> Plan | None:
    """The grouping of a batched step whose rows have ``lengths`` context entries; None
    when one call is as good."""
    bounds = group_rows(lengths, width)
    if len(bounds) < 2:
        return None
    return Plan(len(lengths), past, width, bounds)


_PLAN: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("msn_ragged_plan", default=None)


def current_plan() -> Plan | None:
    return _PLAN.get()


def applies(p: Plan, query, key, attention_mask, kwargs: dict) -> bool:
    """Whether an attention call is one of the batched step's (its rows, its context and inputs)."""
    return not (attention_mask is None or attention_mask.dim() != 4 or query.shape[0] != p.rows
                or key.shape[-2] != p.past + p.width or attention_mask.shape[-1] != key.shape[-2]
                or kwargs.get("position_bias") is not None)


def in_groups(attend, p: Plan, module, query, key, value, attention_mask, **kwargs) -> torch.Tensor:
    """``attend`` on each group's rows, keys, values and mask cut to its context; outputs in row order."""
    outs = []
    for a, b, keep in p.bounds:
        end = keep + p.width
        out, _ = attend(module, query[a:b], key[a:b, :, :end], value[a:b, :, :end], attention_mask[a:b, ..., :end],
                        **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=0)


@contextlib.contextmanager
def grouped_attention(p: Plan | None):
    """Within the block, msn's attention (``msn.decoding.attention``) runs this thread's calls of
    ``p``'s batch shape group by group; every other call (other shapes, other threads) is unchanged."""
    if p is None:
        yield
        return
    token = _PLAN.set(p)
    try:
        yield
    finally:
        _PLAN.reset(token)
