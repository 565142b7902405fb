"""msn's attention function (``msn.decoding.attention``): registered under msn's own name and
chosen per model, sdpa's results outside msn's steps, grouped-query attention inside sdpa on
CPU tree steps, and nothing of transformers or the process environment changed."""

import copy
import os

import torch

import msn
from msn.decoding import attention
from tiny import tiny_model


def test_msn_sdpa_is_chosen_per_model_and_changes_nothing_else(monkeypatch):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny_model("llama", vocab_size=96).eval()
    plain = copy.deepcopy(model)
    x = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    want = msn.generate(plain, x, method="ar", max_new_tokens=24, eos_token_id=[]).tokens
    assert plain.config._attn_implementation == attention.MSN_SDPA        # chosen by msn for this model

    other = tiny_model("llama", vocab_size=96, seed=1).eval()
    assert other.config._attn_implementation == "sdpa"                     # and for no other
    assert AttentionInterface()["sdpa"] is sdpa_attention_forward

    # Outside msn's steps it computes what sdpa computes.
    with torch.no_grad():
        assert torch.equal(plain(x).logits, model(x).logits)

    # Inside a CPU tree step with a mask: grouped-query attention in sdpa, no copy of heads,
    # nothing written to the environment, the tokens of greedy decoding.
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        seen.append(k.get("enable_gqa", False))
        assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    got = msn.generate(plain, x, method="tr-jacobi", tree="reference", max_new_tokens=24, eos_token_id=[])
    assert got.tokens == want and seen and all(seen)      # every masked CPU forward shared the heads


def test_an_eager_model_stays_eager():
    model = tiny_model("llama", vocab_size=96)
    model.set_attn_implementation("eager")
    attention.use(model)
    assert model.config._attn_implementation == "eager"
