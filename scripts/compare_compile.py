"""What compiled steps change, in one process: ``ar`` and ``tr-jacobi`` (a fixed tree, so one
step shape each) decoded eagerly and with ``compile="on"``, on the demo's prompts, after an
untimed warm-up that pays every compilation. Rounds alternate the four runs; reports the
median wall per prompt and kind, the ratios to eager ``ar``, whether every output equals
eager ``ar``'s, and the compile seconds.

    .venv/bin/python scripts/compare_compile.py MODEL [--max-new-tokens 64] [--rounds 3] [--out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tree", default="small", help="the tr-jacobi tree preset (paper drafts: one step shape)")
    p.add_argument("--out")
    a = p.parse_args()

    from msn.bench.demo import PROMPTS
    from msn.data.records import encode_prompt, ensure_chat_template
    from msn.decoding.engine import generate
    from msn.decoding.devices import model_device, sync_device
    from msn.loading import load_for_inference

    model, tok = load_for_inference(a.model, "auto", "auto")
    device = model_device(model)
    ensure_chat_template(tok)
    runs = {"ar": ("ar", {}), "ar compiled": ("ar", {"compile": "on"}),
            "tr-jacobi": ("tr-jacobi", {"tree": a.tree, "drafts": "paper"}),
            "tr-jacobi compiled": ("tr-jacobi", {"tree": a.tree, "drafts": "paper", "compile": "on"})}
    prompts = [encode_prompt(tok, [{"role": "user", "content": q.text}], device) for q in PROMPTS]
    t0 = time.perf_counter()
    compile_s = {}
    for name, (method, opts) in runs.items():          # warm-up: every shape each prompt meets
        for ids in prompts:
            r = generate(model, ids, method=method, max_new_tokens=a.max_new_tokens, fit_context=True, **opts)
            if "compile_s" in r.info.get("step", {}):
                compile_s[name] = r.info["step"]["compile_s"]
    warm_s = time.perf_counter() - t0
    walls = {(i, n): [] for i in range(len(prompts)) for n in runs}
    outs = {}
    for rnd in range(a.rounds):
        order = list(runs) if rnd % 2 == 0 else list(reversed(runs))
        for i, ids in enumerate(prompts):
            for name in order:
                method, opts = runs[name]
                sync_device(device)
                t = time.perf_counter()
                r = generate(model, ids, method=method, max_new_tokens=a.max_new_tokens, fit_context=True, **opts)
                sync_device(device)
                walls[(i, name)].append(time.perf_counter() - t)
                outs[(i, name)] = r
    rows = []
    for i, q in enumerate(PROMPTS):
        base = statistics.median(walls[(i, "ar")])
        row = {"kind": q.kind, "tokens": len(outs[(i, "ar")].tokens)}
        for name in runs:
            med = statistics.median(walls[(i, name)])
            row[name] = {"median_s": round(med, 3), "speedup_over_eager_ar": round(base / med, 3),
                         "tokens_per_step": round(outs[(i, name)].mean_accepted_tokens, 3),
                         "identical_to_ar": outs[(i, name)].tokens == outs[(i, "ar")].tokens}
        rows.append(row)
        print(f"{q.kind:>14}: " + ", ".join(f"{n} {row[n]['median_s']:.2f} s ({row[n]['speedup_over_eager_ar']:.2f}x)"
                                            for n in runs))
    report = {"model": a.model.rstrip("/").split("/")[-1], "device": str(device), "dtype": str(model.dtype),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "max_new_tokens": a.max_new_tokens,
              "rounds": a.rounds, "tree": a.tree, "warmup_s": round(warm_s, 1), "compile_s": compile_s,
              "all_identical": all(r[n]["identical_to_ar"] for r in rows for n in runs), "prompts": rows}
    print(json.dumps({k: v for k, v in report.items() if k != "prompts"}))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
