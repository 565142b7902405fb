"""Batches for training: padding, clean labels and MSN noise on the inputs.

The noise of a sample is seeded by (run seed, sample index, epoch), so it does not depend
on the number of processes, the batch layout, or whether the run was resumed.
"""

from __future__ import annotations

import zlib

import torch

from msn.data.records import IGNORE_INDEX
from msn.noise import NoiseConfig, noise_sequence, sample_seed


def clean_labels(feature: dict, ids: torch.Tensor) -> torch.Tensor:
    """A feature's labels: its own ``labels``; else the ids where TRL's ``completion_mask``
    or ``assistant_masks`` is 1 (-100 elsewhere); else every id (language modelling)."""
    if feature.get("labels") is not None:
        return torch.as_tensor(feature["labels"], dtype=torch.long)
    mask = next((feature[k] for k in ("completion_mask", "assistant_masks") if feature.get(k) is not None), None)
    if mask is None:
        return ids.clone()
    return torch.where(torch.as_tensor(mask, dtype=torch.bool), ids, torch.full_like(ids, IGNORE_INDEX))


class MsnCollator:
    """Pads a list of tokenized examples and applies MSN noise to the inputs.

    Each feature is a dict with ``input_ids``, ``labels`` (-100 outside responses),
    ``noise_mask`` (1 where noise may go) and ``index`` (the sample's position in the
    data set, which seeds its noise), as ``msn data`` writes them. Features that TRL's
    ``SFTTrainer`` prepares work too: without ``labels``, the ``completion_mask`` or
    ``assistant_masks`` marks the response (see ``clean_labels``); without ``noise_mask``,
    noise may go on any labelled token; without ``index``, a checksum of the ids seeds the
    noise. Returns ``input_ids`` (noisy), ``labels``
    (clean, -100 on prompt and padding) and ``attention_mask``; usable as the
    ``data_collator`` of transformers' Trainer or TRL's SFTTrainer.

    The epoch that seeds the noise is set by ``set_epoch`` (``EpochCallback`` does it
    for a Trainer), like a distributed sampler's. Without it, the collator counts its
    own visits of each sample, which matches the epoch in a run that is not resumed.
    """

    def __init__(self, cfg: NoiseConfig, pad_token_id: int, vocab_size: int, seed: int = 0):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.seed = seed
        self.epoch: int | None = None
        self.visits: dict[int, int] = {}
        self.samples = 0
        self.too_short = 0
        self.noised_positions = 0
        self.tokens = 0
        self.response_tokens = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _visit(self, index: int) -> int:
        if self.epoch is not None:
            return self.epoch
        visit = self.visits.get(index, 0)
        self.visits[index] = visit + 1
        return visit

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        for row, f in enumerate(features):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            n = ids.numel()
            clean = clean_labels(f, ids)
            eligible = (torch.as_tensor(f["noise_mask"], dtype=torch.bool) if f.get("noise_mask") is not None
                        else clean != IGNORE_INDEX)
            index = int(f["index"]) if f.get("index") is not None else zlib.crc32(ids.numpy().tobytes())
            gen = torch.Generator().manual_seed(sample_seed(self.seed, index, self._visit(index)))
            noisy, noised = noise_sequence(ids, eligible, self.cfg, gen, self.vocab_size)
            input_ids[row, :n] = noisy
            labels[row, :n] = clean
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
        # Samples the data loader collated: it may read a batch beyond the last optimizer step.
        return {"samples_collated": self.samples, "too_short_for_a_span": self.too_short,
                "noised_positions": self.noised_positions, "tokens": self.tokens,
                "response_tokens": self.response_tokens}


def epoch_callback(collator: MsnCollator):
    """A transformers ``TrainerCallback`` that tells ``collator`` the epoch at each epoch's
    start, so the noise of a resumed run equals a straight run's in every epoch.

    The Trainer's ``state.epoch`` at an epoch's start is the whole number of epochs done
    (``e + steps / steps_in_epoch`` ends each epoch exactly at ``e + 1``), including after
    a resume in the middle of an epoch.
    """
    from transformers import TrainerCallback

    class EpochCallback(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            collator.set_epoch(int(state.epoch or 0))

    return EpochCallback()
