"""What a step costs on the model at hand, measured once per model, device and dtype and
kept on disk: t(n), the wall time of a step with n inputs (``--tree auto`` weighs it), and
whether a float32 CPU model computes a one-row product as two (``msn.decoding.cpu``).
"""

from __future__ import annotations

import statistics
import time

import torch

from msn.decoding import attention
from msn.decoding import cache as kv
from msn.decoding import cpu
from msn.decoding import static_steps
from msn.decoding.autotree import LADDER, Latency, latency_key, load_latency, save_latency
from msn.decoding.devices import context_limit, model_device, sync_device, vocab_size
from msn.decoding.step import decode_one_token, fixed_step, prefill, tree_step
from msn.decoding.tree import chain
from msn.paths import read_stored, stored_path, write_stored


_LATENCY: dict[str, Latency] = {}


def step_latency(model, *, refresh: bool = False, graphs: bool = False) -> Latency:
    """t(n) of one tree step on this model, device and dtype (``graphs``: of the replayed
    fixed-shape step): from memory, from the disk cache, or measured (a few seconds) and cached."""
    device = model_device(model)
    key = latency_key(model, device, model.dtype)
    if graphs:
        key["step"] = "graphs"
    name = str(stored_path("latency", key))      # kept in memory per store entry: another store reads its own
    if not refresh:
        if name in _LATENCY:
            return _LATENCY[name]
        cached = load_latency(key)
        if cached is not None:
            _LATENCY[name] = cached
            return cached
    lat = Latency(measure_step_latency(model, graphs=graphs), key)
    save_latency(lat)
    _LATENCY[name] = lat
    return lat


