"""The decoding loop: prefill -> one step -> n steps, for every method (``generate``).

The request checks live in ``requests``, one step in ``step``, the step timings in
``timing``, the choice of proposer in ``drafting`` and batched decoding in ``batch``; this
module runs a generation through them. ``ar`` is a separate, plain loop: the oracle the
others are tested against.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from msn.decoding import cache as kv
from msn.decoding import static_steps
from msn.decoding.batch import generate_batch
from msn.decoding.config import DEFAULT_MAX_NEW_TOKENS, DecodeConfig
from msn.decoding.drafting import make_proposer
from msn.decoding.history import TokenHistory
from msn.decoding.profile import StepProfile, section
from msn.decoding.request import DecodeResult, Output, check_model, is_batch, request_sampler, resolve_eos, validate_request
from msn.decoding.devices import context_limit, model_device, sync_device
from msn.decoding.sampling import Sampler
from msn.decoding.step import pick_token, decode_one_token, fixed_step, prefill, tree_step
from msn.decoding.timing import prepare_model
from msn.errors import MsnError

__all__ = ["DecodeResult", "generate"]


def generate(model, input_ids: torch.Tensor, *, method: str = "tr-jacobi",
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, eos_token_id: int | list[int] | None = None,
             on_tokens: Callable[[list[int]], None] | None = None, fit_context: bool = False,
             generator: torch.Generator | None = None, profile: StepProfile | None = None,
             attention_mask: torch.Tensor | None = None, max_batch: int | None = None,
             **options) -> DecodeResult | list[DecodeResult]:
    """Decodes one prompt, or a batch, several tokens per step where the method allows.

    Greedy (the default): every method returns exactly the tokens of greedy
    autoregressive decoding. Sampling (``do_sample=True``): every method returns tokens
    distributed exactly as one-token sampling with the same logits processing.

    What it keeps between calls (the tokens never depend on it, only the speed and, for
    ``tr-jacobi``'s automatic tree and merged drafts, which tree is tried), in msn's store
    (``msn.paths.cache_root()``; ``msn cache info`` shows it, ``msn cache clear`` deletes it):
    it reads and, where missing, measures and writes the calibration of the model at hand (step
    latency t(n), the CPU kernel decision); it reads and, as the generation ends, writes the
    learned state (``--tree auto``'s scored steps, the recycled candidate table). Inside
    ``with msn.paths.empty_decoding_state():`` a call starts from nothing and leaves the store
    as it was (``empty_decoding_state(msn.paths.LEARNED)``: learned state only); inside
    ``with msn.paths.decoding_store(folder):`` it reads and writes ``folder`` instead.

    Args:
        model: a Hugging Face causal LM with ``sdpa`` or ``eager`` attention.
        input_ids: (1, T) prompt ids. A batch, (B, T) with ``attention_mask`` (padding on
            either side) or a list of prompts (lists of ids or (1, T) tensors), is decoded
            in batched steps (``msn.decoding.batch``) and returns one result per prompt.
        method: one of ``METHODS``: ``ar``, ``jacobi``, ``tr-jacobi``, ``pld``, ``lookahead`` or ``recycle``.
        max_new_tokens: at most this many new tokens.
        eos_token_id: one id or several; None takes the model's generation config.
        on_tokens: called with each step's newly accepted tokens (for streaming).
        fit_context: when prompt + ``max_new_tokens`` exceeds the model's positions, cut
            ``max_new_tokens`` to fit instead of raising ``MsnError``.
        generator: the random stream of sampling (on the model's device); default: one
            seeded with ``seed``.
        profile: a ``StepProfile`` that accumulates where each decoding step's time goes.
        attention_mask: (B, T) mask of a padded batch (1 on prompt tokens).
        max_batch: a batch: at most this many rows decode at once; the next prompt joins
            when a row finishes (continuous batching).
        **options: fields of ``DecodeConfig`` (window, tree, do_sample, temperature,
            top_k, top_p, seed, ...).
    """
    batch = is_batch(input_ids, attention_mask)
    if batch is not None:
        for name, value in (("on_tokens", on_tokens), ("generator", generator), ("profile", profile)):
            if value is not None:
                raise MsnError(f"{name} applies to one prompt; a batch takes seed= for sampling and "
                               "msn.decoding.batch.BatchDecoder for per-row callbacks")
        return generate_batch(model, batch, method=method, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                              fit_context=fit_context, max_batch=max_batch, **options)
    if max_batch is not None:
        raise MsnError("max_batch applies to a batch of prompts (a list, or (B, T) ids with an attention_mask)")
    cfg = DecodeConfig.from_options(method, options)
    check_model(model)
    max_new_tokens = validate_request(model, input_ids, max_new_tokens, fit_context)
    # Before the prefill, once per model: attention, CPU kernels (the one-input kernel timed).
    prepare_model(model, cfg, several_inputs=cfg.method != "ar")
    device = model_device(model)
    sampler = request_sampler(cfg, generator, device)
    if cfg.graphs == "on" and device.type != "cuda":
        raise MsnError(f"graphs='on' needs a CUDA device; the model is on {device.type} (use graphs='auto' or 'off')")
    capture = static_steps.wanted(cfg.graphs, device, sampler is not None)
    compiled = static_steps.compiles(cfg.compile, device, sampler is not None)
    steps = static_steps.steps_for(model, capture=capture, compiled=compiled) if capture or compiled else None
    if steps is not None and not steps.lock.acquire(blocking=False):
        steps = None          # another generation holds this model's buffers: this one runs eagerly
    try:
        return _generate_one(model, input_ids, cfg, max_new_tokens, eos_token_id, on_tokens, sampler, profile,
                             steps)
    finally:
        if steps is not None:
            steps.lock.release()


def _generate_one(model, input_ids: torch.Tensor, cfg: DecodeConfig, max_new_tokens: int, eos_token_id,
                  on_tokens, sampler: Sampler | None, profile: StepProfile | None,
                  steps: static_steps.StaticSteps | None) -> DecodeResult:
    device = model_device(model)
    input_ids = input_ids.to(device)
    prompt = input_ids[0].tolist()
    out = Output(max_new_tokens, resolve_eos(model, eos_token_id), on_tokens)
    cache = kv.new_cache(model)
    limit = context_limit(model)
    # For tree="auto", the step latency (measured once per model, on its fixed buffers if used).
    proposer = make_proposer(cfg, model, graphs=steps is not None and steps.capture)

    sync_device(device)
    t0 = time.perf_counter()
    first = pick_token(prefill(model, input_ids, cache), sampler, 0)
    if steps is not None:
        # The smallest buffers that hold the prompt and one step: attention reads every slot, so
        # the buffers grow with the context (a step reads about the filled length, not the final).
        steps.begin(cache, len(prompt) + static_steps.STEP_ROOM, limit)
    sync_device(device)
    t1 = time.perf_counter()
    out.add([first])
    result = DecodeResult(tokens=out.tokens, steps=0, prefill_s=t1 - t0)
    root = first
    if cfg.method == "ar":
        while not out.done:
            if steps is not None:
                root = fixed_step(steps, model, root, (), None, profile)[0][-1]
            else:
                with section(profile, "forward"):
                    root = decode_one_token(model, root, cache, device, sampler, len(out.tokens))
            result.steps += 1
            result.accept_lengths.append(len(out.add([root])))
    else:
        history = TokenHistory(prompt + [first], seed=cfg.seed)
        context_len = len(prompt)
        while not out.done:
            with section(profile, "proposer"):
                paths, cand = proposer.propose(history)
            if steps is not None:
                new, feedback = fixed_step(steps, model, root, tuple(paths), cand, profile)
            else:
                new, feedback = tree_step(model, cache, context_len, root, paths, cand, limit, sampler,
                                          cfg.sample_drafts, len(out.tokens), profile)
            context_len += 1 + feedback.accepted
            kept = out.add(new)
            result.steps += 1
            result.accept_lengths.append(len(kept))
            if out.done:
                break
            root = new[-1]
            with section(profile, "proposer"):
                history.extend(new)
                proposer.update(feedback, history)
        proposer.close()
        result.info = proposer.describe()
    if steps is not None:
        result.info = {**result.info, "step": steps.describe()}
    sync_device(device)
    result.decode_s = time.perf_counter() - t1
    if profile is not None:
        profile.steps += result.steps
    return result
