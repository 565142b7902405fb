"""vLLM with and without msn's proposer, on this machine: 16 Spec-Bench prompts (the first two
of eight categories), greedy, one at a time and 8 at once, for no speculation, vLLM's own
``ngram`` and ``msn.vllm.MsnProposer`` (each in its own engine process), plus one sampled pass
(temperature 0.7) with msn's proposer. Reports every output against no speculation's, the
mean tokens per step from vLLM's spec-decode metrics (1 + accepted / drafts) and the
throughput. Runs in .venv-vllm (``scripts/test-vllm.sh`` builds it).

    .venv-vllm/bin/python scripts/vllm_bench.py MODEL [--max-tokens 96] [--out F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CATEGORIES = ("translation", "summarization", "qa", "math_reasoning", "rag", "writing", "coding", "extraction")
CONFIGS = {"none": None,
           "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
           "msn": {"method": "custom_class", "model": "msn.vllm.MsnProposer", "num_speculative_tokens": 5}}


def prompts(path: str) -> list[list[dict]]:
    qs = [json.loads(line) for line in open(path)]
    out = []
    for cat in CATEGORIES:
        out += [[{"role": "user", "content": q["turns"][0]}] for q in qs if q["category"] == cat][:2]
    return out


def spec_stats(llm) -> dict:
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}
    got = {}
    for m in llm.get_metrics():
        if m.name in names:
            got[names[m.name]] = getattr(m, "value", 0)
    return got


def one(model: str, config: str, path: str, max_tokens: int) -> dict:
    """Runs one configuration in this process: concurrency 1, then 8, then (msn) one sampled pass."""
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model=model, dtype="float32", gpu_memory_utilization=0.4, max_model_len=4096, max_num_seqs=8,
              speculative_config=CONFIGS[config], seed=0, disable_log_stats=False)
    report = {"config": config, "startup_s": round(time.time() - t0, 1)}
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    ps = prompts(path)
    llm.chat(ps[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)     # warm-up
    base = spec_stats(llm)
    for conc in (1, 8):
        t = time.time()
        if conc == 1:
            outs = [llm.chat([p], greedy, use_tqdm=False)[0] for p in ps]
        else:
            outs = llm.chat(ps, greedy, use_tqdm=False)
        wall = time.time() - t
        stats = spec_stats(llm)
        delta = {k: stats.get(k, 0) - base.get(k, 0) for k in stats}
        base = stats
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        new = sum(len(x) for x in tokens)
        drafts, accepted = delta.get("drafts", 0), delta.get("accepted_tokens", 0)
        report[f"c{conc}"] = {"wall_s": round(wall, 2), "tokens": new, "tokens_per_s": round(new / wall, 2),
                              # vLLM's mean acceptance length: over the steps that drafted
                              "tokens_per_step": round(1 + accepted / drafts, 3) if drafts else 1.0,
                              # over every step of every request (each gives 1 + its accepted drafts)
                              "tokens_per_request_step": round(new / (new - accepted), 3),
                              "spec": delta, "outputs": tokens}
    if config == "msn":
        t = time.time()
        outs = llm.chat(ps, SamplingParams(temperature=0.7, max_tokens=max_tokens, seed=0), use_tqdm=False)
        report["sampled"] = {"wall_s": round(time.time() - t, 2), "completed": sum(1 for o in outs if o.outputs[0].token_ids),
                             "prompts": len(ps)}
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--questions", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench"
                                               / "question.jsonl"))
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--configs", default="none,ngram,msn")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="vllm-bench.json")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.one, a.questions, a.max_tokens)))
        return 0
    results = {}
    for config in a.configs.split(","):
        run = subprocess.run([sys.executable, __file__, a.model, "--one", config, "--questions", a.questions,
                              "--max-tokens", str(a.max_tokens)], capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode != 0 or not lines:
            results[config] = {"error": run.stderr[-2000:]}
            continue
        results[config] = json.loads(lines[-1])
        print(config, {k: {kk: vv for kk, vv in v.items() if kk != "outputs"} if isinstance(v, dict) else v
                       for k, v in results[config].items()}, flush=True)
    ref = results.get("none", {})
    summary = {}
    for config, r in results.items():
        if "error" in r:
            summary[config] = {"error": r["error"][-300:]}
            continue
        row = {"startup_s": r["startup_s"]}
        for conc in ("c1", "c8"):
            row[conc] = {k: r[conc].get(k) for k in ("tokens_per_s", "tokens_per_step", "tokens_per_request_step",
                                                     "tokens", "wall_s")}
            if "c1" in ref:
                row[conc]["identical_to_no_speculation"] = r[conc]["outputs"] == ref[conc]["outputs"]
                row[conc]["identical_prompts"] = sum(x == y for x, y in zip(r[conc]["outputs"], ref[conc]["outputs"]))
        if "sampled" in r:
            row["sampled"] = r["sampled"]
        summary[config] = row
    import vllm

    report = {"model": Path(a.model).name, "vllm": vllm.__version__, "prompts": 2 * len(CATEGORIES),
              "categories": list(CATEGORIES), "max_tokens": a.max_tokens, "dtype": "float32", "summary": summary,
              "runs": results}
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
