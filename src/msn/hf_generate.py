"""msn's decoders inside transformers' own ``generate`` (its ``custom_generate`` hook).

``msn export-generate DIR`` writes ``DIR/custom_generate/generate.py``; then

    out = model.generate(**inputs, custom_generate=DIR, trust_remote_code=True,
                         msn_method="tr-jacobi", max_new_tokens=128)

returns what ``generate`` returns (prompt plus new tokens, finished rows padded with the
pad token), computed by ``msn.generate``. ``msn_*`` keywords are msn's options
(``msn_method``, ``msn_tree``, ``msn_window``, ...); the generation config gives
``max_new_tokens``/``max_length``, ``eos_token_id``, ``pad_token_id`` and sampling
(``do_sample``, ``temperature``, ``top_k``, ``top_p``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from msn.errors import MsnError

GENERATE_PY = '''"""msn's decoders inside transformers' generate. Written by `msn export-generate`;
the code lives in the installed msn package (pip install msn-llm)."""


def generate(model, *args, **kwargs):
    from msn.hf_generate import run

    return run(model, *args, **kwargs)
'''

HF_DEFAULT_NEW_TOKENS = 20     # what transformers' generate adds when neither length is set
# Generation settings msn's decoders do not implement: refused unless at transformers' default.
_UNSUPPORTED_CONFIG = ("num_beams", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size",
                       "min_length", "min_new_tokens", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                       "forced_bos_token_id", "forced_eos_token_id", "stop_strings", "typical_p", "min_p",
                       "epsilon_cutoff", "eta_cutoff", "encoder_repetition_penalty", "sequence_bias",
                       "guidance_scale", "penalty_alpha", "prompt_lookup_num_tokens", "assistant_early_exit")
# generate() arguments transformers passes to a custom function; these must be unused.
_UNSUPPORTED = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                "negative_prompt_ids", "negative_prompt_attention_mask")


def export(directory: str | Path) -> Path:
    """Writes ``directory/custom_generate/generate.py`` (and its requirements); returns the folder."""
    from msn.paths import ensure_output_dir

    root = ensure_output_dir(directory, "DIR")
    folder = root / "custom_generate"
    folder.mkdir(exist_ok=True)
    (folder / "generate.py").write_text(GENERATE_PY)
    (folder / "requirements.txt").write_text("msn-llm\n")
    return root


def run(model, inputs: torch.Tensor | None = None, generation_config=None, streamer=None, **kwargs) -> torch.Tensor:
    """The body of the exported ``generate``: maps transformers' arguments onto ``msn.generate``."""
    from msn.decoding.engine import generate

    for name in _UNSUPPORTED:
        if kwargs.pop(name, None) not in (None, [], ()):
            raise MsnError(f"{name} is not supported by msn's custom_generate")
    for name in ("synced_gpus", "use_model_defaults"):
        kwargs.pop(name, None)
    ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise MsnError("msn's custom_generate needs input_ids of shape (B, T)")
    mask = kwargs.pop("attention_mask", None)
    options = {k[len("msn_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("msn_")}
    method = options.pop("method", "tr-jacobi")
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    unused = config.update(**kwargs)
    unused = {k: v for k, v in unused.items() if v is not None}
    if unused:
        raise MsnError(f"msn's custom_generate does not take {', '.join(sorted(unused))}")
    from transformers import GenerationConfig

    default = GenerationConfig()
    changed = [n for n in _UNSUPPORTED_CONFIG if getattr(config, n, None) != getattr(default, n, None)]
    if changed:
        raise MsnError(f"msn's custom_generate decodes greedily or samples; it does not implement "
                       f"{', '.join(f'{n}={getattr(config, n)!r}' for n in changed)}")
    # As plain generate: max_new_tokens wins; a given max_length counts the prompt; with neither,
    # 20 new tokens, cut to the model's context.
    fit = config.max_new_tokens is None and config.max_length is None
    if config.max_new_tokens is not None:
        new = config.max_new_tokens
    elif config.max_length is not None:
        new = config.max_length - ids.shape[1]
        if new <= 0:
            raise MsnError(f"max_length={config.max_length} leaves no room after the {ids.shape[1]}-token prompt; "
                           "raise max_length or give max_new_tokens")
    else:
        new = HF_DEFAULT_NEW_TOKENS
    options["fit_context"] = fit
    if config.do_sample:
        options.update(do_sample=True, temperature=config.temperature, top_k=config.top_k,
                       top_p=config.top_p if config.top_p is not None and config.top_p < 1 else None)
    eos = config.eos_token_id
    batched = ids.shape[0] > 1 or (mask is not None and not bool(mask.all()))
    if batched:
        results = generate(model, ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                           method=method, max_new_tokens=new, eos_token_id=eos, **options)
    else:
        on_tokens = None
        if streamer is not None:
            streamer.put(ids.cpu())
            on_tokens = lambda toks: streamer.put(torch.tensor(toks))   # noqa: E731
        results = [generate(model, ids, method=method, max_new_tokens=new, eos_token_id=eos, on_tokens=on_tokens,
                            **options)]
        if streamer is not None:
            streamer.end()
    pad = config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else (eos if eos is not None else 0)
    width = max(len(r.tokens) for r in results)
    tail = torch.full((len(results), width), int(pad), dtype=ids.dtype, device=ids.device)
    for b, r in enumerate(results):
        tail[b, : len(r.tokens)] = torch.tensor(r.tokens, dtype=ids.dtype)
    return torch.cat([ids, tail], dim=1)
