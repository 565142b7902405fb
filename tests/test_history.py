import torch

from msn.decoding.history import TokenHistory, find_continuation


def h(xs):
    return torch.tensor(xs)


def test_latest_occurrence_of_trigram():
    hist = h([1, 2, 3, 10, 11, 1, 2, 3, 20, 21, 22, 1, 2, 3])
    assert find_continuation(hist, 3, 5, latest=True) == [20, 21, 22, 1, 2]
    assert find_continuation(hist, 3, 2, latest=False) == [10, 11]


def test_falls_back_to_shorter_ngrams():
    hist = h([5, 7, 8, 9, 4, 7])
    assert find_continuation(hist, 3, 3) == [8, 9, 4]
    assert find_continuation(hist, 3, 3, min_ngram=2) == []


def test_no_match_and_tail_only_match():
    assert find_continuation(h([1, 2, 3, 4]), 2, 3) == []
    # The tail occurs only as itself: no earlier occurrence with a continuation.
    assert find_continuation(h([1, 2, 1, 2]), 2, 3) == [1, 2]
    assert find_continuation(h([3]), 2, 3) == []


def test_continuation_is_cut_at_the_end():
    assert find_continuation(h([1, 2, 9, 1, 2]), 2, 10) == [9, 1, 2]


def test_noise_comes_from_the_history():
    hist = TokenHistory([4, 5, 6], seed=3)
    hist.extend([7, 8])
    assert set(hist.noise(200)) <= {4, 5, 6, 7, 8}
    assert hist.tokens().tolist() == [4, 5, 6, 7, 8]
    hist.extend(list(range(50)))
    assert hist.tokens().tolist()[-3:] == [47, 48, 49] and hist.last == 49 and hist.length == 55


def test_indexed_continuation_equals_the_scan():
    """The n-gram index, brought up to date as the history grows by steps of several
    tokens, returns what a scan of the whole history returns, for every setting."""
    import random

    rng = random.Random(0)
    for trial in range(40):
        vocab = rng.choice([2, 3, 5, 12])
        hist = TokenHistory([rng.randrange(vocab) for _ in range(rng.randrange(1, 6))])
        for _ in range(30):
            for max_ngram, length, min_ngram, latest in ((3, 5, 1, True), (4, 3, 2, False), (1, 8, 1, True),
                                                         (3, 2, 1, False), (5, 5, 3, True)):
                want = find_continuation(hist.tokens(), max_ngram, length, min_ngram=min_ngram, latest=latest)
                got = hist.continuation(max_ngram, length, min_ngram=min_ngram, latest=latest)
                assert got == want, (trial, hist.ids, max_ngram, length, min_ngram, latest)
            hist.extend([rng.randrange(vocab) for _ in range(rng.randrange(1, 4))])
