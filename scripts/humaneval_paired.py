"""Paired HumanEval pass@1 for several checkpoints: every model answers a problem before the
next problem starts, so a run stopped early still compares the models on the same problems.

    python scripts/humaneval_paired.py runs/ablation/sft runs/ablation/msn-spans1 --out he.jsonl
Appends one JSON line per (problem, model) to --out; rerun to continue; prints pass@1 per model.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

from msn.data.records import ensure_chat_template
from msn.evaluate import HUMANEVAL_MAX_NEW_TOKENS, humaneval_check, humaneval_completions, humaneval_problems
from msn.loading import load_for_inference


def summary(path: Path, names: list[str]) -> dict:
    by_task = defaultdict(dict)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        by_task[r["task_id"]][r["model"]] = r["passed"]
    paired = [t for t, v in by_task.items() if all(n in v for n in names)]
    return {"problems": len(paired),
            "pass1": {n: 100.0 * sum(by_task[t][n] for t in paired) / max(len(paired), 1) for n in names}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="checkpoint folders")
    ap.add_argument("--out", required=True, help="JSONL of per-problem results (appended)")
    ap.add_argument("--limit", type=int, help="first N problems")
    ap.add_argument("--max-new-tokens", type=int, default=HUMANEVAL_MAX_NEW_TOKENS)
    a = ap.parse_args()
    names = [Path(m).name for m in a.models]
    out = Path(a.out)
    done = {(r["task_id"], r["model"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    models = {n: load_for_inference(m) for n, m in zip(names, a.models)}
    for _, tok in models.values():
        ensure_chat_template(tok)
    with out.open("a") as f:
        for p in humaneval_problems(a.limit):
            for n, (model, tok) in models.items():
                if (p["task_id"], n) in done:
                    continue
                answer = humaneval_completions(model, tok, [p], a.max_new_tokens, progress=False)
                passed = humaneval_check([p], answer, progress=False)[0]["passed"]
                f.write(json.dumps({"task_id": p["task_id"], "model": n, "passed": passed}) + "\n")
                f.flush()
    print(json.dumps(summary(out, names)))


if __name__ == "__main__":
    main()
