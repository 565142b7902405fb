import random

import pytest
import torch

from msn.errors import MsnError
from msn.data.collate import MsnCollator
from msn.noise import NoiseConfig, noise_sequence, pick_spans


def random_sample(rng, vocab=50):
    """A sequence with a prompt and one or two response runs, as a chat would have."""
    prompt = rng.randint(1, 20)
    runs = [rng.randint(0, 40) for _ in range(rng.randint(1, 2))]
    ids, eligible = [rng.randrange(vocab) for _ in range(prompt)], [False] * prompt
    for r in runs:
        ids += [rng.randrange(vocab) for _ in range(r)] + [vocab]  # end-of-turn special
        eligible += [True] * r + [False]
        ids += [rng.randrange(vocab) for _ in range(3)]
        eligible += [False] * 3
    return torch.tensor(ids), torch.tensor(eligible)


@pytest.mark.parametrize("source", ["ahead", "uniform"])
@pytest.mark.parametrize("span_len,num_spans", [(5, 1), (3, 2), (1, 4), (8, 3)])
def test_noise_properties_over_many_samples(source, span_len, num_spans):
    rng = random.Random(f"{source}{span_len}{num_spans}")
    cfg = NoiseConfig(span_len=span_len, num_spans=num_spans, source=source)
    skipped = 0
    for trial in range(300):
        ids, eligible = random_sample(rng)
        gen = torch.Generator().manual_seed(trial)
        noisy, noised = noise_sequence(ids, eligible, cfg, gen, vocab_size=51)
        touched = int(noised.sum())
        assert touched % span_len == 0 and touched // span_len <= num_spans
        assert not (noised & ~eligible).any(), "noise outside the response"
        assert ((noisy != ids) <= noised).all(), "a position changed without being selected"
        # Each span is L consecutive positions inside one eligible run.
        starts = pick_spans(eligible, span_len, num_spans, torch.Generator().manual_seed(trial))
        for s in starts:
            assert eligible[s : s + span_len].all()
        assert len(starts) * span_len == touched
        if source == "ahead":
            for p in torch.nonzero(noised).flatten().tolist():
                assert int(noisy[p]) in ids[:p].tolist(), "ahead noise must copy an earlier token"
        skipped += touched == 0
        if eligible.long().sum() >= span_len * num_spans * 2 - 1 and len(starts) < num_spans:
            # Only possible when runs are short; a run of 2L-1 fits at least one span.
            assert len(starts) >= 1
    assert skipped < 300


def test_same_seed_same_noise_different_seed_differs():
    ids = torch.arange(100)
    eligible = torch.zeros(100, dtype=torch.bool)
    eligible[20:] = True
    cfg = NoiseConfig(span_len=5, num_spans=3)
    a = noise_sequence(ids, eligible, cfg, torch.Generator().manual_seed(1), 100)
    b = noise_sequence(ids, eligible, cfg, torch.Generator().manual_seed(1), 100)
    c = noise_sequence(ids, eligible, cfg, torch.Generator().manual_seed(2), 100)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_too_short_response_stays_clean_and_is_counted():
    coll = MsnCollator(NoiseConfig(span_len=5, num_spans=1), pad_token_id=0, vocab_size=10, seed=0)
    feats = [
        {"input_ids": [3, 4, 5, 6, 7, 8], "labels": [-100, -100, 5, 6, 7, 8], "noise_mask": [0, 0, 1, 1, 1, 1], "index": 0},
        {"input_ids": list(range(1, 21)), "labels": [-100] * 5 + list(range(6, 21)), "noise_mask": [0] * 5 + [1] * 15, "index": 1},
    ]
    out = coll(feats)
    assert out["input_ids"][0, :6].tolist() == [3, 4, 5, 6, 7, 8]
    assert coll.too_short == 1 and coll.noised_positions == 5
    # Labels are the clean ids, -100 on prompt and padding; padding is masked out.
    assert out["labels"][0].tolist() == [-100, -100, 5, 6, 7, 8] + [-100] * 14
    assert out["labels"][1].tolist() == [-100] * 5 + list(range(6, 21))
    assert out["attention_mask"][0].tolist() == [1] * 6 + [0] * 14
    assert (out["input_ids"][1] != torch.arange(1, 21)).sum() <= 5


def test_no_noise_touches_nothing():
    coll = MsnCollator(NoiseConfig(enabled=False), pad_token_id=0, vocab_size=10)
    feats = [{"input_ids": list(range(1, 30)), "labels": list(range(1, 30)), "noise_mask": [1] * 29, "index": 0}]
    assert coll(feats)["input_ids"][0].tolist() == list(range(1, 30))
    assert coll.noised_positions == 0 and coll.too_short == 0


def test_collator_noise_is_independent_of_batch_layout():
    feats = [{"input_ids": list(range(1, 40)), "labels": list(range(1, 40)), "noise_mask": [1] * 39, "index": i}
             for i in range(4)]
    together = MsnCollator(NoiseConfig(), 0, 50, seed=3)(feats)["input_ids"]
    split = MsnCollator(NoiseConfig(), 0, 50, seed=3)
    parts = torch.cat([split(feats[:2])["input_ids"], split(feats[2:])["input_ids"]])
    assert torch.equal(together, parts)


@pytest.mark.parametrize("kwargs", [dict(span_len=0), dict(span_len=-2), dict(num_spans=0), dict(source="zeros")])
def test_bad_noise_settings(kwargs):
    with pytest.raises(MsnError):
        NoiseConfig(**kwargs)
