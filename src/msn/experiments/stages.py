"""Stages shared by the experiments: prepare the model and data, fine-tune, evaluate a
checkpoint. Each stage is skipped when its output exists, so a rerun continues."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from msn.errors import MsnError
from msn.noise import NoiseConfig

log = logging.getLogger("msn.experiments")


def variant_noise(spans: int, span_len: int) -> NoiseConfig:
    """The noise of a fine-tuning variant: ``spans`` spans of ``span_len`` per sample; 0 is plain SFT."""
    return NoiseConfig(enabled=False) if spans == 0 else NoiseConfig(span_len=span_len, num_spans=spans)


def resolved_alpha(rank: int, alpha: int) -> int:
    """The LoRA alpha of a preset's variants: ``alpha``, or 2 x ``rank`` where it is 0."""
    return alpha or 2 * rank


def train_stage(target: Path, base: str, data: Path, noise: NoiseConfig, *, steps: int, batch_size: int,
                max_length: int, lr: float, save_steps: int, grad_accum: int = 1, precision: str = "fp32",
                save_total_limit: int | None = None, warmup: float | None = None, lora_r: int = 0,
                lora_alpha: int = 0) -> bool:
    """Fine-tunes ``base`` into ``target`` unless it is finished; resumes an interrupted run.
    ``lora_r`` > 0 trains a LoRA adapter of that rank (``lora_alpha``, no dropout) on every
    linear layer and saves it merged, so ``target`` is a full model either way.
    Returns True when it trained."""
    from msn.train import TrainConfig, run

    if (target / "msn_config.json").exists():
        return False
    resume = any(target.glob("checkpoint-*/trainer_state.json"))
    log.info("training %s (%d steps%s)", target, steps, ", resumed" if resume else "")
    extra = {} if save_total_limit is None else {"save_total_limit": save_total_limit}
    if warmup is not None:
        extra["warmup"] = warmup
    if lora_r:
        extra.update(lora_r=lora_r, lora_alpha=resolved_alpha(lora_r, lora_alpha), lora_dropout=0.0,
                     merge_lora=True)
    run(TrainConfig(model=str(base), data=str(data / "train.jsonl"), output_dir=str(target), noise=noise,
                    max_steps=steps, batch_size=batch_size, max_length=max_length, lr=lr, save_steps=save_steps,
                    logging_steps=10, seed=42, grad_accum=grad_accum, precision=precision, resume=resume, **extra))
    return True


def prepare(out: Path, prompts: int, base_model: str | None, data: str | None = None,
            stride: int = 1) -> tuple[str, Path, Path]:
    """The base model, the data and the held-out question file, made once.

    ``base_model``: a checkpoint folder, a GGUF file or a folder holding one GGUF file
    (converted into ``out/base`` once), or None to fetch SmolLM2-135M-Instruct. ``data``:
    a built stdlib code set (``train.jsonl``, ``heldout.jsonl``), or None to build one.
    The questions are every ``stride``-th held-out prompt, ``prompts`` of them.
    """
    from msn.data.stdlib_code import build
    from msn.fetch import convert_gguf, fetch

    gguf = _gguf_file(Path(base_model)) if base_model is not None else None   # checked before any work
    if data is None:
        data_dir = out / "data"
        if not (data_dir / "info.json").exists():
            build(data_dir)
    else:
        data_dir = check_data(data)
    if base_model is None:
        base = str(fetch("smollm2-135m-instruct", log=lambda m: print(m, file=sys.stderr)))
    else:
        base = str(convert_gguf(gguf, out / "base")) if gguf else base_model
    questions = out / f"heldout_questions_{prompts}x{stride}.jsonl"
    if not questions.exists():
        rows = [json.loads(line) for line in open(data_dir / "heldout.jsonl", encoding="utf-8")][::stride][:prompts]
        questions.write_text("".join(json.dumps({"question_id": i, "category": "stdlib-heldout",
                                                 "turns": [r["prompt"]]}) + "\n" for i, r in enumerate(rows)))
    return base, data_dir, questions


def check_data(data: str) -> Path:
    """A given ``--data`` folder: it must hold a built stdlib code set."""
    data_dir = Path(data)
    missing = [f for f in ("train.jsonl", "heldout.jsonl") if not (data_dir / f).is_file()]
    if missing:
        raise MsnError(f"--data {data}: no {' or '.join(missing)} there; build one with msn data stdlib-code")
    return data_dir


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file that ``path`` is or holds (alone), or None for a checkpoint folder."""
    if not path.exists():
        raise MsnError(f"--base-model {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise MsnError(f"--base-model {path}: give a checkpoint folder or a .gguf file")
        return path
    if (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        raise MsnError(f"--base-model {path}: no config.json, and {len(found)} .gguf files (need a checkpoint "
                       "folder or exactly one .gguf)")
    return found[0]


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


