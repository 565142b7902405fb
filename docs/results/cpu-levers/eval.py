"""Scores one model of docs/results/cpu-levers.md: held-out loss (100 human-written held-out
records), mean accepted tokens per step on the cpu preset's 10 held-out prompts (`ar`, the
reference tree without retrieval, `tr-jacobi` with the reference tree) and on the code
requests in a user's own words (`ar`, the tree without retrieval), 128 new tokens, float32.

    python docs/results/cpu-levers/eval.py RUN MODEL OUT.json
"""
import json
import sys
import time
from pathlib import Path

import torch

from msn.data.records import ensure_chat_template
from msn.evaluate import heldout_loss
from msn.experiments.reproduce import PRESETS, acceptance
from msn.loading import load_for_inference


def main(run: Path, model_path: str, out: Path) -> None:
    if out.exists():
        return
    preset = PRESETS["cpu"]
    torch.manual_seed(0)
    t = time.time()
    model, tok = load_for_inference(model_path, dtype="float32")
    ensure_chat_template(tok)
    result = {"model": Path(model_path).name,
              "loss": heldout_loss(model, tok, str(run / "data-self" / "heldout.jsonl"), preset.max_length,
                                            batch_size=preset.batch_size, limit=preset.heldout_loss_examples,
                                            progress=False)}
    questions = next(run.glob(f"heldout_questions_{preset.accept_prompts}x{preset.accept_stride}.jsonl"))
    result["heldout"] = acceptance(model, tok, questions, ["ar", "tree-noret", "tr-jacobi"], preset.accept_tokens,
                                   preset.accept_batch, progress=False)
    result["own"] = acceptance(model, tok, run / "own_words_questions.jsonl", ["ar", "tree-noret"],
                                     preset.accept_tokens, preset.accept_batch, progress=False)
    result["eval_s"] = time.time() - t
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(out.name, json.dumps({k: {m: round(v["mean_accepted_tokens"], 3) for m, v in result[k].items()}
                                for k in ("heldout", "own")}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
