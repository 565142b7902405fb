"""``msn reproduce --preset {cpu,pilot,gpu,smoke}``: MSN versus plain SFT on SmolLM2-135M-Instruct
with the stdlib code set, quality included.

Stages, each skipped when its output exists (so an interrupted run continues):

1. the base model (fetched, a checkpoint folder, or converted from a carried GGUF file)
   and the data (built here, or a carried ``--data`` folder);
2. fine-tuning of every variant with identical data, settings and seed: plain SFT and
   MSN with one or more noise settings (on a GPU all at once, in separate processes);
3. where the preset gives an adapter budget, a LoRA adapter of every MSN variant
   (``msn export-lora`` at the largest rank that fits the budget), in ``NAME-lora/``;
4. evaluation of the base model, every variant and every adapter merged into the base (on a
   GPU all at once): held-out response loss on clean inputs, HumanEval pass@1 by batched
   greedy ``model.generate`` (not for adapters), and the mean accepted tokens per step of
   every decoder on held-out prompts, with each output checked against ``ar``'s;
5. wall-clock speedups of the best MSN model, timed alone, against ``ar`` and
   ``model.generate`` (``msn bench``);
6. ``results.json``, ``results.md`` and ``acceptance.png``, written after the evaluation and
   again after the timing; the best MSN model's adapter gets its model card (``README.md``)
   and the prompts it was measured on (``prompts.jsonl``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from msn.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, REPORT
from msn.adapter_export import export_lora
from msn.errors import MsnError
from msn.experiments.stages import prepare, resolved_alpha, train_stage, variant_noise
from msn.noise import DEFAULT_NOISE_SPANS

log = logging.getLogger("msn.experiments")

# Acceptance rows: name -> (decoder, options). The trees are fixed so acceptance does not
# depend on the hardware; "tree-noret" is the tree with its retrieval chain filled by noise;
# "tr-jacobi" is the paper's (its draft sources exactly).
ACCEPT_METHODS = {
    "ar": ("ar", {}),
    "jacobi": ("jacobi", {}),
    "tree-noret": ("tr-jacobi", {"tree": "reference", "retrieve": False}),
    "tr-jacobi": ("tr-jacobi", {"tree": "reference", "drafts": "paper"}),
    "pld": ("pld", {}),
    "lookahead": ("lookahead", {}),
    # Recycled candidates: the anchor, and TR-Jacobi at the reference size with merged drafts.
    "recycle": ("recycle", {}),
    "tr-jacobi-merged": ("tr-jacobi", {"tree": "reference", "drafts": "merged"}),
    # msn's default decoder as a user gets it: one request at a time, the tree sized by this
    # machine's measured step latency (cached per model and machine), merged drafts.
    "default": ("tr-jacobi", {}),
}
# Rows decoded one prompt at a time by the single-request decoder, as ``msn generate`` runs a
# request: a batch sizes the automatic tree for all its rows at once and keeps a wide step only
# while its wall-clock throughput beats a one-input step's, so its choice follows the machine's
# load; a single request's follows the stored latency ladder and the scored steps, so reruns agree.
ONE_AT_A_TIME = ("default",)
# Rows scored on the code requests in a user's own words (``msn.bench.prompts.CODE_REQUESTS``).
OWN_WORDS_METHODS = ("ar", "tree-noret", "tr-jacobi", "default")
# Rows that draft from the model's recycled candidate table: each starts it empty.
RECYCLING = ("recycle", "tr-jacobi-merged", "default")


@dataclass
class Preset:
    """Sizes of one reproduction run.

    Attributes:
        steps / batch_size / grad_accum / max_length / lr / warmup: training of every variant
            (cosine schedule; warmup in steps if >= 1, else a fraction of the steps).
        variants: (name, noise spans per sample) of each fine-tuned model; 0 spans is plain SFT.
        noise_len: MSN span length L.
        parallel: train the variants at once and evaluate the models at once, one process each
            (one GPU has room for all; on a CPU they would only share the cores).
        heldout_loss_examples: held-out examples scored for loss.
        accept_prompts / accept_stride: held-out prompts decoded for acceptance (every
            ``accept_stride``-th held-out record); accept_tokens: new tokens per prompt;
            accept_methods: rows of ``ACCEPT_METHODS``; accept_batch: prompts decoded per batch.
        humaneval_limit: HumanEval problems (None: all 164); humaneval_tokens: per answer;
            humaneval_batch: answers generated per batch.
        timing_prompts / timing_tokens / timing_methods: the best MSN model timed alone.
        lora_r / lora_alpha: every variant trains a LoRA adapter of rank ``lora_r`` (0: all
            weights; alpha 0 means 2 x rank), saved merged into a full model.
        precision: training precision (evaluation is always float32, so every decoder's
            output can be checked against ``ar``'s token for token).
        adapter_mib: size budget of each MSN variant's LoRA adapter (0: none).
        data: ``human`` trains on the stdlib code set's own responses; ``self`` on the base
            model's greedy answers to ``distill_prompts`` of its prompts (a seeded sample;
            ``msn.data.distill``; answers longer than ``distill_tokens`` are left out).
        distill_keep_cut: keep the answers cut at ``distill_tokens`` too (test presets: a random
            model rarely ends its answer).
        distill_requests: with ``self`` data, the base model's answers to this many more of the
            stdlib prompts, asked in a user's words (``msn.data.stdlib_code.write_requests``: "Write a
            Python function that returns ..."; prompts outside the ``distill_prompts`` sample) join
            the training set: what decoding meets is the model's answers to such requests.
        curve: evaluate the checkpoints at these fractions of the steps as well (the learning
            curve); each fraction times ``steps`` must be a multiple of steps / len(curve) + 1.
        humaneval_base: HumanEval of the base model too.
        own_words: acceptance on the code requests in a user's own words as well.
    """

    steps: int = 150
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 384
    lr: float = 5e-5
    warmup: float = 0.03
    variants: tuple[tuple[str, int], ...] = (("sft", 0), ("msn", DEFAULT_NOISE_SPANS))
    noise_len: int = 5
    parallel: bool = False
    heldout_loss_examples: int = 300
    accept_prompts: int = 20
    accept_stride: int = 1
    accept_tokens: int = 128
    accept_methods: tuple[str, ...] = ("ar", "jacobi", "tree-noret", "tr-jacobi", "pld")
    accept_batch: int = 4
    humaneval_limit: int | None = None
    humaneval_tokens: int = 320
    humaneval_batch: int = 8
    timing_prompts: int = 5
    timing_tokens: int = 128
    timing_methods: tuple[str, ...] = ("ar", "hf-generate", "pld", "tr-jacobi")
    precision: str = "fp32"
    lora_r: int = 0
    lora_alpha: int = 0
    adapter_mib: float = 0.0
    data: str = "human"
    distill_prompts: int = 600
    distill_tokens: int = 320
    distill_batch: int = 16
    distill_keep_cut: bool = False
    distill_requests: int = 0
    curve: tuple[float, ...] = ()
    humaneval_base: bool = True
    own_words: bool = False

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.variants]

    @property
    def adapters(self) -> list[str]:
        """The adapter model of every MSN variant, when the preset makes adapters."""
        return [f"{name}{LORA}" for name, spans in self.variants if spans and self.adapter_mib > 0]

    @property
    def curve_steps(self) -> list[int]:
        """The training steps of the learning curve's earlier points (the last is ``steps``)."""
        return sorted({round(f * self.steps) for f in self.curve if 0 < round(f * self.steps) < self.steps})

    @property
    def save_steps(self) -> int:
        """Checkpoint interval: every curve point is a checkpoint."""
        import math

        return math.gcd(self.steps, *self.curve_steps) if self.curve_steps else max(self.steps // 3, 1)

    @property
    def checkpoints(self) -> list[str]:
        """The learning curve's checkpoint models, named VARIANT@STEP."""
        return [f"{name}{AT}{k}" for name in self.names for k in self.curve_steps]


LORA = "-lora"    # an adapter model's name: its variant's, with this suffix
AT = "@"          # a checkpoint model's name: its variant's, this, and its step


CPU_NOISE_SPANS = 8     # the cpu preset's: more denoising signal per sample in a short run
CPU_LORA_RANK = 24      # the cpu preset's adapters: faster steps than full weights, the same acceptance
CPU_LORA_LR = 1e-3
DISTILL_SEED = 42       # the seeded samples of prompts a preset self-distills
GPU_VARIANTS = (("sft", 0), ("msn-1span", 1), (f"msn-{DEFAULT_NOISE_SPANS}spans", DEFAULT_NOISE_SPANS))

PRESETS = {
    # About 1.5 hours on a 2-core CPU: plain SFT and MSN on the base's own answers to 600 training
    # prompts (self-distilled), 120 steps of 4, evaluated at 60 and 120 steps, both as LoRA adapters
    # of rank 24 (saved merged). MSN with 8 spans (docs/results/cpu-levers.md): more noise and LoRA
    # at lr 1e-3 raised its acceptance the most without the quality cost of full fine-tuning at a
    # high rate (full weights at lr 3e-4 cut plain SFT's HumanEval from 6.1 % to 1.2 %).
    "cpu": Preset(steps=120, lr=CPU_LORA_LR, warmup=0, data="self", curve=(0.5,), heldout_loss_examples=100,
                  variants=(("sft", 0), ("msn", CPU_NOISE_SPANS)), lora_r=CPU_LORA_RANK,
                  accept_prompts=10, accept_stride=50, accept_tokens=128, accept_batch=10,
                  accept_methods=("ar", "jacobi", "tree-noret", "tr-jacobi", "default", "pld"),
                  humaneval_tokens=320, humaneval_batch=16, humaneval_base=False, own_words=True,
                  timing_prompts=5, timing_tokens=128, timing_methods=("ar", "hf-generate", "pld", "tr-jacobi"),
                  adapter_mib=16),
    # Under an hour on a 2-core CPU: a first look, not the claim.
    "pilot": Preset(steps=60, heldout_loss_examples=100, accept_prompts=8, humaneval_limit=20,
                    humaneval_tokens=256, timing_prompts=3),
    # One H100/H200, under 9 minutes with the model and data carried: the settings of the
    # reference run (docs/results/smollm2-code-gpu.md), ~3 epochs of the stdlib code set.
    "gpu": Preset(steps=430, batch_size=32, max_length=512, lr=1e-4, warmup=20, variants=GPU_VARIANTS,
                  parallel=True, accept_prompts=10, accept_stride=50, accept_tokens=200, accept_batch=10,
                  accept_methods=("ar", "jacobi", "tree-noret", "tr-jacobi", "pld", "recycle", "tr-jacobi-merged"),
                  humaneval_tokens=384, humaneval_batch=164, timing_prompts=4, timing_tokens=128,
                  timing_methods=("ar", "hf-generate", "pld", "tr-jacobi"), precision="bf16", adapter_mib=32),
    # Minutes on a tiny model: the gpu preset's pipeline (parallel stages included), not the method.
    "smoke": Preset(steps=2, batch_size=2, max_length=128, warmup=0, variants=GPU_VARIANTS, parallel=True,
                    heldout_loss_examples=4, accept_prompts=2, accept_tokens=8, humaneval_limit=2,
                    humaneval_tokens=16, humaneval_batch=2, timing_prompts=1, timing_tokens=8,
                    timing_methods=("ar", "hf-generate", "tr-jacobi"), adapter_mib=2),
    # Minutes on a tiny model: the cpu preset's pipeline (self-distilled data, learning curve,
    # requests in a user's own words), not the method.
    "cpu-smoke": Preset(steps=4, batch_size=2, max_length=128, warmup=0, data="self", distill_prompts=40,
                        distill_tokens=8, distill_batch=4, distill_keep_cut=True, curve=(0.5,), heldout_loss_examples=4, accept_prompts=2,
                        accept_tokens=8, accept_batch=2, humaneval_limit=2, humaneval_tokens=16, humaneval_batch=2,
                        humaneval_base=False, own_words=True, timing_prompts=1, timing_tokens=8,
                        timing_methods=("ar", "tr-jacobi"), adapter_mib=2, lora_r=4),
}


REQUESTS = "requests-self"   # the base model's answers to stdlib prompts asked in a user's words


def _with_requests(out: Path, base: str, data_dir: Path, preset: Preset) -> Path:
    """The training set of a preset with ``distill_requests``: the self-distilled stdlib answers
    (``data-self``) and the base model's answers to ``distill_requests`` stdlib prompts outside
    that sample asked in a user's words (``requests`` -> ``requests-self``), in ``data-train``.
    Each part is made once; an interrupted run continues."""
    from msn.data.distill import select, self_distill
    from msn.data.records import jsonl_lines, write_jsonl
    from msn.data.stdlib_code import write_requests

    asked, mixed = out / "requests", out / "data-train"
    if not (asked / "train.jsonl").exists():
        records = [rec for _, rec in jsonl_lines(data_dir / "train.jsonl")]
        write_requests(records, asked, set(select(records, preset.distill_prompts, DISTILL_SEED)))
    self_distill(base, asked, out / REQUESTS, limit=preset.distill_requests, max_new_tokens=preset.distill_tokens,
                 batch_size=preset.distill_batch, seed=DISTILL_SEED, keep_unfinished=preset.distill_keep_cut)
    if not (mixed / "train.jsonl").exists():
        mixed.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "data-self" / "heldout.jsonl", mixed / "heldout.jsonl")
        write_jsonl(mixed / "train.jsonl", (rec for part in ("data-self", REQUESTS)
                                            for _, rec in jsonl_lines(out / part / "train.jsonl")))
    return mixed


