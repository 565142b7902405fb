"""Batched decoding: every row is exactly its own greedy output, whatever the batch does
around it (rows of other lengths, rows finishing early, rows joining late, rows cancelled)."""

import pytest
import torch

import msn
from msn.decoding.batch import BatchDecoder, Finished
from msn.errors import MsnError

METHODS = ["ar", "jacobi", "tr-jacobi", "pld", "lookahead", "recycle"]
NEW = 20


def prompts(n, seed=0, vocab=96):
    """``n`` prompts of different lengths; half repeat a phrase so that retrieval drafts hit."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 24, (1,), generator=g))
        ids = torch.randint(3, vocab, (1, length), generator=g)
        if i % 2:
            ids = torch.cat([ids, ids[:, : length // 2 + 1]], dim=1)
        out.append(ids)
    return out


def own(model, ps, eos, new=NEW):
    return [msn.generate(model, p, method="ar", max_new_tokens=new, eos_token_id=eos).tokens for p in ps]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2", "phi3"])
@pytest.mark.parametrize("size", [2, 4, 8])
def test_every_row_is_its_own_greedy_output(family, size, models):
    model = models(family)
    ps = prompts(size, seed=size)
    free = own(model, ps, [], new=NEW)
    # An EOS that some rows produce early (they finish first) and others never do.
    eos = [free[0][NEW // 3]]
    expected = own(model, ps, eos)
    assert any(len(e) < NEW for e in expected)
    for method in METHODS:
        tree = {"tree": "reference"} if method == "tr-jacobi" else {}
        got = msn.generate(model, ps, method=method, max_new_tokens=NEW, eos_token_id=eos, **tree)
        assert [r.tokens for r in got] == expected, (family, size, method)
        assert all(sum(r.accept_lengths) + 1 == len(r.tokens) for r in got)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma"])
def test_rows_that_join_late_and_rows_cancelled(family, models):
    model = models(family)
    ps = prompts(6, seed=11)
    expected = own(model, ps, [])
    for method in ["tr-jacobi", "lookahead", "ar"]:
        dec = BatchDecoder(model, method, tree="reference") if method == "tr-jacobi" else BatchDecoder(model, method)
        ids, done = {}, {}
        for i in (0, 1):
            ids[dec.add(ps[i], max_new_tokens=NEW, eos_token_id=[])] = i
        for _ in range(3):
            assert dec.step() == []
        for i in (2, 3, 4):                     # join a batch that is 3 steps in
            ids[dec.add(ps[i], max_new_tokens=NEW, eos_token_id=[])] = i
        victim = dec.add(ps[5], max_new_tokens=NEW, eos_token_id=[])
        dec.step()
        gone = dec.cancel(victim)
        assert gone.cancelled and expected[5][: len(gone.result.tokens)] == gone.result.tokens
        assert dec.cancel(victim) is None
        while not dec.idle:
            for fin in dec.step():
                done[ids[fin.rid]] = fin.result.tokens
        assert done == {i: expected[i] for i in range(5)}, (family, method)


def test_continuous_batching_with_max_batch(models):
    model = models("llama")
    ps = prompts(7, seed=3)
    expected = own(model, ps, [])
    got = msn.generate(model, ps, method="tr-jacobi", max_new_tokens=NEW, eos_token_id=[], max_batch=3)
    assert [r.tokens for r in got] == expected


def test_a_padded_tensor_batch_equals_the_list(models):
    model = models("qwen2")
    ps = prompts(4, seed=5)
    width = max(p.shape[1] for p in ps)
    for side in ("left", "right"):
        ids = torch.zeros(len(ps), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(ps):
            span = slice(width - p.shape[1], width) if side == "left" else slice(0, p.shape[1])
            ids[b, span], mask[b, span] = p[0], 1
        got = msn.generate(model, ids, attention_mask=mask, method="pld", max_new_tokens=NEW, eos_token_id=[])
        assert [r.tokens for r in got] == own(model, ps, [])


def test_a_row_whose_first_token_ends_it_never_joins(models):
    model = models("llama")
    ps = prompts(3, seed=7)
    first = own(model, ps[:1], [], new=1)[0][0]
    dec = BatchDecoder(model, "tr-jacobi")
    added = dec.add(ps[0], max_new_tokens=NEW, eos_token_id=[first])
    assert isinstance(added, Finished) and added.result.tokens == [first] and dec.idle


@pytest.mark.parametrize("method", ["ar", "tr-jacobi"])
def test_sampled_rows_equal_their_own_seeded_runs(method, models):
    model = models("gpt2")
    ps = prompts(4, seed=9)
    opts = dict(do_sample=True, temperature=0.8, top_k=20, seed=4)
    alone = [msn.generate(model, p, method=method, max_new_tokens=NEW, eos_token_id=[], **opts).tokens for p in ps]
    got = msn.generate(model, ps, method=method, max_new_tokens=NEW, eos_token_id=[], **opts)
    assert [r.tokens for r in got] == alone


@pytest.mark.parametrize("call, message", [
    (lambda m: msn.generate(m, []), "empty batch"),
    (lambda m: msn.generate(m, [1, 2, 3]), "one prompt"),
    (lambda m: msn.generate(m, [[1, 2], "x"]), "a batch holds prompts"),
    (lambda m: msn.generate(m, torch.tensor([[1, 2, 3]]), max_batch=2), "max_batch applies to a batch"),
    (lambda m: msn.generate(m, [[1, 2], [3]], max_batch=0), "max_batch must be a positive integer"),
    (lambda m: msn.generate(m, [[1, 2], [3]], on_tokens=print), "on_tokens applies to one prompt"),
    (lambda m: msn.generate(m, torch.tensor([[1, 2, 3], [0, 4, 5]]), attention_mask=torch.tensor([[1, 1, 1], [1, 0, 1]])),
     "padding inside the prompt"),
    (lambda m: msn.generate(m, torch.tensor([[1, 2, 3], [0, 4, 5]]), attention_mask=torch.tensor([[1, 1], [1, 1]])),
     "attention_mask shape"),
    (lambda m: msn.generate(m, [[1, 2], [3, 500]]), "outside the model's vocabulary"),
])
def test_bad_batches_get_one_clear_line(call, message, models):
    with pytest.raises(MsnError, match=message):
        call(models("llama"))


def test_rows_of_very_different_lengths_are_grouped():
    from msn.decoding.ragged import group_rows, plan

    assert plan([30, 28, 25, 20], 30, 4) is None                    # similar lengths: one call
    lengths = [900, 850, 60, 55, 40, 12]
    bounds = group_rows(lengths, 1)
    assert bounds[0] == (0, 2, 900)                                   # the long rows read the whole context
    ends = [0] + [b for _, b, _ in bounds]
    assert [(a, b) for a, b, _ in bounds] == list(zip(ends, ends[1:])) and ends[-1] == len(lengths)
    assert all(keep == max(lengths[a:b]) for a, b, keep in bounds)
    assert plan(lengths, 900, 1) is not None


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2", "phi3"])
def test_grouped_attention_equals_one_call(family, models, monkeypatch):
    """Prompts of 3 to 400 tokens: the short rows' attention runs in their own groups (the
    grouped path is taken), and every row is still exactly its own greedy output."""
    from msn.decoding import ragged

    model = models(family)
    g = torch.Generator().manual_seed(21)
    ps = [torch.randint(3, 96, (1, n), generator=g) for n in (400, 5, 380, 9, 3, 12)]
    expected = own(model, ps, [])
    joined = []
    real = ragged.in_groups
    monkeypatch.setattr(ragged, "in_groups", lambda *a, **k: joined.append(a[1]) or real(*a, **k))
    for method in METHODS:
        tree = {"tree": "reference"} if method == "tr-jacobi" else {}
        joined.clear()
        got = msn.generate(model, ps, method=method, max_new_tokens=NEW, eos_token_id=[], **tree)
        assert any(len(p.bounds) >= 2 for p in joined), (family, method)    # the grouped path ran
        assert [r.tokens for r in got] == expected, (family, method)
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert AttentionInterface()["sdpa"] is sdpa_attention_forward      # transformers' own function is back


def test_a_grouped_forward_has_the_logits_of_one_call(models, monkeypatch):
    """The same batched step with and without groups: logits equal to float rounding."""
    import copy

    from msn.decoding import cache as kv
    from msn.decoding import ragged
    from msn.decoding.step import prefill

    model = models("llama")
    g = torch.Generator().manual_seed(5)
    lengths = [300, 7, 280, 4]
    singles = []
    for n in lengths:
        c = kv.new_cache(model)
        prefill(model, torch.randint(3, 96, (1, n), generator=g), c)
        singles.append(c)
    width, past = 3, max(lengths)
    ids = torch.randint(3, 96, (len(lengths), width), generator=g)
    positions = torch.tensor(lengths)[:, None] + torch.arange(width)
    # Row r: its context [0, length_r), then its inputs at [length_r, length_r + width), causal.
    offset = torch.arange(past + width)[None, None, :] - torch.tensor(lengths)[:, None, None]
    allowed = offset <= torch.arange(width)[None, :, None]
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]
    groups = ragged.plan(lengths, past, width)
    assert groups is not None and len(groups.bounds) >= 2
    ran = []
    real = ragged.in_groups
    monkeypatch.setattr(ragged, "in_groups", lambda *a, **k: ran.append(1) or real(*a, **k))
    logits = []
    for p in (None, groups):
        cache = kv.merge_rows(None, [copy.deepcopy(c) for c in singles], list(range(len(lengths))))
        with torch.no_grad(), ragged.grouped_attention(p), kv.rows_at(cache, torch.tensor(lengths)):
            logits.append(model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                **kv.cache_kwargs(model, cache)).logits)
    assert len(ran) == model.config.num_hidden_layers          # every layer ran in groups
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_a_row_cancelled_before_its_first_step(models):
    """A row leaves between ``add`` and the step that would merge it into the batch cache."""
    model = models("qwen2")
    ps = prompts(4, seed=13)
    expected = own(model, ps, [])
    dec = BatchDecoder(model, "pld")
    ids = {dec.add(ps[0], max_new_tokens=NEW, eos_token_id=[]): 0}
    dec.step()
    victim = dec.add(ps[1], max_new_tokens=NEW, eos_token_id=[])
    ids[dec.add(ps[2], max_new_tokens=NEW, eos_token_id=[])] = 2
    gone = dec.cancel(victim)
    assert gone.cancelled and gone.result.tokens == expected[1][:1]
    ids[dec.add(ps[3], max_new_tokens=NEW, eos_token_id=[])] = 3
    done = {}
    while not dec.idle:
        for fin in dec.step():
            done[ids[fin.rid]] = fin.result.tokens
    assert done == {i: expected[i] for i in (0, 2, 3)}
