"""Draft trees as data, compiled once into tensors by pure functions.

A tree is a list of *paths* below an implicit root, Medusa style. Each path is a tuple
of column indices, one per depth: ``(0,)`` is the first candidate column at depth 1,
``(0, 1)`` its child holding column 1 at depth 2. A node's token is read from a
candidate table ``cand[depth - 1, column]`` (shape (P, C): future position x column),
so one tree shape serves every proposer: a Jacobi window is the chain ``(0,), (0, 0),
...``; TR-Jacobi puts the top-K ranks in columns 0..K-1 and the retrieved continuation
in column K; Lookahead puts one n-gram guess per column.

Nothing here touches a model.
"""

from __future__ import annotations

import functools
import heapq
import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch

from msn.errors import MsnError

Path = tuple[int, ...]


@dataclass(frozen=True)
class CompiledTree:
    """Tensors describing a draft tree of ``n`` nodes plus the root (``n + 1`` inputs).

    Input index 0 is the root (the last accepted token, not yet in the cache); input
    index ``i >= 1`` is node ``paths[i - 1]``. Nodes are ordered parents first.

    Attributes:
        paths: the node paths in input order (length n).
        parents: (n + 1,) long, input index of each input's parent; -1 for the root.
        depths: (n + 1,) long, 0 for the root; position id = context length + depth.
        node_pos: (n,) long, future position (depth - 1) each node reads its token from.
        node_col: (n,) long, candidate column each node reads its token from.
        ancestor: (n + 1, n + 1) bool, ``ancestor[i, j]`` is True when j is i or an
            ancestor of i (the attention pattern inside the tree).
        leaf_paths: (L, D) long, input indices along each root-to-leaf path, padded with 0.
        leaf_valid: (L, D) bool, True where ``leaf_paths`` holds a real node.
        leaf_len: (L,) long, number of real nodes on each leaf path.
        num_positions: P, the number of future positions the tree reads.
        num_columns: C, the number of candidate columns the tree reads.
    """

    paths: tuple[Path, ...]
    parents: torch.Tensor
    depths: torch.Tensor
    node_pos: torch.Tensor
    node_col: torch.Tensor
    ancestor: torch.Tensor
    leaf_paths: torch.Tensor
    leaf_valid: torch.Tensor
    leaf_len: torch.Tensor
    num_positions: int
    num_columns: int

    @property
    def num_inputs(self) -> int:
        return len(self.paths) + 1

    def to(self, device: torch.device | str) -> "CompiledTree":
        moved = {
            name: getattr(self, name).to(device)
            for name in ("parents", "depths", "node_pos", "node_col", "ancestor",
                         "leaf_paths", "leaf_valid", "leaf_len")
        }
        return CompiledTree(paths=self.paths, num_positions=self.num_positions,
                            num_columns=self.num_columns, **moved)


def validate_paths(paths: Sequence[Sequence[int]]) -> tuple[Path, ...]:
    """Checks a tree spec and returns it as tuples, parents before children.

    Raises MsnError when a path is empty, has a negative column, repeats, or when the
    tree is not prefix-closed (a node whose parent is missing).
    """
    out = []
    if isinstance(paths, (str, bytes)):
        raise MsnError(f"malformed tree: expected a list of paths such as [(0,), (1,), (0, 0)], got {paths!r}")
    for p in paths:
        if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
            raise MsnError(f"malformed tree: each path is a sequence of column indices, got {p!r}")
        try:
            if any(isinstance(c, bool) for c in p):
                raise TypeError
            t = tuple(operator.index(c) for c in p)
        except TypeError:
            raise MsnError(f"malformed tree: path {tuple(p)!r} holds a non-integer entry; "
                           "columns are integers") from None
        if not t:
            raise MsnError("malformed tree: empty path; every path names at least one column, e.g. (0,)")
        if any(c < 0 for c in t):
            raise MsnError(f"malformed tree: negative column in path {t}")
        out.append(t)
    seen = set(out)
    if len(seen) != len(out):
        raise MsnError("malformed tree: a path appears twice")
    for t in out:
        if len(t) > 1 and t[:-1] not in seen:
            raise MsnError(f"malformed tree: path {t} has no parent {t[:-1]}; trees must be prefix-closed")
    # Stable sort by depth keeps the caller's order (which decides tie-breaks) within a depth.
    return tuple(sorted(out, key=len))


