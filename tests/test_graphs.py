"""The fixed-shape step (``msn.decoding.static_steps``): preallocated KV buffers, a mask built on
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
from conftest import FAMILIES, families_by_default
from tiny import tiny_model
from msn.decoding import static_steps
from msn.decoding.config import DecodeConfig
from msn.errors import MsnError

METHODS = ["ar", "jacobi", "tr-jacobi", "pld", "lookahead"]


def prompts(seed, n=8, vocab=96):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        unit = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))]
        out.append((unit * 8)[: rng.randint(8, 30)] if i % 2 else [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))])
    return out


# Two families by default, every family under -m slow.
@pytest.mark.parametrize("family", families_by_default("llama", "gemma"))
def test_fixed_steps_equal_greedy(family, models, eager_fixed):
    model = models(family)
    rng = random.Random(7)
    used = 0
    for i, ids in enumerate(prompts(FAMILIES.index(family))):
        x = torch.tensor([ids])
        max_new = rng.randint(1, 48)
        want = msn.generate(model, x, method="ar", max_new_tokens=max_new, eos_token_id=[], graphs="off").tokens
        for m in METHODS + ["recycle"]:
            for tree in (("auto", "reference", "paper") if m == "tr-jacobi" else (None,)):
                opts = {"tree": tree} if tree in ("auto", "reference") else {"drafts": tree} if tree else {}
                r = msn.generate(model, x, method=m, max_new_tokens=max_new, eos_token_id=[], **opts)
                assert r.tokens == want, (family, i, m, tree)
                assert sum(r.accept_lengths) + 1 == len(r.tokens)
                assert r.info["step"]["capacity"] >= len(ids) + len(r.tokens) - 1   # every entry held
                used += 1
    assert used and eager_fixed[id(model)].buf is not None


def test_a_long_generation_grows_the_buffers(models, eager_fixed, monkeypatch):
    """A request past the buffers' capacity moves its entries into larger ones mid-generation."""
    model = models("llama")
    x = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    want = msn.generate(model, x, method="ar", max_new_tokens=150, eos_token_id=[], graphs="off").tokens
    monkeypatch.setattr(static_steps, "capacity_for", lambda need, limit, start: need)     # no room to spare
    monkeypatch.setattr(static_steps, "STEP_ROOM", 0)
    got = msn.generate(model, x, method="tr-jacobi", tree="reference", max_new_tokens=150, eos_token_id=[])
    assert got.tokens == want
    assert got.info["step"]["capacity"] > x.shape[1] + 150


def test_a_request_starts_small_and_grows_as_it_fills(models, eager_fixed):
    """Attention reads every slot, so a request starts in the smallest buffers that hold its
    prompt and one step, and moves through the next sizes as its context fills; the sizes it
    passed through stay for the next request."""
    model = models("llama")
    x = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    want = msn.generate(model, x, method="ar", max_new_tokens=300, eos_token_id=[], graphs="off").tokens
    got = msn.generate(model, x, method="tr-jacobi", tree="reference", max_new_tokens=300, eos_token_id=[])
    assert got.tokens == want
    steps = eager_fixed[id(model)]
    first = static_steps.capacity_for(x.shape[1] + static_steps.STEP_ROOM, 2048, 64)
    assert first < x.shape[1] + 300 and sorted(steps.buckets)[0] == first
    assert got.info["step"]["capacity"] == max(steps.buckets) >= x.shape[1] + len(want) - 1
    assert len(steps.buckets) >= 2


def test_buffers_made_while_measuring_serve_the_generation(models, eager_fixed):
    """``tree="auto"`` measures t(n) on the model's fixed buffers (in inference mode) before
    generating on the same buffers."""
    from msn.decoding.timing import measure_step_latency

    model = models("qwen2")
    measure_step_latency(model, ladder=(1, 4), graphs=True)
    x = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    want = msn.generate(model, x, method="ar", max_new_tokens=24, eos_token_id=[], graphs="off").tokens
    for m, opts in (("ar", {}), ("tr-jacobi", {"tree": "reference"})):
        assert msn.generate(model, x, method=m, max_new_tokens=24, eos_token_id=[], **opts).tokens == want


def test_requests_use_buffers_of_their_size_and_keep_their_trees(models, eager_fixed):
    """A short request uses small buffers; each size keeps its trees for the next request."""
    model = models("llama")
    short, long = torch.tensor([[5, 6, 7, 8] * 3]), torch.tensor([[9, 10, 11, 12] * 60])
    for x in (short, long, short):
        want = msn.generate(model, x, method="ar", max_new_tokens=20, eos_token_id=[], graphs="off").tokens
        r = msn.generate(model, x, method="tr-jacobi", tree="reference", max_new_tokens=20, eos_token_id=[])
        assert r.tokens == want
        steps = eager_fixed[id(model)]
        if x is short and len(steps.buckets) == 1:
            trees = dict(steps.buf.shapes)
    assert sorted(steps.buckets) == [static_steps.capacity_for(12 + static_steps.STEP_ROOM, 2048, 64),
                                     static_steps.capacity_for(240 + static_steps.STEP_ROOM, 2048, 64)]
    assert r.info["step"]["capacity"] == min(steps.buckets)
    assert all(steps.buf.shapes[p] is shape for p, shape in trees.items())     # the same objects: kept


class _HostData(TorchDispatchMode):
    """Records every tensor built from host data (``torch.tensor(...)``: a host-to-device copy)."""

    def __init__(self):
        super().__init__()
        self.built = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            self.built.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_step_reads_nothing_on_the_host(family):
    """What a CUDA graph captures (the step's body) never reads a device value on the host
    (``.item()``, ``.tolist()``, ``bool(tensor)``, indexing by a 0-dim tensor, data-dependent
    shapes) and builds no tensor from host data (a copy that capture refuses).

    The body runs with the model and buffers on the ``meta`` device, where every host read
    raises, and under a spy for tensors built from host data."""
    from msn.decoding import cache as kv
    from msn.decoding.step import prefill
    from msn.decoding.tree import preset_paths

    model = tiny_model(family).to("meta")
    cache = kv.new_cache(model)
    prefill(model, torch.tensor([[5, 6, 7, 8, 9, 10, 11]], device="meta"), cache)
    steps = static_steps.StaticSteps(model, capture=False, min_capacity=64)
    steps.begin(cache, 64, 2048)
    for paths in (tuple(preset_paths("reference")[0]), ()):
        shape = steps._shape(paths)
        with torch.inference_mode(), _HostData() as spy:
            packed, logits, pred = steps._body(model, shape)
        assert spy.built == [] and packed.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):     # the meta device does refuse a host read
        shape.ids[0].item()
    with _HostData() as control:
        torch.tensor([1, 2])
    assert control.built


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
