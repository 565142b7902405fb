"""Batches for training: padding, clean labels and MSN noise on the inputs.

The noise of a sample is seeded by (run seed, sample index, epoch), so it does not depend
on the number of processes, the batch layout, or whether the run was resumed.
"""

from __future__ import annotations

import itertools
import zlib

import torch

from msn.data.records import IGNORE_INDEX
from msn.errors import MsnError
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


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): ``keep`` (B, T) is True at each position whose next token carries a label,
    ``targets`` (K,) those next tokens in row-major order, K = keep.sum(): the logits and labels a
    causal LM's loss reads, without the positions it ignores."""
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    return keep, targets[keep[:, :-1]]


class MsnCollator:
    """Batches tokenized examples with MSN noise on the inputs: padded rows, or one
    padding-free row (``packing=True``).

    Each feature is a dict with ``input_ids``, ``labels`` (-100 outside responses),
    ``noise_mask`` (1 where noise may go) and ``index`` (the sample's position in the
    data set, which seeds its noise), as ``msn data`` writes them. Features that TRL's
    ``SFTTrainer`` prepares work too: without ``labels``, the ``completion_mask`` or
    ``assistant_masks`` marks the response (see ``clean_labels``); without ``noise_mask``,
    noise may go on any labelled token; without ``index``, a checksum of the ids seeds the
    noise. Usable as the ``data_collator`` of transformers' Trainer or TRL's SFTTrainer.

    Padded (default): ``input_ids`` (noisy) and ``labels`` (clean, -100 on prompt and
    padding) of shape (B, longest) and ``attention_mask``.

    Packed (``packing=True``): the batch's samples end to end in one row, (1, total tokens),
    with ``position_ids`` restarting at 0 for each sample and no ``attention_mask``:
    transformers then confines attention to each sample (``masking_utils`` finds the
    sample boundaries from the positions; flash attention uses them directly).
    ``msn.data.packing.check_packing`` verifies that a model honours it. The label of each
    sample's first token is -100, so nothing is learnt across a boundary; a padded batch never
    learns it either, so both give the same loss. Noise is drawn per sample, before
    concatenation, from the sample's own tokens. A feature that is itself several samples
    (TRL's ``seq_lengths``) is split into them.

    ``head_at_labels``: the batch also carries ``logits_to_keep`` (a (B, T) boolean mask of the
    positions whose next token is a label) and ``shift_labels`` (those labels, in order), so a
    transformers causal LM computes its vocabulary head and loss at those positions only, with
    the same loss (``msn.data.packing.head_at_labels_matches`` checks a model honours them).

    The epoch that seeds the noise is set by ``set_epoch`` (``EpochCallback`` does it
    for a Trainer), like a distributed sampler's. Without it, the collator counts its
    own visits of each sample, which matches the epoch in a run that is not resumed.
    """

    def __init__(self, cfg: NoiseConfig, pad_token_id: int, vocab_size: int, seed: int = 0,
                 packing: bool = False, head_at_labels: bool = False):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.seed = seed
        self.packing = packing
        self.head_at_labels = head_at_labels
        self.epoch: int | None = None
        self.visits: dict[int, int] = {}
        self.samples = 0
        self.too_short = 0
        self.noised_positions = 0
        self.tokens = 0
        self.response_tokens = 0
        self.slots = 0          # positions the model computes: tokens plus padding

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _visit(self, index: int) -> int:
        if self.epoch is not None:
            return self.epoch
        visit = self.visits.get(index, 0)
        self.visits[index] = visit + 1
        return visit

    def _samples(self, features: list[dict]):
        """(ids, clean labels, noise-eligible) of each sample, in order; packed features split."""
        for f in features:
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            clean = clean_labels(f, ids)
            eligible = (torch.as_tensor(f["noise_mask"], dtype=torch.bool) if f.get("noise_mask") is not None
                        else clean != IGNORE_INDEX)
            lengths = f.get("seq_lengths")
            if lengths is None:
                yield ids, clean, eligible, f.get("index")
                continue
            if not self.packing:
                raise MsnError("a feature holds several samples (seq_lengths, from TRL's packing): give "
                               "MsnCollator(packing=True), which keeps each sample's attention and noise apart")
            for a, b in _bounds(lengths, ids.numel()):
                yield ids[a:b], clean[a:b], eligible[a:b], None

    def _noisy(self, ids, clean, eligible, index) -> torch.Tensor:
        index = int(index) if index is not None else zlib.crc32(ids.numpy().tobytes())
        gen = torch.Generator().manual_seed(sample_seed(self.seed, index, self._visit(index)))
        noisy, noised = noise_sequence(ids, eligible, self.cfg, gen, self.vocab_size)
        self.samples += 1
        self.tokens += ids.numel()
        self.response_tokens += int((clean != IGNORE_INDEX).sum())
        self.noised_positions += int(noised.sum())
        if self.cfg.enabled and int(noised.sum()) < self.cfg.span_len:
            self.too_short += 1
        return noisy

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        samples = [(self._noisy(*s), s[1]) for s in self._samples(features)]
        if self.packing:
            input_ids = torch.cat([noisy for noisy, _ in samples])[None]
            labels = torch.cat([torch.cat([clean.new_full((1,), IGNORE_INDEX), clean[1:]])
                                for _, clean in samples])[None]
            positions = torch.cat([torch.arange(noisy.numel()) for noisy, _ in samples])[None]
            self.slots += input_ids.numel()
            return self._head({"input_ids": input_ids, "labels": labels, "position_ids": positions})
        length = max(noisy.numel() for noisy, _ in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(samples), length), dtype=torch.long)
        for row, (noisy, clean) in enumerate(samples):
            n = noisy.numel()
            input_ids[row, :n] = noisy
            labels[row, :n] = clean
            attention[row, :n] = 1
        self.slots += input_ids.numel()
        return self._head({"input_ids": input_ids, "labels": labels, "attention_mask": attention})

    def _head(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With ``head_at_labels``: the positions whose next token is a label, and those labels."""
        if self.head_at_labels:
            batch["logits_to_keep"], batch["shift_labels"] = labelled_positions(batch["labels"])
        return batch

    def stats(self) -> dict:
        # Samples the data loader collated: it may read a batch beyond the last optimizer step.
        return {"samples_collated": self.samples, "too_short_for_a_span": self.too_short,
                "noised_positions": self.noised_positions, "tokens": self.tokens,
                "response_tokens": self.response_tokens,
                "padding_share": round(1 - self.tokens / self.slots, 4) if self.slots else 0.0}


def _bounds(lengths, total: int) -> list[tuple[int, int]]:
    """[start, end) of each sample of a packed feature from its ``seq_lengths``."""
    lengths = [int(n) for n in lengths]
    if sum(lengths) != total or min(lengths, default=0) <= 0:
        raise MsnError(f"seq_lengths {lengths} do not split a feature of {total} tokens")
    ends = list(itertools.accumulate(lengths))
    return list(zip([0, *ends[:-1]], ends))


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
