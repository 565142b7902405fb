"""How much of a real fine-tune a LoRA adapter from ``msn export-lora`` keeps: the adapter at a
size budget, then held-out loss, acceptance (ar, the tree without retrieval, tr-jacobi with the
reference tree) and greedy outputs of the base, the fine-tuned model and the adapter merged.

    .venv/bin/python scripts/adapter_fidelity.py BASE TUNED DATA_DIR [--budget-mib 32] [--out F]

DATA_DIR is a built stdlib code set (msn data stdlib-code): the loss is on its first 100
held-out examples, acceptance and greedy outputs on every 50th held-out prompt (6, 128 tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    import msn
    from msn.adapter_export import export_lora
    from msn.data.records import encode_prompt, ensure_chat_template
    from msn.evaluate import heldout_loss
    from msn.experiments.reproduce import acceptance
    from msn.loading import load_for_inference

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("tuned")
    ap.add_argument("data")
    ap.add_argument("--budget-mib", type=float, default=32)
    ap.add_argument("--adapter", help="adapter folder to write (default: TUNED-lora)")
    ap.add_argument("--out", default="adapter-fidelity.json")
    a = ap.parse_args()
    adapter = a.adapter or a.tuned.rstrip("/") + "-lora"
    data = Path(a.data)
    t = time.time()
    report = export_lora(a.base, a.tuned, adapter, budget_mib=a.budget_mib)
    rows = [json.loads(line) for line in open(data / "heldout.jsonl", encoding="utf-8")][::50][:6]
    questions = Path(adapter) / "fidelity_questions.jsonl"
    questions.write_text("".join(json.dumps({"turns": [r["prompt"]]}) + "\n" for r in rows))
    out = {"base": Path(a.base).name, "tuned": Path(a.tuned).name, "budget_mib": a.budget_mib, "export_s": round(time.time() - t, 1),
           "rank": report["rank"], "bytes": report["bytes"], "kept": report["kept"],
           "embedding_kept": report["per_layer"].get("model.embed_tokens", {}).get("kept"),
           "loss_examples": 100, "prompts": len(rows), "max_new_tokens": 128, "models": {}}
    greedy = {}
    for name, path in (("base", a.base), ("tuned", a.tuned), ("adapter", adapter)):
        model, tok = load_for_inference(path, device="cpu", dtype="float32")
        ensure_chat_template(tok)
        loss = heldout_loss(model, tok, str(data / "heldout.jsonl"), 384, batch_size=4, limit=100, progress=False)
        acc = acceptance(model, tok, questions, ("ar", "tree-noret", "tr-jacobi"), 128, len(rows), progress=False)
        greedy[name] = [msn.generate(model, encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]),
                                     method="ar", max_new_tokens=128).tokens for r in rows]
        out["models"][name] = {"held_out_loss": loss,
                               "accept": {k: round(v["mean_accepted_tokens"], 3) for k, v in acc.items()},
                               "match_rate": min(v["match_rate"] for v in acc.values())}
        print(name, out["models"][name], flush=True)
    m = out["models"]
    out["adapter_greedy_identical_to_tuned"] = sum(x == y for x, y in zip(greedy["tuned"], greedy["adapter"]))
    change = m["tuned"]["held_out_loss"] - m["base"]["held_out_loss"]
    out["loss_change_kept"] = (m["adapter"]["held_out_loss"] - m["base"]["held_out_loss"]) / change if change else None
    out["acceptance_gain_kept"] = {
        k: (m["adapter"]["accept"][k] - m["base"]["accept"][k]) / (m["tuned"]["accept"][k] - m["base"]["accept"][k])
        for k in ("tree-noret", "tr-jacobi") if m["tuned"]["accept"][k] != m["base"]["accept"][k]}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "models"}, indent=2))


if __name__ == "__main__":
    main()
