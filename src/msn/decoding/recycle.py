"""Recycled candidates (Token Recycling, Luo et al., ACL 2025): for every token id, the top-k
tokens the model predicted after it the last time it was fed, kept in a (V, k) table.

* ``RecycleTable``: the table on the model's device, one per model in a process (shared by
  every generation and batch row, so it outlives a request: the "hot start"), kept on disk so
  a new process starts where the last one stopped. After every step the top-k of every
  input's logits overwrite the rows of the step's input tokens; nothing leaves the device.
* ``RecycleTree``: a static draft tree over the table's ranks, filled breadth-first from the
  root token (depth d reads the table rows of depth d - 1's tokens), as a candidate table
  in the shape every proposer hands the verifier (``tree.py``): node ``(s1, ..., sd)`` reads
  column ``offset + sd`` of row ``d - 1``, one column per node of a depth.

Pure tensor work; proposers call it, it never calls the model.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from msn.decoding.tree import Path
from msn.paths import discarded, stored_path

K = 8           # candidates kept per token, the paper's k (int32: 1 MB for a 32k vocabulary, 8 MB for 262k)

# The anchor's static, imbalanced tree: 80 nodes over ranks 0-7, depth 6 (8, 21, 25, 15, 8
# and 3 nodes per depth), earlier ranks with more and deeper children. Node (r1, ..., rd) is
# the r_d-th candidate after its parent's token.
RECYCLE_TEMPLATE: tuple[tuple[int, ...], ...] = (
    *((r,) for r in range(8)),
    *((0, r) for r in range(8)), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1),
    (4, 0), (5, 0), (6, 0), (7, 0),
    *((0, 0, r) for r in range(8)), (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 4, 0),
    (0, 5, 0), (0, 6, 0), (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0),
    *((0, 0, 0, r) for r in range(5)), (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0),
    (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0),
    (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
)


@dataclass(frozen=True)
class RecycleTree:
    """A rank tree compiled for the breadth-first fill.

    Attributes:
        ranks: the nodes as rank paths, parents first (a prefix of ``RECYCLE_TEMPLATE`` or it all).
        offset: the first candidate column the tree's nodes read (other sources sit before it).
    """

    ranks: tuple[tuple[int, ...], ...] = RECYCLE_TEMPLATE
    offset: int = 0

    @cached_property
    def slots(self) -> dict[tuple[int, ...], int]:
        """Each node's column among the nodes of its depth (0, 1, ... in order)."""
        seen: dict[int, int] = {}
        out = {}
        for r in self.ranks:
            out[r] = seen.get(len(r), 0)
            seen[len(r)] = out[r] + 1
        return out

    @cached_property
    def depth(self) -> int:
        return max(len(r) for r in self.ranks)

    @cached_property
    def width(self) -> int:
        """The most nodes at one depth (the candidate columns the tree uses)."""
        return max(self.slots.values()) + 1

    def path(self, ranks: tuple[int, ...]) -> Path:
        """The tree spec path (``tree.py``) of the node with these ranks."""
        return tuple(self.offset + self.slots[ranks[:d]] for d in range(1, len(ranks) + 1))

    @cached_property
    def paths(self) -> tuple[Path, ...]:
        return tuple(self.path(r) for r in self.ranks)

    @cached_property
    def levels(self) -> list[tuple[list[int], list[int]]]:
        """Per depth: (the parent's column at the depth above, the rank) of each node, in column order."""
        out = []
        for d in range(1, self.depth + 1):
            nodes = sorted((r for r in self.ranks if len(r) == d), key=lambda r: self.slots[r])
            out.append(([self.slots[r[:-1]] if d > 1 else 0 for r in nodes], [r[-1] for r in nodes]))
        return out

    @cached_property
    def children(self) -> dict[tuple[int, ...], list[tuple[int, ...]]]:
        out: dict[tuple[int, ...], list[tuple[int, ...]]] = {(): []}
        for r in self.ranks:
            out.setdefault(r, [])
            out[r[:-1]].append(r)
        return out

    def accepted(self, tokens: list[list[int]], truth: list[int]) -> tuple[int, ...]:
        """The columns, depth by depth, of the nodes the tree would have accepted when it drafted
        ``tokens`` (rows: depths, columns: nodes) and the output went on with ``truth``. Among
        siblings holding the same token the first counts."""
        out, node = [], ()
        for d, tok in enumerate(truth[: self.depth]):
            hit = next((c for c in self.children.get(node, ()) if tokens[d][self.slots[c]] == tok), None)
            if hit is None:
                break
            out.append(self.slots[hit])
            node = hit
        return tuple(out)