def _train_one(target: str, base: str, data: str, spans: int, preset: Preset, log_file: str | None) -> None:
    """One variant's fine-tuning (run in a child process when the preset is parallel)."""
    if log_file:
        _child(log_file)
    train_stage(Path(target), base, Path(data), variant_noise(spans, preset.noise_len), steps=preset.steps,
                batch_size=preset.batch_size, max_length=preset.max_length, lr=preset.lr,
                save_steps=preset.save_steps, grad_accum=preset.grad_accum, precision=preset.precision,
                warmup=preset.warmup, save_total_limit=0 if preset.curve_steps else None, lora_r=preset.lora_r,
                lora_alpha=preset.lora_alpha)


def _child(path: str) -> None:
    """Set-up of a child process: output to ``path``; on a CPU one thread, so the children
    share the cores instead of fighting over them."""
    import sys

    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    f = open(path, "a", buffering=1, encoding="utf-8")
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    sys.stdout = sys.stderr = f


def _run_all(jobs: list[tuple[str, tuple]], target, what: str, log_dir: Path, parallel: bool) -> None:
    """Runs ``target(*args, log_file)`` for every (name, args): in this process one after
    another (``log_file`` None), or with ``parallel`` and several jobs all at once, one
    spawned process each (CUDA needs spawn), logging to ``log_dir``; a failure names its log."""
    import multiprocessing as mp

    from tqdm import tqdm

    if not parallel or len(jobs) < 2:
        for _, args in jobs:
            target(*args, None)
        return
    ctx = mp.get_context("spawn")
    procs = []
    for name, args in jobs:
        log_file = str(log_dir / f"{what}-{name}.log")
        p = ctx.Process(target=target, args=(*args, log_file), name=f"{what}-{name}")
        p.start()
        procs.append((name, p, log_file))
    print(f"{what}: {', '.join(n for n, *_ in procs)} at once; logs in {log_dir}/{what}-*.log", flush=True)
    try:
        with tqdm(total=len(procs), desc=what, unit="run") as bar:
            for name, p, log_file in procs:
                p.join()
                bar.update()
                if p.exitcode != 0:
                    raise MsnError(f"{what} of {name} failed (exit {p.exitcode}); see {log_file}")
    finally:
        for _, p, _ in procs:
            if p.is_alive():
                p.terminate()
                p.join()


