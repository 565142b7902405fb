"""The CPU kernel for a few rows (msn.decoding.cpu): same products up to float rounding,
only inside its block, only on plain float32 CPU linears, off with cpu_kernels="off"
(MSN_CPU_GEMM=0 its default), and layers turned once, never swapped per step."""

import pytest
import torch

from msn.decoding import cpu
from tiny import tiny_model


def _linear_calls(model, monkeypatch):
    calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_products_match_and_forwards_are_restored(monkeypatch):
    model = tiny_model("llama").eval()
    x = torch.randint(3, 90, (2, 5))
    with torch.inference_mode():
        want = model(input_ids=x).logits
        calls = _linear_calls(model, monkeypatch)
        with cpu.skinny_linears(model):
            got = model(input_ids=x).logits
        assert not calls                         # every linear took (W @ x^T)^T: 10 rows <= MAX_ROWS
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        model(input_ids=x)
        assert calls                              # after the block, F.linear again
    assert not any("forward" in m.__dict__ for m in model.modules())     # no forward assigned
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(type(m) is cpu.FewRowLinear for m in linears)              # turned once, visibly
    cpu.restore(model)
    assert all(type(m) is torch.nn.Linear for m in linears)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=x).logits, want, rtol=0, atol=0)


def test_layers_are_turned_once_and_not_touched_per_step(monkeypatch):
    """A step sets a context variable; it neither assigns nor deletes an attribute of any layer."""
    model = tiny_model("llama").eval()
    x = torch.randint(3, 90, (1, 4))
    with torch.inference_mode(), cpu.skinny_linears(model):
        model(input_ids=x)
    touched = []
    monkeypatch.setattr(torch.nn.Module, "__setattr__",
                        lambda self, k, v: touched.append(k) or object.__setattr__(self, k, v))
    monkeypatch.setattr(torch.nn.Module, "__delattr__", lambda self, k: touched.append(k) or object.__delattr__(self, k))
    with torch.inference_mode(), cpu.skinny_linears(model):
        model(input_ids=x)
    assert not touched


def _packed_calls(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(cpu, "_linear_pointwise", lambda *a: calls.append(a[0].shape[0]) or real(*a), raising=False)
    return calls


def test_one_row_many_rows_other_dtypes_and_the_switch_keep_f_linear(monkeypatch):
    model = tiny_model("qwen2").eval()
    calls = _linear_calls(model, monkeypatch)
    cpu.configure(model, prepack=False)          # without the prepacked product: (W @ x^T)^T up to MAX_ROWS
    with torch.inference_mode():
        for ids in (torch.randint(3, 90, (1, 1)), torch.randint(3, 90, (1, cpu.MAX_ROWS + 1))):
            calls.clear()
            with cpu.skinny_linears(model):
                model(input_ids=ids)
            assert calls, ids.shape
        cpu.configure(model, kernels=False)
        calls.clear()
        with cpu.skinny_linears(model):
            model(input_ids=torch.randint(3, 90, (1, 4)))
        assert calls
        half = tiny_model("llama").eval().to(torch.bfloat16)
        calls.clear()
        with cpu.skinny_linears(half):
            half(input_ids=torch.randint(3, 90, (1, 4)))
        assert calls


def test_a_module_whose_forward_is_owned_elsewhere_is_left_alone():
    model = tiny_model("llama").eval()
    hooked = next(m for m in model.modules() if type(m) is torch.nn.Linear)
    owner = hooked.forward                    # a bound method stored on the instance, as accelerate's hooks do
    hooked.forward = owner
    with torch.inference_mode(), cpu.skinny_linears(model):
        assert hooked.__dict__["forward"] is owner
        model(input_ids=torch.randint(3, 90, (1, 4)))
    assert hooked.__dict__["forward"] is owner and type(hooked) is torch.nn.Linear


def test_one_row_as_two_rows_where_decided(monkeypatch):
    """A model decided to compute one row as two: every linear of a one-input forward takes
    the two-row product (no F.linear), with the same logits up to float rounding; undecided
    or decided against, a one-input forward swaps nothing."""
    model = tiny_model("llama").eval()
    ids = torch.randint(3, 90, (1, 1))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        calls = _linear_calls(model, monkeypatch)
        try:
            for on in (None, False, True):
                cpu.set_padded(model, on)
                calls.clear()
                with cpu.one_row_linears(model):
                    got = model(input_ids=ids).logits
                assert bool(calls) is not bool(on), on
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            cpu.configure(model, kernels=False)
            assert not cpu.padded(model)
        finally:
            cpu.set_padded(model, None)


def test_the_one_row_decision_is_measured_once_and_kept(monkeypatch, tmp_path):
    """timing.one_row_kernel times one-token forwards both ways once, keeps the verdict on
    disk (a new model object of the same config reads it, measuring nothing), and applies it;
    a bf16 model, or kernels switched off, measures nothing and stays with F.linear."""
    from msn.decoding import timing

    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path))
    measured = []
    real = timing.measure_one_row

    def faster_padded(model, **kw):
        measured.append(real(model, repeats=2, **kw))
        return {"linear": 2.0, "padded": 1.0}

    monkeypatch.setattr(timing, "measure_one_row", faster_padded)
    first = tiny_model("qwen2").eval()
    assert timing.one_row_kernel(first) is True and cpu.padded(first)
    assert len(measured) == 1 and set(measured[0]) == {"linear", "padded"} and all(v > 0 for v in measured[0].values())
    assert not cpu.padded(tiny_model("llama").eval())            # another model: not decided yet
    again = tiny_model("qwen2").eval()
    monkeypatch.setattr(timing, "measure_one_row", lambda *a, **k: pytest.fail("measured again"))
    assert timing.one_row_kernel(again) is True and len(measured) == 1   # read from disk
    assert timing.one_row_kernel(tiny_model("qwen2").eval().to(torch.bfloat16)) is False
    off = tiny_model("llama").eval()
    cpu.configure(off, kernels=False)
    assert timing.one_row_kernel(off) is False and not cpu.padded(off)


