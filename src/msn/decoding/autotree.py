"""``--tree auto``: the TR-Jacobi tree that maximises accepted tokens per second, chosen
by measurement on the model, device and dtype at hand.

Two measurements meet here:

* ``Latency``: the wall time t(n) of one decoding step with n inputs, measured once per
  model, device and dtype on a ladder of input counts and kept on disk.
* ``AcceptanceLog``: for every step, the rank of the true token in each row of the
  step's top-K table, and how many retrieved tokens were right. Because the truth is
  read from the output afterwards, this is observed for every node of the reference
  tree whatever tree actually ran, so the acceptance of any candidate tree is counted,
  not guessed.

The candidates form a nested family: the reference tree's nodes ordered by observed
acceptance (parents first), cut at several sizes, each with and without the retrieval
chain, plus the root alone (a plain one-token step). The choice maximises
(1 + expected accepted drafts) / t(inputs). Pure host code: nothing here calls a model.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field

from msn.decoding.history import leading_matches
from msn.decoding.tree import REFERENCE_TREE, Path
from msn.paths import read_stored, write_stored

# 6 is the retrieval chain alone (1 + 5): on a 2-core CPU t(4) ~ t(1) but t(6) ~ 1.3 t(1),
# which interpolating between 4 and 8 hid. 3: the widest step that may keep F.linear
# (``timing.few_row_kernel``; SmolLM2 here: t(3) = 1.1 t(1), t(4) = 1.45 t(1)).
LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 69)
SIZES = (0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 26, 32, 40, 48, 63)
MERGED_SIZES = (80, 100, 120)      # merged drafts: 63 trajectory + 80 recycled nodes at most


@dataclass
class Latency:
    """Measured step latency t(n) in seconds for a ladder of input counts; linear in between.

    Attributes:
        seconds: {inputs: median seconds of one step}.
        key: what was measured (model, device, dtype, versions), for the cache and reports.
    """

    seconds: dict[int, float]
    key: dict = field(default_factory=dict)

    def __call__(self, n: int) -> float:
        xs = sorted(self.seconds)
        if n <= xs[0] or len(xs) == 1:      # one point (a model too short for the ladder): flat
            return self.seconds[xs[0]]
        if n >= xs[-1]:
            # Past the ladder: extend the last segment's slope.
            a, b = xs[-2], xs[-1]
            return self.seconds[b] + (n - b) * (self.seconds[b] - self.seconds[a]) / (b - a)
        i = bisect.bisect_left(xs, n)
        a, b = xs[i - 1], xs[i]
        w = (n - a) / (b - a)
        return self.seconds[a] * (1 - w) + self.seconds[b] * w

    def to_dict(self) -> dict:
        return {"ms": {str(n): round(s * 1000, 3) for n, s in sorted(self.seconds.items())}, **self.key}


def latency_key(model, device, dtype) -> dict:
    """What a latency measurement depends on: the model's architecture and size, the device,
    the dtype and the library versions."""
    import torch
    import transformers

    from msn.version import __version__
    from msn.decoding import cpu

    cfg = model.config.to_json_string(use_diff=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"model": hashlib.sha1(cfg.encode()).hexdigest()[:16], "model_type": model.config.model_type,
            "device": name, "dtype": str(dtype).replace("torch.", ""),
            "attention": getattr(model.config, "_attn_implementation", None) or "eager",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "msn": __version__, "ladder": list(LADDER),
            **({"cpu_gemm": cpu.enabled(model), "one_row": cpu.padded(model), "cpu_pack": cpu.prepacked(model),
                "plain_rows": cpu.plain_rows(model)}
               if device.type == "cpu" else {})}


def load_latency(key: dict) -> Latency | None:
    data = read_stored("latency", key)
    try:
        return Latency({int(n): float(s) for n, s in data["seconds"].items()}, key)
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def save_latency(lat: Latency) -> None:
    write_stored("latency", lat.key, {"seconds": lat.seconds, "key": lat.key})


@dataclass
class StepRecord:
    """What one step proposed, waiting for the truth.

    Attributes:
        start: history index of the token the step's first position drafts.
        table: (P, K) host list of lists, the top-K candidates per future position.
        retrieved: the retrieval chain's tokens (noise-padded as proposed).
        found: how many of them were retrieved (the rest is noise).
        recycled: the recycled tree's tokens per depth and column (merged drafts only).
    """

    start: int
    table: list[list[int]]
    retrieved: list[int]
    found: int | None = None
    recycled: list[list[int]] | None = None   # the recycled tree's tokens (depth x column), merged drafts


@dataclass
class Outcome:
    """One step scored against the truth: ``ranks[d]`` is the rank of the true token in
    row d of the table (None when it is not there); ``retrieved`` counts right retrieved
    tokens from the start of the chain; ``guessed`` says whether the table held guesses;
    ``found`` how many tokens retrieval found (None: unknown, taken as a full chain);
    ``recycled`` the columns, depth by depth, of the recycled nodes that were right
    (``RecycleTree.accepted``; empty without merged drafts)."""

    ranks: tuple[int | None, ...]
    retrieved: int
    guessed: bool = False     # the step had top-K guesses (a table of noise tells nothing)
    found: int | None = None
    recycled: tuple[int, ...] = ()


def score(record: StepRecord, truth: list[int]) -> Outcome:
    """Scores a step once the ``truth`` (the tokens at positions start, start + 1, ...) is known.
    Rows without guesses (empty lists) give None."""
    ranks = []
    for row, tok in zip(record.table, truth):
        ranks.append(row.index(tok) if tok in row else None)
    return Outcome(tuple(ranks), leading_matches(record.retrieved, truth), guessed=bool(record.table and record.table[0]), found=record.found)


def _accepted_path(ranks: tuple[int | None, ...], nodes) -> list[Path]:
    """The nodes a tree made of ``nodes`` would have accepted, root side first: the
    prefixes of the true ranks while each is a node."""
    out, path = [], ()
    for r in ranks:
        if r is None or path + (r,) not in nodes:
            break
        path = path + (r,)
        out.append(path)
    return out


def accepted(outcome: Outcome, nodes: frozenset[Path], retrieval: bool) -> int:
    """Drafts a tree made of ``nodes`` (top-K paths) and, with ``retrieval``, the chain,
    would have accepted in the scored step."""
    return max(len(_accepted_path(outcome.ranks, nodes)), outcome.retrieved if retrieval else 0)


def _accepted_paths(outcome: Outcome, reference: frozenset[Path], offset: int | None) -> tuple[list[Path], list[Path]]:
    """The nodes the whole trajectory tree and the whole recycled tree (its columns start at
    ``offset``; None: no recycled tree) would have accepted in a scored step, root side first."""
    recycled = [] if offset is None else [tuple(offset + c for c in outcome.recycled[:d])
                                          for d in range(1, len(outcome.recycled) + 1)]
    return _accepted_path(outcome.ranks, reference), recycled


def node_order(outcomes: list[Outcome], reference: tuple[Path, ...] = REFERENCE_TREE,
               recycled: tuple[tuple[Path, ...], int] | None = None, accepted: list | None = None) -> list[Path]:
    """The draft nodes ordered by how many more tokens each would have accepted, most first,
    greedily: a node joins once its parent has, and it counts a scored step only where it
    lengthens what the nodes before it accepted there (the longer of the trajectory's and
    the recycled tree's accepted paths). Every prefix of the result is prefix-closed. Nodes
    that add nothing follow in their given order (the reference's, then the recycled
    tree's). ``recycled``: the recycled tree's node paths and their first column;
    ``accepted``: each outcome's ``_accepted_paths`` if the caller has them.

    With the trajectory alone this is the nodes sorted by how often each would have been
    accepted (ties in the reference order): a node is never accepted more often than its parent."""
    extra, offset = recycled if recycled is not None else ((), None)
    nodes = list(reference) + list(extra)
    index = {p: i for i, p in enumerate(nodes)}
    ref = frozenset(reference)
    paths = accepted if accepted is not None else [_accepted_paths(o, ref, offset) for o in outcomes]
    have = [[0, 0] for _ in outcomes]        # nodes chosen along each step's two accepted paths
    best = [0] * len(outcomes)               # what the chosen nodes accept in each step
    waiting: dict[Path, list[tuple[int, int]]] = {}    # node -> (step, source) it would lengthen next
    for i, pair in enumerate(paths):
        for src, path in enumerate(pair):
            if path:
                waiting.setdefault(path[0], []).append((i, src))
    children: dict[Path, list[Path]] = {}
    for p in nodes:
        children.setdefault(p[:-1], []).append(p)
    frontier = set(children.get((), []))
    order: list[Path] = []
    while frontier:
        pick, gain = None, 0
        for node in frontier:
            g = sum(1 for i, src in waiting.get(node, ()) if have[i][src] == best[i])
            if g > gain or (g == gain and g > 0 and index[node] < index[pick]):
                pick, gain = node, g
        if pick is None:
            break
        order.append(pick)
        frontier.remove(pick)
        frontier.update(children.get(pick, []))
        for i, src in waiting.pop(pick, []):
            have[i][src] += 1
            best[i] = max(best[i], have[i][src])
            path = paths[i][src]
            if have[i][src] < len(path):
                waiting.setdefault(path[have[i][src]], []).append((i, src))
    chosen = set(order)
    return order + [p for p in nodes if p not in chosen]


@dataclass(frozen=True)
class Choice:
    """A candidate tree: the first ``size`` nodes of the order, with or without the chain."""

    nodes: tuple[Path, ...]
    retrieval: bool
    inputs: int
    expected_tokens: float
    tokens_per_s: float
    recycled: int = 0          # how many of ``nodes`` are recycled-tree nodes

    def describe(self) -> dict:
        return {"topk_nodes": len(self.nodes) - self.recycled, "recycled_nodes": self.recycled,
                "retrieval": self.retrieval, "inputs": self.inputs,
                "expected_tokens_per_step": round(self.expected_tokens, 3),
                "expected_tokens_per_s": round(self.tokens_per_s, 2)}


def candidates(outcomes: list[Outcome], latency: Latency, retrieve_len: int,
               sizes: tuple[int, ...] = SIZES, recycled: tuple[tuple[Path, ...], int] | None = None) -> list[Choice]:
    """Every candidate with its expected tokens per step and per second.

    Trees with top-K nodes are scored on the steps that had top-K guesses; the root alone,
    the retrieval chain alone and trees of recycled nodes alone on every step (retrieval
    and the recycled tree are proposed at every step). The retrieval chain alone feeds only
    the tokens retrieval found (none: a one-token step), so its time is the mean of
    t(1 + found) over the scored steps; a chain beside other nodes is always fed whole (its
    noise-filled part drafts the next step's guesses). ``recycled``: the recycled tree's
    nodes and first column (merged drafts; the family then reaches every node of both trees).
    """
    guessed = [o for o in outcomes if o.guessed]
    reference = frozenset(REFERENCE_TREE)
    offset = recycled[1] if recycled is not None else None
    accepted = [_accepted_paths(o, reference, offset) for o in outcomes]
    order = node_order(outcomes, REFERENCE_TREE, recycled, accepted)
    index = {p: i for i, p in enumerate(order)}
    if recycled is not None:
        sizes = tuple(sorted({*sizes, *MERGED_SIZES, len(order)}))
    # A parent precedes its children in the order, so the nodes among the first ``size`` that
    # a step would have accepted are, in each tree, its accepted path's nodes with index below
    # ``size``: a prefix of the path's (increasing) indices.
    path_index = {id(o): [[index[p] for p in path] for path in pair] for o, pair in zip(outcomes, accepted)}
    out = []
    fed = [retrieve_len if o.found is None else min(o.found, retrieve_len) for o in outcomes] or [retrieve_len]
    chain_only = sum(latency(1 + n) for n in fed) / len(fed)      # seconds of a step of the chain alone
    for size in sizes:
        nodes = tuple(order[:size])
        if len(nodes) < size and size != sizes[0]:
            continue
        top = sum(p in reference for p in nodes)
        basis = guessed if top else outcomes
        if not basis and recycled is None:
            continue
        # Merged drafts: a tree no step has scored yet is expected to give the root's one token
        # (so a fixed size can run before anything is known; the free choice never prefers it).
        drafts = [max(bisect.bisect_left(path_index[id(o)][0], size), bisect.bisect_left(path_index[id(o)][1], size))
                  if nodes else 0 for o in basis]
        for retrieval in (False, True):
            inputs = 1 + len(nodes) + (retrieve_len if retrieval else 0)
            hits = sum(max(k, o.retrieved) for k, o in zip(drafts, basis)) if retrieval else sum(drafts)
            expected = 1 + hits / len(basis) if basis else 1.0
            seconds = chain_only if retrieval and not nodes else latency(inputs)
            out.append(Choice(nodes, retrieval, inputs, expected, expected / seconds, len(nodes) - top))
    return out


def choose_tree(outcomes: list[Outcome], latency: Latency, retrieve_len: int,
           sizes: tuple[int, ...] = SIZES, margin: float = 0.2, options: list[Choice] | None = None) -> Choice:
    """The candidate with the most expected tokens per second (ties: the smaller tree).
    A tree replaces the root alone only when it is expected to be ``margin`` faster: the
    estimate of the winner among many candidates is optimistic, the root's is exact, and
    t(n) itself is noisy on a loaded CPU (two ladders back to back can differ by a fifth:
    ``docs/results/cpu-kernels.md``), so a tree that is expected to be only a little faster is
    often slower.
    ``options``: ``candidates(outcomes, latency, retrieve_len, sizes)`` if the caller has them."""
    root = Choice((), False, 1, 1.0, 1.0 / latency(1))
    best = root
    for c in options if options is not None else candidates(outcomes, latency, retrieve_len, sizes):
        if c.tokens_per_s > best.tokens_per_s * (1 + 1e-9) and c.tokens_per_s > root.tokens_per_s * (1 + margin):
            best = c
    return best


def fullest(options: list[Choice], max_inputs: int) -> Choice:
    """The candidate with the most expected tokens that has at most ``max_inputs`` inputs
    (ties: the larger tree, whose extra nodes are scored at no extra cost); the root alone
    when none fits."""
    fitting = [c for c in options if c.inputs <= max_inputs]
    root = Choice((), False, 1, 1.0, 0.0)
    return max(fitting + [root], key=lambda c: (round(c.expected_tokens, 9), c.inputs))


def batch_width(options: list[list[Choice]], step_seconds, margin: float = 0.1) -> int:
    """The input count every row of a batch is padded to, maximising the batch's expected
    tokens per second.

    A batched step costs what its widest row costs for every row, ``step_seconds(w)`` for
    rows of ``w`` inputs, so the width is chosen for the batch: with width ``w`` each row
    runs its ``fullest`` candidate of at most ``w`` inputs. ``options`` holds each row's
    candidates. Wider than one input only when expected ``margin`` faster than the root alone.
    """
    rows = len(options)
    root_rate = rows / step_seconds(1)
    best, best_rate = 1, root_rate
    for w in sorted({c.inputs for opts in options for c in opts if c.inputs > 1}):
        rate = sum(fullest(opts, w).expected_tokens for opts in options) / step_seconds(w)
        if rate > best_rate * (1 + 1e-9) and rate > root_rate * (1 + margin):
            best, best_rate = w, rate
    return best


def save_outcomes(key: dict, outcomes: list[Outcome]) -> None:
    """Keeps the latest scored steps of a model on disk, so the next run starts from them."""
    write_stored("acceptance", key, [[list(o.ranks), o.retrieved, o.guessed, o.found, list(o.recycled)]
                                     for o in outcomes])


def forget_outcomes(model) -> None:
    """Deletes the scored steps kept on disk for ``model`` with the default drafting settings, so its
    next generation starts cold (a measurement that must not depend on what ran before)."""
    from msn.decoding.config import DecodeConfig
    from msn.paths import stored_path

    cfg = DecodeConfig()
    for drafts in ("paper", "merged"):
        stored_path("acceptance", acceptance_key(model, cfg.retrieve_len, cfg.retrieve_ngram, drafts)) \
            .unlink(missing_ok=True)


def load_outcomes(key: dict) -> list[Outcome]:
    try:
        return [Outcome(tuple(r[0]), int(r[1]), bool(r[2]), r[3] if len(r) > 3 else None,
                        tuple(int(c) for c in r[4]) if len(r) > 4 else ())
                for r in read_stored("acceptance", key) or ()]
    except (ValueError, TypeError, IndexError):
        return []


def weights_key(model) -> dict:
    """The weights a measurement depends on: named by the checkpoint path, and the architecture."""
    cfg = model.config.to_json_string(use_diff=False)
    return {"model": getattr(model.config, "_name_or_path", "") or "",
            "config": hashlib.sha1(cfg.encode()).hexdigest()[:16]}


def acceptance_key(model, retrieve_len: int, retrieve_ngram: int, drafts: str = "paper") -> dict:
    """Acceptance depends on the weights and the drafting."""
    return {**weights_key(model), "retrieve_len": retrieve_len, "retrieve_ngram": retrieve_ngram,
            **({"drafts": drafts} if drafts != "paper" else {})}
