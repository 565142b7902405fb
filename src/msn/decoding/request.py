"""A decoding request before any step runs: what the model must be, what a prompt and its
lengths must be (one clear ``MsnError`` for each mistake), the request's sampler, and what a
generation returns (``DecodeResult``) and how its output stops (``Output``).

No forward runs here; the step (``step``) and the loop (``engine``) build on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from msn.decoding.checks import is_int
from msn.decoding.config import DecodeConfig
from msn.decoding.devices import context_limit, vocab_size
from msn.decoding.sampling import Sampler, check_generator
from msn.decoding.windows import layer_masks
from msn.errors import MsnError

SUPPORTED_ATTENTION = ("sdpa", "eager", "msn_sdpa")     # msn_sdpa: msn.decoding.attention


@dataclass
class DecodeResult:
    """What one generation produced.

    Attributes:
        tokens: new token ids (prompt excluded), EOS included when it ended the output.
        steps: forward passes after prefill.
        accept_lengths: tokens kept from each step (sum + 1 prefill token == len(tokens)).
        prefill_s / decode_s: wall seconds, device synchronized.
        info: what the decoder chose (``tree="auto"``: each tree chosen and the measured
            step latency t(n)).
    """

    tokens: list[int]
    steps: int
    accept_lengths: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def mean_accepted_tokens(self) -> float:
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return len(self.tokens) / total if total > 0 else 0.0


class Output:
    """Accepted tokens with exact stopping on EOS and ``max_new_tokens``."""

    def __init__(self, max_new_tokens: int, eos: set[int], on_tokens):
        self.tokens: list[int] = []
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.done = False
        self.on_tokens = on_tokens

    def add(self, new: list[int]) -> list[int]:
        """Appends ``new`` up to the first stop; returns the tokens actually kept."""
        kept = []
        for tok in new:
            kept.append(tok)
            if tok in self.eos or len(self.tokens) + len(kept) >= self.max_new_tokens:
                self.done = True
                break
        self.tokens.extend(kept)
        if self.on_tokens is not None and kept:
            self.on_tokens(kept)
        return kept


def check_model(model) -> None:
    """Refuses what is not a loaded causal LM, and models whose attention ignores a custom 4D mask."""
    if isinstance(model, (str, os.PathLike)):
        raise MsnError(f"model must be a loaded model, not the path {str(model)!r}; load it first, e.g. with "
                       "msn.loading.load_for_inference(path)")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise MsnError(f"model must be a Hugging Face causal LM (a torch.nn.Module with a config), "
                       f"got {type(model).__name__}")
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise MsnError(
            f"attention implementation {impl!r} takes no custom tree mask; load the model with "
            f"attn_implementation='sdpa' (or 'eager')")
    layer_masks(model.config)        # refuses attention layers without a tree-mask rule


def resolve_eos(model, eos_token_id) -> set[int]:
    """EOS ids as ``model.generate()`` would use them when none are given."""
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    if is_int(eos_token_id):
        return {eos_token_id}
    if isinstance(eos_token_id, (list, tuple, set)) and all(is_int(e) for e in eos_token_id):
        return set(eos_token_id)
    raise MsnError(f"eos_token_id must be a token id or a list of token ids, got {eos_token_id!r}; "
                   "convert a token string with tokenizer.convert_tokens_to_ids")


def request_sampler(cfg: DecodeConfig, generator, device: torch.device) -> Sampler | None:
    """The sampler of a request, or None when it decodes greedily."""
    if generator is not None:
        if not cfg.do_sample:
            raise MsnError("a generator needs do_sample=True (greedy decoding draws nothing)")
        check_generator(generator, device)
    params = cfg.sampling_params()
    if params is None:
        return None
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return Sampler(params, generator)


FIT_HINT = "or allow the cut (fit_context=True in Python, --fit-context in msn generate)"


def validate_request(model, input_ids: torch.Tensor, max_new_tokens: int, fit_context: bool = False,
                     name: str = "max_new_tokens", fit_hint: str = FIT_HINT) -> int:
    """Checks one request; returns the ``max_new_tokens`` to use (cut to the context with
    ``fit_context``). ``name`` is the length's name in the caller's interface and
    ``fit_hint`` ends the too-long message with the way it allows the cut (the server
    names its own)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise MsnError("input_ids must be a tensor of shape (1, T) for one prompt, (B, T) for a batch")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise MsnError(f"input_ids must hold integer token ids, got dtype {str(input_ids.dtype).replace('torch.', '')}")
    if input_ids.shape[0] != 1:
        raise MsnError(f"input_ids of one prompt must have shape (1, T), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise MsnError("empty prompt: give at least one token")
    vocab = vocab_size(model)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        raise MsnError(f"input_ids hold token id {bad}, outside the model's vocabulary [0, {vocab}); "
                       "was the prompt encoded with this model's tokenizer?")
    if not is_int(max_new_tokens) or max_new_tokens <= 0:
        raise MsnError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    prompt = input_ids.shape[1]
    limit = context_limit(model)
    if limit is not None and prompt >= limit:
        raise MsnError(f"prompt of {prompt} tokens does not fit the model's context of {limit} tokens; shorten it")
    if limit is not None and prompt + max_new_tokens > limit:
        if not fit_context:
            raise MsnError(f"prompt ({prompt} tokens) plus {name} ({max_new_tokens}) exceeds the model's "
                           f"context of {limit} positions; lower {name} to {limit - prompt} {fit_hint}")
        max_new_tokens = limit - prompt
    return max_new_tokens


def is_batch(input_ids, attention_mask=None) -> list | None:
    """The prompts of a batch request, or None for one (1, T) prompt without a mask."""
    if isinstance(input_ids, (list, tuple)):
        if not input_ids:
            raise MsnError("empty batch: give at least one prompt")
        if all(is_int(t) for t in input_ids):
            raise MsnError("a list of ids is one prompt: pass torch.tensor([ids]), or a list of prompts for a batch")
        if attention_mask is not None:
            raise MsnError("attention_mask applies to a (B, T) tensor, not to a list of prompts")
        return [p if isinstance(p, torch.Tensor) else torch.tensor([list(p)], dtype=torch.long)
                if isinstance(p, (list, tuple)) else _not_a_prompt(p) for p in input_ids]
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and (input_ids.shape[0] > 1
                                                                         or attention_mask is not None):
        return split_batch(input_ids, attention_mask)
    if attention_mask is not None:
        raise MsnError("attention_mask needs input_ids of shape (B, T)")
    return None


def _not_a_prompt(p):
    raise MsnError(f"a batch holds prompts (lists of ids or (1, T) tensors), got {type(p).__name__}")


def split_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """A padded (B, T) batch as B unpadded (1, T_b) prompts; padding (mask 0) may sit on either side."""
    if attention_mask is None:
        return [input_ids[b : b + 1] for b in range(input_ids.shape[0])]
    if attention_mask.shape != input_ids.shape:
        raise MsnError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                       f"{tuple(input_ids.shape)}")
    rows = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        idx = torch.nonzero(keep).flatten()
        if idx.numel() and idx[-1] - idx[0] + 1 != idx.numel():
            raise MsnError(f"attention_mask row {b} has padding inside the prompt; pad on the left or the right only")
        rows.append(input_ids[b : b + 1, keep.to(input_ids.device)])
    return rows