class RecycleTable:
    """The (V, k) candidate table of one model, on its device (int32: 8 MB for 262k ids)."""

    def __init__(self, vocab: int, device, k: int = K, key: dict | None = None):
        self.k = k
        self.key = key
        # A normal tensor even when made inside inference mode (a batch step), so every later
        # update, inside inference mode or not, may write it.
        with torch.inference_mode(False):
            self.ids = torch.zeros(vocab, k, dtype=torch.int32, device=device)
        self.cold = True            # nothing loaded from disk or learnt since it was made or reset
        self.dirty = False
        self.saved_at = 0.0
        # Where it lives, fixed when it is made: a table made in an empty store (--cold) is
        # saved there, never over the store's own.
        self._path = _table_path(key) if key is not None else None
        self._levels: dict = {}     # (RecycleTree, host|device) -> its levels' (parent column, rank) indices

    def fill(self, tree: RecycleTree, root: int) -> torch.Tensor:
        """The tree's tokens, (depth, offset + width) long, drafted from ``root`` breadth-first:
        depth 1 holds the root's candidates, depth d the candidates of depth d - 1's tokens.
        Columns before ``offset`` are zero (other sources fill them). Device work only; a
        table in host memory is walked through its NumPy view (a step's worth of small
        torch ops there costs about 5x more host time than the walk itself)."""
        if self.ids.device.type == "cpu":
            return self._fill_host(tree, root)
        return self._fill_device(tree, root)

    def _levels_on(self, tree: RecycleTree, kind: str):
        levels = self._levels.get((tree, kind))
        if levels is None:
            if kind == "host":
                levels = [(np.asarray(p, dtype=np.int64), np.asarray(r, dtype=np.int64)) for p, r in tree.levels]
            else:
                levels = [(torch.tensor(p, dtype=torch.long, device=self.ids.device),
                           torch.tensor(r, dtype=torch.long, device=self.ids.device)) for p, r in tree.levels]
            self._levels[(tree, kind)] = levels
        return levels

    def _fill_host(self, tree: RecycleTree, root: int) -> torch.Tensor:
        ids = self.ids.numpy()
        out = np.zeros((tree.depth, tree.offset + tree.width), dtype=np.int64)
        prev = None
        for d, (parents, ranks) in enumerate(self._levels_on(tree, "host")):
            prev = ids[root, ranks] if prev is None else ids[prev[parents], ranks]
            out[d, tree.offset : tree.offset + len(ranks)] = prev
        return torch.from_numpy(out)

    def _fill_device(self, tree: RecycleTree, root: int) -> torch.Tensor:
        rows = []
        prev = None
        for parents, ranks in self._levels_on(tree, "device"):
            # Depth 1 reads the root's row (a view: no host-to-device copy), deeper ones the rows above.
            prev = self.ids[root][ranks].long() if prev is None else self.ids[prev[parents], ranks].long()
            rows.append(torch.nn.functional.pad(prev, (tree.offset, tree.width - len(ranks))))
        return torch.stack(rows)

    def update(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Rows ``ids`` (n,) take the top-k of their logits (n, V): the step's every input,
        accepted or not (the paper's update; a token fed twice keeps one of its two rows)."""
        k = min(self.k, logits.shape[-1])
        top = torch.topk(logits, k, dim=-1).indices.to(torch.int32)
        self.ids[ids, :k] = top
        self.dirty = True
        self.cold = False

    # -- what a process keeps: one table per model, saved on disk ---------------------------

    def path(self):
        return self._path

    def save(self, every_s: float = 5.0, force: bool = False) -> None:
        """Writes the table to disk (atomic rename) when it changed, at most every ``every_s``
        seconds unless ``force`` (every generation that used it saves it as it ends, so nothing
        waits for the interpreter's exit); a read-only cache only costs a cold start later."""
        if self.key is None or not self.dirty or (not force and time.monotonic() - self.saved_at < every_s) \
                or discarded(self._path):
            return
        path = self.path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            save_file({"ids": self.ids.cpu().contiguous()}, tmp, metadata={"key": json.dumps(self.key, sort_keys=True)})
            os.replace(tmp, path)
        except OSError:
            return
        self.dirty = False
        self.saved_at = time.monotonic()

    def load(self) -> bool:
        """Takes the table saved for this key, if one of the right shape is there."""
        try:
            with safe_open(self.path(), framework="pt") as f:
                key = json.loads((f.metadata() or {}).get("key", "null"))
                ids = f.get_tensor("ids")
        except Exception:       # noqa: BLE001 - missing, truncated or foreign: a cold start
            return False
        if ids.shape != self.ids.shape or key != json.loads(json.dumps(self.key, sort_keys=True)):
            return False
        self.ids.copy_(ids.to(torch.int32))
        self.cold = False
        return True

    def reset(self) -> None:
        """Empties the table here and on disk (the next generation starts cold)."""
        self.ids.zero_()
        self.cold, self.dirty = True, False
        if self.key is not None:
            self.path().unlink(missing_ok=True)


_TABLES: dict[str, RecycleTable] = {}


def _table_path(key: dict):
    return stored_path("recycle", key, ".safetensors")


def table_key(model, k: int = K) -> dict:
    """What a table depends on: the weights and k."""
    from msn.decoding.autotree import weights_key

    return {**weights_key(model), "k": k}


def table_for(model, vocab: int, device, k: int = K) -> RecycleTable:
    """The process's table of ``model``: made (and loaded from disk) on first use, then shared
    (one per store: a table made in an empty store, ``--cold``, is not the store's own)."""
    key = table_key(model, k)
    name = f"{_table_path(key)} {device}"      # the path names the key (its hash) and the store
    table = _TABLES.get(name)
    if table is None or table.ids.shape[0] != vocab:
        table = RecycleTable(vocab, device, k, key)
        table.load()
        _TABLES[name] = table
    return table


def reset_tables(model, k: int = K) -> bool:
    """Empties ``model``'s table in this process and on disk; returns whether one was on disk."""
    key = table_key(model, k)
    on_disk = _table_path(key).exists()
    for table in tables_of(model, k):
        table.reset()
    _table_path(key).unlink(missing_ok=True)
    return on_disk


def tables_of(model, k: int = K) -> list[RecycleTable]:
    key = table_key(model, k)
    return [t for t in _TABLES.values() if t.key == key]

