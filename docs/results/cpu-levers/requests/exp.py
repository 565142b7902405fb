"""Train MSN (the cpu preset's settings) on a data folder; score own words and held-out acceptance.
Usage: exp.py NAME DATA_DIR STEPS  |  exp.py --eval MODEL_DIR NAME
Environment: BASE (the base model folder), RUN (a cpu preset run folder: its question files)."""
import os
import json, sys, time
from pathlib import Path
import torch
from msn.experiments.stages import train_stage, variant_noise
from msn.experiments.reproduce import acceptance
from msn.loading import load_for_inference
from msn.data.records import ensure_chat_template

BASE = os.environ["BASE"]
OWN = Path(os.environ["RUN"]) / "own_words_questions.jsonl"
HELD = Path(os.environ["RUN"]) / "heldout_questions_10x50.jsonl"
METHODS = ["ar", "tree-noret", "default"]

def score(model_dir, name):
    torch.manual_seed(0)
    model, tok = load_for_inference(str(model_dir), dtype="float32")
    ensure_chat_template(tok)
    res = {}
    for label, q in (("own", OWN), ("held", HELD)):
        t = time.time()
        r = acceptance(model, tok, q, METHODS, 128, 10, progress=False, per_prompt=True)
        res[label] = r
        print(name, label, {m: round(r[m]["mean_accepted_tokens"], 3) for m in METHODS[1:]},
              "match", [r[m]["match_rate"] for m in METHODS[1:]],
              "per-prompt default", [round(p["mean_accepted_tokens"], 2) for p in r["default"]["per_prompt"]],
              round(time.time() - t), "s", flush=True)
    Path(f"score-{name}.json").write_text(json.dumps(res, indent=1))

if sys.argv[1] == "--eval":
    score(sys.argv[2], sys.argv[3])
else:
    name, data, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    t = time.time()
    train_stage(Path("models") / name, BASE, data, variant_noise(8, 5), steps=steps, batch_size=4, max_length=384,
                lr=1e-3, save_steps=10_000, warmup=0, lora_r=24)
    print(name, "trained in", round(time.time() - t), "s", flush=True)
    score(Path("models") / name, name)
