"""Drafting strategies: interchangeable proposers feeding the one verifier.

Each proposer answers two calls (the transformers candidate-generator shape):

* ``propose(history)`` -> ``(paths, cand)``: a tree spec (tuple of paths, see
  ``tree.py``) and a candidate table ``cand`` of shape (P, C) on the model's device,
  from which node ``(c1, ..., cd)`` takes token ``cand[d - 1, cd]``.
* ``update(step)``: what the verifier accepted, with the step's logits, so the proposer
  can prepare the next drafts (Jacobi trajectory, top-K table, n-gram pool).

Proposers never call the model and never read the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from msn.decoding.history import TokenHistory, find_continuation
from msn.decoding.tree import Path, chain, compile_tree, preset_paths


@dataclass
class StepFeedback:
    """What one verified step tells the proposer.

    Attributes:
        logits: (n + 1, V) logits of the step's inputs, on device.
        pred: (n + 1,) the token drafts are built from at each input, on device: the
            argmax of the raw logits, or (``sample_drafts``) the step's draw.
        path: input indices of the chosen root-to-leaf path (host list, accepted part first).
        accepted: how many nodes of ``path`` were accepted.
        pred_host: ``pred`` as a host list (read in the step's single sync).
        draft_sampler: with ``sample_drafts``, the sampler whose processed distribution
            top-K rows are drawn from (without replacement); None drafts from raw logits.
    """

    logits: torch.Tensor
    pred: torch.Tensor
    path: list[int]
    accepted: int
    pred_host: list[int]
    draft_sampler: object | None = None

    def future_nodes(self) -> list[int]:
        """Inputs on the chosen path after the accepted ones: their predictions are the
        model's guesses for the tokens after the bonus token (the Jacobi trajectory)."""
        return self.path[self.accepted :]


class Proposer:
    """Base class: subclasses implement ``propose`` and may implement ``update``."""

    def __init__(self, device: torch.device):
        self.device = device

    def propose(self, history: TokenHistory) -> tuple[tuple[Path, ...], torch.Tensor]:
        raise NotImplementedError

    def update(self, step: StepFeedback, history: TokenHistory) -> None:
        pass

    def _column(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor(tokens, dtype=torch.long).view(-1, 1).to(self.device, non_blocking=True)


def _jacobi_next(step: StepFeedback, history: TokenHistory, width: int, device) -> torch.Tensor:
    """Next Jacobi window (width,): the trajectory's predictions, padded with noise."""
    future = step.future_nodes()[:width]
    guess = step.pred[torch.tensor(future, dtype=torch.long, device=device)] if future else \
        torch.empty(0, dtype=torch.long, device=device)
    if len(future) < width:
        pad = torch.tensor(history.noise(width - len(future)), dtype=torch.long, device=device)
        guess = torch.cat([guess, pad])
    return guess


class JacobiWindow(Proposer):
    """Jacobi decoding: one chain of ``window`` drafts, refined by each step's outputs."""

    def __init__(self, device, *, window: int):
        super().__init__(device)
        self.window = window
        self.paths = tuple(chain(window))
        self.drafts: torch.Tensor | None = None

    def propose(self, history):
        if self.drafts is None:
            self.drafts = torch.tensor(history.noise(self.window), dtype=torch.long, device=self.device)
        return self.paths, self.drafts.view(-1, 1)

    def update(self, step, history):
        self.drafts = _jacobi_next(step, history, self.window, self.device)


class TreeJacobi(Proposer):
    """TR-Jacobi: a sparse tree over the top-K guesses for each future position (taken
    from the previous step's logits along the chosen path, after its accepted part),
    plus one chain holding a continuation retrieved from the text so far. Positions
    without a guess and a retrieval shorter than its chain are filled with noise drawn
    from the sequence, the distribution MSN training uses.
    """

    def __init__(self, device, *, retrieve_len: int, retrieve_ngram: int, tree: str | None = None,
                 topk_paths: list[Path] | None = None, topk: int | None = None, retrieve_min_ngram: int = 1):
        super().__init__(device)
        if (tree is None) == (topk_paths is None):
            raise ValueError("give a tree preset name or topk_paths, not both")
        if topk_paths is None:
            topk_paths, topk = preset_paths(tree)
        self.k = topk if topk is not None else max(p[-1] for p in topk_paths) + 1
        self.retrieve_len = retrieve_len
        self.ngram = retrieve_ngram
        self.min_ngram = retrieve_min_ngram
        self.paths = tuple(topk_paths) + tuple(chain(retrieve_len, column=self.k))
        self.positions = max(max((len(p) for p in topk_paths), default=0), retrieve_len)
        self.table: torch.Tensor | None = None     # (positions, k) top-K guesses

    def _noise_rows(self, history, rows: int) -> torch.Tensor:
        return torch.tensor(history.noise(rows * self.k), dtype=torch.long,
                            device=self.device).view(rows, self.k)

    def propose(self, history):
        if self.table is None:
            self.table = self._noise_rows(history, self.positions)
        found = find_continuation(history.tokens(), self.ngram, self.retrieve_len,
                                  min_ngram=self.min_ngram, latest=True)
        if len(found) < self.retrieve_len:
            found = found + history.noise(self.retrieve_len - len(found))
        retrieved = self._column(found)
        if self.positions > self.retrieve_len:
            retrieved = torch.cat([retrieved, self._column(history.noise(self.positions - self.retrieve_len))])
        return self.paths, torch.cat([self.table, retrieved], dim=1)

    def update(self, step, history):
        future = step.future_nodes()[: self.positions]
        rows = []
        if future:
            idx = torch.tensor(future, dtype=torch.long, device=self.device)
            if step.draft_sampler is not None:
                rows.append(step.draft_sampler.draw_distinct(step.logits[idx], self.k))
            else:
                rows.append(torch.topk(step.logits[idx], self.k, dim=-1).indices)
        if len(future) < self.positions:
            rows.append(self._noise_rows(history, self.positions - len(future)))
        self.table = torch.cat(rows)


class PromptLookup(Proposer):
    """Prompt lookup decoding: the tokens that followed the earliest earlier occurrence
    of the last n-gram (n from ``max_ngram`` down to 1), as transformers'
    ``prompt_lookup_num_tokens`` does. No match: a plain one-token step."""

    def __init__(self, device, *, num_tokens: int, max_ngram: int):
        super().__init__(device)
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram

    def propose(self, history):
        found = find_continuation(history.tokens(), self.max_ngram, self.num_tokens, latest=False)
        if not found:
            return (), torch.zeros(0, 1, dtype=torch.long, device=self.device)
        return tuple(chain(len(found))), self._column(found)


class Lookahead(Proposer):
    """Lookahead decoding (one-level variant): a Jacobi window of ``window`` drafts whose
    trajectory fills a pool of n-grams keyed by their first token; each step also
    verifies up to ``guesses`` pooled (n-1)-token continuations of the root token as
    parallel chains.
    """

    def __init__(self, device, *, window: int, ngram: int, guesses: int):
        super().__init__(device)
        self.window, self.ngram, self.guesses = window, ngram, guesses
        self.pool: dict[int, OrderedDict] = {}
        self.drafts: torch.Tensor | None = None
        self._layout: dict[int, tuple[tuple[Path, ...], list[int]]] = {}
        self._window_inputs: list[int] = []

    def _paths(self, g: int) -> tuple[tuple[Path, ...], list[int]]:
        """Tree spec for ``g`` guesses and the input indices of root + window chain."""
        if g not in self._layout:
            paths: list[Path] = []
            for col in range(g):
                paths += chain(self.ngram - 1, column=col)
            window = chain(self.window, column=g)
            order = compile_tree(tuple(paths + window)).paths
            self._layout[g] = (tuple(paths + window), [0] + [order.index(p) + 1 for p in window])
        return self._layout[g]

    def propose(self, history):
        if self.drafts is None:
            self.drafts = torch.tensor(history.noise(self.window), dtype=torch.long, device=self.device)
        root = int(history.tokens()[-1])
        guesses = list(self.pool.get(root, ()))[-self.guesses :]
        rows = max(self.ngram - 1, self.window)
        table = torch.zeros(rows, len(guesses) + 1, dtype=torch.long)
        for col, gram in enumerate(guesses):
            table[: len(gram), col] = torch.tensor(gram)
        table = table.to(self.device, non_blocking=True)
        table[: self.window, -1] = self.drafts
        paths, self._window_inputs = self._paths(len(guesses))
        return paths, table

    def update(self, step, history):
        self.drafts = _jacobi_next(step, history, self.window, self.device)
        # Pool n-grams from the trajectory: the predictions along the window chain.
        traj = [step.pred_host[i] for i in self._window_inputs]
        for i in range(len(traj) - self.ngram + 1):
            gram = tuple(traj[i : i + self.ngram])
            bucket = self.pool.setdefault(gram[0], OrderedDict())
            bucket.pop(gram[1:], None)
            bucket[gram[1:]] = True
            while len(bucket) > self.guesses:
                bucket.popitem(last=False)