@functools.lru_cache(maxsize=256)
def compile_tree(paths: tuple[Path, ...]) -> CompiledTree:
    """Compiles a tree spec into the tensors the verifier and the attention mask need.

    Pure and cached: the same spec returns the same (CPU) tensors. An empty spec is the
    root alone (one plain decoding step).
    """
    paths = validate_paths(paths)
    n = len(paths)
    index = {p: i + 1 for i, p in enumerate(paths)}
    parents = [-1] + [index[p[:-1]] if len(p) > 1 else 0 for p in paths]
    depths = [0] + [len(p) for p in paths]
    ancestor = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    for i in range(n + 1):
        j = i
        while j != -1:
            ancestor[i, j] = True
            j = parents[j]
    has_child = set(parents[1:])
    leaves = [i for i in range(1, n + 1) if i not in has_child]
    max_depth = max(depths)
    leaf_paths = torch.zeros(max(len(leaves), 1), max(max_depth, 1), dtype=torch.long)
    leaf_valid = torch.zeros_like(leaf_paths, dtype=torch.bool)
    leaf_len = torch.zeros(leaf_paths.shape[0], dtype=torch.long)
    for row, leaf in enumerate(leaves):
        chain = []
        j = leaf
        while j > 0:
            chain.append(j)
            j = parents[j]
        chain.reverse()
        leaf_paths[row, : len(chain)] = torch.tensor(chain)
        leaf_valid[row, : len(chain)] = True
        leaf_len[row] = len(chain)
    return CompiledTree(
        paths=paths,
        parents=torch.tensor(parents, dtype=torch.long),
        depths=torch.tensor(depths, dtype=torch.long),
        node_pos=torch.tensor([len(p) - 1 for p in paths], dtype=torch.long),
        node_col=torch.tensor([p[-1] for p in paths], dtype=torch.long),
        ancestor=ancestor,
        leaf_paths=leaf_paths,
        leaf_valid=leaf_valid,
        leaf_len=leaf_len,
        num_positions=max_depth,
        num_columns=max((p[-1] for p in paths), default=-1) + 1,
    )


def chain(length: int, column: int = 0) -> list[Path]:
    """A single chain of ``length`` nodes all reading ``column``: (c,), (c, c), ..."""
    return [(column,) * d for d in range(1, length + 1)]


def topk_tree(nodes_per_depth: Sequence[int], k: int) -> list[Path]:
    """A sparse tree over top-k ranks with the given number of nodes at each depth.

    Nodes are picked like Medusa's trees: the rank combinations with the highest prior
    probability first, under a prior where rank r at any depth has probability
    proportional to 1 / (r + 1). Each depth only extends nodes kept at the depth above,
    so the result is prefix-closed. Ties break on the rank tuple, so the result is
    deterministic, and within a depth paths are ordered most likely first.
    """
    if k <= 0 or any(c < 0 for c in nodes_per_depth):
        raise MsnError("top-k tree needs k > 0 and non-negative node counts")

    def score(p: Path) -> float:
        return -sum(math.log(r + 1) for r in p)

    out: list[Path] = []
    frontier: list[Path] = [()]
    for count in nodes_per_depth:
        children = [p + (r,) for p in frontier for r in range(k)]
        if count > len(children):
            raise MsnError(f"top-k tree: {count} nodes asked at depth {len(frontier[0]) + 1}, "
                           f"only {len(children)} possible")
        best = heapq.nsmallest(count, children, key=lambda p: (-score(p), p))
        out.extend(best)
        frontier = best
        if not frontier:
            break
    return out


