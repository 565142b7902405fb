"""Which proposer a request gets (``DecodeConfig.method`` and its options), with the
model's measured step latency and its recycled candidate table where the method uses them."""

from __future__ import annotations

from msn.decoding.autotree import acceptance_key
from msn.decoding.config import DecodeConfig
from msn.decoding.proposers import AutoTreeJacobi, JacobiWindow, Lookahead, PromptLookup, Proposer, Recycle, TreeJacobi
from msn.decoding.recycle import table_for
from msn.decoding.devices import model_device, vocab_size
from msn.decoding.timing import step_latency
from msn.decoding.tree import preset_paths
from msn.errors import MsnError


def make_proposer(cfg: DecodeConfig, model, graphs: bool = False) -> Proposer | None:
    """The drafting strategy of ``cfg.method``; None for ``ar``, which drafts nothing.
    ``graphs``: the steps are fixed-shape graph replays (the latency ``tree="auto"`` weighs)."""
    device = model_device(model)
    if cfg.method == "ar":
        return None
    if cfg.method == "jacobi":
        return JacobiWindow(device, window=cfg.window)
    table = lambda: table_for(model, vocab_size(model) or 1, device)     # noqa: E731 - the model's, made once
    if cfg.method == "recycle":
        return Recycle(device, table=table())
    if cfg.method == "tr-jacobi":
        if not isinstance(cfg.tree, str):
            return TreeJacobi(device, topk_paths=list(cfg.tree), retrieve_len=cfg.retrieve_len,
                              retrieve_ngram=cfg.retrieve_ngram, retrieve=cfg.retrieve)
        merged = cfg.drafts == "merged" and cfg.retrieve
        if cfg.tree == "auto" or merged:
            # Merged drafts with a preset: that preset's size (its input count), nodes chosen by measurement.
            fixed = None if cfg.tree == "auto" else len(preset_paths(cfg.tree)[0]) + cfg.retrieve_len + 1
            drafts = "merged" if merged else "paper"
            return AutoTreeJacobi(device, latency=step_latency(model, graphs=graphs), retrieve_len=cfg.retrieve_len,
                                  retrieve_ngram=cfg.retrieve_ngram,
                                  store_key=acceptance_key(model, cfg.retrieve_len, cfg.retrieve_ngram, drafts),
                                  recycle=table() if merged else None,
                                  fixed_inputs=fixed)
        return TreeJacobi(device, tree=cfg.tree, retrieve_len=cfg.retrieve_len, retrieve_ngram=cfg.retrieve_ngram,
                          retrieve=cfg.retrieve)
    if cfg.method == "pld":
        return PromptLookup(device, num_tokens=cfg.pld_tokens, max_ngram=cfg.pld_ngram)
    if cfg.method == "lookahead":
        return Lookahead(device, window=cfg.lookahead_window, ngram=cfg.lookahead_ngram,
                         guesses=cfg.lookahead_guesses)
    raise MsnError(f"method {cfg.method!r} has no proposer")
