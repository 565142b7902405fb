"""``msn data self-distill``: a records file whose responses are a model's own greedy answers.

MSN teaches a model to predict well after a partly wrong recent context; what decoding meets is
the text the model itself writes. Fine-tuning on human-written responses moves the model away
from that text; fine-tuning on its own greedy answers to the same prompts keeps its output (plain
SFT on them changes little) and lets MSN's noise teach the denoising skill on the distribution
that decoding sees.

The answers are generated in batches of prompts sorted by length (transformers' greedy
``generate``; every msn decoder returns the same tokens) and appended to ``answers.jsonl`` after
every batch, so an interrupted run continues where it stopped. Answers that hit
``max_new_tokens`` before the end-of-turn token are left out of ``train.jsonl`` (training on them
would teach the model to stop mid-answer); ``info.json`` counts them.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from msn.errors import MsnError
from msn.paths import check_apart

ANSWERS = "answers.jsonl"      # one line per generated answer: {"index", "response", "finished"}


def select(records: list[dict], limit: int | None, seed: int) -> list[int]:
    """Indices of the prompts to answer: a seeded sample of ``limit`` (all when None), in file order."""
    idx = list(range(len(records)))
    if limit is not None and limit < len(idx):
        idx = sorted(random.Random(seed).sample(idx, limit))
    return idx


def self_distill(model_path: str, data_dir: str | Path, out_dir: str | Path, *, limit: int | None = None,
                 max_new_tokens: int = 320, batch_size: int = 16, seed: int = 42, dtype: str = "float32",
                 device: str = "auto", keep_unfinished: bool = False, progress: bool = True) -> dict:
    """Writes ``out_dir/train.jsonl`` with the model's greedy answers to (a sample of) the prompts
    of ``data_dir/train.jsonl``, and copies ``heldout.jsonl`` (kept human-written: the held-out
    loss still measures the model against reference text). ``keep_unfinished`` keeps answers cut
    at ``max_new_tokens`` too (for a model that rarely ends, e.g. a random test model). Returns
    ``info.json``'s content."""
    from tqdm import tqdm

    from msn.bench.batch import hf_batched
    from msn.data.records import encode_prompt, ensure_chat_template, jsonl_lines, resumed_rows, write_jsonl
    from msn.decoding.request import resolve_eos
    from msn.loading import load_for_inference

    data_dir, out = Path(data_dir), Path(out_dir)
    src = data_dir / "train.jsonl"
    if not src.is_file():
        raise MsnError(f"--data {data_dir}: no train.jsonl there; build one with msn data stdlib-code")
    check_apart(out, "--out", {"--data": data_dir, "--model": model_path})
    if max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise MsnError("--max-new-tokens, --batch-size and --limit must be positive")
    if (out / "info.json").exists():
        return json.loads((out / "info.json").read_text())
    records = []
    for where, rec in jsonl_lines(src):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise MsnError(f"{src}:{where}: a self-distilled set needs records with a \"prompt\" string")
        records.append(rec)
    chosen = select(records, limit, seed)
    out.mkdir(parents=True, exist_ok=True)
    answers_path = out / ANSWERS
    done = resumed_rows(answers_path, "answer records", "index")
    todo = [i for i in chosen if i not in done]
    if todo:
        model, tok = load_for_inference(model_path, dtype=dtype, device=device)
        ensure_chat_template(tok)
        eos = resolve_eos(model, None)
        prompts = {i: encode_prompt(tok, [{"role": "user", "content": records[i]["prompt"]}]) for i in todo}
        todo.sort(key=lambda i: prompts[i].shape[1])
        with open(answers_path, "a", encoding="utf-8") as f, \
                tqdm(total=len(chosen), initial=len(chosen) - len(todo), desc="self-distill", unit="answer",
                     disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                rows = hf_batched(model, [prompts[i] for i in chunk], max_new_tokens, eos, tok.pad_token_id)
                for i, row in zip(chunk, rows):
                    finished = bool(row) and row[-1] in eos
                    text = tok.decode(row[:-1] if finished else row, skip_special_tokens=True)
                    done[i] = {"index": i, "response": text, "finished": finished}
                    f.write(json.dumps(done[i]) + "\n")
                f.flush()
                bar.update(len(chunk))
    kept = [i for i in chosen if (done[i]["finished"] or keep_unfinished) and done[i]["response"].strip()]
    write_jsonl(out / "train.jsonl", ({**records[i], "response": done[i]["response"]} for i in kept))
    if (data_dir / "heldout.jsonl").is_file():
        shutil.copy(data_dir / "heldout.jsonl", out / "heldout.jsonl")
    info = {"source": str(src), "model": str(model_path), "prompts": len(chosen), "kept": len(kept),
            "unfinished": sum(not done[i]["finished"] for i in chosen), "max_new_tokens": max_new_tokens,
            "seed": seed, "limit": limit, "unfinished_kept": keep_unfinished,
            "note": "responses are the model's own greedy answers; heldout.jsonl is the source's, unchanged"}
    staging = out / "info.json.partial"
    staging.write_text(json.dumps(info, indent=2) + "\n")
    staging.replace(out / "info.json")
    return info
