"""One decoding step, the only code that calls the model.

Every step is the same four stages, whatever carries it:

1. **inputs**: each row's root and draft tree as (B, N) ids, positions (its length plus
   each node's depth) and the ancestor matrix (B, N, N) (``tree_inputs``);
2. **the forward** (``forward``): one additive 4D mask built from those on the device
   (``offset_attention_bias``, sliding windows per layer type), the model run once with
   the CPU kernels of ``msn.decoding.cpu`` and wherever the cache writes the inputs;
3. **verification** on the device (``verify``), the host reading one packed tensor;
4. **cache compaction**: the accepted path's entries kept (``msn.decoding.cache``).

What differs comes in as arguments: one row on a growing cache (``tree_step``), a batch
of rows of different lengths (``batch_step``, rows written at their own lengths and their
attention grouped by length), or the fixed buffers of ``msn.decoding.static_steps``
(``fixed_device_step``: positions from a device scalar, compaction on the device, so the
step can be compiled and captured as a CUDA graph). The prefill and a step that feeds the
root alone (``one_token``) pass no mask: transformers builds it from the cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from msn.decoding import cache as kv
from msn.decoding import cpu
from msn.decoding import ragged
from msn.decoding.profile import StepProfile, section
from msn.decoding.proposers import StepFeedback
from msn.decoding.devices import model_device
from msn.decoding.sampling import Sampler, first_siblings
from msn.decoding.tree import (CompiledTree, compiled_on, offset_attention_bias, offset_key_positions,
                               tree_positions)
from msn.decoding.verify import greedy_verify
from msn.decoding.windows import layer_masks

if TYPE_CHECKING:
    from msn.decoding.static_steps import StaticSteps


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Runs the prompt (1, T) through the model; returns the last position's logits (V,)."""
    out = model(input_ids=input_ids, logits_to_keep=1, **kv.cache_kwargs(model, cache))
    return out.logits[0, -1]


def pick_token(logits: torch.Tensor, sampler: Sampler | None, position: int) -> int:
    """The token at output ``position`` from (V,) logits: the argmax, or its draw when sampling."""
    if sampler is None:
        return int(logits.argmax())
    return int(sampler.draw(logits[None], torch.tensor([position]), upto=position + 1)[0])


@torch.inference_mode()
def one_token(model, token: int, cache, device) -> torch.Tensor:
    """The forward of one input (the root alone) after ``cache``: its logits (1, V). One row
    is computed as two where the model's CPU kernel says so (``cpu.one_row_linears``)."""
    with cpu.one_row_linears(model):
        return model(input_ids=torch.tensor([[token]], device=device), **kv.cache_kwargs(model, cache)).logits[0]


@torch.inference_mode()
def decode_one_token(model, token: int, cache, device, sampler: Sampler | None = None, position: int = 0) -> int:
    """One plain step (the oracle's rung): greedy, or the draw of output ``position`` when sampling."""
    return pick_token(one_token(model, token, cache, device)[-1], sampler, position)


