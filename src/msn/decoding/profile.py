"""Where a decoding step's time goes: forward, inputs (tree tensors and mask), verification,
host sync, cache, proposer. Used by ``msn bench --profile``; off (no cost) otherwise.

Each section synchronizes the device before it starts and ends, so on a GPU the figures
are the section's own time; the synchronizations themselves slow a profiled run a little.
"""

from __future__ import annotations

import contextlib
import time

import torch

PARTS = ("forward", "inputs", "verification", "host_sync", "cache", "proposer")


class StepProfile:
    """Accumulates wall seconds per part over any number of generations."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds = {p: 0.0 for p in PARTS}
        self.steps = 0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def section(self, part: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[part] += time.perf_counter() - t0

    def report(self) -> dict:
        """Milliseconds per step of each part, and the share of the step outside the forward."""
        steps = max(self.steps, 1)
        total = sum(self.seconds.values())
        out = {f"{p}_ms": round(1e3 * s / steps, 3) for p, s in self.seconds.items()}
        out["step_ms"] = round(1e3 * total / steps, 3)
        out["outside_forward"] = round(1 - self.seconds["forward"] / total, 4) if total else 0.0
        out["steps"] = self.steps
        return out


def section(profile: StepProfile | None, part: str):
    """``profile.section(part)``, or nothing when not profiling."""
    return profile.section(part) if profile is not None else contextlib.nullcontext()
