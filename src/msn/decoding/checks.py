"""Checks of user-given values shared by the options (``config``), sampling and the server:
what counts as an integer, a finite number and a seed. No other msn import but the error."""

from __future__ import annotations

import math

from msn.errors import MsnError

# What ``torch.Generator.manual_seed`` takes: a signed or unsigned 64-bit integer.
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)

def is_int(x) -> bool:
    """An integer that is not a bool (``True`` must not pass as 1)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A finite int or float that is not a bool (NaN and infinities do not pass)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_seed(seed, name: str = "seed") -> None:
    """A seed must be an integer that ``torch.Generator`` takes (64 bits)."""
    low, high = SEED_RANGE
    if not is_int(seed) or not low <= seed <= high:
        raise MsnError(f"{name} must be an integer in [-2^63, 2^64 - 1], got {seed!r}")
