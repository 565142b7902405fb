"""Runs `msn generate` (the CLI) with --method ar and with each other method on Spec-Bench
prompts and checks the text is identical. Prints one JSON line per prompt and a summary.

usage: python scripts/check_generate.py --model PATH [--prompts 20] [--max-new-tokens N]
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from msn.bench.prompts import load_questions
from msn.decoding.config import DEFAULT_MAX_NEW_TOKENS

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--prompts", type=int, default=20)
p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
p.add_argument("--methods", default="tr-jacobi")
p.add_argument("--questions")
a = p.parse_args()

msn = str(Path(sys.executable).parent / "msn")
qs = load_questions("spec-bench", a.questions, limit=(a.prompts + 5) // 6)[: a.prompts]
methods = ["ar"] + a.methods.split(",")
same, accepted = {m: 0 for m in methods[1:]}, {m: [] for m in methods}
for q in qs:
    docs = {}
    for m in methods:
        out = subprocess.run([msn, "generate", "--model", a.model, "--chat", "--prompt", q.turns[0], "--method", m,
                              "--max-new-tokens", str(a.max_new_tokens), "--json"], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr[-2000:])
        docs[m] = json.loads(out.stdout.strip().splitlines()[-1])
        accepted[m].append(docs[m]["mean_accepted_tokens"])
    for m in methods[1:]:
        same[m] += docs[m]["text"] == docs["ar"]["text"] and docs[m]["tokens"] == docs["ar"]["tokens"]
    print(json.dumps({"question_id": q.qid, "category": q.category, "tokens": len(docs["ar"]["tokens"]),
                      **{f"{m}_same": docs[m]["text"] == docs["ar"]["text"] for m in methods[1:]},
                      **{f"{m}_accepted": docs[m]["mean_accepted_tokens"] for m in methods}}), flush=True)
print(json.dumps({"prompts": len(qs), "identical": same,
                  "mean_accepted_tokens": {m: statistics.mean(v) for m, v in accepted.items()}}))
sys.exit(0 if all(v == len(qs) for v in same.values()) else 1)
