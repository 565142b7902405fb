"""Requests that reach past the model's positions: refused alike by every method, or cut
to fit with ``fit_context``, and then still equal to greedy decoding."""

import pytest
import torch

import msn
from conftest import hf_greedy
from msn.errors import MsnError
from tiny import tiny_model

METHODS = ["ar", "jacobi", "tr-jacobi", "pld", "lookahead"]
CONTEXT = 32


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def short(request):
    return tiny_model(request.param, context=CONTEXT)


PROMPT = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8]])   # 12 tokens, repetitive: drafts get accepted


@pytest.mark.parametrize("method", METHODS)
def test_overflow_is_refused_by_every_method(short, method):
    with pytest.raises(MsnError, match="exceeds the model's context of 32 positions"):
        msn.generate(short, PROMPT, method=method, max_new_tokens=CONTEXT - 12 + 1, eos_token_id=[])
    with pytest.raises(MsnError, match="exceeds the model's context"):
        msn.generate(short, PROMPT, method=method, max_new_tokens=10**10, eos_token_id=[])


@pytest.mark.parametrize("method", METHODS)
def test_up_to_the_last_position_every_method_equals_greedy(short, method):
    room = CONTEXT - PROMPT.shape[1]
    want = hf_greedy(short, PROMPT, room, [])
    assert len(want) == room
    got = msn.generate(short, PROMPT, method=method, max_new_tokens=room, eos_token_id=[])
    assert got.tokens == want
    cut = msn.generate(short, PROMPT, method=method, max_new_tokens=10**6, eos_token_id=[], fit_context=True)
    assert cut.tokens == want