def _evaluate_one(path: str, result_file: str, data: str, questions: str, preset: Preset, humaneval: bool,
                  own_words: str | None, log_file: str | None) -> None:
    """Held-out loss, HumanEval (with ``humaneval``), acceptance of one model (a checkpoint or an
    adapter folder, merged) and, with ``own_words`` (a question file), its acceptance on those
    requests, written to ``result_file``."""
    from msn.data.records import ensure_chat_template
    from msn.evaluate import heldout_loss, humaneval_pass1
    from msn.loading import load_for_inference

    if log_file:
        _child(log_file)
    progress = log_file is None
    t = time.time()
    model, tok = load_for_inference(path, dtype="float32")
    ensure_chat_template(tok)
    loss = heldout_loss(model, tok, str(Path(data) / "heldout.jsonl"), preset.max_length,
                        batch_size=preset.batch_size, limit=preset.heldout_loss_examples, progress=progress) \
        if preset.heldout_loss_examples else None
    t_loss = time.time()
    partial = Path(result_file).with_suffix(".humaneval-answers.jsonl")   # kept while it runs: a rerun continues
    he = humaneval_pass1(model, tok, max_new_tokens=preset.humaneval_tokens, limit=preset.humaneval_limit,
                         batch_size=preset.humaneval_batch, progress=progress, answers_file=partial) if humaneval else \
        {"pass1": None, "problems": 0, "results": []}
    t_he = time.time()
    accept = acceptance(model, tok, Path(questions), preset.accept_methods, preset.accept_tokens, preset.accept_batch,
                        progress=progress)
    t_acc = time.time()
    own = acceptance(model, tok, Path(own_words), OWN_WORDS_METHODS, preset.accept_tokens, preset.accept_batch,
                     progress=progress, per_prompt=True) if own_words else None
    entry = {"path": path, "held_out_loss": loss, "humaneval_pass1": he["pass1"], "humaneval_problems": he["problems"],
             "accept": accept, **({"accept_own_words": own} if own is not None else {}),
             "seconds": {"loss": t_loss - t, "humaneval": t_he - t_loss, "accept": t_acc - t_he,
                         "own_words": time.time() - t_acc}}
    if humaneval:
        Path(result_file).with_suffix(".humaneval.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in he["results"]))
    _save(Path(result_file), entry)
    partial.unlink(missing_ok=True)


def acceptance(model, tokenizer, questions: Path, methods, max_new_tokens: int, batch: int,
               progress: bool = True, per_prompt: bool = False) -> dict:
    """Mean accepted tokens per step of each decoder (``ACCEPT_METHODS`` rows) on the
    questions' first turns, decoded in batches (``ONE_AT_A_TIME`` rows one request per call);
    match_rate is the share of outputs identical to ``ar``'s. ``per_prompt`` adds each
    prompt's tokens per step and match."""
    import msn
    from msn.data.records import encode_prompt
    from msn.evaluate import repeated_line_share
    from tqdm import tqdm

    unknown = sorted(set(methods) - set(ACCEPT_METHODS))
    if unknown:
        raise MsnError(f"unknown acceptance method(s) {', '.join(unknown)}; known: {', '.join(ACCEPT_METHODS)}")
    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": json.loads(line)["turns"][0]}], device)
               for line in questions.read_text().splitlines() if line.strip()]
    order = ["ar"] + [m for m in methods if m != "ar"]
    outputs: dict[str, list] = {}
    for name in tqdm(order, desc="acceptance", disable=not progress):
        method, options = ACCEPT_METHODS[name]
        if name in RECYCLING:
            from msn.decoding.autotree import forget_outcomes
            from msn.decoding.recycle import reset_tables

            reset_tables(model)        # cold: no row learns from another row's pass over these prompts,
            forget_outcomes(model)     # nor from an earlier run's (kept on disk)
        if name in ONE_AT_A_TIME:
            outputs[name] = [msn.generate(model, p, method=method, max_new_tokens=max_new_tokens, **options)
                             for p in prompts]
        else:
            outputs[name] = msn.generate(model, prompts, method=method, max_new_tokens=max_new_tokens,
                                         max_batch=batch, **options)
    table = {}
    for name in order:
        rs = outputs[name]
        steps = sum(r.steps for r in rs)
        kept = sum(sum(r.accept_lengths) for r in rs)
        table[name] = {"mean_accepted_tokens": kept / steps if steps else 0.0, "steps": steps,
                       "tokens": sum(len(r.tokens) for r in rs), "prompts": len(rs),
                       "match_rate": sum(r.tokens == a.tokens for r, a in zip(rs, outputs["ar"])) / len(rs)}
        if per_prompt:
            table[name]["per_prompt"] = [{"tokens": len(r.tokens), "steps": r.steps,
                                          "mean_accepted_tokens": sum(r.accept_lengths) / r.steps if r.steps else 0.0,
                                          "identical": r.tokens == a.tokens} for r, a in zip(rs, outputs["ar"])]
    # What every decoder reproduces, checked for loops: tokens per step on looping text overstate MSN.
    table["ar"]["repeated_lines"] = repeated_line_share(
        [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in outputs["ar"]])
    return table