# The reference TR-Jacobi tree: the 63 top-10 nodes of the MSN authors' TR-Jacobi code
# (10, 28, 23 and 2 per depth), the same node list as Medusa's ``mc_sim_7b_63``, kept
# literally and in its order. The retrieval chain is added by the proposer.
REFERENCE_TREE: tuple[Path, ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
    (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,),
    (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0),
    (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0),
    (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1),
    (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)

# Smaller trees for hardware where a step's cost grows with its inputs, picked by
# ``topk_tree``: name -> (nodes per depth, k).
TOPK_PRESETS: dict[str, tuple[tuple[int, ...], int]] = {
    "medium": ((4, 6, 5, 3, 2), 4),
    "small": ((2, 2, 1, 1, 1), 2),
    "chain": ((1, 1, 1, 1, 1), 1),
}
TREE_PRESETS = ("reference", *TOPK_PRESETS)


def preset_paths(name: str) -> tuple[list[Path], int]:
    """Returns (top-k paths, k) of a named preset."""
    if name == "reference":
        return list(REFERENCE_TREE), 10
    if name not in TOPK_PRESETS:
        raise MsnError(f"unknown tree preset {name!r}; choose one of {', '.join(TREE_PRESETS)}")
    counts, k = TOPK_PRESETS[name]
    return topk_tree(counts, k), k


def attention_bias(tree: CompiledTree, context_len: int, dtype: torch.dtype,
                   device: torch.device | str) -> torch.Tensor:
    """The additive 4D mask for one tree step: shape (1, 1, n + 1, context_len + n + 1).

    Every input sees the whole context and its own ancestors (itself included); all
    other entries hold the dtype's most negative value.
    """
    q = tree.num_inputs
    bias = torch.zeros(1, 1, q, context_len + q, dtype=dtype, device=device)
    blocked = ~tree.ancestor.to(device)
    bias[0, 0, :, context_len:].masked_fill_(blocked, torch.finfo(dtype).min)
    return bias


def offset_attention_bias(seen: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """The additive mask, shape (B, 1, N, S), of B rows whose N inputs sit at cache slots
    [lengths[r], lengths[r] + N) among ``slots`` = 0..S-1: each input sees every slot before
    its row's inputs and, among the inputs, those ``seen[r]`` (B, N, N) marks (its tree's
    ancestors); all other slots hold the dtype's most negative value. Pure device work, no
    host read (a batched step; a fixed-shape step, captured as a CUDA graph)."""
    n = seen.shape[-1]
    offset = slots[None, :] - lengths[:, None]                                        # (B, S)
    inside = (offset >= 0) & (offset < n)
    among = seen.gather(2, offset.clamp(0, n - 1)[:, None, :].expand(-1, n, -1)) & inside[:, None, :]
    allowed = (offset < 0)[:, None, :] | among                                         # (B, N, S)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=slots.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def offset_key_positions(lengths: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The position, (B, S), of the entry at each cache slot of B rows laid out as in
    ``offset_attention_bias``: slot s before row r's inputs holds position s, the slots of its
    N inputs their ``positions`` (B, N); later slots (hidden anyway) repeat the last input's.
    Pure device work."""
    n = positions.shape[-1]
    offset = slots[None, :] - lengths[:, None]                                        # (B, S)
    inputs = positions.gather(1, offset.clamp(0, n - 1))
    return torch.where(offset < 0, slots[None, :].expand_as(offset), inputs)


def single_step_keys(context_len: int, positions: torch.Tensor) -> torch.Tensor:
    """Key positions (1, context_len + N) of a one-row step (``attention_bias``'s layout):
    the context, then its inputs at ``positions`` (N,)."""
    return torch.cat([torch.arange(context_len, device=positions.device), positions])[None]


def windowed_bias(bias: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """``bias`` (B, 1, N, S) with every key ``window`` or more positions before its query
    hidden as well: transformers' sliding-window rule, under which a query at position q
    sees the keys at q - window < k <= q. ``query_pos`` (B, N), ``key_pos`` (B, S).
    Returns a new tensor; pure device work."""
    far = (query_pos[:, :, None] - key_pos[:, None, :]) >= window                      # (B, N, S)
    return bias.masked_fill(far[:, None], torch.finfo(bias.dtype).min)


def tree_positions(tree: CompiledTree, context_len, max_position: int | None) -> torch.Tensor:
    """Position ids of a step's inputs (context length + depth; an int or a device tensor).
    Nodes past the model's last position can only be accepted beyond max_new_tokens: they
    are clamped to it."""
    positions = context_len + tree.depths
    return positions if max_position is None else positions.clamp_max(max_position - 1)


@functools.lru_cache(maxsize=512)
def compiled_on(paths: tuple[Path, ...], device: str) -> CompiledTree:
    """``compile_tree(paths)`` moved to ``device`` once and reused."""
    return compile_tree(paths).to(device)
