"""Batched throughput: ``python -m msn.bench.batch --model PATH [--batch 8]``.

Decodes the same prompts (the first turn of the first ``--prompts`` Spec-Bench questions,
one category after another) three ways, in one process, after a warm-up:

* ``loop``: ``msn.generate`` one prompt at a time (batch 1), for each ``--methods`` entry;
* ``batched``: ``msn.generate`` on the list of prompts, ``--batch`` rows at once;
* ``hf-generate``: transformers' ``model.generate`` on the same left-padded batch (greedy).

Reports useful tokens per second (tokens up to and including EOS) and the ratios, and
checks that every batched row equals the batch-1 output of the same method.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from msn.bench.prompts import load_questions
from msn.data.records import encode_prompt, ensure_chat_template
from msn.decoding.config import DEFAULT_MAX_NEW_TOKENS
from msn.decoding.engine import generate
from msn.decoding.request import resolve_eos
from msn.decoding.devices import model_device, sync_device


def _timed(fn, device):
    sync_device(device)
    t0 = time.perf_counter()
    out = fn()
    sync_device(device)
    return out, time.perf_counter() - t0


def hf_batched(model, prompts: list[torch.Tensor], max_new_tokens: int, eos: set[int],
               pad: int | None) -> list[list[int]]:
    """transformers' greedy ``generate`` on the left-padded batch of (1, T) prompts; each row
    cut after its EOS. ``pad`` None: the smallest EOS id pads."""
    if pad is None:
        pad = min(eos, default=0)
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - p.shape[1]:], mask[b, width - p.shape[1]:] = p[0], 1
    device = model_device(model)
    out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=sorted(eos) or None, pad_token_id=pad, top_k=None, top_p=None, temperature=None)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def measure(model, prompts: list[torch.Tensor], methods: list[str], batch: int, max_new_tokens: int,
            eos: set[int], pad: int | None, tree: str | None = None) -> dict:
    device = model_device(model)
    report = {"prompts": len(prompts), "batch": batch, "max_new_tokens": max_new_tokens, "methods": {}}
    eos_list = sorted(eos)
    # Warm-up: one short generation of each kind (allocator, kernels, the latency ladder of --tree auto).
    for m in methods:
        opts = {"tree": tree} if m == "tr-jacobi" and tree else {}
        generate(model, prompts[0], method=m, max_new_tokens=8, eos_token_id=eos_list, **opts)
        generate(model, prompts[:2], method=m, max_new_tokens=8, eos_token_id=eos_list, **opts)
    hf_batched(model, prompts[:2], 8, eos, pad)
    hf_rows, hf_s = _timed(lambda: hf_batched(model, prompts, max_new_tokens, eos, pad), device)
    hf_tokens = sum(len(r) for r in hf_rows)
    report["hf-generate"] = {"tokens": hf_tokens, "seconds": round(hf_s, 3), "tokens_per_s": round(hf_tokens / hf_s, 3)}
    for m in methods:
        opts = {"tree": tree} if m == "tr-jacobi" and tree else {}
        loop, loop_s = _timed(lambda: [generate(model, p, method=m, max_new_tokens=max_new_tokens,
                                                eos_token_id=eos_list, **opts) for p in prompts], device)
        rows, rows_s = _timed(lambda: generate(model, prompts, method=m, max_new_tokens=max_new_tokens,
                                               eos_token_id=eos_list, max_batch=batch, **opts), device)
        tokens = sum(len(r.tokens) for r in loop)
        steps = sum(r.steps for r in rows)
        report["methods"][m] = {
            "tokens": tokens,
            "loop_tokens_per_s": round(tokens / loop_s, 3),
            "batched_tokens_per_s": round(sum(len(r.tokens) for r in rows) / rows_s, 3),
            "batched_over_loop": round(loop_s / rows_s * sum(len(r.tokens) for r in rows) / tokens, 3),
            "batched_over_hf_generate": round(sum(len(r.tokens) for r in rows) / rows_s / (hf_tokens / hf_s), 3),
            "mean_accepted_tokens_batched": round(sum(sum(r.accept_lengths) for r in rows) / max(steps, 1), 3),
            "rows_equal_batch1": sum(a.tokens == b.tokens for a, b in zip(loop, rows)) / len(prompts),
            "rows_equal_hf_generate": sum(a.tokens == b for a, b in zip(rows, hf_rows)) / len(prompts),
        }
    return report


def main(argv=None):
    from msn.loading import load_for_inference

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--batch", type=int, default=8, help="rows decoded at once (default 8)")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts (default 8)")
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: ../shared/data)")
    p.add_argument("--methods", default="ar,tr-jacobi", help="comma-separated msn methods (default ar,tr-jacobi)")
    p.add_argument("--tree", default=None, help="TR-Jacobi tree (default: auto)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    a = p.parse_args(argv)
    model, tok = load_for_inference(a.model)
    ensure_chat_template(tok)
    by_category: dict[str, list] = {}
    for q in load_questions("spec-bench", a.questions):
        by_category.setdefault(q.category, []).append(q)
    # One question per category in turn, so that every kind of prompt (and length) is in the batch.
    questions = [q for group in itertools.zip_longest(*by_category.values()) for q in group if q][: a.prompts]
    prompts = [encode_prompt(tok, [{"role": "user", "content": q.turns[0]}], model.device) for q in questions]
    eos = resolve_eos(model, None)
    report = measure(model, prompts, a.methods.split(","), a.batch, a.max_new_tokens, eos, tok.pad_token_id, a.tree)
    report["threads"] = torch.get_num_threads()
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        from pathlib import Path

        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
