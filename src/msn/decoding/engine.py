"""The decoding loop: prefill -> one step -> n steps, for every method.

The only code here that calls the model. A step feeds the root (last accepted token)
plus a draft tree in one forward with a 4D additive mask and explicit position ids,
verifies greedily, keeps the accepted path's KV entries and hands the step's logits to
the proposer. ``ar`` is a separate, plain loop: the oracle the others are tested against.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from msn.decoding import cache as kv
from msn.decoding import cpu
from msn.decoding import graphs as fixed
from msn.decoding.config import DEFAULT_MAX_NEW_TOKENS, DecodeConfig, is_int
from msn.decoding.history import TokenHistory
from msn.decoding.profile import StepProfile, section
from msn.decoding.sampling import Sampler, check_generator, first_siblings
from msn.decoding.autotree import LADDER, Latency, acceptance_key, latency_key, load_latency, save_latency
from msn.decoding.proposers import (AutoTreeJacobi, JacobiWindow, Lookahead, PromptLookup, Proposer, Recycle,
                                    StepFeedback, TreeJacobi)
from msn.decoding.recycle import table_for
from msn.decoding.tree import attention_bias, chain, compiled_on, preset_paths, single_step_keys, tree_positions
from msn.decoding.windows import layer_masks
from msn.decoding.verify import greedy_verify
from msn.errors import MsnError
from msn.paths import read_stored, write_stored

SUPPORTED_ATTENTION = ("sdpa", "eager")
_GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"    # transformers' switch: sdpa's enable_gqa even with a mask


@contextlib.contextmanager
def shared_kv_heads(device: torch.device):
    """Forwards with a custom mask on CPU: grouped-query attention runs in sdpa
    (``enable_gqa``) instead of transformers copying every key/value head group
    (``repeat_kv``), which transformers does whenever a mask is given.

    The results are identical. The copy grows with rows x context. Measured on this
    project's CPU for 8 rows x 900 positions of SmolLM2's attention shapes, one thread,
    the attention call took 6.8 ms with it against 27.3 ms with the copy.
    """
    if device.type != "cpu" or not _SDPA_GQA or os.environ.get(_GQA_SWITCH) is not None:
        yield
        return
    os.environ[_GQA_SWITCH] = "1"
    try:
        yield
    finally:
        os.environ.pop(_GQA_SWITCH, None)


_SDPA_GQA = "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")


@contextlib.contextmanager
def masked_forward(model, device: torch.device):
    """The context of every forward with several inputs and a custom mask (a tree step,
    a batched step): on CPU, grouped-query attention inside sdpa (``shared_kv_heads``)
    and the linear layers' kernel for a few rows (``msn.decoding.cpu``)."""
    if device.type != "cpu":
        yield
        return
    with shared_kv_heads(device), cpu.skinny_linears(model):
        yield


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


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


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


def context_limit(model) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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


def make_proposer(cfg: DecodeConfig, model, graphs: bool = False) -> Proposer | None:
    """The drafting strategy of ``cfg.method``; None for ``ar``, which drafts nothing.
    ``graphs``: the steps are fixed-shape graph replays (the latency ``tree="auto"`` weighs)."""
    device = model_device(model)
    if cfg.method == "ar":
        return None
    if cfg.method == "jacobi":
        return JacobiWindow(device, window=cfg.window)
    table = lambda: table_for(model, vocab_size(model) or 1, device)     # noqa: E731 - the model's, made once
    if cfg.method == "recycle":
        return Recycle(device, table=table())
    if cfg.method == "tr-jacobi":
        if not isinstance(cfg.tree, str):
            return TreeJacobi(device, topk_paths=list(cfg.tree), retrieve_len=cfg.retrieve_len,
                              retrieve_ngram=cfg.retrieve_ngram, retrieve=cfg.retrieve)
        merged = cfg.drafts == "merged" and cfg.retrieve
        if cfg.tree == "auto" or merged:
            # Merged drafts with a preset: that preset's size (its input count), nodes chosen by measurement.
            fixed = None if cfg.tree == "auto" else len(preset_paths(cfg.tree)[0]) + cfg.retrieve_len + 1
            drafts = "merged" if merged else "paper"
            return AutoTreeJacobi(device, latency=step_latency(model, graphs=graphs), retrieve_len=cfg.retrieve_len,
                                  retrieve_ngram=cfg.retrieve_ngram,
                                  store_key=acceptance_key(model, cfg.retrieve_len, cfg.retrieve_ngram, drafts),
                                  recycle=table() if merged else None,
                                  fixed_inputs=fixed)
        return TreeJacobi(device, tree=cfg.tree, retrieve_len=cfg.retrieve_len, retrieve_ngram=cfg.retrieve_ngram,
                          retrieve=cfg.retrieve)
    if cfg.method == "pld":
        return PromptLookup(device, num_tokens=cfg.pld_tokens, max_ngram=cfg.pld_ngram)
    if cfg.method == "lookahead":
        return Lookahead(device, window=cfg.lookahead_window, ngram=cfg.lookahead_ngram,
                         guesses=cfg.lookahead_guesses)
    raise MsnError(f"method {cfg.method!r} has no proposer")


