"""Stages shared by the experiments: prepare the model and data, fine-tune, evaluate a
checkpoint. Each stage is skipped when its output exists, so a rerun continues."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from msn.noise import NoiseConfig

log = logging.getLogger("msn.experiments")


def train_stage(target: Path, base: str, data: Path, noise: NoiseConfig, *, steps: int, batch_size: int,
                max_length: int, lr: float, save_steps: int, grad_accum: int = 1, precision: str = "fp32",
                save_total_limit: int | None = None) -> bool:
    """Fine-tunes ``base`` into ``target`` unless it is finished; resumes an interrupted run.
    Returns True when it trained."""
    from msn.train import TrainConfig, run

    if (target / "msn_config.json").exists():
        return False
    resume = any(target.glob("checkpoint-*/trainer_state.json"))
    log.info("training %s (%d steps%s)", target, steps, ", resumed" if resume else "")
    extra = {} if save_total_limit is None else {"save_total_limit": save_total_limit}
    run(TrainConfig(model=str(base), data=str(data / "train.jsonl"), output_dir=str(target), noise=noise,
                    max_steps=steps, batch_size=batch_size, max_length=max_length, lr=lr, save_steps=save_steps,
                    logging_steps=10, seed=42, grad_accum=grad_accum, precision=precision, resume=resume, **extra))
    return True


def prepare(out: Path, prompts: int, base_model: str | None) -> tuple[str, Path, Path]:
    """Fetches the model and builds the data and held-out question file once."""
    from msn.data.stdlib_code import build
    from msn.fetch import fetch

    base = base_model or str(fetch("smollm2-135m-instruct", log=lambda m: print(m, file=sys.stderr)))
    data = out / "data"
    if not (data / "info.json").exists():
        build(data)
    questions = out / f"heldout_questions_{prompts}.jsonl"
    if not questions.exists():
        rows = [json.loads(line) for line in open(data / "heldout.jsonl", encoding="utf-8")][:prompts]
        questions.write_text("".join(json.dumps({"question_id": i, "category": "stdlib-heldout",
                                                 "turns": [r["prompt"]]}) + "\n" for i, r in enumerate(rows)))
    return base, data, questions


def evaluate_checkpoint(path: str, out: Path, data: Path, questions: Path, methods, max_new_tokens: int,
                         max_length: int, loss_examples: int, tree: str | None = None) -> dict:
    """Held-out loss and bench figures of one checkpoint; cached in ``out/eval.json``."""
    from msn.bench.harness import BenchConfig, run_bench
    from msn.evaluate import heldout_loss
    from msn.loading import load_for_inference

    cached = out / "eval.json"
    if cached.exists():
        return json.loads(cached.read_text())
    t = time.time()
    model, tok = load_for_inference(path)
    loss = heldout_loss(model, tok, str(data / "heldout.jsonl"), max_length, limit=loss_examples) \
        if loss_examples else None
    bench = run_bench(BenchConfig(model=path, out=str(out / "bench"), bench=str(questions), methods=list(methods),
                                  max_new_tokens=max_new_tokens, tree=tree, warmup=1), model=model, tokenizer=tok)
    entry = {"held_out_loss": loss,
             "methods": {m: {k: v["overall"][k] for k in ("mean_accepted_tokens", "speedup", "match_rate",
                                                           "tokens_per_s")}
                         for m, v in bench["methods"].items()},
             "eval_s": time.time() - t}
    cached.write_text(json.dumps(entry, indent=2) + "\n")
    return entry