@dataclass(frozen=True)
class StepInputs:
    """The inputs of one step of B rows, N inputs each (shorter trees padded; padding sees
    itself only).

    Attributes:
        ids: (B, N) root then drafts.
        positions: (B, N) position ids: the row's length plus the node's depth, clamped to
            the model's last position.
        seen: (B, N, N) bool, input i sees input j (j is i's ancestor or i itself).
        lengths: (B,) each row's cache entries before its inputs (a device tensor).
        slots: (S,) 0..S-1, the cache slots the step's attention reads.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    seen: torch.Tensor
    lengths: torch.Tensor
    slots: torch.Tensor


def tree_inputs(roots: list[int], lengths: list[int], trees: list[CompiledTree], cands: list, past: int,
                max_position: int | None, device) -> StepInputs:
    """``StepInputs`` of rows with ``roots``, ``lengths`` entries each, and ``trees`` drafted
    from candidate tables ``cands`` ((P, K) or None for a row that drafts nothing); the cache
    holds ``past`` slots before the step (the longest row)."""
    width = max(t.num_inputs for t in trees)
    if len(trees) == 1:        # one row: no padding
        tree, cand = trees[0], cands[0]
        root = torch.tensor([roots[0]], dtype=torch.long, device=device)
        ids = torch.cat([root, cand[tree.node_pos, tree.node_col]]) if tree.num_inputs > 1 else root
        ids, seen = ids[None], tree.ancestor[None]
        positions = tree_positions(tree, lengths[0], max_position)[None]
    else:
        ids = torch.zeros(len(trees), width, dtype=torch.long, device=device)
        positions = torch.zeros(len(trees), width, dtype=torch.long, device=device)
        seen = torch.eye(width, dtype=torch.bool, device=device).repeat(len(trees), 1, 1)
        for r, (root, length, tree, cand) in enumerate(zip(roots, lengths, trees, cands)):
            n = tree.num_inputs
            ids[r, 0] = root
            if n > 1:
                ids[r, 1:n] = cand[tree.node_pos, tree.node_col]
            positions[r] = length
            positions[r, :n] += tree.depths
        if max_position is not None:
            positions.clamp_max_(max_position - 1)
        for r, tree in enumerate(trees):
            seen[r, : tree.num_inputs, : tree.num_inputs] = tree.ancestor
    return StepInputs(ids, positions, seen, torch.tensor(lengths, device=device),
                      torch.arange(past + width, device=device))


def forward(model, inputs: StepInputs, cache_kwargs: dict, *, placed=None, kernels: bool = True,
            groups: ragged.Plan | None = None) -> torch.Tensor:
    """The step's one forward: logits (B, N, V). Pure device work, no host sync.

    ``placed``: the context in which the cache writes the inputs where this step keeps them
    (``kv.rows_at``, ``kv.writing_at``; None: appended). ``kernels``: the CPU kernels of
    ``cpu.masked_forward`` (a compiled step leaves kernels to inductor). ``groups``: a batch's
    rows attended in groups of similar length (``msn.decoding.ragged``)."""
    mask = offset_attention_bias(inputs.seen, inputs.lengths, inputs.slots, model.dtype)
    masks = layer_masks(model.config)
    if masks.sliding:
        mask = masks.build(mask, inputs.positions, offset_key_positions(inputs.lengths, inputs.slots, inputs.positions))
    device = inputs.ids.device
    with (cpu.masked_forward(model, device) if kernels else contextlib.nullcontext()), \
            ragged.grouped_attention(groups), (placed if placed is not None else contextlib.nullcontext()):
        return model(input_ids=inputs.ids, position_ids=inputs.positions, attention_mask=mask,
                     **cache_kwargs).logits


@torch.inference_mode()
def tree_step(model, cache, context_len: int, root: int, paths, cand: torch.Tensor | None,
              max_position: int | None, sampler: Sampler | None = None, sample_drafts: bool = False,
              out_position: int = 0, profile: StepProfile | None = None):
    """One row's step on a growing cache: the root plus a draft tree in one forward,
    verification, cache compaction.

    Greedy verification accepts drafts equal to the argmax at their parent; with a
    ``sampler`` it follows one draw per input (see ``sampling``), which keeps the output
    distributed exactly as one-token sampling. ``out_position`` is the output position of
    the token drawn at the root (the uniform it uses).

    Returns (new tokens, StepFeedback). ``new`` is the accepted drafts plus the bonus token.
    An empty tree is a plain one-token step, as cheap as ``ar``'s.
    """
    if not paths:
        device = model_device(model) if cand is None else cand.device
        with section(profile, "forward"):
            logits = one_token(model, root, cache, device)
        with section(profile, "host_sync"):
            token = pick_token(logits[-1], sampler, out_position)
            if sampler is None or sample_drafts:
                pred_host = [token]       # greedy: the argmax ``pick_token`` took; sampled drafts: the draw
            else:
                pred_host = logits.argmax(dim=-1).tolist()
            pred = torch.tensor(pred_host, device=device)
        return [token], StepFeedback(logits=logits, pred=pred, path=[], accepted=0, pred_host=pred_host,
                                     draft_sampler=sampler if sample_drafts else None)
    device = cand.device
    with section(profile, "inputs"):
        tree = compiled_on(paths, str(device))
        inputs = tree_inputs([root], [context_len], [tree], [cand], context_len, max_position, device)
    with section(profile, "forward"):
        logits = forward(model, inputs, kv.cache_kwargs(model, cache))[0]
    with section(profile, "verification"):
        packed, pred = verify(tree, inputs.ids[0], logits, sampler, sample_drafts, out_position)
    with section(profile, "host_sync"):
        host = packed.tolist()        # the step's one sync
    with section(profile, "cache"):
        new, feedback = read_verdict(host, paths, logits, pred, sampler if sample_drafts else None)
        kv.keep_path(cache, [0] + feedback.path[: feedback.accepted], tree.num_inputs)
    return new, feedback


@dataclass
class RowStep:
    """One row of a batched step: what it feeds and how it verifies.

    Attributes:
        root: the row's last accepted token.
        length: its cache entries before the step.
        paths: its draft tree (() for the root alone).
        cand: the candidate table the tree reads (None when it drafts nothing).
        sampler: its sampler (None: greedy).
        sample_drafts: whether its drafts are sampled (see ``sampling``).
        out_position: the output position of the token drawn at its root.
        skip: a row that failed before the step: it feeds its root, keeps it and is not verified.
    """

    root: int
    length: int
    paths: tuple
    cand: torch.Tensor | None
    sampler: Sampler | None = None
    sample_drafts: bool = False
    out_position: int = 0
    skip: bool = False


@torch.inference_mode()
def batch_step(model, cache, rows: list[RowStep], max_position: int | None) -> list:
    """One forward for every row of a batch cache (``kv.rows_at``: row r's inputs written
    from its own length; their attention grouped by length, ``ragged.plan``), each row
    verified on its own, one host sync, every row's accepted path kept. Returns per row (new tokens, StepFeedback), or the exception that failed the
    row alone (its verification raised); a failed or skipped row keeps its root only."""
    device = model_device(model)
    trees = [compiled_on(row.paths, str(device)) for row in rows]
    lengths, past = [row.length for row in rows], kv.cache_length(cache)
    inputs = tree_inputs([row.root for row in rows], lengths, trees, [row.cand for row in rows], past,
                         max_position, device)
    logits = forward(model, inputs, kv.cache_kwargs(model, cache), placed=kv.rows_at(cache, inputs.lengths),
                     groups=ragged.plan(lengths, past, inputs.ids.shape[1]))
    results: list = [None] * len(rows)
    packed, preds = [], []
    for r, (row, tree) in enumerate(zip(rows, trees)):
        n = tree.num_inputs
        p, pred = torch.zeros(0, dtype=torch.long, device=device), None
        if not row.skip:
            try:
                p, pred = verify(tree, inputs.ids[r, :n], logits[r, :n], row.sampler, row.sample_drafts,
                                 row.out_position)
            except Exception as e:          # noqa: BLE001 - this row's fault alone
                results[r] = e
        packed.append(p)
        preds.append(pred)
    host = torch.cat(packed).tolist()          # the step's one sync
    keeps, offset = [], 0
    for r, (row, tree) in enumerate(zip(rows, trees)):
        size = packed[r].numel()
        offset += size
        keep = [0]
        if not row.skip and results[r] is None:
            try:
                results[r] = read_verdict(host[offset - size : offset], row.paths, logits[r, : tree.num_inputs],
                                          preds[r], row.sampler if row.sample_drafts else None)
                keep += results[r][1].path[: results[r][1].accepted]
            except Exception as e:          # noqa: BLE001
                results[r] = e
        keeps.append(keep)
    kv.keep_paths(cache, [row.length for row in rows], keeps)
    return results


def fixed_device_step(model, cache, ctx: torch.Tensor, slots: torch.Tensor, tree: CompiledTree, ids: torch.Tensor,
                      moves: bool, max_position: int | None, kernels: bool = True,
                      cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A greedy step on fixed buffers (``msn.decoding.static_steps``): the inputs ``ids`` (N,)
    written at slots ``ctx`` + 0..N-1 of ``cache`` (a ``kv.FixedCache``), the accepted path's
    entries moved to follow the context (``moves``: the tree is not a chain). No host sync
    and no allocation that depends on the context length, so the step compiles and captures.
    Returns (verdict and predictions packed for the host, logits (N, V), predictions (N,))."""
    offsets = slots[: tree.num_inputs]                       # 0..n-1
    inputs = StepInputs(ids[None], tree_positions(tree, ctx, max_position)[None], tree.ancestor[None], ctx, slots)
    logits = forward(model, inputs, cache_kwargs or kv.cache_kwargs(model, cache),
                     placed=kv.writing_at(cache, ctx + offsets), kernels=kernels)[0]
    packed, pred = verify(tree, ids, logits, None, False, 0)
    if moves:
        best = packed[1:2]         # ``Verdict.pack``: accepted, best leaf, ...
        keep = torch.cat([offsets[:1], tree.leaf_paths.index_select(0, best)[0]])
        kv.move_entries(cache, ctx + keep, ctx + offsets[: keep.numel()])
    return packed, logits, pred

def fixed_step(steps: StaticSteps, model, root: int, paths, cand: torch.Tensor | None,
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