def test_few_rows_keep_f_linear_up_to_the_decided_width(monkeypatch):
    """Decided to keep F.linear up to 3 rows: a step of 2 or 3 inputs calls F.linear in every
    layer, one of 4 the kernel; the logits agree with F.linear's to float rounding."""
    import torch.nn.functional as F

    model = tiny_model("llama").eval()
    cpu.set_plain_rows(model, 3)
    calls = _linear_calls(model, monkeypatch)
    for rows, plain in ((2, True), (3, True), (4, False)):
        x = torch.randint(3, 90, (1, rows))
        with torch.no_grad():
            want = model(x).logits
            calls.clear()
            with cpu.skinny_linears(model):
                got = model(x).logits
        assert bool(calls) is plain, rows
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cpu.restore(model)


def test_the_few_row_decision_is_measured_once_and_kept(monkeypatch, tmp_path):
    """timing.few_row_kernel times tree steps both ways at each width once, keeps F.linear up to
    the last width where it was faster at every width so far, keeps that on disk (a new model
    object of the same config reads it) and applies it; kernels switched off: nothing measured."""
    from msn.decoding import timing

    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path))
    measured = []
    real = timing.measure_few_rows

    def plain_wins_below_four(model, **kw):
        got = real(model, widths=(2, 3, 4), repeats=1, margin=None)
        measured.append(got)
        return {n: {"linear": 1.0 if n in (2, 3, 8) else 2.0, "kernel": 1.5} for n in (2, 3, 4, 6, 8)}

    monkeypatch.setattr(timing, "measure_few_rows", plain_wins_below_four)
    first = tiny_model("qwen2").eval()
    assert timing.few_row_kernel(first) == 3 and cpu.plain_rows(first) == 3     # 8 is past a loss at 4
    assert len(measured) == 1 and set(measured[0]) == {2, 3, 4}
    assert all(v > 0 for t in measured[0].values() for v in t.values())
    assert cpu.plain_rows(tiny_model("llama").eval()) == 1                       # another model: not decided
    monkeypatch.setattr(timing, "measure_few_rows", lambda *a, **k: pytest.fail("measured again"))
    assert timing.few_row_kernel(tiny_model("qwen2").eval()) == 3                # read from disk
    off = tiny_model("llama").eval()
    cpu.configure(off, kernels=False)
    assert timing.few_row_kernel(off) == 1
    # The measurement stops at the first width where the kernel is not beaten.
    stepped = []
    monkeypatch.setattr(timing, "tree_step", lambda *a, **k: stepped.append(cpu.plain_rows(a[0])) or
                        (None, type("F", (), {"accepted": 0})()))
    clock = iter(range(10**6))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    got = real(tiny_model("gemma").eval(), widths=(2, 3, 4), repeats=1)
    assert list(got) == [2] and len(stepped) == 4       # every step took one tick both ways: no gain at 2


def test_greedy_outputs_with_one_row_as_two_rows(models):
    """Every method equals transformers' greedy decoding with one row computed as two."""
    from conftest import hf_greedy
    from msn.decoding.engine import generate

    for family in ("llama", "gemma"):
        model = models(family)
        ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(1))
        want = hf_greedy(model, ids, 24, None)
        cpu.set_padded(model, True)
        try:
            for method in ("ar", "pld", "tr-jacobi", "jacobi"):
                got = generate(model, ids, method=method, max_new_tokens=24, eos_token_id=[]).tokens
                assert got == want[: len(got)] and len(got) == 24, (family, method)
        finally:
            cpu.set_padded(model, None)


