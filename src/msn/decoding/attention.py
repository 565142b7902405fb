"""msn's attention function: transformers' sdpa, plus what msn's own forwards need.

Registered once with transformers' ``AttentionInterface`` under msn's own name (``MSN_SDPA``,
never over ``"sdpa"``) and chosen for a model by ``use``: an sdpa model decoded by msn runs
``attention``, which computes exactly what sdpa computes unless one of msn's steps asks for
more through a context variable:

- ``shared_kv_heads()`` (CPU forwards with a custom mask): grouped-query attention inside sdpa
  (``enable_gqa``), where transformers would copy every key/value head group whenever a mask is
  given; the results are identical, the copy grows with rows x context;
- ``msn.decoding.ragged.grouped_attention(plan)`` (batched steps): the batch's rows attended in
  groups of similar length.

Nothing of transformers is replaced and nothing is written to the process environment; a
compiled step (``torch.compile``) runs transformers' sdpa as it is.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from msn.decoding import ragged

MSN_SDPA = "msn_sdpa"
_GQA: contextvars.ContextVar[bool] = contextvars.ContextVar("msn_shared_kv_heads", default=False)
_SDPA_GQA = "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")


def attention(module, query, key, value, attention_mask, **kwargs):
    """(batch, query length, heads, head dim) output and no weights, as transformers' sdpa."""
    if torch.compiler.is_compiling():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    p = ragged.current_plan()
    if p is not None and ragged.applies(p, query, key, attention_mask, kwargs):
        return ragged.in_groups(_one, p, module, query, key, value, attention_mask, **kwargs), None
    return _one(module, query, key, value, attention_mask, **kwargs)


def _one(module, query, key, value, attention_mask, **kwargs):
    if (_GQA.get() and attention_mask is not None and getattr(module, "num_key_value_groups", 1) > 1
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=kwargs.get("dropout", 0.0),
            scale=kwargs.get("scaling"), enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def shared_kv_heads(device: torch.device):
    """Within the block, forwards on CPU with a mask run grouped-query attention inside sdpa
    (where this torch's sdpa has ``enable_gqa``)."""
    if device.type != "cpu" or not _SDPA_GQA:
        yield
        return
    token = _GQA.set(True)
    try:
        yield
    finally:
        _GQA.reset(token)


def use_attention(model, name: str, function) -> str | None:
    """Switches an sdpa model to the attention ``function`` registered under msn's own ``name``
    (with sdpa's mask builder; registered the first time); returns the implementation it replaced,
    or None when the model keeps its own (eager, flash attention)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    before = getattr(model.config, "_attn_implementation", None)
    if before != "sdpa":
        return None
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    return before


def use(model) -> None:
    """Chooses ``MSN_SDPA`` for an sdpa model; other implementations (eager) are left as they are."""
    use_attention(model, MSN_SDPA, attention)
