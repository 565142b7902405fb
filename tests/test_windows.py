"""Hybrid and sliding-window attention past the window: every decoder, batches, sampling and
the fixed-shape step equal transformers' own decoding on tiny models of every hybrid family
(windows of 12 positions, prompts and outputs several windows long)."""

import random
from types import SimpleNamespace

import pytest
import torch

import msn
from conftest import hf_greedy
from msn.decoding.windows import FULL, SLIDING, LayerMasks, layer_masks
from msn.errors import MsnError
from tiny import HYBRID_FAMILIES, WINDOW, tiny_hybrid

HYBRIDS = list(HYBRID_FAMILIES)
NEW = 40
# Method name -> generate options; every decoder and every source of drafts.
METHODS = {"ar": {}, "jacobi": {}, "pld": {}, "lookahead": {}, "recycle": {},
           "tr-jacobi": {}, "tr-jacobi:reference": {"tree": "reference"},
           "tr-jacobi:paper": {"drafts": "paper", "tree": "reference"}}
_MODELS = {}


def hybrid(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_hybrid(family)
    return _MODELS[family]


def prompt(seed, n=30, vocab=96):
    """A prompt with a repeated stretch (drafts get accepted) of ``n`` tokens."""
    rng = random.Random(seed)
    head = [rng.randrange(3, vocab) for _ in range((n + 1) // 2)]
    return torch.tensor([(head + head)[:n]])


def run(model, x, name, max_new_tokens=NEW, **kw):
    method = name.split(":")[0]
    return msn.generate(model, x, method=method, max_new_tokens=max_new_tokens, eos_token_id=[], **METHODS[name],
                        **kw)


def check_every_decoder(model, seeds, n=30, new=NEW):
    """Every decoder against transformers' greedy decoding, cached where its cache keeps the
    window; with a window of one position, against forwards over the whole sequence: there
    transformers 5.25's own cached decoding of Gemma 3 differs from its full forward from the
    third new token on (a tiny model, a 3-token prompt; msn's ``ar`` equals the full forward)."""
    window = getattr(model.config, "sliding_window", None)
    for seed in seeds:
        x = prompt(seed, n)
        want = hf_greedy(model, x, new, [], use_cache=window != 1)
        for name in METHODS:
            r = run(model, x, name, max_new_tokens=new)
            assert r.tokens == want, (seed, n, name)
            assert sum(r.accept_lengths) + 1 == len(r.tokens)


@pytest.mark.parametrize("family", HYBRIDS)
def test_every_decoder_equals_transformers_past_the_window(family):
    model = hybrid(family)
    masks = layer_masks(model.config)
    assert masks.sliding and (masks.window == WINDOW or dict(masks.types).get(SLIDING) == WINDOW)
    assert 30 + NEW > 5 * WINDOW
    check_every_decoder(model, seeds=(0,))


@pytest.mark.slow
@pytest.mark.parametrize("family", HYBRIDS)
@pytest.mark.parametrize("window", [1, 5, 29])
def test_every_decoder_on_more_windows_and_lengths(family, window):
    """Windows from one position (each token sees only itself) to longer than a tree's depth,
    prompts from 3 to 200 tokens, outputs up to 100: python -m pytest -m slow."""
    model = tiny_hybrid(family, seed=window, window=window)
    for n, new in ((3, 60), (90, 40), (200, 100)):
        check_every_decoder(model, seeds=(window, n), n=n, new=new)


@pytest.mark.parametrize("family", HYBRIDS)
def test_batched_rows_equal_their_own_output_past_the_window(family, monkeypatch):
    """Rows of 3 to 60 tokens, split into attention groups where the family's attention
    allows it (sdpa): each row equals transformers' greedy output for it alone."""
    from msn.decoding import ragged

    model = hybrid(family)
    ps = [prompt(s, n) for s, n in ((2, 60), (3, 5), (4, 33), (5, 3))]
    want = [hf_greedy(model, p, NEW, []) for p in ps]
    monkeypatch.setattr(ragged, "_CALL", 1.0)          # group rows of different lengths
    for name in ("ar", "tr-jacobi:reference"):
        got = run(model, ps, name)
        assert [r.tokens for r in got] == want, (family, name)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral_window"])
def test_a_seed_gives_ar_sampled_tokens_past_the_window(family):
    """``ar`` samples from transformers' own forward (it builds the sliding masks); every
    other decoder draws the same tokens with the same seed."""
    model = hybrid(family)
    x = prompt(6)
    for seed in range(2):
        opts = dict(do_sample=True, temperature=0.9, top_k=20, seed=seed)
        want = run(model, x, "ar", **opts).tokens
        for name in METHODS:
            assert run(model, x, name, **opts).tokens == want, (family, seed, name)
        got = run(model, x, "tr-jacobi:reference", sample_drafts=True, **opts).tokens
        assert got == want, (family, seed)


@pytest.mark.parametrize("family", HYBRIDS)
def test_fixed_shape_steps_equal_transformers_past_the_window(family, eager_fixed):
    model = hybrid(family)
    x = prompt(7)
    want = hf_greedy(model, x, NEW, [])
    for name in ("ar", "recycle", "tr-jacobi:reference"):
        assert run(model, x, name).tokens == want, (family, name)
    assert eager_fixed[id(model)].buf is not None          # the fixed-shape step ran


def test_the_window_rule_is_transformers():
    """A chain step's windowed mask equals transformers' sliding-window causal rule at
    every query and key, for several windows and context lengths."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    from msn.decoding.tree import attention_bias, compile_tree, single_step_keys

    tree = compile_tree(((0,), (0, 0), (0, 0, 0)))
    for window, context in ((1, 5), (3, 2), (4, 9), (12, 30)):
        bias = attention_bias(tree, context, torch.float32, "cpu")
        positions = context + tree.depths
        got = LayerMasks(window=window).build(bias, positions[None], single_step_keys(context, positions))
        rule = sliding_window_causal_mask_function(window)
        t = torch.tensor
        want = torch.tensor([[bool(rule(t(0), t(0), t(q), t(k))) for k in range(context + 4)]
                             for q in range(context, context + 4)])
        assert torch.equal(got[0, 0] == 0, want), (window, context)


def test_layer_masks_per_type_and_refusals():
    cfg = lambda **kw: SimpleNamespace(model_type="x", **kw)  # noqa: E731
    assert not layer_masks(cfg()).sliding
    assert layer_masks(cfg(layer_types=[FULL, FULL], sliding_window=8)) == LayerMasks()
    assert layer_masks(cfg(layer_types=[SLIDING, FULL, SLIDING], sliding_window=8)).types == ((FULL, None), (SLIDING, 8))
    assert layer_masks(cfg(sliding_window=8)).window == 8
    assert layer_masks(cfg(sliding_window=8, use_sliding_window=False)) == LayerMasks()
    with pytest.raises(MsnError, match="'linear_attention'"):
        layer_masks(cfg(layer_types=[FULL, "linear_attention"]))
    with pytest.raises(MsnError, match="chunked attention"):
        layer_masks(cfg(attention_chunk_size=64))
    with pytest.raises(MsnError, match="no sliding_window"):
        layer_masks(cfg(layer_types=[SLIDING, FULL]))


def test_a_family_without_sdpa_loads_with_eager_and_decodes_exactly(tmp_path):
    from msn.loading import load_for_inference
    from tiny import tiny_tokenizer

    hybrid("gemma2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, _ = load_for_inference(str(tmp_path), "cpu", "float32")
    assert model.config._attn_implementation == "eager"
    x = prompt(8)
    assert run(model, x, "tr-jacobi:reference").tokens == hf_greedy(model, x, NEW, [])


def test_the_cache_keeps_every_position_in_sliding_layers_too():
    """Sliding layers keep every entry (the window is the mask's): the bytes held grow with
    the whole context, the same in every layer."""
    from msn.decoding import cache as kv
    from msn.decoding.step import prefill

    model = hybrid("gemma3_text")
    cache = kv.new_cache(model)
    with torch.inference_mode():
        prefill(model, prompt(9, 50), cache)
    cfg = model.config
    per_position = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    live, allocated = kv.cache_bytes(cache)
    assert live == 50 * per_position and allocated >= live
    assert {layer.keys.shape[-2] for layer in cache.layers} == {50}
