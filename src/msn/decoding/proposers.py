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

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from msn.decoding.history import TokenHistory
from msn.decoding.recycle import RecycleTable, RecycleTree
from msn.decoding.tree import Path, chain, compile_tree, compiled_on, preset_paths


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

    def describe(self) -> dict:
        """What the proposer chose, for reports (``DecodeResult.info``)."""
        return {}

    def close(self) -> None:
        """Called once when the generation ends."""

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


def fed_ids(paths, cand: torch.Tensor | None, root: int, device) -> torch.Tensor:
    """The inputs of a step that fed ``root`` plus the tree ``paths`` drafted from ``cand``: (n + 1,)."""
    head = torch.tensor([root], dtype=torch.long, device=device)
    if not paths:
        return head
    tree = compiled_on(tuple(paths), str(device))
    return torch.cat([head, cand[tree.node_pos, tree.node_col]])


class Recycle(Proposer):
    """Token Recycling (Luo et al., ACL 2025): the static 80-node tree over the ranks of the
    model's candidate table (``recycle``), filled breadth-first from the root token every
    step; after the step the top-k of every input's logits overwrite the table rows of the
    step's inputs. The table is the model's, shared across generations (hot start)."""

    def __init__(self, device, *, table: RecycleTable, tree: RecycleTree | None = None):
        super().__init__(device)
        self.table = table
        self.tree = tree or RecycleTree()
        self.paths = self.tree.paths
        self.started_cold = table.cold
        self._fed = None

    def propose(self, history):
        root = history.last
        cand = self.table.fill(self.tree, root)
        self._fed = (root, cand)
        return self.paths, cand

    def update(self, step, history):
        root, cand = self._fed
        self.table.update(fed_ids(self.paths, cand, root, self.device), step.logits)

    def close(self):
        self.table.save(force=True)

    def describe(self):
        return {"recycle_table": "cold" if self.started_cold else "warm"}


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
    from the sequence, the distribution MSN training uses. ``retrieve=False`` fills the
    chain with noise always (the tree alone, an ablation).
    """

    def __init__(self, device, *, retrieve_len: int, retrieve_ngram: int, tree: str | None = None,
                 topk_paths: list[Path] | None = None, topk: int | None = None, retrieve_min_ngram: int = 1,
                 retrieve: bool = True):
        super().__init__(device)
        if (tree is None) == (topk_paths is None):
            raise ValueError("give a tree preset name or topk_paths, not both")
        if topk_paths is None:
            topk_paths, topk = preset_paths(tree)
        self.k = topk if topk is not None else max(p[-1] for p in topk_paths) + 1
        self.retrieve_len = retrieve_len
        self.ngram = retrieve_ngram
        self.min_ngram = retrieve_min_ngram
        self.retrieve = retrieve
        self.paths = tuple(topk_paths) + tuple(chain(retrieve_len, column=self.k))
        self.positions = max(max((len(p) for p in topk_paths), default=0), retrieve_len)
        self.table: torch.Tensor | None = None     # (positions, k) top-K guesses
        self.real_rows = 0                          # leading rows of the table that are guesses, not noise
        self.retrieved: list[int] = []              # the retrieval chain of the last proposal
        self.found = 0                              # how many of its tokens were retrieved, not noise

    def _noise_rows(self, history, rows: int) -> torch.Tensor:
        return torch.tensor(history.noise(rows * self.k), dtype=torch.long,
                            device=self.device).view(rows, self.k)

    def describe(self) -> dict:
        return {"tree_inputs": len(self.paths) + 1}

    def _retrieve(self, history) -> None:
        """This step's retrieval chain as host lists: ``retrieved`` (noise after what was
        found), ``found`` and the noise below the chain where the table is deeper."""
        if self.table is None:
            self.table = self._noise_rows(history, self.positions)
        found = history.continuation(self.ngram, self.retrieve_len, min_ngram=self.min_ngram,
                                     latest=True) if self.retrieve else []
        self.found = len(found)
        if len(found) < self.retrieve_len:
            found = found + history.noise(self.retrieve_len - len(found))
        self.retrieved = found
        self._below = history.noise(self.positions - self.retrieve_len) if self.positions > self.retrieve_len else []

    def _candidates(self) -> torch.Tensor:
        """The candidate table: the top-K guesses, then the retrieval chain's column."""
        return torch.cat([self.table, self._column(self.retrieved + self._below)], dim=1)

    def propose(self, history):
        self._retrieve(history)
        return self.paths, self._candidates()

    def update(self, step, history):
        future = step.future_nodes()[: self.positions]
        rows = []
        if future:
            idx = torch.tensor(future, dtype=torch.long, device=self.device)
            k = min(self.k, step.logits.shape[-1])     # a vocabulary smaller than K: pad with noise
            if step.draft_sampler is not None:
                top = step.draft_sampler.draw_distinct(step.logits[idx], k)
            else:
                top = torch.topk(step.logits[idx], k, dim=-1).indices
            if k < self.k:
                pad = torch.tensor(history.noise(len(future) * (self.k - k)), dtype=torch.long, device=self.device)
                top = torch.cat([top, pad.view(len(future), self.k - k)], dim=1)
            rows.append(top)
        if len(future) < self.positions:
            rows.append(self._noise_rows(history, self.positions - len(future)))
        self.table = torch.cat(rows)
        self.real_rows = len(future)


