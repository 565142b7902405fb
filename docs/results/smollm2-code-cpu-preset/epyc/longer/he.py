"""HumanEval pass@1 of one model with the cpu preset's settings (all 164 problems, greedy,
``humaneval_tokens`` new tokens in batches of ``humaneval_batch``). Writes the summary (pass@1,
the problems passed, how many answers close their code block within the limit); the answers
are kept in OUT.answers.jsonl as they come, so a rerun continues.

    python he.py MODEL OUT.json
"""
import json
import sys
from pathlib import Path

from msn.evaluate import humaneval_pass1
from msn.experiments.reproduce import PRESETS
from msn.loading import load_for_inference
from quality import closed

preset = PRESETS["cpu"]
model, tok = load_for_inference(sys.argv[1], dtype="float32")
out = Path(sys.argv[2])
he = humaneval_pass1(model, tok, max_new_tokens=preset.humaneval_tokens, batch_size=preset.humaneval_batch,
                     answers_file=out.with_suffix(".answers.jsonl"))
summary = {"pass1": he["pass1"], "problems": he["problems"], "max_new_tokens": preset.humaneval_tokens,
           "decoding": f"greedy, batches of {preset.humaneval_batch}",
           "passed": [r["task_id"] for r in he["results"] if r["passed"]],
           "answers_closing_their_code_block": sum(closed(r["answer"]) for r in he["results"])}
out.write_text(json.dumps(summary, indent=1))
print(out.name, json.dumps(summary))
