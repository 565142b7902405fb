"""``msn reproduce``: MSN versus plain SFT on SmolLM2-135M-Instruct with the stdlib code set.

Fetches the model, builds the data, fine-tunes twice with identical data, settings and
seed (plain SFT with ``--no-noise``, then MSN), and evaluates the base model and both
fine-tuned models: held-out response loss on clean inputs, HumanEval pass@1, and the
acceleration of every decoder on held-out prompts (``msn bench``). Results go to
``OUT/results.json`` and ``OUT/results.md``; every stage is skipped when its output
exists, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from msn.errors import MsnError


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
        methods: decoders benchmarked; tree: TR-Jacobi preset.
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
    tree: str = "auto"
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


@dataclass
class Ablation:
    """The noise-spans x training-tokens ablation: which MSN setting shows the effect on a CPU budget.

    Attributes:
        spans: noise spans per sample, one training run each; 0 is plain SFT, 1 the paper's default.
        steps: training steps of every run; eval_every: a checkpoint is evaluated every this many.
        prompts: held-out prompts decoded per evaluation.
        methods: decoders at intermediate checkpoints; final_methods: at the last one and the base model.
        trees: TR-Jacobi tree presets timed on the last MSN model, to pick the fastest on this machine.
    """

    spans: tuple[int, ...] = (0, 8, 1)
    steps: int = 120
    eval_every: int = 60
    batch_size: int = 4
    max_length: int = 384
    lr: float = 1e-4
    noise_len: int = 5
    prompts: int = 8
    max_new_tokens: int = 128
    loss_examples: int = 100
    methods: tuple[str, ...] = ("ar", "jacobi", "tr-jacobi")
    final_methods: tuple[str, ...] = ("ar", "pld", "lookahead", "jacobi", "tr-jacobi")
    trees: tuple[str, ...] = ("chain", "small", "medium", "reference")


def _msn(*args) -> None:
    cmd = [sys.executable, "-m", "msn", *map(str, args)]
    print("$ msn " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise MsnError(f"stage failed: msn {' '.join(map(str, args[:2]))}")


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
    base, data, questions = _prepare(out, preset.heldout_prompts, base_model)
    times["setup_s"] = time.time() - t
    paths = {"base": str(base)}
    for name, noise in (("sft", ["--no-noise"]),
                        ("msn", ["--noise-len", preset.noise_len, "--noise-spans", preset.noise_spans])):
        if name not in models:
            continue
        paths[name] = str(out / name)
        t = time.time()
        if _train(out / name, base, data, preset.steps, preset.batch_size, preset.max_length, preset.lr,
                  max(preset.steps // 3, 1), *noise, "--grad-accum", preset.grad_accum, "--precision",
                  preset.precision):
            times[f"train_{name}_s"] = time.time() - t
    results = {"models": {}, "config": {"preset": preset_name, **asdict(preset), "torch": torch.__version__},
               "times": times}
    for name in models:
        result_file = out / f"eval_{name}.json"
        if result_file.exists():
            results["models"][name] = json.loads(result_file.read_text())
            continue
        t = time.time()
        entry = _evaluate_checkpoint(paths[name], out / f"eval_{name}", data, questions, preset.methods,
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


def _train(target: Path, base: str, data: Path, steps: int, batch_size: int, max_length: int, lr: float,
           save_steps: int, *extra) -> bool:
    """Fine-tunes ``base`` into ``target`` unless it is finished; resumes an interrupted run."""
    if (target / "msn_config.json").exists():
        return False
    resume = ["--resume"] if any(target.glob("checkpoint-*/trainer_state.json")) else []
    _msn("train", "--model", base, "--data", data / "train.jsonl", "--max-steps", steps, "--batch-size", batch_size,
         "--max-length", max_length, "--lr", lr, "--save-steps", save_steps, "--logging-steps", 10, "--seed", 42,
         *extra, "--output-dir", target, *resume)
    return True


def _prepare(out: Path, prompts: int, base_model: str | None) -> tuple[str, Path, Path]:
    """Fetches the model and builds the data and held-out question file once."""
    from msn.fetch import fetch

    base = base_model or str(fetch("smollm2-135m-instruct", log=lambda m: print(m, file=sys.stderr)))
    data = out / "data"
    if not (data / "info.json").exists():
        _msn("data", "stdlib-code", "--out", data)
    questions = out / f"heldout_questions_{prompts}.jsonl"
    if not questions.exists():
        rows = [json.loads(line) for line in open(data / "heldout.jsonl")][:prompts]
        questions.write_text("".join(json.dumps({"question_id": i, "category": "stdlib-heldout",
                                                 "turns": [r["prompt"]]}) + "\n" for i, r in enumerate(rows)))
    return base, data, questions


def _evaluate_checkpoint(path: str, out: Path, data: Path, questions: Path, methods, max_new_tokens: int,
                         max_length: int, loss_examples: int, tree: str = "auto") -> dict:
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


def ablation(out: Path, cfg: Ablation = Ablation(), base_model: str | None = None) -> dict:
    """Trains one model per noise-spans setting (0 = plain SFT), evaluates every ``eval_every``
    steps, times the TR-Jacobi trees on the last MSN model, and writes ``ablation.json``.
    Finished stages are skipped, so a rerun continues."""
    out.mkdir(parents=True, exist_ok=True)
    base, data, questions = _prepare(out, cfg.prompts, base_model)
    tokens_per_step = None
    rows = []

    def record(name, spans, step, entry):
        rows.append({"run": name, "noise_spans": spans, "steps": step,
                     "train_tokens": None if tokens_per_step is None else round(tokens_per_step * step), **entry})
        (out / "ablation.json").write_text(json.dumps({"rows": rows, "config": asdict(cfg)}, indent=2) + "\n")
        (out / "ablation.md").write_text(ablation_table(rows))
        ablation_plot(rows, out / "ablation.png")

    for spans in cfg.spans:
        name = "sft" if spans == 0 else f"msn-spans{spans}"
        target = out / name
        noise = ["--no-noise"] if spans == 0 else ["--noise-len", cfg.noise_len, "--noise-spans", spans]
        _train(target, base, data, cfg.steps, cfg.batch_size, cfg.max_length, cfg.lr, cfg.eval_every, *noise,
               "--save-total-limit", cfg.steps // cfg.eval_every + 1)
        stats = json.loads((target / "msn_config.json").read_text())["summary"]["noise_stats"]
        if stats.get("samples"):
            tokens_per_step = stats["tokens"] / stats["samples"] * cfg.batch_size
        for step in range(cfg.eval_every, cfg.steps + 1, cfg.eval_every):
            final = step == cfg.steps
            path = target if final else target / f"checkpoint-{step}"
            entry = _evaluate_checkpoint(str(path), target / f"eval-{step}", data, questions,
                                         cfg.final_methods if final else cfg.methods, cfg.max_new_tokens,
                                         cfg.max_length, cfg.loss_examples)
            record(name, spans, step, entry)
    record("base", None, 0, _evaluate_checkpoint(base, out / "base", data, questions, cfg.final_methods,
                                                 cfg.max_new_tokens, cfg.max_length, cfg.loss_examples))
    msn_runs = [s for s in cfg.spans if s]
    if msn_runs and cfg.trees:
        target = out / f"msn-spans{msn_runs[0]}"
        for tree in cfg.trees:
            entry = _evaluate_checkpoint(str(target), target / f"tree-{tree}", data, questions, ("ar", "tr-jacobi"),
                                         cfg.max_new_tokens, cfg.max_length, 0, tree=tree)
            record(f"msn-spans{msn_runs[0]} tree={tree}", msn_runs[0], cfg.steps, entry)
    summary = _ablation_summary(rows, cfg)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"rows": rows, "config": asdict(cfg), "summary": summary}


def _ablation_summary(rows: list[dict], cfg: Ablation) -> dict:
    """``{"models": {"base", "sft", "msn"}}`` from the ablation: the final checkpoints, with ``msn`` the
    noise setting whose Jacobi and TR-Jacobi acceptance is highest (HumanEval is not run here)."""
    def pick(row):
        return {"held_out_loss": row["held_out_loss"], "humaneval_pass1": None, "methods": row["methods"],
                "steps": row["steps"], "train_tokens": row["train_tokens"], "noise_spans": row["noise_spans"]}

    final = {r["run"]: r for r in rows if r["steps"] == cfg.steps and "tree=" not in r["run"]}
    models = {"base": pick(r) for r in rows if r["run"] == "base"}
    if "sft" in final:
        models["sft"] = pick(final["sft"])
    msn = [r for name, r in final.items() if name.startswith("msn-")]
    if msn:
        best = max(msn, key=lambda r: sum(r["methods"][m]["mean_accepted_tokens"] for m in ("jacobi", "tr-jacobi")
                                          if m in r["methods"]))
        models["msn"] = pick(best)
    return {"models": models, "config": {**asdict(cfg), "selection": "msn = the noise setting with the highest "
                                         "jacobi + tr-jacobi acceptance at the last step"}}


def ablation_table(rows: list[dict]) -> str:
    """The ablation rows as a Markdown table: mean accepted tokens (speedup over ``ar``) per method."""
    methods = list(dict.fromkeys(m for r in rows for m in r["methods"] if m != "ar"))
    head = ["run", "noise spans", "steps", "train tokens", "held-out loss", *methods, "match"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], "-" if not r["noise_spans"] else str(r["noise_spans"]), str(r["steps"]),
                 f"{r['train_tokens']:,}" if r["train_tokens"] else "0",
                 "-" if r["held_out_loss"] is None else f"{r['held_out_loss']:.3f}"]
        for m in methods:
            v = r["methods"].get(m)
            cells.append(f"{v['mean_accepted_tokens']:.2f} ({v['speedup']:.2f}x)" if v else "")
        cells.append(f"{min(v['match_rate'] for v in r['methods'].values()):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nCells: mean accepted tokens per step (wall-clock speedup over ar).\n"


def ablation_plot(rows: list[dict], path: Path) -> None:
    """Mean accepted tokens against training tokens, one line per run and decoder (base at 0 tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["run"] == "base"), None)
    runs = list(dict.fromkeys(r["run"] for r in rows if r["steps"] and "tree=" not in r["run"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, method in zip(axes, ("jacobi", "tr-jacobi")):
        for name in runs:
            points = [(0, base["methods"][method]["mean_accepted_tokens"])] if base else []
            points += [(r["train_tokens"], r["methods"][method]["mean_accepted_tokens"]) for r in rows
                       if r["run"] == name and method in r["methods"]]
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set_title(method)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("mean accepted tokens per step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
