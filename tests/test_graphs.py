"""The fixed-shape step (``msn.decoding.graphs``): preallocated KV buffers, a mask built on
the device from a context-length tensor, on-device verification and path compaction.

On CUDA it is captured and replayed; here the same step runs eagerly, and must give every
method exactly greedy decoding's tokens on every family, with no host read of a device
value inside the step (what capture forbids).
"""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import msn
from conftest import FAMILIES
from msn.decoding import graphs as fixed
from msn.decoding.config import DecodeConfig
from msn.errors import MsnError

METHODS = ["ar", "jacobi", "tr-jacobi", "pld", "lookahead"]


@pytest.fixture
def eager_fixed(monkeypatch):
    """Every greedy generation runs its steps on fixed buffers (eager, small capacity)."""
    made = {}

    def steps_for(model, capture=True, min_capacity=fixed.MIN_CAPACITY):
        if id(model) not in made:
            made[id(model)] = fixed.StaticSteps(model, capture=False, min_capacity=64)
        return made[id(model)]

    monkeypatch.setattr(fixed, "wanted", lambda graphs, device, sampling: graphs != "off" and not sampling)
    monkeypatch.setattr(fixed, "steps_for", steps_for)
    return made


def prompts(seed, n=8, vocab=96):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        unit = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))]
        out.append((unit * 8)[: rng.randint(8, 30)] if i % 2 else [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_steps_equal_greedy(family, models, eager_fixed):
    model = models(family)
    rng = random.Random(7)
    used = 0
    for i, ids in enumerate(prompts(FAMILIES.index(family))):
        x = torch.tensor([ids])
        max_new = rng.randint(1, 48)
        want = msn.generate(model, x, method="ar", max_new_tokens=max_new, eos_token_id=[], graphs="off").tokens
        for m in METHODS:
            for tree in (("auto", "reference") if m == "tr-jacobi" else (None,)):
                opts = {"tree": tree} if tree else {}
                r = msn.generate(model, x, method=m, max_new_tokens=max_new, eos_token_id=[], **opts)
                assert r.tokens == want, (family, i, m, tree)
                assert sum(r.accept_lengths) + 1 == len(r.tokens)
                assert r.info["step"]["capacity"] >= len(ids) + max_new
                used += 1
    assert used and eager_fixed[id(model)].cache is not None


def test_a_long_generation_grows_the_buffers(models, eager_fixed, monkeypatch):
    """A request past the buffers' capacity moves its entries into larger ones mid-generation."""
    model = models("llama")
    x = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    want = msn.generate(model, x, method="ar", max_new_tokens=150, eos_token_id=[], graphs="off").tokens
    monkeypatch.setattr(fixed, "capacity_for", lambda need, limit, start: need)     # no room to spare
    monkeypatch.setattr(fixed, "STEP_ROOM", 0)
    got = msn.generate(model, x, method="tr-jacobi", tree="reference", max_new_tokens=150, eos_token_id=[])
    assert got.tokens == want
    assert got.info["step"]["capacity"] > x.shape[1] + 150


class _HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's value on the host (a sync on a device)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # _local_scalar_dense: .item()/.tolist()/bool(); lift_fresh: torch.tensor(data), a host-to-device copy
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default) \
                or "nonzero" in str(func):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_step_reads_nothing_on_the_host(family, models):
    """What a CUDA graph captures (the step's body) never reads a device value on the host
    (no ``.item()``, ``.tolist()``, ``bool(tensor)`` or data-dependent shape) and builds no
    tensor from host data (a copy that capture refuses)."""
    from msn.decoding import cache as kv
    from msn.decoding.engine import prefill
    from msn.decoding.tree import preset_paths

    model = models(family)
    cache = kv.new_cache(model)
    prefill(model, torch.tensor([[5, 6, 7, 8, 9, 10, 11]]), cache)
    steps = fixed.StaticSteps(model, capture=False, min_capacity=64)
    steps.begin(cache, 64, None)
    paths = tuple(preset_paths("reference")[0])
    cand = torch.randint(3, 90, (10, 10))
    shape = steps._shape(paths)
    with torch.inference_mode(), _HostReads() as spy:
        steps._body(model, shape)
    assert spy.reads == []
    with _HostReads() as control:      # the spy sees them when there are some
        shape.ids.sum().item()
        torch.tensor([1, 2])
    assert len(control.reads) == 2


def test_graphs_option_is_checked():
    with pytest.raises(MsnError, match="graphs must be one of"):
        DecodeConfig(graphs="yes")
    with pytest.raises(MsnError, match="greedy decoding"):
        DecodeConfig(graphs="on", do_sample=True, temperature=0.7)


def test_graphs_on_needs_cuda(models):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(MsnError, match="needs a CUDA device"):
        msn.generate(models("llama"), torch.tensor([[5, 6, 7]]), method="ar", max_new_tokens=4, graphs="on")
