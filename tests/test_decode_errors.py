import pytest
import torch

import msn
from msn.errors import MsnError


@pytest.fixture(scope="module")
def model(models):
    return models("llama")


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
    (dict(input_ids=torch.ones(2, 4, dtype=torch.long)), "batch size 2"),
    (dict(input_ids=torch.ones(1, 2100, dtype=torch.long)), "does not fit the model's context"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive"),
    (dict(method="beam"), "unknown method"),
    (dict(tree="huge"), "unknown tree preset"),
    (dict(window=0), "window must be positive"),
    (dict(colour="red"), "unknown decoding option"),
    (dict(tree=[]), "malformed tree: it has no node"),
    (dict(tree=[(0,), (1, 0)]), "malformed tree: .* prefix-closed"),
    (dict(tree=[(0,), ()]), "malformed tree: empty path"),
])
def test_bad_requests_get_one_clear_error(model, kwargs, match):
    args = dict(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=5, method="tr-jacobi")
    args.update(kwargs)
    with pytest.raises(MsnError, match=match):
        msn.generate(model, args.pop("input_ids"), **args)


def test_flash_attention_is_refused_with_a_hint():
    from msn.testing import tiny_model

    m = tiny_model("llama")
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(MsnError, match="sdpa"):
        msn.generate(m, torch.ones(1, 4, dtype=torch.long), max_new_tokens=3)


def test_sliding_window_beyond_its_span_is_refused():
    from msn.testing import tiny_model

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
