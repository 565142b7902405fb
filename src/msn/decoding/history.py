"""Host-side token history (prompt plus accepted tokens), noise and n-gram retrieval.

Pure host code: proposers read it to build drafts; nothing here touches the model.
"""

from __future__ import annotations

import random

import torch


class TokenHistory:
    """Prompt plus every accepted token, in a host buffer that doubles when full."""

    def __init__(self, prompt: list[int], seed: int = 0, capacity: int = 256):
        self.buf = torch.zeros(len(prompt) + capacity, dtype=torch.long)
        self.buf[: len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.length = len(prompt)
        self.rng = random.Random(seed)

    def extend(self, tokens: list[int]) -> None:
        n = len(tokens)
        if self.length + n > self.buf.numel():
            grown = torch.zeros(2 * (self.length + n), dtype=torch.long)
            grown[: self.length] = self.buf[: self.length]
            self.buf = grown
        self.buf[self.length : self.length + n] = torch.tensor(tokens, dtype=torch.long)
        self.length += n

    def tokens(self) -> torch.Tensor:
        """(length,) long view of the history."""
        return self.buf[: self.length]

    def noise(self, n: int) -> list[int]:
        """``n`` tokens drawn uniformly from the history (the MSN 'ahead' distribution)."""
        hist = self.buf[: self.length]
        return hist[torch.tensor([self.rng.randrange(self.length) for _ in range(n)], dtype=torch.long)].tolist()


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
