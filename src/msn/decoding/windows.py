"""Sliding-window and hybrid attention: which mask each layer of a model sees.

Models such as Gemma 2 and 3, Cohere2, gpt-oss, OLMo 3 and Qwen2/3 with
``use_sliding_window`` mix full-attention layers with layers that attend only to the
last ``sliding_window`` positions; Mistral-style configs with a ``sliding_window`` and no
layer types slide in every layer. transformers takes one 4D mask per layer type
(``attention_mask={"full_attention": ..., "sliding_attention": ...}``) for the models
with ``layer_types``, and one mask for all layers otherwise, so a tree step passes the
tree mask through ``LayerMasks.build``: each sliding layer type gets it with the keys
outside each query's window hidden (a tree node's position is the context length plus
its depth). The cache keeps every entry in every layer (``msn.decoding.cache``), so the
window is the mask's alone. Prefill and one-token steps pass no mask: transformers
builds the per-layer masks itself from the cache, which holds every position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msn.errors import MsnError
from msn.decoding.tree import windowed_bias

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class LayerMasks:
    """The masks one forward needs.

    Attributes:
        types: (layer type, window or None for full attention) for each layer type of a
            model with ``layer_types`` and a sliding one; () otherwise.
        window: the window of the single mask every layer sees (a sliding-window model
            without layer types); None: full attention.
    """

    types: tuple[tuple[str, int | None], ...] = ()
    window: int | None = None

    @property
    def sliding(self) -> bool:
        return bool(self.types) or self.window is not None

    def build(self, bias: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor):
        """The ``attention_mask`` argument for a step whose full-attention mask is ``bias``
        (B, 1, N, S), its queries at ``query_pos`` (B, N) and its key slots at ``key_pos`` (B, S)."""
        if self.types:
            return {t: bias if w is None else windowed_bias(bias, query_pos, key_pos, w) for t, w in self.types}
        if self.window is not None:
            return windowed_bias(bias, query_pos, key_pos, self.window)
        return bias


def layer_masks(config) -> LayerMasks:
    """The masks a model of ``config`` needs; refuses layer types without a mask rule here."""
    window = getattr(config, "sliding_window", None)
    if window is not None and not getattr(config, "use_sliding_window", True):
        window = None
    types = getattr(config, "layer_types", None)
    if types:
        unknown = sorted(set(types) - {FULL, SLIDING})
        if unknown:
            raise MsnError(f"{config.model_type} has layers of type {', '.join(map(repr, unknown))}, which msn "
                           f"cannot mask for a draft tree; models with full and sliding attention layers are supported")
        if SLIDING not in types:
            return LayerMasks()
        if not isinstance(window, int) or window <= 0:
            raise MsnError(f"{config.model_type} has sliding attention layers but no sliding_window in its config")
        return LayerMasks(types=tuple((t, window if t == SLIDING else None) for t in sorted(set(types))))
    if getattr(config, "attention_chunk_size", None):
        raise MsnError(f"{config.model_type} uses chunked attention (attention_chunk_size), which msn cannot mask "
                       "for a draft tree")
    return LayerMasks(window=window if isinstance(window, int) and window > 0 else None)
