"""The central contract: every fast decoder returns exactly greedy decoding's tokens."""

import random

import pytest
import torch

import msn
from conftest import FAMILIES, families_by_default, hf_greedy
from tiny import tiny_model

FAST = ["jacobi", "tr-jacobi", "pld", "lookahead", "recycle"]
PROMPTS = 50


def prompts(seed, vocab=96):
    rng = random.Random(seed)
    out = []
    for i in range(PROMPTS):
        if i % 2:
            # Repetitive prompt: the retrieval branch and prompt lookup find matches.
            unit = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))]
            ids = (unit * 8)[: rng.randint(8, 30)]
        else:
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]
        out.append(ids)
    return out


# Four families by default (mistral is llama's layout; phi3 only fuses its projections), all six
# under -m slow.
@pytest.mark.parametrize("family", families_by_default("llama", "qwen2", "gemma", "gpt2"))
def test_fast_decoders_equal_greedy(family, models):
    model = models(family)
    seed = FAMILIES.index(family)      # fixed per family, the same in every process
    rng = random.Random(1000 + seed)
    accepted_more = {m: 0 for m in FAST}
    for i, ids in enumerate(prompts(seed)):
        x = torch.tensor([ids])
        max_new = rng.randint(1, 40)
        ar = msn.generate(model, x, method="ar", max_new_tokens=max_new, eos_token_id=[])
        # EOS at a random point of the output (sometimes never reached).
        eos = rng.choice(ar.tokens) if i % 3 else 0
        want = hf_greedy(model, x, max_new, eos)
        got_ar = msn.generate(model, x, method="ar", max_new_tokens=max_new, eos_token_id=eos)
        assert got_ar.tokens == want, (family, i, "ar")
        assert sum(got_ar.accept_lengths) + 1 == len(want)
        for m in FAST:
            # tr-jacobi: the measured tree (which may be the root alone) and, on the repetitive
            # prompts, the reference size with merged drafts and the paper's tree, whose drafts get accepted.
            opts = {}
            if m == "tr-jacobi" and i % 2:
                opts = {"tree": "reference", "drafts": "paper" if i % 4 == 3 else "merged"}
            r = msn.generate(model, x, method=m, max_new_tokens=max_new, eos_token_id=eos, **opts)
            assert r.tokens == want, (family, i, m)
            assert sum(r.accept_lengths) + 1 == len(r.tokens) and r.steps == len(r.accept_lengths)
            accepted_more[m] += any(a > 1 for a in r.accept_lengths)
    # Drafts are really verified: on repetitive prompts, steps accept several tokens.
    assert accepted_more["tr-jacobi"] > 0 and accepted_more["pld"] > 0 and accepted_more["recycle"] > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eos_given_as_several_ids_and_from_generation_config(family, models):
    model = models(family)
    x = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    ar = msn.generate(model, x, method="ar", max_new_tokens=30, eos_token_id=[])
    stops = [ar.tokens[7], ar.tokens[12]]
    want = hf_greedy(model, x, 30, stops)
    for m in ["ar"] + FAST:
        assert msn.generate(model, x, method=m, max_new_tokens=30, eos_token_id=stops).tokens == want
    # None: the model's generation config decides, as model.generate() does.
    default = hf_greedy(model, x, 30, model.generation_config.eos_token_id)
    assert msn.generate(model, x, method="tr-jacobi", max_new_tokens=30).tokens == default


@pytest.mark.parametrize("drafts", ["merged", "paper"])
@pytest.mark.parametrize("tree", ["auto", "reference", "medium", "small", "chain",
                                  [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]])
def test_every_tree_preset_is_lossless(tree, drafts, models):
    model = models("qwen2")
    for ids in prompts(7)[:12]:
        x = torch.tensor([ids])
        want = msn.generate(model, x, method="ar", max_new_tokens=25, eos_token_id=[]).tokens
        got = msn.generate(model, x, method="tr-jacobi", tree=tree, drafts=drafts, max_new_tokens=25,
                           eos_token_id=[])
        assert got.tokens == want


def test_eager_attention_is_lossless_too():
    model = tiny_model("llama", attn_implementation="eager")
    for ids in prompts(3)[:10]:
        x = torch.tensor([ids])
        want = msn.generate(model, x, method="ar", max_new_tokens=20, eos_token_id=[]).tokens
        assert msn.generate(model, x, method="tr-jacobi", max_new_tokens=20, eos_token_id=[]).tokens == want


def test_max_new_tokens_and_eos_cut_a_multi_token_step(models):
    model = models("llama")
    for ids in prompts(11):  # the first prompt whose output has a step accepting 3+ tokens
        x = torch.tensor([ids])
        full = msn.generate(model, x, method="pld", max_new_tokens=40, eos_token_id=[])
        big = [i for i, a in enumerate(full.accept_lengths) if a > 2]
        if big:
            break
    assert big, "some prompt should give a multi-token step"
    # Cut inside that step: tokens before it + 1 (prefill) + part of it.
    cut = 1 + sum(full.accept_lengths[: big[0]]) + 1
    ar = msn.generate(model, x, method="ar", max_new_tokens=cut, eos_token_id=[])
    got = msn.generate(model, x, method="pld", max_new_tokens=cut, eos_token_id=[])
    assert got.tokens == ar.tokens and len(got.tokens) == cut
    # The same cut made by EOS: the token at that place, if it first appears there.
    eos = full.tokens[cut - 1]
    if eos not in full.tokens[: cut - 1]:
        got = msn.generate(model, x, method="pld", max_new_tokens=40, eos_token_id=eos)
        assert got.tokens == full.tokens[:cut]


def test_the_tree_without_retrieval_is_lossless_and_retrieves_nothing(models):
    """``retrieve=False`` (the reproduction's "tree-noret" row): the output stays greedy's,
    and the retrieval chain holds noise where retrieval would have found a continuation."""
    from msn.decoding.history import TokenHistory, find_continuation
    from msn.decoding.proposers import TreeJacobi

    model = models("llama")
    for ids in prompts(5)[:8]:
        x = torch.tensor([ids])
        want = msn.generate(model, x, method="ar", max_new_tokens=24, eos_token_id=[]).tokens
        off = msn.generate(model, x, method="tr-jacobi", tree="reference", retrieve=False, max_new_tokens=24,
                           eos_token_id=[])
        assert off.tokens == want
    seq = list(range(3, 53)) * 2 + [3, 4, 5]
    found = find_continuation(torch.tensor(seq), 3, 5, min_ngram=1, latest=True)
    assert found == [6, 7, 8, 9, 10]
    for retrieve in (True, False):
        proposer = TreeJacobi(torch.device("cpu"), tree="small", retrieve_len=5, retrieve_ngram=3, retrieve=retrieve)
        proposer.propose(TokenHistory(seq, seed=0))
        assert (proposer.retrieved == found) == retrieve


def test_retrieve_false_needs_a_fixed_tree():
    model = tiny_model("llama")
    with pytest.raises(msn.MsnError, match="retrieve=False needs a fixed tree"):
        msn.generate(model, torch.tensor([[3, 4, 5]]), method="tr-jacobi", retrieve=False, max_new_tokens=4)
    with pytest.raises(msn.MsnError, match="retrieve must be True or False"):
        msn.generate(model, torch.tensor([[3, 4, 5]]), method="tr-jacobi", tree="small", retrieve="no",
                     max_new_tokens=4)
