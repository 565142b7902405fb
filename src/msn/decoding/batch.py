"""Batched decoding: several prompts in one forward per step, rows joining and leaving
between steps (continuous batching).

Every row keeps its own proposer, token history, output and sampler, and accepts its
own number of tokens per step. The rows share one KV cache (``cache`` owns its layout):
row r's entries are positions [0, length_r); a step appends every row's root and draft
tree, padded to the widest tree, and the 4D mask lets each input see its own row's
entries and its own ancestors only. Each row then keeps its accepted path at its own
length. A row is prefilled alone when it joins, so its prompt needs no padding, and
every row returns exactly what ``msn.generate`` returns for it alone: the greedy tokens
(float32), or draws distributed as one-token sampling.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from msn.decoding import cache as kv
from msn.decoding.config import DEFAULT_MAX_NEW_TOKENS, DecodeConfig
from msn.decoding.drafting import make_proposer
from msn.decoding.request import DecodeResult, Output, check_model, request_sampler, resolve_eos, validate_request
from msn.decoding.devices import context_limit, model_device, sync_device
from msn.decoding.step import RowStep, batch_step, pick_token, prefill
from msn.decoding.timing import prepare_model, step_latency
from msn.decoding.history import TokenHistory
from msn.decoding.proposers import AutoTreeJacobi, Proposer
from msn.decoding.sampling import Sampler
from msn.decoding.tree import compiled_on
from msn.errors import MsnError


@dataclass
class _Row:
    """One prompt of the batch: what it has produced and what drafts for it."""

    rid: int
    prompt: list[int]
    out: Output
    sampler: Sampler | None        # None: greedy
    sample_drafts: bool
    proposer: Proposer | None      # None: ``ar`` (the root alone every step)
    history: TokenHistory | None   # prompt and output, what the proposer drafts from (None for ``ar``)
    length: int                    # KV entries of this row (prompt + accepted tokens before the root)
    root: int
    result: DecodeResult
    started: float
    joining: DynamicCache | None = None   # its own prefilled cache until the next step merges it into the batch


@dataclass
class Finished:
    """A row that left the batch: its id, its result, whether it was cancelled, and the
    exception that failed it alone (its own drafting, verification or callback raised)."""

    rid: int
    result: DecodeResult
    cancelled: bool = False
    error: Exception | None = None


class BatchDecoder:
    """Continuous batching over one model and one method.

    ``add`` prefills a prompt and makes it a row; ``step`` runs one batched forward for
    every row and returns the rows that finished; ``cancel`` drops a row. Rows may join
    and leave between any two steps.

    Args:
        model: a Hugging Face causal LM with ``sdpa`` or ``eager`` attention.
        method: ``ar``, ``jacobi``, ``tr-jacobi``, ``pld`` or ``lookahead``.
        **options: ``DecodeConfig`` fields shared by every row (tree, window, ...).
            Sampling options may also be given per row to ``add``.
    """

    def __init__(self, model, method: str = "tr-jacobi", **options):
        cfg = DecodeConfig.from_options(method, options)     # refuses bad options before any row joins
        check_model(model)
        prepare_model(model, cfg)  # batched steps feed several inputs
        self.model = model
        self.method = method
        self.options = options
        self.device = model_device(model)
        self.limit = context_limit(model)
        self.cache = None
        self.rows: list[_Row] = []
        self.ids = itertools.count()
        self.steps = 0
        self.width: int | None = None      # --tree auto: the batch's step width (inputs per row)
        self.resize = False                # rows joined or left: choose the width again
        self.timings: dict[tuple[int, int], collections.deque] = {}   # (rows, width) -> recent step seconds
        self.realized: dict[int, collections.deque] = {}              # batch width -> recent (tokens, seconds)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def idle(self) -> bool:
        return not self.rows

    @torch.inference_mode()
    def add(self, input_ids, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, eos_token_id=None,
            on_tokens: Callable[[list[int]], None] | None = None, fit_context: bool = False,
            generator: torch.Generator | None = None, **sampling) -> int | Finished:
        """Prefills one prompt ((1, T) tensor or a list of ids) and adds it as a row.

        ``sampling`` holds per-row ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``seed``, ``sample_drafts``. Returns the row id, or a ``Finished`` when the first
        token already ends the output.
        """
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
        cfg = DecodeConfig.from_options(self.method, {**self.options, **sampling})
        max_new_tokens = validate_request(self.model, input_ids, max_new_tokens, fit_context)
        sampler = request_sampler(cfg, generator, self.device)
        prompt = input_ids[0].tolist()
        rid = next(self.ids)
        out = Output(max_new_tokens, resolve_eos(self.model, eos_token_id), on_tokens)
        row_cache = kv.new_cache(self.model)
        sync_device(self.device)
        t0 = time.perf_counter()
        first = pick_token(prefill(self.model, input_ids.to(self.device), row_cache), sampler, 0)
        sync_device(self.device)
        t1 = time.perf_counter()
        out.add([first])
        result = DecodeResult(tokens=out.tokens, steps=0, prefill_s=t1 - t0)
        if out.done:
            return Finished(rid, result)
        proposer = history = None
        if cfg.method != "ar":
            proposer = make_proposer(cfg, self.model)
            history = TokenHistory(prompt + [first], seed=cfg.seed)
        self.resize = True
        self.rows.append(_Row(rid, prompt, out, sampler, cfg.sample_drafts, proposer, history, len(prompt), first,
                              result, t1, row_cache))
        return rid

    def cancel(self, rid: int) -> Finished | None:
        """Drops row ``rid``; returns what it had produced (None if it is not in the batch)."""
        for i, row in enumerate(self.rows):
            if row.rid == rid:
                self._drop([i])
                return self._finish(row, cancelled=True)
        return None

    def _size_trees(self, every: int = 16) -> None:
        """``--tree auto``: one width for the whole batch (``autotree.batch_width``), chosen
        again every ``every`` steps and whenever rows join or leave; each row then runs its
        best tree of at most that many inputs."""
        auto = [row.proposer for row in self.rows if isinstance(row.proposer, AutoTreeJacobi)]
        if not auto or not (self.resize or self.steps % every == 0):
            return
        from msn.decoding.autotree import batch_width

        latency = step_latency(self.model)
        rows = len(self.rows)

        def seconds(w: int) -> float:
            # This batch's own measured steps where there are some; else the one-row ladder at
            # rows x w inputs, scaled by how this batch's one-input steps compare with it.
            seen = self.timings.get((rows, w))
            if seen:
                return statistics.median(seen)
            base = self.timings.get((rows, 1))
            scale = statistics.median(base) / latency(rows) if base else 1.0
            return latency(rows * w) * scale

        options = [p.options() for p in auto]
        wanted = batch_width(options, seconds)
        # Estimates can be optimistic (acceptance from earlier runs, wide steps costlier than the
        # ladder says): a wider step stays only while its realized tokens per second beat the
        # one-input step's. Measure one input first, then try the wider width once.
        narrow, wide = self._realized(1), self._realized(wanted)
        if wanted == 1 or narrow is None:
            self.width = 1
        elif wide is None:
            self.width = wanted
        else:
            self.width = wanted if wide > narrow else 1
        for p, opts in zip(auto, options):
            p.set_cap(self.width, opts)
        self.resize = False

    def _realized(self, width: int, least: int = 4) -> float | None:
        """Tokens per second of this batch's recent steps at ``width`` (None: too few)."""
        seen = self.realized.get(width)
        if not seen or len(seen) < least:
            return None
        return sum(t for t, _ in seen) / sum(s for _, s in seen)

    def _merge(self) -> None:
        """Rows that joined since the last step enter the batch cache, all in one copy, and
        every row is placed longest first, so that rows of similar length are neighbours
        (``ragged`` groups consecutive rows)."""
        joining = [row.joining for row in self.rows if row.joining is not None]
        if not joining:
            return
        order = sorted(range(len(self.rows)), key=lambda i: -self.rows[i].length)
        self.cache = kv.merge_rows(self.cache, joining, order)
        self.rows = [self.rows[i] for i in order]
        for row in self.rows:
            row.joining = None

    def _drop(self, indices: list[int]) -> None:
        """Removes rows ``indices``; the batch cache keeps the others' rows, longest first.
        Rows that joined since the last step are in ``self.rows`` after every cached row."""
        gone = set(indices)
        cached = [i for i, row in enumerate(self.rows) if row.joining is None and i not in gone]
        keep = sorted(cached, key=lambda i: -self.rows[i].length)
        joining = [row for i, row in enumerate(self.rows) if row.joining is not None and i not in gone]
        self.rows = [self.rows[i] for i in keep] + joining
        self.resize = True
        if not keep:
            self.cache = None
        else:
            kv.select_rows(self.cache, keep, self.rows[0].length)      # longest first

    def _finish(self, row: _Row, cancelled: bool = False) -> Finished:
        sync_device(self.device)
        row.result.decode_s = time.perf_counter() - row.started
        if row.proposer is not None:
            row.proposer.close()
            row.result.info = row.proposer.describe()
        return Finished(row.rid, row.result, cancelled)

    @staticmethod
    def _advance(row: _Row, new: list[int], feedback) -> bool:
        """Row ``row`` takes this step's accepted tokens; True when its output is complete."""
        kept = row.out.add(new)
        row.result.steps += 1
        row.result.accept_lengths.append(len(kept))
        if row.out.done:
            return True
        row.root = new[-1]
        if row.proposer is not None:
            row.history.extend(new)
            row.proposer.update(feedback, row.history)
        return False

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """One batched forward for every row; returns the rows that finished in it."""
        if not self.rows:
            return []
        self._merge()
        device, rows = self.device, self.rows
        self._size_trees()
        started = time.perf_counter()
        # A row whose own work raises (drafting, verification, its callback) fails alone: it
        # leaves the batch with its error and every other row goes on as if it were not there.
        failed: dict[int, Exception] = {}
        # This step's drafts: (paths, candidate table) per row; ``ar`` rows draft nothing.
        drafts = []
        for r, row in enumerate(rows):
            try:
                drafts.append(row.proposer.propose(row.history) if row.proposer is not None else ((), None))
            except Exception as e:          # noqa: BLE001 - any fault of this row's own
                failed[r] = e
                drafts.append(((), None))
        width = max(compiled_on(paths, str(device)).num_inputs for paths, _ in drafts)    # the timings' key
        steps = [RowStep(row.root, row.length, paths, cand, row.sampler, row.sample_drafts, len(row.out.tokens),
                         skip=r in failed) for r, (row, (paths, cand)) in enumerate(zip(rows, drafts))]
        results = batch_step(self.model, self.cache, steps, self.limit)
        self.steps += 1
        self.timings.setdefault((len(rows), width), collections.deque(maxlen=8)).append(
            time.perf_counter() - started)
        done, kept = [], 0
        for r, (row, result) in enumerate(zip(rows, results)):
            verified = isinstance(result, tuple)          # else skipped (None) or failed in the step
            taken = 1 + result[1].accepted if verified else 1
            row.length += taken          # the step kept the root and the accepted path
            kept += taken
            if isinstance(result, Exception):
                failed[r] = result
            elif verified:
                try:
                    if self._advance(row, *result):
                        done.append(r)
                except Exception as e:          # noqa: BLE001 - its callback raised
                    failed[r] = e
        if self.width is not None:
            self.realized.setdefault(self.width, collections.deque(maxlen=16)).append(
                (kept, time.perf_counter() - started))
        finished = [self._finish(rows[r]) for r in done if r not in failed]
        for r, e in failed.items():
            if rows[r].proposer is not None:
                with contextlib.suppress(Exception):
                    rows[r].proposer.close()
            finished.append(Finished(rows[r].rid, rows[r].result, error=e))
        gone = sorted(set(done) | set(failed))
        if gone:
            self._drop(gone)
        return finished


