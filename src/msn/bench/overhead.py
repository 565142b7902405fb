"""Per-step cost outside the model forward: ``python -m msn.bench.overhead --model PATH``.

Times every forward of the model with hooks during a generation; what a decode step
costs beyond its forward is the proposer, the verifier, the mask and the cache work.
Also times a bare forward of the same number of tokens, for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from msn.data.records import encode_prompt
from msn.decoding import cache as kv
from msn.decoding.config import DEFAULT_MAX_NEW_TOKENS, DecodeConfig
from msn.decoding.drafting import make_proposer
from msn.decoding.engine import generate
from msn.decoding.devices import sync_device
from msn.decoding.step import forward, prefill, tree_inputs
from msn.decoding.tree import chain, compile_tree, compiled_on

FIXED_SHAPE = ("ar", "jacobi", "tr-jacobi")


class ForwardTimer:
    def __init__(self, model):
        self.times: list[float] = []
        self.device = next(model.parameters()).device
        self._t0 = 0.0
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, *a):
        sync_device(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *a):
        sync_device(self.device)
        self.times.append(time.perf_counter() - self._t0)

    def close(self):
        for h in self.handles:
            h.remove()


def measure(model, ids: torch.Tensor, method: str, max_new_tokens: int, **options) -> dict:
    """Median step time, median forward time inside steps, and the overhead between them."""
    generate(model, ids, method=method, max_new_tokens=8, **options)  # warm-up
    timer = ForwardTimer(model)
    try:
        r = generate(model, ids, method=method, max_new_tokens=max_new_tokens, **options)
    finally:
        timer.close()
    forwards = timer.times[1:]  # the first is prefill
    per_step = r.decode_s / max(r.steps, 1)
    overhead = (r.decode_s - sum(forwards)) / max(r.steps, 1)
    return {"method": method, "steps": r.steps, "mean_accepted_tokens": r.mean_accepted_tokens,
            "step_ms": 1e3 * per_step, "forward_ms_median": 1e3 * statistics.median(forwards),
            "overhead_ms_per_step": 1e3 * overhead, "overhead_fraction": overhead / per_step}


@torch.inference_mode()
def bare_forward_ms(model, context: int, n: int, repeats: int = 10) -> float:
    """Median ms of one forward of ``n`` tokens (a chain, through the step module's forward:
    its mask, no verification, no cache compaction) after a ``context``-token cache."""
    device = next(model.parameters()).device
    ids = torch.randint(model.config.vocab_size, (1, context), device=device)
    tree = compiled_on(tuple(chain(n - 1)), str(device))
    times = []
    for _ in range(repeats + 2):
        cache = kv.new_cache(model)
        prefill(model, ids, cache)
        cand = torch.randint(model.config.vocab_size, (max(n - 1, 1), 1), device=device)
        inputs = tree_inputs([0], [context], [tree], [cand], context, None, device)
        sync_device(device)
        t0 = time.perf_counter()
        forward(model, inputs, kv.cache_kwargs(model, cache))
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


def main(argv=None):
    from msn.loading import load_for_inference

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="Write a Python function that merges two sorted lists, with tests.")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--methods", default="ar,jacobi,tr-jacobi")
    p.add_argument("--tree", default=DecodeConfig.tree)
    a = p.parse_args(argv)
    model, tok = load_for_inference(a.model)
    ids = encode_prompt(tok, [{"role": "user", "content": a.prompt}], model.device)
    for m in a.methods.split(","):
        options = {"tree": a.tree} if m == "tr-jacobi" else {}
        row = measure(model, ids, m, a.max_new_tokens, **options)
        if m in FIXED_SHAPE:
            # Methods with a fixed tree: compare with a bare forward of as many tokens.
            proposer = make_proposer(DecodeConfig(method=m, **options), model)
            n = compile_tree(proposer.paths).num_inputs if proposer else 1
            row["inputs_per_step"] = n
            row["bare_forward_ms"] = bare_forward_ms(model, ids.shape[1] + a.max_new_tokens // 2, n)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
