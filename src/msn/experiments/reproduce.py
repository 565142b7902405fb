"""``msn reproduce --preset {cpu,pilot,gpu,smoke}``: MSN versus plain SFT on SmolLM2-135M-Instruct
with the stdlib code set.

Fetches the model, builds the data, fine-tunes twice with identical data, settings and
seed (plain SFT, then MSN), and evaluates the base model and both fine-tuned models:
held-out response loss on clean inputs, HumanEval pass@1, and the acceleration of every
decoder on held-out prompts (``msn bench``). Results go to ``OUT/results.json``; every
stage is skipped when its output exists, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from msn.experiments.stages import evaluate_checkpoint, prepare, train_stage
from msn.noise import NoiseConfig


@dataclass
class Preset:
    """Sizes of one reproduction run.

    Attributes:
        steps / batch_size / grad_accum / max_length / lr: training of SFT and MSN.
        noise_spans / noise_len: MSN noise (the paper: 1 span of 5).
        heldout_prompts: held-out prompts decoded by the bench.
        heldout_loss_examples: held-out examples scored for loss.
        humaneval_limit: HumanEval problems (None: all 164).
        max_new_tokens: per bench prompt; humaneval_tokens: per HumanEval answer.
        methods: decoders benchmarked; tree: TR-Jacobi preset (None: the decoder's default).
    """

    steps: int = 150
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 384
    lr: float = 5e-5
    noise_spans: int = 1
    noise_len: int = 5
    heldout_prompts: int = 20
    heldout_loss_examples: int = 300
    humaneval_limit: int | None = None
    max_new_tokens: int = 128
    humaneval_tokens: int = 320
    methods: list[str] = field(default_factory=lambda: ["ar", "pld", "lookahead", "jacobi", "tr-jacobi"])
    tree: str | None = None
    precision: str = "fp32"


PRESETS = {
    # About 2 hours on a 2-core CPU.
    "cpu": Preset(),
    # One GPU: a real epoch-scale run.
    # Under an hour on a 2-core CPU: a first look at the acceptance gap, not the full claim.
    "pilot": Preset(steps=60, heldout_prompts=10, heldout_loss_examples=100, humaneval_limit=20,
                    humaneval_tokens=256, methods=["ar", "pld", "jacobi", "tr-jacobi"], noise_spans=4),
    # Minutes on a tiny model: checks the pipeline, not the method.
    "smoke": Preset(steps=2, batch_size=2, max_length=128, heldout_prompts=2, heldout_loss_examples=4,
                    humaneval_limit=2, max_new_tokens=8, humaneval_tokens=16, methods=["ar", "tr-jacobi"]),
    "gpu": Preset(steps=3000, batch_size=16, max_length=1024, lr=2e-5, heldout_prompts=80,
                  heldout_loss_examples=1204, max_new_tokens=256, humaneval_tokens=512, precision="bf16"),
}


def run(preset_name: str, out: Path, models=("base", "sft", "msn"), spans: int | None = None,
        base_model: str | None = None) -> dict:
    import torch

    from msn.evaluate import humaneval_pass1
    from msn.loading import load_for_inference

    preset = PRESETS[preset_name]
    if spans is not None:
        preset = replace(preset, noise_spans=spans)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    t = time.time()
    base, data, questions = prepare(out, preset.heldout_prompts, base_model)
    times["setup_s"] = time.time() - t
    paths = {"base": str(base)}
    for name, noise in (("sft", NoiseConfig(enabled=False)),
                        ("msn", NoiseConfig(span_len=preset.noise_len, num_spans=preset.noise_spans))):
        if name not in models:
            continue
        paths[name] = str(out / name)
        t = time.time()
        if train_stage(out / name, base, data, noise, steps=preset.steps, batch_size=preset.batch_size,
                       max_length=preset.max_length, lr=preset.lr, save_steps=max(preset.steps // 3, 1),
                       grad_accum=preset.grad_accum, precision=preset.precision):
            times[f"train_{name}_s"] = time.time() - t
    results = {"models": {}, "config": {"preset": preset_name, **asdict(preset), "torch": torch.__version__},
               "times": times}
    for name in models:
        result_file = out / f"eval_{name}.json"
        if result_file.exists():
            results["models"][name] = json.loads(result_file.read_text())
            continue
        t = time.time()
        entry = evaluate_checkpoint(paths[name], out / f"eval_{name}", data, questions, preset.methods,
                                     preset.max_new_tokens, preset.max_length, preset.heldout_loss_examples,
                                     preset.tree)
        model, tok = load_for_inference(paths[name])
        he = humaneval_pass1(model, tok, method="pld", max_new_tokens=preset.humaneval_tokens,
                             limit=preset.humaneval_limit)
        entry = {**entry, "humaneval_pass1": he["pass1"], "humaneval_problems": he["problems"],
                 "eval_s": time.time() - t}
        result_file.write_text(json.dumps(entry, indent=2) + "\n")
        results["models"][name] = entry
        del model
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return results