def generate_batch(model, prompts, *, method: str = "tr-jacobi", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   eos_token_id=None, fit_context: bool = False, max_batch: int | None = None,
                   **options) -> list[DecodeResult]:
    """Decodes several prompts in batched steps; returns one ``DecodeResult`` per prompt, in order.

    Each row is exactly what ``msn.generate`` returns for that prompt alone. With
    ``max_batch``, at most that many rows decode at once and the next prompt joins as soon
    as a row finishes (continuous batching).
    """
    if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
        raise MsnError(f"max_batch must be a positive integer, got {max_batch!r}")
    sampling_keys = ("do_sample", "temperature", "top_k", "top_p", "seed", "sample_drafts")
    sampling = {k: options.pop(k) for k in sampling_keys if k in options}
    decoder = BatchDecoder(model, method, **options)
    # Every prompt is checked before the first is decoded; an error names the prompt.
    for index, prompt in enumerate(prompts):
        ids = prompt if isinstance(prompt, torch.Tensor) else torch.tensor([list(prompt)], dtype=torch.long)
        try:
            validate_request(model, ids, max_new_tokens, fit_context)
        except MsnError as e:
            raise MsnError(f"prompt {index} of the batch: {e}") from None
    results: dict[int, DecodeResult] = {}
    order: dict[int, int] = {}
    pending = list(enumerate(prompts))
    limit = max_batch or len(pending)
    while pending or not decoder.idle:
        while pending and len(decoder) < limit:
            index, prompt = pending.pop(0)
            added = decoder.add(prompt, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                fit_context=fit_context, **sampling)
            if isinstance(added, Finished):
                results[index] = added.result
            else:
                order[added] = index
        for fin in decoder.step():
            if fin.error is not None:
                raise fin.error
            results[order[fin.rid]] = fin.result
    return [results[i] for i in range(len(results))]
