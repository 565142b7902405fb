"""The default decoder on the 10 code requests in a user's own words, one at a time, cold (as
msn reproduce scores it). Usage: own.py MODEL QUESTIONS OUT.json, QUESTIONS the run's
own_words_questions.jsonl (PYTHONPATH picks the msn code: the one before the fix, the one after)."""
import json, sys, time
from pathlib import Path
import torch
import msn
from msn.loading import load_for_inference
from msn.data.records import ensure_chat_template
from msn.experiments.reproduce import acceptance

torch.manual_seed(0)
model, tok = load_for_inference(sys.argv[1], dtype="float32")
ensure_chat_template(tok)
t = time.time()
res = acceptance(model, tok, Path(sys.argv[2]), ["ar", "default"], 128, 10,
                 progress=False, per_prompt=True)
res = {"model": Path(sys.argv[1]).name, "msn": msn.__file__, "seconds": round(time.time() - t, 1), **res}
Path(sys.argv[3]).write_text(json.dumps(res, indent=1))
d = res["default"]
print(sys.argv[3], round(d["mean_accepted_tokens"], 3), d["match_rate"], [round(p["mean_accepted_tokens"], 2) for p in d["per_prompt"]])