class AutoTreeJacobi(TreeJacobi):
    """TR-Jacobi with the tree chosen by measurement (``autotree``).

    Every step is scored afterwards against the truth for every node of the reference
    tree, for the retrieval chain and (``recycle``: merged drafts) for every node of the
    recycled tree. Every ``reselect_every`` steps the candidate with the most expected
    tokens per second under the measured step latency takes over, from the root alone (a
    plain one-token step) up to every node plus the retrieval chain; ``fixed_inputs`` pins
    the size instead (the most expected tokens within that many inputs). The latest scored
    steps are kept on disk per model, so a new run starts from what earlier runs saw. A
    tree without draft nodes produces no top-K guesses; while a tree with nodes is within
    reach of the current choice, one step in ``explore_every`` runs it, so the choice can
    come back. The retrieval chain alone feeds only the tokens retrieval found: a step with
    nothing retrieved is a plain one-token step.

    With ``recycle`` each node takes its token from one of three sources: the Jacobi
    trajectory (top-K columns), the retrieval chain, or the model's recycled candidate table
    (its own subtree from the root, filled breadth-first, ``msn.decoding.recycle``); the
    nodes of the trajectory and recycled trees are ranked together by how many more tokens
    each would have accepted (``autotree.node_order``). The recycled tree is filled and
    scored at every step, so it still guesses after a step that drafted nothing.
    """

    START = 4            # top-K nodes of the tree used before anything is known
    WINDOW = 96          # scored steps of each kind the choice is based on (the most recent)
    PRIOR = 24           # earlier runs' latest scored steps of a kind a new generation starts from
    DISPLACE = 3         # ... of which each scored step of this generation displaces this many
    EARLY = (4, 8)       # steps after which the choice is made again before the regular interval
    EXPLORE_COST = 0.01  # the most an exploring step may add to the time of plain steps, as a share

    def __init__(self, device, *, latency, retrieve_len: int, retrieve_ngram: int, store_key: dict | None = None,
                 reselect_every: int = 16, explore_every: int = 32, recycle: RecycleTable | None = None,
                 fixed_inputs: int | None = None):
        from msn.decoding.autotree import load_outcomes
        from msn.decoding.tree import REFERENCE_TREE

        super().__init__(device, topk_paths=list(REFERENCE_TREE), topk=10, retrieve_len=retrieve_len,
                         retrieve_ngram=retrieve_ngram)
        self.latency = latency
        self.reselect_every = reselect_every
        self.explore_every = explore_every
        self.store_key = store_key
        self.recycle = recycle
        self.rtree = RecycleTree(offset=self.k + 1) if recycle is not None else None
        self.recycle_started = None if recycle is None else ("cold" if recycle.cold else "warm")
        # Future positions a step is scored on (the recycled tree reaches deeper than the table).
        self.horizon = max(self.positions, self.rtree.depth if self.rtree is not None else 0)
        self.fixed = fixed_inputs
        self.pending: list = []       # autotree.StepRecord awaiting their truth
        self.prior = load_outcomes(store_key) if store_key is not None else []   # earlier generations
        self.outcomes: list = []                                                # this generation
        self.steps = 0
        self.choice = None
        self.explore = False
        self.exploring = False
        self.explore_interval = explore_every
        self.choices: list[dict] = []
        self.cap: int | None = None   # in a batch: the most inputs this row may use (batch_width)
        self._fed = None
        self._pending_table = None    # (table, real rows, recycled) of the step proposed, for ``update``
        self.explore_paths: tuple = ()   # the whole candidate tree an exploring step feeds
        self.active: tuple = ()       # the paths a plain step feeds (``_use``)
        self.topk_active = False      # whether they include top-K nodes
        self.chain_alone = False      # whether the retrieval chain is all they feed
        if self.prior or self.fixed is not None:
            self._reselect(None)
        else:
            start = REFERENCE_TREE[: self.START] + (self.rtree.paths[: self.START] if self.rtree else ())
            self._use(start, True)

    def _use(self, nodes, retrieval: bool) -> None:
        self.active = tuple(nodes) + (tuple(chain(self.retrieve_len, column=self.k)) if retrieval else ())
        self.topk_active = bool(nodes)
        self.chain_alone = retrieval and not nodes

    def propose(self, history):
        """The step's paths and candidates. A step that feeds the root alone builds no
        candidate table (None): it only records what each source would have drafted, so it
        costs what a plain one-token step costs plus that host bookkeeping."""
        from msn.decoding.autotree import StepRecord

        self._retrieve(history)
        root = history.last
        # The recycled tree is filled at every step, fed or not, so it is scored at every step.
        recycled = self.recycle.fill(self.rtree, root) if self.rtree is not None else None   # (depth, offset + width)
        self._resolve(history)
        self.pending.append(StepRecord(start=history.length, table=None, retrieved=list(self.retrieved),
                                       found=self.found))
        self._pending_table = (self.table, self.real_rows, recycled)
        every = self.explore_interval
        self.exploring = self.explore and self.steps % every == every // 2
        if self.exploring:
            paths = self.explore_paths
        elif self.chain_alone and self.found < self.retrieve_len:
            paths = tuple(chain(self.found, column=self.k))     # noise would draft nothing here
        else:
            paths = self.active
        cand = None
        if paths:
            cand = self._candidates()
            if recycled is not None:
                rows = max(cand.shape[0], recycled.shape[0])
                merged = torch.nn.functional.pad(recycled, (0, 0, 0, rows - recycled.shape[0]))
                merged[: cand.shape[0], : cand.shape[1]] = cand
                cand = merged
        self._fed = (paths, cand, root)
        return paths, cand

    def update(self, step, history):
        table, real, recycled = self._pending_table
        # The tables' host copies are read after the step's one sync, not before the forward.
        rows = table[:real].tolist() if real else []
        record = self.pending[-1]
        record.table = rows + [[] for _ in range(self.positions - real)]
        if recycled is not None:
            record.recycled = recycled[:, self.rtree.offset:].tolist()
            paths, cand, root = self._fed
            self.recycle.update(fed_ids(paths, cand, root, self.device), step.logits)
        if self.topk_active or self.exploring or self.real_rows:
            super().update(step, history)     # top-K rows from this step's logits
        self.steps += 1
        if self.steps % self.reselect_every == 0 or self.steps in self.EARLY:
            self._reselect(history)

    def _resolve(self, history) -> None:
        from msn.decoding.autotree import score

        still = []
        for rec in self.pending:
            if history is not None and rec.table is not None and history.length >= rec.start + self.horizon:
                truth = history.ids[rec.start : rec.start + self.horizon]
                outcome = score(rec, truth[: self.positions])
                if rec.recycled is not None:
                    outcome.recycled = self.rtree.accepted(rec.recycled, truth)
                self.outcomes.append(outcome)
            else:
                still.append(rec)
        self.pending = still
        self.outcomes = self._window(self.outcomes)

    def _window(self, outcomes: list) -> list:
        guessed = [o for o in outcomes if o.guessed][-self.WINDOW:]
        plain = [o for o in outcomes if not o.guessed][-self.WINDOW:]
        keep = set(map(id, guessed + plain))
        return [o for o in outcomes if id(o) in keep]

    def _basis(self) -> list:
        """The scored steps a choice is based on, per kind (with or without top-K guesses):
        this generation's, after the latest ``PRIOR`` of earlier runs' less ``DISPLACE`` for
        each of this generation's, so a prompt unlike the last ones (a copy task, then an
        open question) takes over within a few steps."""
        basis = []
        for kind in (True, False):
            own = [o for o in self.outcomes if o.guessed == kind]
            keep = max(0, self.PRIOR - self.DISPLACE * len(own))
            prior = [o for o in self.prior if o.guessed == kind]
            basis += (prior[len(prior) - keep:] if keep else []) + own
        return basis

    def options(self) -> list:
        """This row's candidate trees (``autotree.Choice``) under what it has scored so far."""
        from msn.decoding.autotree import candidates

        return candidates(self._basis(), self.latency, self.retrieve_len, recycled=self._recycled())

    def _recycled(self):
        """The recycled tree's nodes and their first column (for ``autotree``), or None."""
        return None if self.rtree is None else (self.rtree.paths, self.rtree.offset)

    def set_cap(self, inputs: int, options: list | None = None) -> None:
        """In a batch whose steps are ``inputs`` wide: from now on run the candidate with the
        most expected tokens that fits (the width is paid for every row anyway). ``options``:
        this row's ``options()`` if the caller has them already."""
        self.cap = inputs
        self._reselect(None, options)

    def _reselect(self, history, options: list | None = None) -> None:
        from msn.decoding.autotree import candidates, choose_tree, fullest

        self._resolve(history)
        basis = self._basis()
        options = options if options is not None else candidates(basis, self.latency, self.retrieve_len,
                                                                 recycled=self._recycled())
        caps = [c for c in (self.cap, self.fixed) if c is not None]
        if caps:
            self.choice = fullest(options, min(caps))
            self._use(self.choice.nodes, self.choice.retrieval)
            self.explore = False
            self.choices.append({"step": self.steps, "cap": min(caps), **self.choice.describe()})
            return
        self.choice = choose_tree(basis, self.latency, self.retrieve_len, options=options)
        self._use(self.choice.nodes, self.choice.retrieval)
        with_topk = [c for c in options if c.nodes]
        best_topk = max(with_topk, key=lambda c: c.tokens_per_s, default=None)
        # Explore only while a top-K tree could win: its estimate is near the choice's.
        self.explore = not self.choice.nodes and (
            best_topk is None or best_topk.tokens_per_s >= 0.9 * self.choice.tokens_per_s)
        if self.explore:
            from msn.decoding.tree import REFERENCE_TREE

            nodes = best_topk.nodes if best_topk is not None else REFERENCE_TREE[: self.START]
            self.explore_paths = tuple(nodes) + tuple(chain(self.retrieve_len, column=self.k))
            # An exploring step costs t(its inputs) where a plain step costs t(1): explore
            # seldom enough that this stays within EXPLORE_COST of the plain steps' time.
            extra = self.latency(len(self.explore_paths) + 1) / self.latency(1) - 1
            self.explore_interval = max(self.explore_every, math.ceil(extra / self.EXPLORE_COST))
        self.choices.append({"step": self.steps, **self.choice.describe()})

    def close(self) -> None:
        from msn.decoding.autotree import save_outcomes

        if self.store_key is not None:
            save_outcomes(self.store_key, self._window(self.prior + self.outcomes))
        if self.recycle is not None:
            self.recycle.save(force=True)

    def describe(self) -> dict:
        info = {"tree": "auto" if self.fixed is None else f"{self.fixed} inputs", "choices": self.choices,
                "latency": self.latency.to_dict(), "drafts": "merged" if self.rtree is not None else "paper"}
        if self.recycle_started is not None:
            info["recycle_table"] = self.recycle_started
        return info


class PromptLookup(Proposer):
    """Prompt lookup decoding: the tokens that followed the earliest earlier occurrence
    of the last n-gram (n from ``max_ngram`` down to 1), as transformers'
    ``prompt_lookup_num_tokens`` does. No match: a plain one-token step."""

    def __init__(self, device, *, num_tokens: int, max_ngram: int):
        super().__init__(device)
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram

    def propose(self, history):
        found = history.continuation(self.max_ngram, self.num_tokens, latest=False)
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
        root = history.last
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
