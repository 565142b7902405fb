"""Sampling is exact in distribution: every decoder's first new tokens follow the joint
distribution of one-token sampling, computed exactly from the model by enumeration.

The default suite runs every method once (500 samples, settings and families in turn);
the slow suite runs the whole grid (3 families x 5 methods x 3 settings) with 20,000
samples each. A verifier that accepts every
draft fails the same test, which shows that the test has power.
"""

import math

import pytest
import torch

import msn
from tiny import tiny_model

METHODS = ["ar", "jacobi", "tr-jacobi", "pld", "lookahead", "recycle", "tr-jacobi:paper"]
SETTINGS = {"T1": dict(temperature=1.0), "T0.7-k5": dict(temperature=0.7, top_k=5),
            "T1-p0.8": dict(temperature=1.0, top_p=0.8)}
VOCAB = 8
NEW = 3
PROMPT = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])    # repetitive: pld, retrieval and lookahead draft often
ALPHA = 1e-3
QUICK_N = 500      # samples per default-suite case (the power test uses as many)


def model_for(family):
    # A narrow initializer keeps the distributions spread out, so many sequences are likely.
    model = tiny_model(family, vocab_size=VOCAB, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


def processed(logits, temperature, top_k=None, top_p=None):
    """transformers' warpers in transformers' order, as the reference."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits[None].float())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores[0], -1)


@torch.no_grad()
def exact_joint(model, setting) -> dict[tuple, float]:
    """P(first NEW tokens) by enumerating prefixes and multiplying processed probabilities."""
    joint = {(): 1.0}
    for _ in range(NEW):
        nxt = {}
        for prefix, p in joint.items():
            if p < 1e-12:
                continue
            ids = torch.cat([PROMPT[0], torch.tensor(prefix, dtype=torch.long)])[None]
            probs = processed(model(input_ids=ids).logits[0, -1], **setting)
            for tok in range(VOCAB):
                nxt[prefix + (tok,)] = p * float(probs[tok])
        joint = nxt
    return joint


def chi_square_p(counts: dict, joint: dict, n: int) -> float:
    """p-value of Pearson's chi-square test, bins with expected count < 5 pooled."""
    observed, expected = [], []
    pool_o = pool_e = 0.0
    for seq, p in joint.items():
        e = n * p
        if e < 5:
            pool_o += counts.get(seq, 0)
            pool_e += e
        else:
            observed.append(counts.get(seq, 0))
            expected.append(e)
    outside = n - sum(counts.get(s, 0) for s in joint)      # sequences of probability 0
    pool_o += outside
    if pool_e > 0 or pool_o > 0:
        observed.append(pool_o)
        expected.append(max(pool_e, 1e-9))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def method_options(name):
    """``tr-jacobi:reference:paper`` -> ("tr-jacobi", {"tree": "reference", "drafts": "paper"})."""
    from msn.bench.harness import split_method

    method, tree, drafts = split_method(name)
    return method, {k: v for k, v in dict(tree=tree, drafts=drafts).items() if v is not None}


def samples(model, method, setting, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = {}
    method, opts = method_options(method)
    for _ in range(n):
        # recycle and merged tr-jacobi: the candidate table carries over from sample to sample.
        seq = tuple(msn.generate(model, PROMPT, method=method, max_new_tokens=NEW, eos_token_id=[],
                                 do_sample=True, generator=g, **opts, **setting).tokens)
        counts[seq] = counts.get(seq, 0) + 1
    return counts


def check(family, method, setting_name, n):
    model = model_for(family)
    setting = SETTINGS[setting_name]
    joint = exact_joint(model, setting)
    assert math.isclose(sum(joint.values()), 1.0, rel_tol=1e-5)
    p = chi_square_p(samples(model, method, setting, n), joint, n)
    print(f"chi-square {family} {method} {setting_name} n={n}: p={p:.4f}")
    assert p > ALPHA, (family, method, setting_name, p)


# The default suite: every method once, the three settings and three families in turn.
QUICK = [("ar", "T1", "llama"), ("jacobi", "T0.7-k5", "qwen2"), ("tr-jacobi", "T1-p0.8", "gpt2"),
         ("pld", "T1", "qwen2"), ("lookahead", "T0.7-k5", "gpt2"), ("recycle", "T1", "qwen2"),
         ("tr-jacobi:reference", "T0.7-k5", "llama")]    # the slow grid holds every pairing


@pytest.mark.parametrize("method, setting, family", QUICK)
def test_every_decoder_samples_exactly(method, setting, family):
    check(family, method, setting, QUICK_N)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("method", METHODS)
def test_every_decoder_samples_exactly_20000(family, method, setting):
    check(family, method, setting, 20000)


@pytest.mark.parametrize("method", ["tr-jacobi", pytest.param("jacobi", marks=pytest.mark.slow),
                                    pytest.param("pld", marks=pytest.mark.slow),
                                    pytest.param("recycle", marks=pytest.mark.slow)])
def test_a_verifier_that_accepts_every_draft_fails(method, monkeypatch):
    from msn.decoding import step, verify

    def accept_any(tree, input_ids, pred, usable=None):
        """Takes the first root-to-leaf path whole, whatever the model says of its drafts."""
        best = torch.tensor(0)
        path = tree.leaf_paths[0]
        accepted = tree.leaf_len[0]
        last = path[accepted - 1] if accepted > 0 else torch.tensor(0)
        return verify.Verdict(accepted=accepted, best=best, bonus=pred[last],
                              path_tokens=input_ids[path])

    monkeypatch.setattr(step, "greedy_verify", accept_any)
    model = model_for("llama")
    setting = SETTINGS["T1"]
    n = QUICK_N
    p = chi_square_p(samples(model, method, setting, n), exact_joint(model, setting), n)
    print(f"chi-square with a verifier that accepts every draft, {method} n={n}: p={p:.2e}")
    assert p < ALPHA, (method, p)


@pytest.mark.slow
def test_the_test_accepts_plain_sampling_from_transformers():
    """transformers' own sampling passes the same test (the reference is right)."""
    model = model_for("llama")
    setting = SETTINGS["T0.7-k5"]
    torch.manual_seed(0)
    n = 2000
    counts = {}
    for _ in range(n):
        out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=True, max_new_tokens=NEW,
                             min_new_tokens=NEW, pad_token_id=0, top_p=None, **setting)
        seq = tuple(out[0, PROMPT.shape[1]:].tolist())
        counts[seq] = counts.get(seq, 0) + 1
    assert chi_square_p(counts, exact_joint(model, setting), n) > ALPHA


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_a_seed_gives_ar_sampled_tokens_with_every_method_and_tree(family):
    """One uniform per output position: drafts and trees do not move the draws."""
    model = model_for(family)
    for seed in range(5):
        setting = dict(do_sample=True, temperature=0.9, top_p=0.95, seed=seed)
        want = msn.generate(model, PROMPT, method="ar", max_new_tokens=30, eos_token_id=[], **setting).tokens
        for name in METHODS[1:]:
            m, opts = method_options(name)
            assert msn.generate(model, PROMPT, method=m, max_new_tokens=30, eos_token_id=[], **opts,
                                **setting).tokens == want
        for tree in ("auto", "reference", "chain"):
            got = msn.generate(model, PROMPT, method="tr-jacobi", tree=tree, max_new_tokens=30, eos_token_id=[],
                               sample_drafts=True, **setting).tokens
            assert got == want


def test_seed_reproduces_and_greedy_is_the_zero_temperature_case():
    model = model_for("qwen2")
    runs = [msn.generate(model, PROMPT, method="tr-jacobi", max_new_tokens=20, eos_token_id=[], do_sample=True,
                         seed=7).tokens for _ in range(2)]
    assert runs[0] == runs[1]
    greedy = msn.generate(model, PROMPT, method="ar", max_new_tokens=20, eos_token_id=[]).tokens
    for name in METHODS:
        m, opts = method_options(name)
        assert msn.generate(model, PROMPT, method=m, max_new_tokens=20, eos_token_id=[], do_sample=True,
                            temperature=0, **opts).tokens == greedy