needs_packing = pytest.mark.skipif(not cpu.packing(), reason="this torch has no oneDNN prepacked linear")


@needs_packing
def test_prepacked_products_match_and_follow_weight_changes(monkeypatch):
    """Several rows (also above MAX_ROWS) take the prepacked product, equal to F.linear up to
    float rounding; a changed weight is reordered again rather than read stale; one row
    stays with F.linear."""
    model = tiny_model("llama").eval()
    used = _packed_calls(monkeypatch)
    with torch.inference_mode():
        for rows in (2, 9, cpu.MAX_ROWS + 7):
            ids = torch.randint(3, 90, (1, rows))
            want = model(input_ids=ids).logits
            used.clear()
            with cpu.skinny_linears(model):
                got = model(input_ids=ids).logits
            assert used and set(used) == {rows}, rows
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        head = model.lm_head
        with torch.no_grad():
            head.weight.mul_(-1.0)              # the same storage, a new version
        ids = torch.randint(3, 90, (1, 4))
        want = model(input_ids=ids).logits
        with cpu.skinny_linears(model):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        used.clear()
        with cpu.skinny_linears(model):
            model(input_ids=ids[:, :1])
        assert not used


@needs_packing
def test_no_prepacking_where_a_second_copy_does_not_fit_or_switched_off(monkeypatch):
    model = tiny_model("qwen2").eval()
    used = _packed_calls(monkeypatch)
    ids = torch.randint(3, 90, (1, 5))
    with torch.inference_mode():
        monkeypatch.setattr(cpu, "_fits_twice", lambda m: False)
        with cpu.skinny_linears(model):
            model(input_ids=ids)
        assert not used
        monkeypatch.undo()
        used = _packed_calls(monkeypatch)
        other = tiny_model("llama").eval()
        cpu.configure(other, prepack=False)
        with cpu.skinny_linears(other):
            other(input_ids=ids)
        assert not used
        fresh = tiny_model("llama").eval()
        with cpu.skinny_linears(fresh):
            fresh(input_ids=ids)
        assert used


@needs_packing
def test_a_tree_method_prepacks_before_its_first_step_and_ar_does_not(monkeypatch, tmp_path):
    """generate() with a several-input method reorders every weight before decoding starts
    (a step then finds them packed); ``ar`` leaves the weights alone."""
    from msn.decoding import engine

    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama").eval()
    ids = torch.randint(3, 90, (1, 6))
    engine.generate(model, ids, method="ar", max_new_tokens=4, eos_token_id=[])
    assert not any(m in cpu._PACKS for m in model.modules())
    reordered = []
    real = cpu._packed_weight
    monkeypatch.setattr(cpu, "_packed_weight", lambda m: reordered.append(m) or real(m))
    monkeypatch.setattr(engine, "make_proposer", lambda *a, **k: pytest.fail("stop after the set-up"))
    with pytest.raises(pytest.fail.Exception):
        engine.generate(model, ids, method="pld", max_new_tokens=4, eos_token_id=[])
    linears = {m for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert set(reordered) == linears and all(m in cpu._PACKS for m in linears)


def test_the_environment_switches_are_decode_config_defaults(monkeypatch):
    """MSN_CPU_GEMM / MSN_CPU_PACK are read once, as DecodeConfig's defaults (shown in the
    resolved config); generate() applies the config's switches to the model."""
    from msn.decoding.config import DecodeConfig
    from msn.decoding.engine import generate
    from msn.errors import MsnError

    assert (DecodeConfig().cpu_kernels, DecodeConfig().cpu_prepack) == ("auto", "auto")
    monkeypatch.setenv("MSN_CPU_GEMM", "0")
    monkeypatch.setenv("MSN_CPU_PACK", "0")
    assert DecodeConfig().to_dict()["cpu_kernels"] == "off" and DecodeConfig().cpu_prepack == "off"
    monkeypatch.delenv("MSN_CPU_GEMM")
    monkeypatch.delenv("MSN_CPU_PACK")
    with pytest.raises(MsnError, match="cpu_kernels must be one of auto, off"):
        DecodeConfig(cpu_kernels="fast")
    model = tiny_model("llama").eval()
    cpu.set_plain_rows(model, 1)       # decided: the kernel for every step width (nothing timed)
    calls = _linear_calls(model, monkeypatch)
    ids = torch.randint(3, 90, (1, 6))
    counts = {}
    for switch in ("off", "auto"):
        calls.clear()
        generate(model, ids, method="tr-jacobi", tree="small", max_new_tokens=4, eos_token_id=[], cpu_kernels=switch)
        counts[switch] = len(calls)
        assert cpu.enabled(model) is (switch == "auto")
    assert counts["off"] > counts["auto"]          # off: the tree steps' linears too are F.linear
