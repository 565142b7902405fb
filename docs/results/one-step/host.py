"""Host time of one decoding step (its wall time minus the model forward's, by forward hooks):
a step that feeds the root alone and a 16-input chain step, SmolLM2-135M, float32, this CPU."""
import json, statistics, sys, time
import torch
from msn.loading import load_for_inference
from msn.decoding import cache as kv
from msn.decoding.step import prefill, tree_step
from msn.decoding.tree import chain
from msn.decoding.timing import one_row_kernel
from msn.decoding import cpu

model, tok = load_for_inference(sys.argv[1])
one_row_kernel(model)
cpu.prepack(model)
inside = []
t = {}
model.register_forward_pre_hook(lambda *a: t.__setitem__("f", time.perf_counter()))
model.register_forward_hook(lambda *a: inside.append(time.perf_counter() - t["f"]))
g = torch.Generator().manual_seed(0)
out = {}
for n in (1, 16, 69):
    cache = kv.new_cache(model)
    ctx = 100
    prefill(model, torch.randint(1000, (1, ctx), generator=g), cache)
    paths = tuple(chain(n - 1)) if n > 1 else ()
    cand = torch.randint(1000, (max(n - 1, 1), 1), generator=g)
    hosts, walls = [], []
    for i in range(80):
        inside.clear()
        t0 = time.perf_counter()
        new, fb = tree_step(model, cache, ctx, 0, paths, cand if n > 1 else None, None)
        wall = time.perf_counter() - t0
        ctx += 1 + fb.accepted
        if i >= 10:
            walls.append(wall); hosts.append(wall - sum(inside))
    out[n] = {"host_ms": round(statistics.median(hosts) * 1e3, 3), "step_ms": round(statistics.median(walls) * 1e3, 2)}
print(json.dumps(out))
