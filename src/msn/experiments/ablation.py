"""``msn reproduce --preset ablation``: noise spans x training tokens, and the TR-Jacobi
trees timed, to see which MSN setting shows the effect on a given budget."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from msn.experiments.stages import evaluate_checkpoint, prepare, train_stage, variant_noise


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


def ablation(out: Path, cfg: Ablation = Ablation(), base_model: str | None = None) -> dict:
    """Trains one model per noise-spans setting (0 = plain SFT), evaluates every ``eval_every``
    steps, times the TR-Jacobi trees on the last MSN model, and writes ``ablation.json``.
    Finished stages are skipped, so a rerun continues."""
    out.mkdir(parents=True, exist_ok=True)
    base, data, questions = prepare(out, cfg.prompts, base_model)
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
        noise = variant_noise(spans, cfg.noise_len)
        train_stage(target, base, data, noise, steps=cfg.steps, batch_size=cfg.batch_size,
                    max_length=cfg.max_length, lr=cfg.lr, save_steps=cfg.eval_every,
                    save_total_limit=cfg.steps // cfg.eval_every + 1)
        stats = json.loads((target / "msn_config.json").read_text())["summary"]["noise_stats"]
        if stats.get("samples_collated"):
            tokens_per_step = stats["tokens"] / stats["samples_collated"] * cfg.batch_size
        for step in range(cfg.eval_every, cfg.steps + 1, cfg.eval_every):
            final = step == cfg.steps
            path = target if final else target / f"checkpoint-{step}"
            # Evaluations go beside the model, never into its folder (a bench refuses that).
            entry = evaluate_checkpoint(str(path), out / "evals" / name / f"eval-{step}", data, questions,
                                         cfg.final_methods if final else cfg.methods, cfg.max_new_tokens,
                                         cfg.max_length, cfg.loss_examples)
            record(name, spans, step, entry)
    record("base", None, 0, evaluate_checkpoint(base, out / "base", data, questions, cfg.final_methods,
                                                 cfg.max_new_tokens, cfg.max_length, cfg.loss_examples))
    msn_runs = [s for s in cfg.spans if s]
    if msn_runs and cfg.trees:
        target = out / f"msn-spans{msn_runs[0]}"
        for tree in cfg.trees:
            entry = evaluate_checkpoint(str(target), out / "evals" / target.name / f"tree-{tree}", data, questions,
                                         ("ar", "tr-jacobi"),
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
