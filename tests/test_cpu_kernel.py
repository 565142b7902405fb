"""The CPU kernel for a few rows (msn.decoding.cpu): same products up to float rounding,
only inside its block, only on plain float32 CPU linears, and off with MSN_CPU_GEMM=0."""

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
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_one_row_many_rows_other_dtypes_and_the_switch_keep_f_linear(monkeypatch):
    model = tiny_model("qwen2").eval()
    calls = _linear_calls(model, monkeypatch)
    with torch.inference_mode():
        for ids in (torch.randint(3, 90, (1, 1)), torch.randint(3, 90, (1, cpu.MAX_ROWS + 1))):
            calls.clear()
            with cpu.skinny_linears(model):
                model(input_ids=ids)
            assert calls, ids.shape
        monkeypatch.setenv("MSN_CPU_GEMM", "0")
        calls.clear()
        with cpu.skinny_linears(model):
            model(input_ids=torch.randint(3, 90, (1, 4)))
        assert calls
        monkeypatch.delenv("MSN_CPU_GEMM")
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
    cpu._LINEARS.pop(model, None)
    with torch.inference_mode(), cpu.skinny_linears(model):
        assert hooked.__dict__["forward"] is owner
        model(input_ids=torch.randint(3, 90, (1, 4)))
    assert hooked.__dict__["forward"] is owner
