"""Host-side token history (prompt plus accepted tokens), noise and n-gram retrieval.

Pure host code: proposers read it to build drafts; nothing here touches the model.
"""

from __future__ import annotations

import random

import torch


class TokenHistory:
    """Prompt plus every accepted token, as a host list, with an n-gram index for retrieval.

    A step's host work stays small whatever the length: ``continuation`` looks the final
    n-gram up in an index that is brought up to date lazily (each n-gram entered once), so a
    step that drafts nothing pays microseconds for its retrieval, not a scan of the history.
    """

    def __init__(self, prompt: list[int], seed: int = 0):
        self.ids: list[int] = [int(t) for t in prompt]
        self.rng = random.Random(seed)
        # n -> (n-grams indexed so far, {n-gram: (its first start, its latest start)})
        self._grams: dict[int, tuple[int, dict[tuple[int, ...], tuple[int, int]]]] = {}

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def last(self) -> int:
        """The latest token (the next step's root)."""
        return self.ids[-1]

    def extend(self, tokens: list[int]) -> None:
        self.ids.extend(tokens)

    def tokens(self) -> torch.Tensor:
        """(length,) long host tensor of the history (a copy)."""
        return torch.tensor(self.ids, dtype=torch.long)

    def noise(self, n: int) -> list[int]:
        """``n`` tokens drawn uniformly from the history (the MSN 'ahead' distribution)."""
        ids, size = self.ids, len(self.ids)
        return [ids[self.rng.randrange(size)] for _ in range(n)]

    def _index(self, n: int) -> dict[tuple[int, ...], tuple[int, int]]:
        """The n-grams that have a following token, each with its first and latest start."""
        done, index = self._grams.get(n, (0, {}))
        ids = self.ids
        for s in range(done, len(ids) - n):
            gram = tuple(ids[s : s + n])
            seen = index.get(gram)
            index[gram] = (seen[0] if seen is not None else s, s)
        self._grams[n] = (max(done, len(ids) - n), index)
        return index

    def continuation(self, max_ngram: int, length: int, *, min_ngram: int = 1, latest: bool = True) -> list[int]:
        """``find_continuation`` of this history, from the index (the same result)."""
        t = len(self.ids)
        for n in range(min(max_ngram, t - 1), min_ngram - 1, -1):
            if n <= 0:
                break
            hit = self._index(n).get(tuple(self.ids[t - n :]))
            if hit is None:
                continue
            start = (hit[1] if latest else hit[0]) + n
            return self.ids[start : min(start + length, t)]
        return []


def find_continuation(history: torch.Tensor, max_ngram: int, length: int, *,
                      min_ngram: int = 1, latest: bool = True) -> list[int]:
    """Continuation after an earlier occurrence of the history's final n-gram.

    Tries n-gram sizes from ``max_ngram`` down to ``min_ngram``; for the first size with
    an earlier occurrence that is followed by at least one token, returns up to
    ``length`` tokens that followed it. ``latest`` picks the most recent such occurrence
    (TR-Jacobi's retrieval branch); otherwise the earliest (transformers' prompt lookup).
    Returns [] when nothing matches.

    Args:
        history: (T,) long, host tensor.
    """
    t = int(history.numel())
    for n in range(min(max_ngram, t - 1), min_ngram - 1, -1):
        if n <= 0:
            break
        tail = history[t - n :]
        # Windows that start early enough to have at least one following token.
        windows = history[: t - 1].unfold(0, n, 1) if t - 1 >= n else None
        if windows is None:
            continue
        hits = torch.nonzero((windows == tail).all(dim=1)).flatten()
        if hits.numel() == 0:
            continue
        start = int(hits[-1] if latest else hits[0]) + n
        return history[start : min(start + length, t)].tolist()
    return []


def leading_matches(drafts: list[int], truth: list[int]) -> int:
    """How many leading ``drafts`` equal the tokens that came (``truth``): what a chain accepts."""
    right = 0
    for drafted, tok in zip(drafts, truth):
        if drafted != tok:
            break
        right += 1
    return right
