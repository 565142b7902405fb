"""Every decoder against transformers' greedy `generate` past a model's sliding window.

Takes Spec-Bench summarization articles, cuts each prompt to exactly --prompt-tokens
tokens (BOS first), decodes --max-new-tokens with transformers (`model.generate`,
greedy) and with every msn method, and reports per method whether the tokens are
identical, with tokens per step. Exit status 1 when any output differs.

    python scripts/check_windows.py --model "$(msn fetch gemma3-270m | tail -n 1)" --out windows.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import msn
from msn.bench.prompts import load_questions
from msn.loading import load_for_inference

METHODS = {"ar": {}, "jacobi": {}, "pld": {}, "lookahead": {}, "recycle": {}, "tr-jacobi": {},
           "tr-jacobi:reference": {"tree": "reference"}, "tr-jacobi:paper": {"drafts": "paper"}}


def prompt_ids(tokenizer, text: str, n: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = (bos + ids)[:n]
    if len(ids) < n:
        raise SystemExit(f"the article has only {len(ids)} tokens; choose --prompt-tokens below that")
    return torch.tensor([ids])


def cache_memory(model, n: int) -> int:
    from msn.decoding import cache as kv
    from msn.decoding.step import prefill

    cache = kv.new_cache(model)
    with torch.inference_mode():
        prefill(model, torch.randint(3, 1000, (1, n)), cache)
    live, allocated = kv.cache_bytes(cache)
    print(json.dumps({"positions": n, "held_mib": round(live / 2**20, 1), "allocated_mib": round(allocated / 2**20, 1),
                      "bytes_per_position": live // n, "dtype": str(model.dtype).replace("torch.", "")}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=600)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=1, help="summarization articles to check (default 1)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cache-memory", type=int, metavar="N",
                   help="instead: prefill N positions and report the cache's bytes (held and allocated)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    model, tok = load_for_inference(a.model, "cpu", "float32")
    if a.cache_memory:
        return cache_memory(model, a.cache_memory)
    window = getattr(model.config, "sliding_window", None)
    arts = [q for q in load_questions("spec-bench", limit=a.prompts, categories=["summarization"])]
    rows, ok = [], True
    for q in arts:
        x = prompt_ids(tok, q.turns[0], a.prompt_tokens)
        t0 = time.perf_counter()
        want = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=a.max_new_tokens,
                              eos_token_id=[], pad_token_id=0)[0, x.shape[1]:].tolist()
        hf_s = time.perf_counter() - t0
        print(f"{q.qid}: transformers greedy {len(want)} tokens in {hf_s:.1f} s "
              f"(prompt {x.shape[1]} + {a.max_new_tokens} new; sliding window {window})", flush=True)
        for name in a.methods.split(","):
            t0 = time.perf_counter()
            r = msn.generate(model, x, method=name.split(":")[0], max_new_tokens=a.max_new_tokens, eos_token_id=[],
                             **METHODS[name])
            same = r.tokens == want
            ok &= same
            first = next((i for i, (u, v) in enumerate(zip(r.tokens, want)) if u != v), None)
            rows.append({"question": q.qid, "method": name, "identical": same, "first_difference": first,
                         "tokens_per_step": round(r.mean_accepted_tokens, 3), "seconds": round(time.perf_counter() - t0, 2)})
            print(f"  {name:>20}: identical {same}, {r.mean_accepted_tokens:.2f} tokens/step, "
                  f"{rows[-1]['seconds']} s", flush=True)
    report = {"model": getattr(model.config, "_name_or_path", a.model).split("/")[-1],
              "model_type": model.config.model_type, "sliding_window": window,
              "layer_types": sorted(set(getattr(model.config, "layer_types", None) or [])),
              "prompt_tokens": a.prompt_tokens, "max_new_tokens": a.max_new_tokens, "all_identical": ok,
              "torch": torch.__version__, "transformers": __import__("transformers").__version__, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
