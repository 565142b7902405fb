import pytest
import torch

import msn
from msn.errors import MsnError


def test_flash_attention_is_refused_with_a_hint():
    from tiny import tiny_model

    m = tiny_model("llama")
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(MsnError, match="sdpa"):
        msn.generate(m, torch.ones(1, 4, dtype=torch.long), max_new_tokens=3)


def test_sliding_window_beyond_its_span_is_refused():
    from tiny import tiny_model

    m = tiny_model("mistral")
    m.config.sliding_window = 16
    with pytest.raises(MsnError, match="sliding attention window"):
        msn.generate(m, torch.ones(1, 10, dtype=torch.long), max_new_tokens=10)
    # Within the window the decoders stay exact.
    from conftest import hf_greedy

    x = torch.tensor([[5, 6, 7, 5, 6]])
    want = hf_greedy(m, x, 11, 0)
    for method in ("ar", "tr-jacobi", "lookahead"):
        assert msn.generate(m, x, method=method, max_new_tokens=11, eos_token_id=0).tokens == want