def _timing_prompt(model, context: int):
    """Where a timing starts: a new cache prefilled with ``context`` seeded random tokens (at
    most a quarter of the model's positions). Returns (cache, context, the position limit,
    the generator of the timing's further random tokens)."""
    limit = context_limit(model) or 1 << 30
    context = max(1, min(context, limit // 4))
    g = torch.Generator().manual_seed(0)
    cache = kv.new_cache(model)
    prefill(model, torch.randint(vocab_size(model) or 2, (1, context), generator=g).to(model_device(model)), cache)
    return cache, context, limit, g


def prepare_model(model, cfg, several_inputs: bool = True) -> None:
    """What a model needs before msn decodes it with ``cfg`` (each part done once per model,
    a lookup after): msn's attention function for an sdpa model, ``cfg``'s CPU kernel switches,
    the one-input CPU kernel (timed once per model and machine) and, where steps will feed
    several inputs, the prepacked CPU weights."""
    attention.use(model)
    cpu.configure(model, cfg.cpu_kernels == "auto", cfg.cpu_prepack == "auto")
    one_row_kernel(model)
    if several_inputs:
        cpu.prepack(model)
        few_row_kernel(model)


_ONE_ROW_MARGIN = 0.97      # one row is computed as two only when that is 3 % faster (timing noise)
FEW_ROWS = (2, 3, 4, 6, 8, 12, 16)   # the step widths F.linear is timed against the kernel at


# What a step latency is keyed by beyond the machine and model: the kernel decisions (and the
# ladder) it was measured under. A kernel decision itself is keyed without them, so neither
# decision's key depends on whether the other was made first.
_DECISION_FIELDS = ("ladder", "one_row", "plain_rows")


def _stored_decision(model, kind: str, valid, measure, refresh: bool) -> dict:
    """A CPU kernel decision of ``model``: read from the store (``kind``, keyed as its step
    latency is, less ``_DECISION_FIELDS``), else ``measure()`` (a dict that holds it) and kept there."""
    key = {k: v for k, v in latency_key(model, model_device(model), model.dtype).items()
           if k not in _DECISION_FIELDS}
    stored = None if refresh else read_stored(kind, key)
    if not (isinstance(stored, dict) and valid(stored)):
        stored = measure()
        write_stored(kind, key, stored)
    return stored


def _ms(seconds: dict) -> dict:
    return {str(k): _ms(v) if isinstance(v, dict) else round(v * 1000, 3) for k, v in seconds.items()}


def one_row_kernel(model, *, refresh: bool = False) -> bool:
    """Whether one-input forwards of this float32 CPU model compute their linear layers as
    two-row products (``msn.decoding.cpu``): decided once per model, from the disk cache or
    by timing (26 one-token forwards), and applied to every later one-input forward.
    False, and nothing measured, on other devices and dtypes or with the kernels switched off
    (``DecodeConfig.cpu_kernels``)."""
    if not cpu.applies(model):
        return False
    if not refresh and cpu.decided(model):
        return cpu.padded(model)

    def measure():
        seconds = measure_one_row(model)
        return {"padded": seconds["padded"] < _ONE_ROW_MARGIN * seconds["linear"], "ms": _ms(seconds)}

    stored = _stored_decision(model, "one-row", lambda s: isinstance(s.get("padded"), bool),
                              measure, refresh)
    cpu.set_padded(model, stored["padded"])
    return stored["padded"]


def few_row_kernel(model, *, refresh: bool = False) -> int:
    """Up to how many rows the several-input steps of this float32 CPU model keep
    ``F.linear`` instead of msn's kernel (``cpu.plain_rows``): decided once per model, from
    the disk cache or by timing steps of ``FEW_ROWS`` inputs both ways, as the largest width
    up to which ``F.linear`` was faster at every timed width (by ``_ONE_ROW_MARGIN``); the
    kernel is kept for wider steps. 1 (the kernel above one row), and nothing measured, on
    other devices and dtypes or with the kernels switched off."""
    if not cpu.applies(model):
        return 1
    if not refresh and cpu.plain_decided(model):
        return cpu.plain_rows(model)

    def measure():
        seconds = measure_few_rows(model)
        plain = 1
        for n in sorted(seconds):
            if seconds[n]["linear"] >= _ONE_ROW_MARGIN * seconds[n]["kernel"]:
                break
            plain = n
        return {"plain_rows": plain, "ms": _ms(seconds)}

    stored = _stored_decision(model, "few-rows", lambda s: isinstance(s.get("plain_rows"), int),
                              measure, refresh)
    cpu.set_plain_rows(model, stored["plain_rows"])
    return stored["plain_rows"]


@torch.inference_mode()
def measure_few_rows(model, widths: tuple[int, ...] = FEW_ROWS, context: int = 100,
                     repeats: int = 5, margin: float | None = _ONE_ROW_MARGIN) -> dict[int, dict[str, float]]:
    """Median wall seconds of a tree step of n inputs (n in ``widths`` that fit, narrowest
    first) with ``F.linear`` (``linear``) and with msn's kernel (``kernel``), the two
    alternating on one growing context (random drafts are rejected), the first of each dropped
    as warm-up. Stops after the first width where ``F.linear`` is not ``margin`` faster (the
    wider ones cannot change ``few_row_kernel``'s decision); ``margin=None`` times every width."""
    device = model_device(model)
    cache, context, limit, g = _timing_prompt(model, context)
    widths = [n for n in sorted(widths) if context + 2 * (repeats + 1) * len(widths) + n < limit]
    vocab = vocab_size(model) or 2
    out: dict[int, dict[str, float]] = {}
    length = context
    try:
        for n in widths:
            cand = torch.randint(vocab, (n - 1, 1), generator=g).to(device)
            times: dict[bool, list] = {False: [], True: []}
            for r in range(1 + repeats):
                for plain in ((False, True) if r % 2 else (True, False)):
                    cpu.set_plain_rows(model, n if plain else 1)
                    t0 = time.perf_counter()
                    _, feedback = tree_step(model, cache, length, 0, tuple(chain(n - 1)), cand, limit)
                    times[plain].append(time.perf_counter() - t0)
                    length += 1 + feedback.accepted
            out[n] = {"linear": statistics.median(times[True][1:]), "kernel": statistics.median(times[False][1:])}
            if margin is not None and out[n]["linear"] >= margin * out[n]["kernel"]:
                break
    finally:
        cpu.set_plain_rows(model, None)
    return out


@torch.inference_mode()
def measure_one_row(model, context: int = 100, repeats: int = 12) -> dict[str, float]:
    """Median wall seconds of a one-token forward after a ``context``-token prompt with the
    matrix-vector product (``linear``) and with one row computed as two (``padded``), the two
    alternating on one growing context (the first of each dropped as warm-up; a model with
    few positions gets fewer repeats, at least one)."""
    device = model_device(model)
    cache, context, limit, _ = _timing_prompt(model, context)
    repeats = max(1, min(repeats, (limit - context) // 2 - 1))
    times = {False: [], True: []}
    try:
        for r in range(1 + repeats):
            for on in ((False, True) if r % 2 else (True, False)):
                cpu.set_padded(model, on)
                t0 = time.perf_counter()
                decode_one_token(model, 0, cache, device)
                times[on].append(time.perf_counter() - t0)
    finally:
        cpu.set_padded(model, None)
    return {"linear": statistics.median(times[False][1:]), "padded": statistics.median(times[True][1:])}


@torch.inference_mode()
def measure_step_latency(model, ladder: tuple[int, ...] = LADDER, context: int = 100,
                         repeats: int = 5, graphs: bool = False, compiled: bool = False) -> dict[int, float]:
    """Median wall seconds of one tree step (forward, verification, cache work) with n
    inputs after a ``context``-token prompt, for each n of ``ladder`` that fits.

    The ladder is run in rounds, every n once per round on the same growing context (random
    drafts are rejected, so each step adds one entry), so a passing load on the machine
    touches every n alike. ``compiled``: the fixed-shape step compiled (``graphs``: and then
    replayed), its compilation in the warm-up rounds. ``graphs``: the fixed-shape step replayed as a CUDA graph, on the
    smallest buffers that hold the whole measurement (as a request of this length uses)."""
    device = model_device(model)
    cache, context, limit, g = _timing_prompt(model, context)
    warm = 1 if not graphs else 2            # replayed: the first step captures, the second warms the replay
    if compiled:
        warm = static_steps.COMPILE_AFTER + 1       # compiled on the COMPILE_AFTER-th step, then warmed
    rounds = warm + repeats
    ladder = sorted(ladder)
    while len(ladder) > 1 and context + rounds * len(ladder) + ladder[-1] >= limit:
        ladder.pop()                         # a short model: the counts that fit its positions
    vocab = vocab_size(model) or 2
    cands = {n: torch.randint(vocab, (max(n - 1, 1), 1), generator=g).to(device) for n in ladder}
    steps = static_steps.steps_for(model, capture=graphs, compiled=compiled) if graphs or compiled else None
    if steps is not None:
        steps.begin(cache, context + rounds * len(ladder) + max(ladder), limit)
    length, times = context, {n: [] for n in ladder}
    for _ in range(rounds):
        for n in ladder:
            paths = tuple(chain(n - 1))
            sync_device(device)
            t0 = time.perf_counter()
            if steps is not None:
                new, feedback = fixed_step(steps, model, 0, paths, cands[n])
            else:
                new, feedback = tree_step(model, cache, length, 0, paths, cands[n], limit)
            sync_device(device)
            times[n].append(time.perf_counter() - t0)
            length += 1 + feedback.accepted
    return {n: statistics.median(t[warm:]) for n, t in times.items()}
