"""Greedy verification of a draft tree: pure tensor code, no model, no host sync."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msn.decoding.tree import CompiledTree


@dataclass
class Verdict:
    """Device tensors describing what one step accepted.

    Attributes:
        accepted: () long, number of draft nodes accepted (0..D).
        best: () long, the chosen leaf path (row of ``tree.leaf_paths``).
        bonus: () long, the model's greedy token after the last accepted node.
        path_tokens: (D,) long, input tokens along the chosen path (padding after its end).
    """

    accepted: torch.Tensor
    best: torch.Tensor
    bonus: torch.Tensor
    path_tokens: torch.Tensor

    def pack(self) -> torch.Tensor:
        """All fields in one 1-D tensor, so the host reads them with one sync."""
        return torch.cat([self.accepted.view(1), self.best.view(1), self.bonus.view(1), self.path_tokens])


def greedy_verify(tree: CompiledTree, input_ids: torch.Tensor, pred: torch.Tensor,
                  usable: torch.Tensor | None = None) -> Verdict:
    """Longest path whose every token equals the model's token at its parent.

    Args:
        tree: the compiled tree, on the same device as the inputs.
        input_ids: (n + 1,) long, root then draft nodes.
        pred: (n + 1,) long, the model's token at each input: the argmax of its logits
            (greedy), or one draw from its processed distribution (sampling).
        usable: optional (n + 1,) bool; nodes marked False are never accepted (sampling
            uses it to let only the first of several same-token siblings count).

    Among paths accepting equally many nodes the longer path wins (its unaccepted
    nodes give more future predictions), then the earlier one in the spec.
    """
    nodes = tree.leaf_paths                                   # (L, D)
    match = (input_ids[nodes] == pred[tree.parents[nodes].clamp_min(0)]) & tree.leaf_valid
    if usable is not None:
        match &= usable[nodes]
    accepted_per_path = match.long().cumprod(dim=-1).sum(dim=-1)          # (L,)
    depth = nodes.shape[1]
    # Indexing with a 0-dim tensor reads it on the host; one-element index tensors do not
    # (the step stays free of syncs, and capturable as a CUDA graph).
    best = torch.argmax(accepted_per_path * (depth + 1) + tree.leaf_len).view(1)
    accepted = accepted_per_path.index_select(0, best)
    path = nodes.index_select(0, best)[0]
    last = torch.where(accepted > 0, path.index_select(0, (accepted - 1).clamp_min(0)), torch.zeros_like(accepted))
    return Verdict(accepted=accepted[0], best=best[0], bonus=pred.index_select(0, last)[0],
                   path_tokens=input_ids[path])
