"""One decoding step, the only code that calls the model: the prefill, a plain one-token
step, and a tree step (the root plus a draft tree in one forward with a 4D additive mask
and explicit position ids, greedy or sampled verification, the accepted path's KV entries
kept), eagerly on a growing cache or on the model's fixed buffers (``graphs``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from msn.decoding import cache as kv
from msn.decoding import cpu
from msn.decoding.profile import StepProfile, section
from msn.decoding.proposers import StepFeedback
from msn.decoding.requests import model_device
from msn.decoding.sampling import Sampler, first_siblings
from msn.decoding.tree import attention_bias, compiled_on, single_step_keys, tree_positions
from msn.decoding.verify import greedy_verify
from msn.decoding.windows import layer_masks

if TYPE_CHECKING:
    from msn.decoding.graphs import StaticSteps


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
    with section(profile, "forward"), cpu.masked_forward(model, device):
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