def run(preset_name: str, out: Path, models: tuple[str, ...] | None = None, spans: int | None = None,
        base_model: str | None = None, data: str | None = None, steps: int | None = None,
        requests: int | None = None) -> dict:
    """Runs (or continues) a reproduction into ``out``; returns the results dict. ``steps``
    overrides the preset's training steps (the learning curve keeps its fractions); ``requests``
    its ``distill_requests`` (a preset that trains on self-distilled data only)."""
    import torch

    preset = PRESETS[preset_name]
    if spans is not None:      # one MSN variant with that noise, named after it
        if spans < 1:
            raise MsnError(f"noise spans must be positive, got {spans}")
        preset = replace(preset, variants=(("sft", 0), (f"msn-{spans}span" + "s" * (spans > 1), spans)))
    if steps is not None:
        if steps < 1:
            raise MsnError(f"--steps must be positive, got {steps}")
        preset = replace(preset, steps=steps)
    if requests is not None:
        if requests < 0:
            raise MsnError(f"--requests must be 0 or more, got {requests}")
        if requests and preset.data != "self":
            raise MsnError(f"--requests: the {preset_name} preset trains on human-written responses; it applies "
                           "to presets that train on the base model's own answers (cpu, cpu-smoke)")
        preset = replace(preset, distill_requests=requests)
    from msn.experiments.stages import check_data
    from msn.paths import check_apart

    if data is not None:
        check_data(data)
    check_apart(out, "--out", {"--base-model": base_model, "--data": data})
    _same_settings(out, preset_name, preset)
    known = ["base", *preset.names, *preset.adapters, *preset.checkpoints]     # the order of evaluation
    models = tuple(models or known)
    unknown = sorted(set(models) - set(known))
    if unknown:
        raise MsnError(f"--models: unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    missing = sorted({m.removesuffix(LORA) for m in models if m.endswith(LORA)} - set(models))
    if missing:
        raise MsnError(f"--models: an adapter needs its model: add {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    times = _load(out / "times.json")
    t_all = time.time()
    t = time.time()
    base, data_dir, questions = prepare(out, preset.accept_prompts, base_model, data, stride=preset.accept_stride)
    times.setdefault("setup_s", round(time.time() - t, 1))
    train_dir = data_dir
    if preset.data == "self":
        from msn.data.distill import self_distill

        t = time.time()
        train_dir = out / "data-self"
        fresh = not (train_dir / "info.json").exists()
        self_distill(base, data_dir, train_dir, limit=preset.distill_prompts, max_new_tokens=preset.distill_tokens,
                     batch_size=preset.distill_batch, seed=DISTILL_SEED, keep_unfinished=preset.distill_keep_cut)
        if preset.distill_requests:
            fresh = fresh or not (out / REQUESTS / "info.json").exists()
            train_dir = _with_requests(out, base, data_dir, preset)
        if fresh:
            times["distill_s"] = round(time.time() - t + times.get("distill_s", 0), 1)
        _save(out / "times.json", times)
    own_words = None
    if preset.own_words:
        from msn.bench.prompts import CODE_REQUESTS, write_questions

        own_words = write_questions(out / "own_words_questions.jsonl", CODE_REQUESTS, "code-request")
    paths = {"base": str(base), **{n: str(out / n) for n in [*preset.names, *preset.adapters]},
             **{n: str(out / n.split(AT)[0] / f"checkpoint-{n.split(AT)[1]}") for n in preset.checkpoints}}

    to_train = [(n, s) for n, s in preset.variants
                if (n in models or any(m.split(AT)[0] == n for m in models))
                and not (out / n / "msn_config.json").exists()]
    if preset.parallel and len(to_train) > 1:
        t = time.time()
        _run_all([(n, (paths[n], str(base), str(train_dir), s, preset)) for n, s in to_train], _train_one, "train",
                 out, True)
        times["train_s"] = round(time.time() - t, 1)
    else:
        for n, s in to_train:       # one after another, each variant's time its own
            t = time.time()
            try:
                _train_one(paths[n], str(base), str(train_dir), s, preset, None)
            finally:                # a run cut short still counts the minutes it trained
                times[f"train_{n}_s"] = round(time.time() - t + times.get(f"train_{n}_s", 0), 1)
                _save(out / "times.json", times)
    _save(out / "times.json", times)

    to_export = [n for n in models if n.endswith(LORA) and not (out / n / REPORT).exists()]
    t = time.time()
    for n in to_export:
        export_lora(base, paths[n.removesuffix(LORA)], paths[n], budget_mib=preset.adapter_mib,
                    log=lambda m: print(m, flush=True))
    if to_export:
        times["export_s"] = round(time.time() - t, 1)

    spans_of = dict(preset.variants)

    def load_entries() -> dict:
        """The evaluations finished so far, with what the run knows of each model."""
        return {n: _entry(n) for n in models if (out / f"eval_{n}.json").exists()}

    def _entry(n: str) -> dict:
        e = json.loads((out / f"eval_{n}.json").read_text())
        he_file = out / f"eval_{n}.humaneval.jsonl"
        if e.get("humaneval_pass1") is not None and he_file.exists():
            e["humaneval_passed"] = [json.loads(line)["passed"] for line in he_file.read_text().splitlines() if line]
        e["noise_spans"] = spans_of.get(n.removesuffix(LORA).split(AT)[0])
        if AT in n or n in preset.names:
            e["train_step"] = int(n.split(AT)[1]) if AT in n else preset.steps
            e["train_samples"] = e["train_step"] * preset.batch_size * preset.grad_accum
            spent = times.get(f"train_{n.split(AT)[0]}_s")
            e["train_minutes"] = None if spent is None else round(spent / 60 * e["train_step"] / preset.steps, 1)
        if n.endswith(LORA):
            e["adapter"] = {k: v for k, v in json.loads((out / n / REPORT).read_text()).items() if k != "per_layer"}
        return e

    def write(timing, entries) -> dict:
        times["this_call_s"] = round(time.time() - t_all, 1)
        _save(out / "times.json", times)
        results = {"config": {"preset": preset_name, **asdict(preset), "torch": torch.__version__,
                              "device": _device_name(), "default_noise_spans": DEFAULT_NOISE_SPANS},
                   "times": times, "models": entries, "timing": timing, "claim": claim(entries, preset),
                   "adapter": shipped_adapter(entries)}
        _save(out / "results.json", results)
        (out / "results.md").write_text(results_markdown(results))
        acceptance_plot(entries, out / "acceptance.png")
        if preset.curve_steps:
            curve_plot(entries, preset, out / "curve.png")
        if results["adapter"]:
            folder = Path(paths[results["adapter"]["model"]])
            shutil.copy(questions, folder / "prompts.jsonl")
            (folder / "README.md").write_text(model_card(results))
        return results

    to_eval = [n for n in models if not (out / f"eval_{n}.json").exists()]
    final = lambda n: n in preset.names or n == "base"  # noqa: E731  (not a checkpoint, not an adapter)
    jobs = [(n, (paths[n], str(out / f"eval_{n}.json"), str(data_dir), str(questions), preset,
                 final(n) and (n != "base" or preset.humaneval_base),
                 str(own_words) if own_words and (final(n) or n.endswith(LORA)) else None)) for n in to_eval]
    if preset.parallel and len(jobs) > 1:
        t = time.time()
        _run_all(jobs, _evaluate_one, "eval", out, True)
        times["eval_s"] = round(time.time() - t, 1)
    else:
        for job in jobs:        # one after another, the results written after each
            t = time.time()
            try:
                _run_all([job], _evaluate_one, "eval", out, False)
            finally:
                times["eval_s"] = round(time.time() - t + times.get("eval_s", 0), 1)
            write(None, load_entries())
    _save(out / "times.json", times)
    entries = load_entries()
    results = write(None, entries)       # what the evaluation measured, kept even if the timing is cut short
    msn_models = [n for n in models if spans_of.get(n) and n in preset.names]
    if msn_models and preset.timing_prompts:
        best = _best(entries, msn_models)
        if best + LORA in entries:      # what ships is the adapter: time that
            best += LORA
        t = time.time()
        timing = time_alone(best, paths[best], out / "timing", questions, preset)
        times.setdefault("timing_s", round(time.time() - t, 1))
        results = write(timing, entries)
    print(json.dumps({"out": str(out), "times": times, "claim": results["claim"]}))
    return results


def _same_settings(out: Path, preset_name: str, preset: Preset) -> None:
    """Records the run's settings in ``out/settings.json``; a rerun with other settings into the
    same folder is refused (its stages would mix models trained and measured differently). A
    setting that a run of an older msn did not record counts as its default (it had no other)."""
    path = out / "settings.json"
    now = json.loads(json.dumps({"preset": preset_name, **asdict(preset)}))
    if path.exists():
        defaults = json.loads(json.dumps(asdict(Preset())))
        before = {**{k: v for k, v in defaults.items() if k in now}, **json.loads(path.read_text())}
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if changed:
            raise MsnError(f"--out {out} holds a run with other settings ({', '.join(changed)}); continue it with "
                           "the same ones, or give another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    _save(path, now)


def _best(entries: dict, names) -> str:
    """The model among ``names`` with the most tr-jacobi tokens per step."""
    return max(names, key=lambda n: entries[n]["accept"].get("tr-jacobi", {}).get("mean_accepted_tokens", 0))


def _trj(entry: dict) -> float | None:
    return entry["accept"].get("tr-jacobi", {}).get("mean_accepted_tokens")


def shipped_adapter(entries: dict) -> dict | None:
    """The adapter of the best MSN model (the one a release ships) against that model and plain
    SFT: the share of MSN's tr-jacobi gain over SFT that the adapter keeps."""
    full = [n for n, e in entries.items() if e.get("noise_spans") and not n.endswith(LORA)
            and n + LORA in entries]
    if not full:
        return None
    best = _best(entries, full)
    lora, model, sft = entries[best + LORA], entries[best], entries.get("sft")
    gain = None
    if sft is not None and None not in (_trj(lora), _trj(model), _trj(sft)) and _trj(model) != _trj(sft):
        gain = (_trj(lora) - _trj(sft)) / (_trj(model) - _trj(sft))
    return {"model": best + LORA, "from": best, **lora["adapter"], "tr_jacobi": _trj(lora),
            "tr_jacobi_full": _trj(model), "tr_jacobi_sft": None if sft is None else _trj(sft),
            "gain_kept": gain, "holds": {"keeps >= 80% of the gain over sft": gain is not None and gain >= 0.8}}


# What comes back from a device machine: at most 8 files of 16 MiB (DEVELOPERS.md).
RETURN_PART_BYTES = 15 * (1 << 20) + (1 << 19)
ADAPTER_FILES = (ADAPTER_CONFIG, "README.md", "prompts.jsonl", REPORT)


def collect(out: Path, dest: Path) -> list[Path]:
    """Copies what a reproduction run must bring back from a machine that returns few, small files:
    ``results.json``, ``results.md`` and the shipped adapter in ``dest/adapter/``, its weights split
    into parts of at most ``RETURN_PART_BYTES`` (``cat`` joins them) and its base named as the known
    model it is (so the folder works on any machine). Returns the files written."""
    from msn.fetch import known_model_of

    results = json.loads((out / "results.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("results.json", "results.md"):
        shutil.copy(out / name, dest / name)
        written.append(dest / name)
    if results.get("adapter"):
        folder, target = out / results["adapter"]["model"], dest / "adapter"
        target.mkdir(exist_ok=True)
        for name in ADAPTER_FILES:
            shutil.copy(folder / name, target / name)
            written.append(target / name)
        config = json.loads((target / ADAPTER_CONFIG).read_text())
        known = known_model_of(config["base_model_name_or_path"])
        if known:
            config["base_model_name_or_path"] = known
            (target / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        weights = folder / ADAPTER_WEIGHTS
        size = weights.stat().st_size
        chunk = -(-size // -(-size // RETURN_PART_BYTES))        # the fewest parts, of equal size
        with open(weights, "rb") as f:
            for i, block in enumerate(iter(lambda: f.read(chunk), b"")):
                part = target / f"{ADAPTER_WEIGHTS}.part{i:02d}"
                part.write_bytes(block)
                written.append(part)
    return written


def model_card(results: dict) -> str:
    """The shipped adapter's README.md: what it is, how it was made, what it measured."""
    from msn.fetch import KNOWN_MODELS, known_model_of

    a, cfg = results["adapter"], results["config"]
    entries = results["models"]
    known = known_model_of(a["base"])
    spec = KNOWN_MODELS.get(known)
    base = spec.hub_id.split("/")[-1] if spec and spec.hub_id else (known or Path(a["base"]).name)
    rows = [n for n in ("base", "sft", a["from"], a["model"]) if n in entries]
    methods = [m for m in ACCEPT_METHODS if any(m in entries[n]["accept"] for n in rows)]
    loss = lambda e: "-" if e["held_out_loss"] is None else f"{e['held_out_loss']:.3f}"  # noqa: E731
    spans = entries[a["from"]].get("noise_spans")
    lines = [
        "---", *([f"base_model: {spec.hub_id}"] if spec and spec.hub_id else []), "library_name: peft",
        "tags: [msn, speculative-decoding, jacobi-decoding, lora]", "---", "",
        f"# {base} fine-tuned with MSN ({a['from']}), as a LoRA adapter", "",
        f"A LoRA adapter over {base} that makes the model verify its own guesses of several future tokens: with "
        "msn's `tr-jacobi` decoder it accepts more tokens per step than the same model after plain fine-tuning, "
        "and its output is exactly its own greedy output. msn loads the folder merged into the base"
        + (f" (`msn fetch` of the shipped copy fetches `{known}` and saves it merged)." if known else "."), "",
        "## How it was made", "",
        f"- `msn reproduce --preset {cfg['preset']}` on {cfg['device']} (torch {cfg['torch']}): "
        + (f"a LoRA adapter of rank {cfg['lora_r']} (alpha {resolved_alpha(cfg['lora_r'], cfg.get('lora_alpha', 0))}, "
           "every linear layer) trained for every variant and merged" if cfg.get("lora_r") else
           "full fine-tuning of every variant")
        + f", with identical data and seed, {cfg['steps']} steps, batch {cfg['batch_size']}, max "
        f"length {cfg['max_length']}, learning rate {cfg['lr']} (cosine), precision {cfg['precision']}.",
        ("- Data: the prompts of the stdlib code set (`msn data stdlib-code`: docstring -> function pairs from the "
         f"Python standard library, PSF licence), {cfg.get('distill_prompts')} of them (seeded sample) answered by "
         "the base model itself with greedy decoding (`msn data self-distill`; answers cut at "
         f"{cfg.get('distill_tokens')} tokens left out)"
         + (f", and {cfg['distill_requests']} more of its prompts asked in a user's words (\"Write a Python "
            "function that returns ...\", `msn.data.stdlib_code.write_requests`) answered the same way"
            if cfg.get("distill_requests") else "")
         + ". Plain SFT on them keeps the model's own output; MSN's "
         "noise teaches it to predict well after a partly wrong recent context on the text it writes."
         if cfg.get("data") == "self" else
         "- Data: the stdlib code set (`msn data stdlib-code`: docstring -> function pairs from the Python "
         "standard library, PSF licence).")
        + f" MSN noise: {spans} span{'s' * (spans != 1)} of {cfg['noise_len']} tokens per sample.",
        f"- Adapter: `msn export-lora` of `{a['from']}` over the base at rank {a['rank']} ({a['dtype']}), "
        f"{a['bytes'] / (1 << 20):.1f} MiB, the largest rank under {cfg['adapter_mib']:g} MiB. It keeps "
        f"{a['kept']['overall']:.1%} of the weight difference (squared Frobenius norm; least in one layer "
        f"{a['kept']['min']:.1%}); norms are stored whole.", "",
        "## Measured (float32, on the held-out prompts in `prompts.jsonl`)", "",
        "Mean accepted tokens per step; every output identical to `ar` of the same model. Repeated lines: "
        "the share of the answers' lines that repeat an earlier line of the same answer (loops, which "
        "drafts verify cheaply).", "",
        "| model | held-out loss | " + " | ".join(methods) + " | repeated lines |",
        "|---|---|" + "---|" * (len(methods) + 1)]
    for n in rows:
        e = entries[n]
        lines.append(f"| {n} | {loss(e)} | "
                     + " | ".join(f"{e['accept'][m]['mean_accepted_tokens']:.2f}" if m in e["accept"] else "-"
                                  for m in methods) + f" | {_repeated(e['accept'])} |")
    if a["gain_kept"] is not None:
        lines += ["", f"The adapter keeps {a['gain_kept']:.0%} of the full model's `tr-jacobi` gain over plain "
                  f"SFT ({a['tr_jacobi']:.2f} tokens per step, against {a['tr_jacobi_full']:.2f} and "
                  f"{a['tr_jacobi_sft']:.2f})."]
    extra = results_markdown(results)
    for head in ("## Learning curve", "## Code requests in a user's own words"):
        if head in extra:
            part = extra[extra.index(head):]
            nxt = part.find("\n## ", 3)
            lines += ["", (part if nxt < 0 else part[:nxt]).rstrip().replace("![learning curve](curve.png)", "")
                      .rstrip()]
    lines += ["", "## Licence", "", f"The base model's: {spec.license if spec else 'see the base model'}. The "
              "training data is derived from the Python standard library (PSF License)."]
    return "\n".join(lines) + "\n"


def time_alone(name: str, path: str, out: Path, questions: Path, preset: Preset) -> dict:
    """Wall-clock speedups of one model alone: ``msn bench`` on the first timing prompts."""
    from msn.bench.harness import BenchConfig, run_bench

    summary = out / "summary.json"
    if not summary.exists():
        rows = questions.read_text().splitlines()[: preset.timing_prompts]
        subset = out / "questions.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        subset.write_text("\n".join(rows) + "\n")
        run_bench(BenchConfig(model=path, out=str(out), bench=str(subset), methods=list(preset.timing_methods),
                              max_new_tokens=preset.timing_tokens, warmup=1, dtype="float32"))
    bench = json.loads(summary.read_text())
    overall = {m: v["overall"] for m, v in bench["methods"].items()}
    hf = overall.get("hf-generate", {}).get("tokens_per_s")
    return {"model": name, "prompts": preset.timing_prompts, "max_new_tokens": preset.timing_tokens,
            "methods": {m: {"tokens_per_s": v["tokens_per_s"], "mean_accepted_tokens": v["mean_accepted_tokens"],
                            "speedup_over_ar": v["speedup"],
                            "speedup_over_hf_generate": v["tokens_per_s"] / hf if hf else None,
                            "match_rate": v["match_rate"]} for m, v in overall.items()}}


def claim(entries: dict, preset: Preset) -> dict | None:
    """MSN with the default noise (else the preset's first MSN variant) against plain SFT:
    the acceptance ratios, the held-out loss change and the HumanEval difference, with the
    thresholds of the claim."""
    msn_variants = [n for n, s in preset.variants if s]
    default = next((n for n, s in preset.variants if s == DEFAULT_NOISE_SPANS), msn_variants[0] if msn_variants else None)
    if default not in entries or "sft" not in entries:
        return None
    m, s = entries[default], entries["sft"]
    ratio = {k: m["accept"][k]["mean_accepted_tokens"] / s["accept"][k]["mean_accepted_tokens"]
             for k in ("tr-jacobi", "tree-noret", "jacobi") if k in m["accept"] and k in s["accept"]}
    loss = (m["held_out_loss"] / s["held_out_loss"] - 1) * 100 if m["held_out_loss"] and s["held_out_loss"] else None
    he = m["humaneval_pass1"] - s["humaneval_pass1"]
    match = min(v["match_rate"] for e in entries.values()
                for v in [*e["accept"].values(), *e.get("accept_own_words", {}).values()])
    return {"msn": default, "acceptance_ratio": ratio, "held_out_loss_change_pct": loss,
            "humaneval_diff_points": he, "humaneval_paired": paired_difference(m.get("humaneval_passed"),
                                                                              s.get("humaneval_passed")),
            "min_match_rate": match,
            "holds": {"tr-jacobi >= 1.2x": ratio.get("tr-jacobi", 0) >= 1.2,
                      "tree-noret >= 1.4x": ratio.get("tree-noret", 0) >= 1.4,
                      "loss at most 3% above sft's": loss is not None and loss <= 3,
                      "humaneval within 2 points": abs(he) <= 2, "match rate 1.0": match == 1.0}}


def paired_difference(a: list[bool] | None, b: list[bool] | None) -> dict | None:
    """Pass@1 of ``a`` minus ``b`` on the same problems, in points, with the standard error of a
    paired difference and the discordant pairs (a only, b only), from which McNemar's test reads."""
    import math

    if not a or not b or len(a) != len(b):
        return None
    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    se = math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0)) / n
    return {"problems": n, "diff_points": 100 * (only_a - only_b) / n, "se_points": 100 * se,
            "only_first": only_a, "only_second": only_b,
            "se_each_points": [100 * math.sqrt(p * (1 - p) / n) for p in (sum(a) / n, sum(b) / n)]}


def curve_rows(entries: dict, preset_names) -> list[tuple[str, dict]]:
    """(variant, entry) of every learning-curve point, the base first as step 0, in step order."""
    rows = [("base", entries["base"])] if "base" in entries else []
    for v in preset_names:
        pts = [e for n, e in entries.items() if n.split(AT)[0] == v and "train_step" in e]
        rows += [(v, e) for e in sorted(pts, key=lambda e: e["train_step"])]
    return rows


def curve_plot(entries: dict, preset: Preset, path: Path) -> None:
    """Held-out loss and tokens per step (tree without retrieval, tr-jacobi) against training
    steps, one line per variant, the base at step 0."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: %s not drawn (results.md has the same figures)", path)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("held-out loss", lambda e: e["held_out_loss"])] + [
        (f"{m}: tokens per step", lambda e, m=m: e["accept"].get(m, {}).get("mean_accepted_tokens"))
        for m in ("tree-noret", "tr-jacobi", "default") if m in preset.accept_methods]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    base = entries.get("base")
    for ax, (title, value) in zip(axes, panels):
        for v in preset.names:
            pts = [(0, base)] if base else []
            pts += [(e["train_step"], e) for _, e in curve_rows(entries, [v]) if e is not base]
            xs = [x for x, e in pts if value(e) is not None]
            ax.plot(xs, [value(e) for x, e in pts if value(e) is not None], marker="o", label=v)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"training steps (x{preset.batch_size * preset.grad_accum} samples)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_markdown(results: dict) -> str:
    entries, cfg = results["models"], results["config"]
    methods = list(dict.fromkeys(k for e in entries.values() for k in e["accept"]))
    head = ["model", "noise spans", "held-out loss", "HumanEval pass@1", *methods, "match", "repeated lines"]
    lines = [f"# msn reproduce --preset {cfg['preset']}", "",
             f"Device: {cfg['device']}; torch {cfg['torch']}. Wall times (s): "
             + ", ".join(f"{k} {v}" for k, v in results["times"].items()) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, e in entries.items():
        loss = "-" if e["held_out_loss"] is None else f"{e['held_out_loss']:.3f}"
        cells = [n, "-" if not e.get("noise_spans") else str(e["noise_spans"]), loss,
                 "-" if e["humaneval_pass1"] is None else f"{e['humaneval_pass1']:.1f} ({e['humaneval_problems']})",
                 *(f"{e['accept'][k]['mean_accepted_tokens']:.2f}" if k in e["accept"] else "" for k in methods),
                 f"{min(v['match_rate'] for v in e['accept'].values()):.2f}", _repeated(e["accept"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Cells under the decoders: mean accepted tokens per step, float32, on {cfg['accept_prompts']} "
              f"held-out prompts ({cfg['accept_tokens']} new tokens; trees fixed: the reference tree, "
              "`tree-noret` without its retrieval chain). match: share of outputs identical to `ar`. "
              "repeated lines: share of the answers' lines (over 3 characters) that repeat an earlier line of "
              "the same answer; drafts verify loops cheaply, so a high share inflates the tokens per step."]
    if results.get("claim"):
        c = results["claim"]
        lines += ["", f"## {c['msn']} against plain SFT", "",
                  "acceptance ratio: " + ", ".join(f"{k} {v:.2f}x" for k, v in c["acceptance_ratio"].items())
                  + (f"; held-out loss {c['held_out_loss_change_pct']:+.1f} %"
                     if c["held_out_loss_change_pct"] is not None else "")
                  + f"; HumanEval {c['humaneval_diff_points']:+.1f} points.", "",
                  *(f"- {k}: {'yes' if v else 'no'}" for k, v in c["holds"].items())]
        hp = c.get("humaneval_paired")
        if hp:
            lines += ["", f"HumanEval, paired on {hp['problems']} problems: {c['msn']} minus sft "
                      f"{hp['diff_points']:+.1f} points (standard error {hp['se_points']:.1f}; solved by "
                      f"{c['msn']} only {hp['only_first']}, by sft only {hp['only_second']}); each model's own "
                      f"pass@1 has a standard error of about {hp['se_each_points'][0]:.1f} points."]
    curve = curve_rows(entries, [n for n in entries if AT not in n and not n.endswith(LORA) and n != "base"])
    if any(AT in n for n in entries):
        cm = [m for m in ("jacobi", "tree-noret", "tr-jacobi", "tr-jacobi-merged", "default", "pld") if m in methods]
        lines += ["", "## Learning curve", "", "The same runs evaluated at their checkpoints (the base is step 0). "
                  "Minutes: training time on this machine up to that step.", "",
                  "| model | step | samples | minutes | held-out loss | " + " | ".join(cm) + " |",
                  "|---|---|---|---|---|" + "---|" * len(cm)]
        for v, e in curve:
            loss = "-" if e["held_out_loss"] is None else f"{e['held_out_loss']:.3f}"
            lines.append(f"| {v} | {e.get('train_step', 0)} | {e.get('train_samples', 0)} | "
                         f"{e.get('train_minutes') if e.get('train_minutes') is not None else '-'} | {loss} | "
                         + " | ".join(f"{e['accept'][m]['mean_accepted_tokens']:.2f}" if m in e["accept"] else "-"
                                      for m in cm) + " |")
        lines += ["", "![learning curve](curve.png)"]
    own = {n: e["accept_own_words"] for n, e in entries.items() if e.get("accept_own_words")}
    if own:
        om = list(dict.fromkeys(k for t in own.values() for k in t))
        lines += ["", "## Code requests in a user's own words", "",
                  "Mean accepted tokens per step on the requests of `msn.bench.prompts.CODE_REQUESTS` (not in the "
                  "training set's prompt format), same decoding; match: outputs identical to `ar`.", "",
                  "| model | " + " | ".join(om) + " | match | repeated lines |", "|---|" + "---|" * (len(om) + 2)]
        for n, t in own.items():
            lines.append(f"| {n} | " + " | ".join(f"{t[m]['mean_accepted_tokens']:.2f}" if m in t else "-"
                                                 for m in om)
                         + f" | {min(v['match_rate'] for v in t.values()):.2f} | {_repeated(t)} |")
        rows = [m for m in ("default", "tr-jacobi-merged", "tr-jacobi") if all(m in t for t in own.values())][:1]
        if rows:
            m = rows[0]
            lines += ["", f"Per request, `{m}` tokens per step (tokens generated):", "",
                      "| request | " + " | ".join(own) + " |", "|---|" + "---|" * len(own)]
            count = len(next(iter(own.values()))[m].get("per_prompt", []))
            for i in range(count):
                lines.append(f"| {i} | " + " | ".join(
                    f"{t[m]['per_prompt'][i]['mean_accepted_tokens']:.2f} ({t[m]['per_prompt'][i]['tokens']})"
                    for t in own.values()) + " |")
    if results.get("adapter"):
        a = results["adapter"]
        gain = "-" if a["gain_kept"] is None else f"{a['gain_kept']:.0%}"
        lines += ["", f"## The adapter of {a['from']} ({a['model']})", "",
                  f"Rank {a['rank']} ({a['dtype']}), {a['bytes'] / (1 << 20):.1f} MiB, "
                  f"{a['kept']['overall']:.1%} of the weight difference kept (least in one layer "
                  f"{a['kept']['min']:.1%}). Merged into the base, it keeps {gain} of {a['from']}'s tr-jacobi gain "
                  "over sft.", "", *(f"- {k}: {'yes' if v else 'no'}" for k, v in a["holds"].items())]
    if results.get("timing"):
        t = results["timing"]
        lines += ["", f"## {t['model']} timed alone ({t['prompts']} prompts, {t['max_new_tokens']} new tokens)", "",
                  "| method | tokens/s | mean accepted tokens | over ar | over hf-generate | match |", "|---|---|---|---|---|---|"]
        for m, v in t["methods"].items():
            over_hf = "-" if v["speedup_over_hf_generate"] is None else f"{v['speedup_over_hf_generate']:.2f}x"
            accepted = "-" if v["mean_accepted_tokens"] is None else f"{v['mean_accepted_tokens']:.2f}"
            lines.append(f"| {m} | {v['tokens_per_s']:.1f} | {accepted} | "
                         f"{v['speedup_over_ar']:.2f}x | {over_hf} | {v['match_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def _repeated(table: dict) -> str:
    """An acceptance table's share of repeated lines, as a cell ("-" in results made before it was measured)."""
    share = table.get("ar", {}).get("repeated_lines")
    return "-" if share is None else f"{share:.0%}"


def acceptance_plot(entries: dict, path: Path) -> None:
    """Grouped bars: mean accepted tokens per step for every decoder and model (skipped,
    with a log line, where matplotlib is missing, e.g. on a GPU machine without network)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: %s not drawn (results.md has the same figures)", path)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [k for k in dict.fromkeys(k for e in entries.values() for k in e["accept"]) if k != "ar"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(entries), 1)
    for i, (n, e) in enumerate(entries.items()):
        ax.bar([j + i * width for j in range(len(methods))],
               [e["accept"].get(m, {}).get("mean_accepted_tokens", 0) for m in methods], width, label=n)
    ax.set_xticks([j + width * (len(entries) - 1) / 2 for j in range(len(methods))], methods)
    ax.set_ylabel("mean accepted tokens per step")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
