"""Whether a model keeps packed samples apart: the check behind ``msn train --packing``.

A padding-free batch (``MsnCollator(packing=True)``) puts several samples in one row with
``position_ids`` restarting at each sample and no attention mask. transformers' attention
(sdpa, eager, flex through ``masking_utils``; flash attention through the positions) then
confines each token's attention to its own sample. A model whose code builds its mask
another way (remote code, an old architecture) would let the samples see each other and
train on wrong contexts without any error, so ``check_packing`` runs the model once on two
short packed samples and compares each with the sample run alone.
"""

from __future__ import annotations

import torch

from msn.errors import MsnError

PROBE_LENGTHS = (7, 5)


@torch.no_grad()
def packed_matches_alone(model, vocab_size: int, atol: float = 1e-3) -> bool:
    """True when ``model``'s logits for two packed samples equal each one's logits alone."""
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    samples = [torch.randint(vocab_size, (n,), generator=gen).to(device) for n in PROBE_LENGTHS]
    positions = torch.cat([torch.arange(n) for n in PROBE_LENGTHS]).to(device)
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=torch.cat(samples)[None], position_ids=positions[None], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in samples])
    finally:
        model.train(was_training)
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
    import logging

    logging.getLogger("msn.train").warning(
        "packed samples would attend to each other in this model (%s, attention %r): padded batches instead",
        type(model).__name__, impl)
    return False
