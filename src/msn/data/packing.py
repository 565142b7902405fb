"""Whether a model keeps packed samples apart: the check behind ``msn train --packing``; and
whether it computes its head at the labelled positions only: the check behind
``msn train --head-at-labels``.

A padding-free batch (``MsnCollator(packing=True)``) puts several samples in one row with
``position_ids`` restarting at each sample and no attention mask. transformers' attention
(sdpa, eager, flex through ``masking_utils``; flash attention through the positions) then
confines each token's attention to its own sample. A model whose code builds its mask
another way (remote code, an old architecture) would let the samples see each other and
train on wrong contexts without any error, so ``check_packing`` runs the model once on two
short packed samples and compares each with the sample run alone.

On sdpa models, training swaps in ``PACKED_SDPA`` (``packed_attention``), registered under msn's
own name with transformers' ``AttentionInterface``: it runs causal sdpa on each sample's slice
instead of one masked sdpa over the whole row, so attention costs the sum of the samples'
squares, not the square of their sum (on a 2-core CPU, SmolLM2-135M, four samples of 140-320
tokens: forward plus backward 2.98 s against 3.50 s with the row's mask and 4.45 s padded).
Layers with a sliding window, attention sinks or a padding mask fall back to transformers' sdpa.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from msn.errors import MsnError

log = logging.getLogger("msn.train")

PROBE_LENGTHS = (7, 5)
PACKED_SDPA = "msn_packed_sdpa"
_last_bounds: list = [None, None]       # (position_ids tensor, its samples' bounds): one forward's layers share it


def _sample_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]] | None:
    """[start, end) of each sample in a single packed row, or None when it is not one."""
    if _last_bounds[0] is position_ids:
        return _last_bounds[1]
    bounds = None
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()
        if starts and starts[0] == 0:
            bounds = list(zip(starts, [*starts[1:], position_ids.shape[1]]))
    _last_bounds[:] = [position_ids, bounds]
    return bounds


def packed_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """sdpa over each packed sample's own slice (causal), concatenated; transformers' sdpa when
    the call is not a packed training row (a padding mask, a cache, a sliding window, sinks)."""
    bounds = _sample_bounds(position_ids) if position_ids is not None else None
    plain = (bounds is None or key.shape[2] != query.shape[2] or getattr(module, "sliding_window", None)
             or kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                   is_causal=True, **kwargs)[0] for a, b in bounds]
    return torch.cat(outs, dim=1), None


def use_packed_attention(model) -> str | None:
    """Switches an sdpa model to ``PACKED_SDPA`` (registered once, under msn's name); returns the
    implementation to restore, or None when the model keeps its own (eager, flash attention)."""
    from msn.decoding.attention import use_attention

    return use_attention(model, PACKED_SDPA, packed_attention)


@contextmanager
def _probing(model):
    """The model in eval mode without gradients for a probe, its training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def packed_matches_alone(model, vocab_size: int, atol: float = 1e-3) -> bool:
    """True when ``model``'s logits for two packed samples equal each one's logits alone."""
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    samples = [torch.randint(vocab_size, (n,), generator=gen).to(device) for n in PROBE_LENGTHS]
    positions = torch.cat([torch.arange(n) for n in PROBE_LENGTHS]).to(device)
    with _probing(model):
        packed = model(input_ids=torch.cat(samples)[None], position_ids=positions[None], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in samples])
    scale = max(1.0, alone.abs().max().item())
    return bool((packed.float() - alone.float()).abs().max().item() <= atol * scale)


def check_packing(model, vocab_size: int, asked: bool | None) -> bool:
    """Whether to pack: ``asked`` None packs if the model keeps samples apart; True refuses a
    model that does not (one line naming its attention implementation); False never packs."""
    if asked is False:
        return False
    if packed_matches_alone(model, vocab_size):
        return True
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "unknown"
    if asked:
        raise MsnError(f"--packing: this model ({type(model).__name__}, attention {impl!r}) lets packed samples "
                       "attend to each other; train with --no-packing (padded batches)")
    log.warning(
        "packed samples would attend to each other in this model (%s, attention %r): padded batches instead",
        type(model).__name__, impl)
    return False


def head_at_labels_matches(model, vocab_size: int, rtol: float = 1e-4) -> bool:
    """True when ``model`` given ``logits_to_keep`` and ``shift_labels`` (``MsnCollator(head_at_labels=True)``)
    returns the loss of its full head: a padded batch of two probe samples, half their labels -100.
    A model whose forward has no such arguments, or uses them otherwise, returns False."""
    from msn.data.collate import labelled_positions
    from msn.data.records import IGNORE_INDEX

    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(vocab_size, (len(PROBE_LENGTHS), max(PROBE_LENGTHS)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROBE_LENGTHS):
        mask[row, :n] = 1
    labels = torch.where(mask.bool() & (torch.arange(ids.shape[1]) >= 2), ids, IGNORE_INDEX)
    keep, targets = labelled_positions(labels)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
             "use_cache": False}
    try:
        with _probing(model):
            full = model(**batch).loss
            kept = model(**batch, logits_to_keep=keep.to(device), shift_labels=targets.to(device))
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        log.info("no head at the labelled positions only: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    if kept.loss is None or kept.logits.numel() != int(keep.sum()) * kept.logits.shape[-1]:
        return False        # the head ran at every position: nothing to gain
    return bool(torch.isclose(kept.loss.float(), full.float(), rtol=rtol, atol=1e-6))


def check_head_at_labels(model, vocab_size: int, asked: bool | None) -> bool:
    """Whether the collator sends the labelled positions: ``asked`` None when the model honours
    them; True refuses a model that does not (one line); False never."""
    if asked is False:
        return False
    if head_at_labels_matches(model, vocab_size):
        return True
    if asked:
        raise MsnError(f"--head-at-labels: this model ({type(model).__name__}) does not compute its loss from "
                       "logits_to_keep and shift_labels; train without it")
    log.info("the head runs at every position (%s does not take logits_to_keep with shift_labels)",
             type(model).__name__)
    return False