_LATENCY: dict[str, Latency] = {}


def step_latency(model, *, refresh: bool = False, graphs: bool = False) -> Latency:
    """t(n) of one tree step on this model, device and dtype (``graphs``: of the replayed
    fixed-shape step): from memory, from the disk cache, or measured (a few seconds) and cached."""
    import json

    device = model_device(model)
    key = latency_key(model, device, model.dtype)
    if graphs:
        key["step"] = "graphs"
    name = json.dumps(key, sort_keys=True)
    if not refresh:
        if name in _LATENCY:
            return _LATENCY[name]
        cached = load_latency(key)
        if cached is not None:
            _LATENCY[name] = cached
            return cached
    lat = Latency(measure_step_latency(model, graphs=graphs), key)
    save_latency(lat)
    _LATENCY[name] = lat
    return lat


def _timing_prompt(model, context: int):
    """Where a timing starts: a new cache prefilled with ``context`` seeded random tokens (at
    most a quarter of the model's positions). Returns (cache, context, the position limit,
    the generator of the timing's further random tokens)."""
    limit = context_limit(model) or 1 << 30
    context = max(1, min(context, limit // 4))
    g = torch.Generator().manual_seed(0)
    cache = kv.new_cache(model)
    prefill(model, torch.randint(vocab_size(model) or 2, (1, context), generator=g).to(model_device(model)), cache)
    return cache, context, limit, g


_ONE_ROW_MARGIN = 0.97      # one row is computed as two only when that is 3 % faster (timing noise)


def one_row_kernel(model, *, refresh: bool = False) -> bool:
    """Whether one-input forwards of this float32 CPU model compute their linear layers as
    two-row products (``msn.decoding.cpu``): decided once per model, from the disk cache or
    by timing (26 one-token forwards), and applied to every later one-input forward.
    False, and nothing measured, on other devices and dtypes or with ``MSN_CPU_GEMM=0``."""
    if not cpu.applies(model):
        return False
    if not refresh and cpu.decided(model):
        return cpu.padded(model)
    key = {k: v for k, v in latency_key(model, model_device(model), model.dtype).items()
           if k not in ("ladder", "one_row")}
    stored = None if refresh else read_stored("one-row", key)
    if not isinstance(stored, dict) or not isinstance(stored.get("padded"), bool):
        seconds = measure_one_row(model)
        stored = {"padded": seconds["padded"] < _ONE_ROW_MARGIN * seconds["linear"],
                  "ms": {k: round(v * 1000, 3) for k, v in seconds.items()}}
        write_stored("one-row", key, stored)
    cpu.set_padded(model, stored["padded"])
    return stored["padded"]


@torch.inference_mode()
def measure_one_row(model, context: int = 100, repeats: int = 12) -> dict[str, float]:
    """Median wall seconds of a one-token forward after a ``context``-token prompt with the
    matrix-vector product (``linear``) and with one row computed as two (``padded``), the two
    alternating on one growing context (the first of each dropped as warm-up; a model with
    few positions gets fewer repeats, at least one)."""
    import statistics

    device = model_device(model)
    cache, context, limit, _ = _timing_prompt(model, context)
    repeats = max(1, min(repeats, (limit - context) // 2 - 1))
    times = {False: [], True: []}
    try:
        for r in range(1 + repeats):
            for on in ((False, True) if r % 2 else (True, False)):
                cpu.set_padded(model, on)
                t0 = time.perf_counter()
                decode_one_token(model, 0, cache, device)
                times[on].append(time.perf_counter() - t0)
    finally:
        cpu.set_padded(model, None)
    return {"linear": statistics.median(times[False][1:]), "padded": statistics.median(times[True][1:])}


@torch.inference_mode()
def measure_step_latency(model, ladder: tuple[int, ...] = LADDER, context: int = 100,
                         repeats: int = 5, graphs: bool = False) -> dict[int, float]:
    """Median wall seconds of one tree step (forward, verification, cache work) with n
    inputs after a ``context``-token prompt, for each n of ``ladder`` that fits.

    The ladder is run in rounds, every n once per round on the same growing context (random
    drafts are rejected, so each step adds one entry), so a passing load on the machine
    touches every n alike. ``graphs``: the fixed-shape step replayed as a CUDA graph, on the
    smallest buffers that hold the whole measurement (as a request of this length uses)."""
    import statistics

    device = model_device(model)
    cache, context, limit, g = _timing_prompt(model, context)
    warm = 1 if not graphs else 2            # replayed: the first step captures, the second warms the replay
    rounds = warm + repeats
    ladder = sorted(ladder)
    while len(ladder) > 1 and context + rounds * len(ladder) + ladder[-1] >= limit:
        ladder.pop()                         # a short model: the counts that fit its positions
    vocab = vocab_size(model) or 2
    cands = {n: torch.randint(vocab, (max(n - 1, 1), 1), generator=g).to(device) for n in ladder}
    steps = fixed.steps_for(model) if graphs else None
    if steps is not None:
        steps.begin(cache, context + rounds * len(ladder) + max(ladder), limit)
    length, times = context, {n: [] for n in ladder}
    for _ in range(rounds):
        for n in ladder:
            paths = tuple(chain(n - 1))
            sync_device(device)
            t0 = time.perf_counter()
            if steps is not None:
                new, feedback = fixed_step(steps, model, 0, paths, cands[n])
            else:
                new, feedback = tree_step(model, cache, length, 0, paths, cands[n], limit)
            sync_device(device)
            times[n].append(time.perf_counter() - t0)
            length += 1 + feedback.accepted
    return {n: statistics.median(t[warm:]) for n, t in times.items()}


class _Output:
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


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Runs the prompt (1, T) through the model; returns the last position's logits (V,)."""
    out = model(input_ids=input_ids, logits_to_keep=1, **kv.cache_kwargs(model, cache))
    return out.logits[0, -1]


def choose(logits: torch.Tensor, sampler: Sampler | None, position: int) -> int:
    """The token at output ``position`` from (V,) logits: the argmax, or its draw when sampling."""
    if sampler is None:
        return int(logits.argmax())
    return int(sampler.draw(logits[None], torch.tensor([position]), upto=position + 1)[0])


@torch.inference_mode()
def decode_one_token(model, token: int, cache, device, sampler: Sampler | None = None, position: int = 0) -> int:
    """One plain step (the oracle's rung): greedy, or the draw of output ``position`` when sampling."""
    with cpu.one_row_linears(model):
        out = model(input_ids=torch.tensor([[token]], device=device), **kv.cache_kwargs(model, cache))
    return choose(out.logits[0, -1], sampler, position)


@torch.inference_mode()
def tree_step(model, cache, context_len: int, root: int, paths, cand: torch.Tensor | None,
              max_position: int | None, sampler: Sampler | None = None, sample_drafts: bool = False,
              out_position: int = 0, profile: StepProfile | None = None):
    """One forward of the root plus a draft tree, verification, cache compaction.

    Greedy verification accepts drafts equal to the argmax at their parent; with a
    ``sampler`` it follows one draw per input (see ``sampling``), which keeps the output
    distributed exactly as one-token sampling. ``out_position`` is the output position of
    the token drawn at the root (the uniform it uses).

    Returns (new tokens, StepFeedback). ``new`` is the accepted drafts plus the bonus token.
    An empty tree is a plain one-token step, as cheap as ``ar``'s.
    """
    if not paths:
        device = model_device(model) if cand is None else cand.device
        with section(profile, "forward"), cpu.one_row_linears(model):
            logits = model(input_ids=torch.tensor([[root]], device=device), **kv.cache_kwargs(model, cache)).logits[0]
        with section(profile, "host_sync"):
            token = choose(logits[-1], sampler, out_position)
            if sampler is None or sample_drafts:
                pred_host = [token]       # greedy: the argmax ``choose`` took; sampled drafts: the draw
            else:
                pred_host = logits.argmax(dim=-1).tolist()
            pred = torch.tensor(pred_host, device=device)
        return [token], StepFeedback(logits=logits, pred=pred, path=[], accepted=0, pred_host=pred_host,
                                     draft_sampler=sampler if sample_drafts else None)
    device = cand.device
    with section(profile, "inputs"):
        tree = compiled_on(paths, str(device))
        drafts = cand[tree.node_pos, tree.node_col]
        ids = torch.cat([torch.tensor([root], dtype=torch.long, device=device), drafts])
        positions = tree_positions(tree, context_len, max_position)
        mask = attention_bias(tree, context_len, model.dtype, device)
        masks = layer_masks(model.config)
        if masks.sliding:
            mask = masks.build(mask, positions[None], single_step_keys(context_len, positions))
    with section(profile, "forward"), masked_forward(model, device):
        logits = model(input_ids=ids[None], position_ids=positions[None], attention_mask=mask,
                       **kv.cache_kwargs(model, cache)).logits[0]
    with section(profile, "verification"):
        packed, pred = verify(tree, ids, logits, sampler, sample_drafts, out_position)
    with section(profile, "host_sync"):
        host = packed.tolist()        # the step's one sync
    with section(profile, "cache"):
        new, feedback = read_verdict(host, paths, logits, pred, sampler if sample_drafts else None)
        kv.keep_path(cache, [0] + feedback.path[: feedback.accepted], tree.num_inputs)
    return new, feedback


def fixed_step(steps: fixed.StaticSteps, model, root: int, paths, cand: torch.Tensor | None,
               profile: StepProfile | None = None):
    """``tree_step`` on the model's fixed buffers (greedy): one graph replay where captured,
    one sync. Returns (new tokens, StepFeedback)."""
    with section(profile, "forward"):
        packed, logits, pred = steps.step(model, root, paths, cand)
    with section(profile, "host_sync"):
        host = packed.tolist()        # the step's one sync
    with section(profile, "cache"):
        new, feedback = read_verdict(host, paths, logits, pred, None)
        steps.advance(1 + feedback.accepted)
    return new, feedback


def verify(tree, ids: torch.Tensor, logits: torch.Tensor, sampler: Sampler | None, sample_drafts: bool,
           out_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Verification of one tree on the device: returns (the verdict and the draft tokens
    packed in one 1-D tensor for the host, the draft tokens ``pred``)."""
    pred = logits.argmax(dim=-1)
    if sampler is None:
        verdict = greedy_verify(tree, ids, pred)
    else:
        drawn = sampler.draw(logits, out_position + tree.depths, upto=out_position + tree.num_positions + 1)
        verdict = greedy_verify(tree, ids, drawn, usable=first_siblings(tree.parents, ids))
        if sample_drafts:
            pred = drawn
    return torch.cat([verdict.pack(), pred]), pred


def read_verdict(host: list[int], paths, logits: torch.Tensor, pred: torch.Tensor,
                 draft_sampler: Sampler | None) -> tuple[list[int], StepFeedback]:
    """The new tokens and the proposer's feedback from ``verify``'s packed tensor read on the host."""
    host_tree = compiled_on(paths, "cpu")
    depth = host_tree.leaf_paths.shape[1]
    accepted, best, bonus = host[0], host[1], host[2]
    path_tokens = host[3 : 3 + depth]
    path = host_tree.leaf_paths[best, : int(host_tree.leaf_len[best])].tolist() if paths else []
    new = path_tokens[:accepted] + [bonus]
    return new, StepFeedback(logits=logits, pred=pred, path=path, accepted=accepted, pred_host=host[3 + depth :],
                             draft_sampler=draft_sampler)


def vocab_size(model) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(emb, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    return int(size) if size else None


def _sampler(cfg: DecodeConfig, generator, device: torch.device) -> Sampler | None:
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
        from msn.decoding.batch import split_batch

        return split_batch(input_ids, attention_mask)
    if attention_mask is not None:
        raise MsnError("attention_mask needs input_ids of shape (B, T)")
    return None


def _not_a_prompt(p):
    raise MsnError(f"a batch holds prompts (lists of ids or (1, T) tensors), got {type(p).__name__}")


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

    Args:
        model: a Hugging Face causal LM with ``sdpa`` or ``eager`` attention.
        input_ids: (1, T) prompt ids. A batch, (B, T) with ``attention_mask`` (padding on
            either side) or a list of prompts (lists of ids or (1, T) tensors), is decoded
            in batched steps (``msn.decoding.batch``) and returns one result per prompt.
        method: ``ar``, ``jacobi``, ``tr-jacobi``, ``pld`` or ``lookahead``.
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
        from msn.decoding.batch import generate_batch

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
    device = model_device(model)
    sampler = _sampler(cfg, generator, device)
    if cfg.graphs == "on" and device.type != "cuda":
        raise MsnError(f"graphs='on' needs a CUDA device; the model is on {device.type} (use graphs='auto' or 'off')")
    steps = fixed.steps_for(model) if fixed.wanted(cfg.graphs, device, sampler is not None) else None
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
                  steps: fixed.StaticSteps | None) -> DecodeResult:
    device = model_device(model)
    input_ids = input_ids.to(device)
    prompt = input_ids[0].tolist()
    out = _Output(max_new_tokens, resolve_eos(model, eos_token_id), on_tokens)
    cache = kv.new_cache(model)
    limit = context_limit(model)
    # Before the prefill: measured once per model, the CPU kernel of one-input forwards and,
    # for tree="auto", the step latency (on the model's fixed buffers).
    one_row_kernel(model)
    if cfg.method != "ar":
        cpu.prepack(model)     # several-input steps ahead: their CPU weights' layout, made once
    proposer = make_proposer(cfg, model, graphs=steps is not None and steps.capture)

    sync_device(device)
    t0 = time.perf_counter()
    first = choose(prefill(model, input_ids, cache), sampler, 0)
    if steps is not None:
        # The smallest buffers that hold the prompt and one step: attention reads every slot, so
        # the buffers grow with the context (a step reads about the filled length, not the final).
        steps.begin(cache, len(prompt) + fixed.STEP_ROOM, limit)
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
