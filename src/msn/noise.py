"""MSN input noise: the pure corruption function and a data collator.

For each sample, ``num_spans`` non-overlapping spans of ``span_len`` consecutive
positions are picked among the noise-eligible positions (response tokens that are not
special tokens; a span never crosses out of one assistant turn). Each position in a
span gets a token drawn uniformly from the clean tokens before it (``ahead``) or from
the vocabulary (``uniform``). Labels stay the clean ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from msn.errors import MsnError

IGNORE_INDEX = -100
NOISE_SOURCES = ("ahead", "uniform")


@dataclass
class NoiseConfig:
    """MSN noise settings.

    Attributes:
        span_len: L, positions per noise span (the paper uses 5).
        num_spans: spans per sample (the paper uses 1).
        source: ``ahead`` (a token drawn uniformly from those before it in the same
            sequence) or ``uniform`` (a random vocabulary token).
        enabled: False trains plain SFT through the same code path.
    """

    span_len: int = 5
    num_spans: int = 1
    source: str = "ahead"
    enabled: bool = True

    def __post_init__(self):
        if self.span_len <= 0:
            raise MsnError(f"noise span length must be positive, got {self.span_len}")
        if self.num_spans <= 0:
            raise MsnError(f"noise spans per sample must be positive, got {self.num_spans}")
        if self.source not in NOISE_SOURCES:
            raise MsnError(f"unknown noise source {self.source!r}; choose one of {', '.join(NOISE_SOURCES)}")


def pick_spans(eligible: torch.Tensor, span_len: int, num_spans: int, generator: torch.Generator) -> list[int]:
    """Start positions of up to ``num_spans`` non-overlapping spans inside ``eligible``.

    Args:
        eligible: (T,) bool.
    Returns a sorted list; shorter than ``num_spans`` when the eligible runs are too short.
    """
    t = eligible.numel()
    if t < span_len:
        return []
    valid = eligible.unfold(0, span_len, 1).all(dim=1).clone()        # (T - L + 1,)
    starts = []
    for _ in range(num_spans):
        idx = torch.nonzero(valid).flatten()
        if idx.numel() == 0:
            break
        s = int(idx[torch.randint(idx.numel(), (1,), generator=generator)])
        starts.append(s)
        valid[max(0, s - span_len + 1) : s + span_len] = False
    return sorted(starts)


def noise_sequence(input_ids: torch.Tensor, eligible: torch.Tensor, cfg: NoiseConfig,
                   generator: torch.Generator, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupts one sequence.

    Args:
        input_ids: (T,) long, clean ids.
        eligible: (T,) bool, positions that may be noised.
    Returns:
        (noisy ids (T,), noised (T,) bool): ``noised`` marks the positions that were
        replaced (a drawn token may by chance equal the clean one).
    """
    noisy = input_ids.clone()
    noised = torch.zeros_like(eligible)
    if not cfg.enabled:
        return noisy, noised
    for s in pick_spans(eligible, cfg.span_len, cfg.num_spans, generator):
        positions = torch.arange(s, s + cfg.span_len)
        if cfg.source == "ahead":
            # Uniform index in [0, p) for each position p: floor(u * p).
            u = torch.rand(cfg.span_len, generator=generator)
            src = (u * positions).long().clamp_max(positions - 1)
            noisy[positions] = input_ids[src]
        else:
            noisy[positions] = torch.randint(vocab_size, (cfg.span_len,), generator=generator)
        noised[positions] = True
    return noisy, noised


def sample_seed(seed: int, index: int, visit: int) -> int:
    """A seed for one sample's noise that depends only on (seed, sample, epoch), so the
    noise is the same whatever the number of processes or the batch layout."""
    digest = hashlib.blake2b(f"{seed}:{index}:{visit}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MsnCollator:
    """Pads a list of tokenized examples and applies MSN noise to the inputs.

    Each feature is a dict with ``input_ids``, ``labels`` (-100 outside responses),
    ``noise_mask`` (1 where noise may go) and ``index`` (the sample's position in the
    data set, which seeds its noise). Returns ``input_ids`` (noisy), ``labels``
    (clean, -100 on prompt and padding) and ``attention_mask``; usable as the
    ``data_collator`` of transformers' Trainer or TRL's SFTTrainer.
    """

    def __init__(self, cfg: NoiseConfig, pad_token_id: int, vocab_size: int, seed: int = 0):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.seed = seed
        self.visits: dict[int, int] = {}
        self.samples = 0
        self.too_short = 0
        self.noised_positions = 0
        self.tokens = 0
        self.response_tokens = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        for row, f in enumerate(features):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            n = ids.numel()
            eligible = torch.as_tensor(f["noise_mask"], dtype=torch.bool)
            index = int(f.get("index", row))
            visit = self.visits.get(index, 0)
            self.visits[index] = visit + 1
            gen = torch.Generator().manual_seed(sample_seed(self.seed, index, visit))
            noisy, noised = noise_sequence(ids, eligible, self.cfg, gen, self.vocab_size)
            input_ids[row, :n] = noisy
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention[row, :n] = 1
            self.samples += 1
            self.tokens += n
            self.response_tokens += int((labels[row, :n] != IGNORE_INDEX).sum())
            spans = int(noised.sum()) // self.cfg.span_len
            self.noised_positions += int(noised.sum())
            if self.cfg.enabled and spans == 0:
                self.too_short += 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    def stats(self) -> dict:
        return {"samples": self.samples, "too_short_for_a_span": self.too_short,
                "noised_positions": self.noised_positions, "tokens": self.tokens,
                "response_tokens": self.response_tokens}
