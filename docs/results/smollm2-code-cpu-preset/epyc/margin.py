"""Default decoder on the own-words requests: tokens/step and time against ar, with the
choice margin and exploration budget patched. Usage: margin.py MODEL OUT.json MARGIN EXPLORE_COST"""
import json, sys, time
from functools import partial
from pathlib import Path
import torch
import msn
from msn.decoding import autotree, proposers
from msn.decoding.autotree import forget_outcomes
from msn.decoding.recycle import reset_tables
from msn.loading import load_for_inference
from msn.data.records import ensure_chat_template, encode_prompt

model_path, out, margin, explore = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
autotree.choose_tree = partial(autotree.choose_tree, margin=margin)
for name in dir(proposers):
    obj = getattr(proposers, name)
    if isinstance(obj, type) and hasattr(obj, "EXPLORE_COST"):
        obj.EXPLORE_COST = explore
torch.manual_seed(0)
model, tok = load_for_inference(model_path, dtype="float32")
ensure_chat_template(tok)
qs = [json.loads(l)["turns"][0] for l in Path("own_words_questions.jsonl").read_text().splitlines() if l.strip()]
prompts = [encode_prompt(tok, [{"role": "user", "content": q}], model.device) for q in qs]
msn.generate(model, [prompts[0]], method="ar", max_new_tokens=16)   # warm-up
reset_tables(model); forget_outcomes(model)
rows = []
for p in prompts:
    t = time.perf_counter(); a = msn.generate(model, [p], method="ar", max_new_tokens=128)[0]; ta = time.perf_counter() - t
    t = time.perf_counter(); d = msn.generate(model, [p], max_new_tokens=128)[0]; td = time.perf_counter() - t
    rows.append({"tps": sum(d.accept_lengths) / d.steps, "speed": ta / td, "identical": d.tokens == a.tokens,
                 "ar_s": ta, "default_s": td})
res = {"model": Path(model_path).name, "margin": margin, "explore_cost": explore,
       "tokens_per_step": sum(r["tps"] for r in rows) / len(rows),
       "speed_total": sum(r["ar_s"] for r in rows) / sum(r["default_s"] for r in rows), "rows": rows}
Path(out).write_text(json.dumps(res, indent=1))
print(out, round(res["tokens_per_step"], 3), "speed", round(res["speed_total"], 3),
      [round(r["tps"], 2) for r in rows], all(r["identical"] for r in rows))
