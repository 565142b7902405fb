"""HumanEval pass@1 (all 164, greedy, 320 new tokens, batches of 16: the cpu preset's settings)
of one model; answers kept as they come, so a rerun continues.

    python he.py MODEL OUT.json
"""
import json
import sys
from pathlib import Path

from msn.evaluate import humaneval_pass1
from msn.loading import load_for_inference

model, tok = load_for_inference(sys.argv[1], dtype="float32")
out = Path(sys.argv[2])
he = humaneval_pass1(model, tok, max_new_tokens=320, batch_size=16, answers_file=out.with_suffix(".answers.jsonl"))
out.write_text(json.dumps(he, indent=1) + "\n")
print(out.name, he["pass1"], sum(not r["answer"].count("```") >= 2 for r in he["results"]))
