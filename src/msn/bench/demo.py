"""``msn demo``: a few prompts of different kinds, decoded by ``ar`` and a fast method on the
same model in one process, timed in pairs (alternating order, device-synchronized, the median
of the pairs' ratios),
with every output checked against ``ar``'s."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass

import torch

from msn.decoding import recycle
from msn.decoding.engine import generate
from msn.decoding.devices import model_device, sync_device, vocab_size
from msn.errors import MsnError

# The paragraph of the copy prompt (this project's own text).
PARAGRAPH = (
    "A speculative decoder guesses several future tokens, feeds them to the model in one forward pass, "
    "and keeps the longest prefix of guesses that the model itself would have produced. Because every kept "
    "token is checked against the model's own choice, the output is exactly what plain greedy decoding "
    "gives, token for token; only the number of forward passes changes. The guesses can come from the text "
    "so far, from the candidates the model ranked highly at earlier steps, or from the model's own "
    "predictions for positions further ahead, which a model fine-tuned with a little input noise makes well."
)


@dataclass(frozen=True)
class DemoPrompt:
    kind: str
    text: str


PROMPTS = (
    DemoPrompt("text to copy", "Repeat the following paragraph word for word, then give it a title.\n\n" + PARAGRAPH),
    DemoPrompt("code", "Write a Python function that returns the n-th Fibonacci number."),
    DemoPrompt("open question", "What are three good ways to stay focused while studying?"),
)
WARMUP = "Name a color."

# What an MSN-trained model adds, measured on an H200 (docs: the reference run).
MSN_NOTE = ("An MSN-trained model drafts better still: on the reference run (SmolLM2-135M on an H200, float32, "
            "10 held-out code prompts) tr-jacobi accepted 3.48 tokens per step after MSN training (4 spans) "
            "against 2.28 after plain SFT and 2.08 for the base model; `msn train` replaces the SFT run.")


def _timed(fn, device) -> tuple[object, float]:
    sync_device(device)
    t0 = time.perf_counter()
    out = fn()
    sync_device(device)
    return out, time.perf_counter() - t0


def run_demo(model, tokenizer, *, method: str = "tr-jacobi", prompts=PROMPTS, max_new_tokens: int = 128,
             repeats: int = 5, reset: bool = True, options: dict | None = None, log=print) -> dict:
    """Decodes each prompt ``repeats`` times with ``ar`` and ``method`` in alternating order
    (ABBA...), after one untimed warm-up of each on another prompt, and returns the per-prompt
    median walls, speedups (the median over the pairs of ``ar``'s wall over the method's in
    the same pair) and their geometric mean.

    The recycled candidate table starts empty (``reset``) and runs on from prompt to prompt,
    as in a server; every repeat of a prompt starts from the table as the prompt found it, so
    a repeat never drafts from what an earlier repeat of the same prompt taught the table.
    """
    from msn.data.records import encode_prompt, ensure_chat_template

    options = options or {}
    device = model_device(model)
    ensure_chat_template(tokenizer)
    table = recycle.table_for(model, vocab_size(model) or 1, device)
    if reset:
        table.reset()
    encode = lambda text: encode_prompt(tokenizer, [{"role": "user", "content": text}], device)  # noqa: E731
    warm = encode(WARMUP)
    for m in ("ar", method):
        generate(model, warm, method=m, max_new_tokens=16, **({} if m == "ar" else options))
    if reset:
        table.reset()
    rows = []
    for p in prompts:
        ids = encode(p.text)
        start = table.ids.clone()
        walls = {"ar": [], method: []}
        results = {}
        for r in range(repeats):
            for m in (("ar", method) if r % 2 == 0 else (method, "ar")):
                if m != "ar":
                    table.ids.copy_(start)
                opts = {} if m == "ar" else options
                res, wall = _timed(lambda: generate(model, ids, method=m, max_new_tokens=max_new_tokens,
                                                    fit_context=True, **opts), device)
                walls[m].append(wall)
                results[m] = res
        ar, fast = results["ar"], results[method]
        row = {"kind": p.kind, "tokens": len(ar.tokens), "steps": fast.steps, "identical": fast.tokens == ar.tokens,
               "tokens_per_step": round(fast.mean_accepted_tokens, 3),
               "ar_s": round(statistics.median(walls["ar"]), 4),
               "method_s": round(statistics.median(walls[method]), 4),
               "ar_walls": [round(w, 4) for w in walls["ar"]], "method_walls": [round(w, 4) for w in walls[method]],
               "text": tokenizer.decode(fast.tokens, skip_special_tokens=True)}
        # Each pair ran back to back, so its ratio cancels the machine's drift between pairs
        # (on a shared CPU, consecutive runs of the same generation differ by up to 10 %).
        ratios = [a / b for a, b in zip(walls["ar"], walls[method])]
        row["pair_speedups"] = [round(x, 4) for x in ratios]
        row["speedup"] = round(statistics.median(ratios), 3)
        rows.append(row)
        log(f"{p.kind:>14}: {row['tokens']} tokens, {row['tokens_per_step']:.2f} tokens/step, "
            f"ar {row['tokens'] / row['ar_s']:.1f} tok/s, {method} {row['tokens'] / row['method_s']:.1f} tok/s: "
            f"{row['speedup']:.2f}x, identical to ar: {'yes' if row['identical'] else 'NO'}")
    geomean = math.exp(sum(math.log(r["speedup"]) for r in rows) / len(rows))
    return {"method": method, "repeats": repeats, "max_new_tokens": max_new_tokens, "prompts": rows,
            "geomean_speedup": round(geomean, 3), "all_identical": all(r["identical"] for r in rows),
            "device": str(device), "dtype": str(model.dtype).replace("torch.", ""), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main(model_path: str, *, method: str = "tr-jacobi", max_new_tokens: int = 128, repeats: int = 5,
         device: str = "auto", dtype: str = "auto", options: dict | None = None, out: str | None = None,
         msn_model: str | None = "auto", code_prompts: int = 3, code_repeats: int = 3, cold: bool = False) -> int:
    """The demo on ``model_path``; then, where an MSN model is at hand (``msn_model``: a folder, an
    adapter folder, ``auto`` for the adapter shipped with msn, None for none), that model and
    ``model_path`` side by side on held-out code prompts (the MSN model's ``prompts.jsonl``).
    ``cold``: decode without learned decoding state (scored tree steps, recycled tables), leaving
    the store's as it was, on the store's calibration (``msn.bench.harness.decoding_state``)."""
    import contextlib

    from msn.bench.harness import decoding_state
    from msn.paths import LEARNED, empty_decoding_state

    with empty_decoding_state(LEARNED) if cold else contextlib.nullcontext():
        return _main(model_path, method, max_new_tokens, repeats, device, dtype, options, out, msn_model, code_prompts,
                     code_repeats, decoding_state(cold))


def _main(model_path, method, max_new_tokens, repeats, device, dtype, options, out, msn_model, code_prompts,
          code_repeats, state) -> int:
    from msn.loading import load_for_inference

    # Everything that can be wrong is checked before the first decode.
    if out:
        _writable(out)
    path = _msn_model(msn_model)
    prompts = heldout_code_prompts(path, code_prompts) if path is not None else ()
    model, tokenizer = load_for_inference(model_path, device, dtype)
    print(f"msn demo: {len(PROMPTS)} prompts, ar and {method}, {repeats} paired runs each (median of the pairs' speedups), "
          f"{max_new_tokens} new tokens at most, on {model_device(model)}")
    report = run_demo(model, tokenizer, method=method, max_new_tokens=max_new_tokens, repeats=repeats,
                      options=options)
    print("-" * 60)
    for row in report["prompts"]:
        print(f"[{row['kind']}] {row['text'][:300]}{'...' if len(row['text']) > 300 else ''}\n")
    print(f"geometric mean speedup over ar: {report['geomean_speedup']:.2f}x; every output identical to ar: "
          f"{'yes' if report['all_identical'] else 'NO'}")
    identical = report["all_identical"]
    if path is None:
        print(MSN_NOTE)
    else:
        print("-" * 60)
        print(f"held-out code: {len(prompts)} prompts, {model_path} against the MSN model {path}, ar and {method}, "
              f"{code_repeats} paired runs each")
        side = {"base": run_demo(model, tokenizer, method=method, prompts=prompts, max_new_tokens=max_new_tokens,
                                 repeats=code_repeats, options=options, log=lambda *_: None)}
        del model
        msn_net, msn_tok = load_for_inference(str(path), device, dtype)
        side["msn"] = run_demo(msn_net, msn_tok, method=method, prompts=prompts, max_new_tokens=max_new_tokens,
                               repeats=code_repeats, options=options, log=lambda *_: None)
        print(side_by_side(side, method))
        report["heldout_code"] = {"msn_model": str(path), **side}
        identical = identical and all(r["all_identical"] for r in side.values())
    report["decoding_state"] = state
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k not in ("prompts", "heldout_code")} |
                     {"speedups": [r["speedup"] for r in report["prompts"]]} |
                     ({"heldout_code": {k: {"geomean_speedup": v["geomean_speedup"],
                                            "tokens_per_step": _tokens_per_step(v)}
                                        for k, v in report["heldout_code"].items() if k != "msn_model"}}
                      if "heldout_code" in report else {})))
    return 0 if identical else 1


def _msn_model(msn_model: str | None):
    """The MSN model to compare with: ``auto`` is the shipped adapter's merged model when msn
    ships one (else None, with a line saying so)."""
    from pathlib import Path

    from msn.fetch import fetch, shipped_adapter

    if msn_model in (None, "none"):
        return None
    if msn_model != "auto":
        from msn.adapter import is_adapter_folder

        p = Path(msn_model).expanduser()
        if not p.is_dir():
            raise MsnError(f"--msn-model {msn_model} is not a folder; give a checkpoint or an adapter folder")
        if not (p / "config.json").is_file() and not is_adapter_folder(p):
            raise MsnError(f"--msn-model {msn_model} holds neither config.json nor adapter_config.json; give a "
                           "checkpoint or an adapter folder")
        return p
    if shipped_adapter(SHIPPED_MSN_MODEL) is None:
        print(f"msn demo: no {SHIPPED_MSN_MODEL} adapter in this copy of msn (msn reproduce --preset cpu makes it)")
        return None
    return fetch(SHIPPED_MSN_MODEL, log=lambda m: print(m, flush=True))


SHIPPED_MSN_MODEL = "smollm2-msn-code"


def _writable(out: str) -> None:
    """``--out`` can be written (checked before any work; the report is written at the end)."""
    from pathlib import Path

    p = Path(out).expanduser()
    if p.is_dir():
        raise MsnError(f"--out {out} is a folder; give a file path for the JSON report")
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as e:
        raise MsnError(f"--out {out} cannot be written ({e.strerror or e}); choose another path") from None
    if not existed:
        p.unlink()


def heldout_code_prompts(path, n: int) -> tuple[DemoPrompt, ...]:
    """The first ``n`` prompts of ``path/prompts.jsonl`` (the held-out prompts an MSN model was
    measured on), else the demo's own code prompt."""
    from pathlib import Path

    from msn.data.records import jsonl_lines

    file = Path(path) / "prompts.jsonl"
    if not file.is_file():
        return tuple(p for p in PROMPTS if p.kind == "code")
    rows = []
    for lineno, row in jsonl_lines(file):
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise MsnError(f"{file}:{lineno}: expected {{\"turns\": [\"a prompt\", ...]}}")
        rows.append(turns[0])
    return tuple(DemoPrompt(f"held-out {i + 1}", text) for i, text in enumerate(rows[:n]))


def _tokens_per_step(report: dict) -> float:
    """Tokens per step over all of a demo's prompts (weighted by their steps)."""
    rows = report["prompts"]
    steps = sum(r["steps"] for r in rows)
    return round(sum(r["tokens_per_step"] * r["steps"] for r in rows) / steps, 3) if steps else 0.0


def side_by_side(side: dict, method: str) -> str:
    head = f"{'prompt':>12} | {'base: tok/step':>14} {'speedup':>8} {'same':>5} | {'MSN: tok/step':>14} " \
           f"{'speedup':>8} {'same':>5}"
    lines = [head, "-" * len(head)]
    for b, m in zip(side["base"]["prompts"], side["msn"]["prompts"]):
        cells = [f"{r['tokens_per_step']:>14.2f} {r['speedup']:>7.2f}x {'yes' if r['identical'] else 'NO':>5}"
                 for r in (b, m)]
        lines.append(f"{b['kind']:>12} | {cells[0]} | {cells[1]}")
    cells = [f"{_tokens_per_step(r):>14.2f} {r['geomean_speedup']:>7.2f}x {'yes' if r['all_identical'] else 'NO':>5}"
             for r in (side["base"], side["msn"])]
    lines.append(f"{'all':>12} | {cells[0]} | {cells[1]}")
    lines.append(f"(tokens per step of {method}; speedup over ar of the same model, geometric mean on the last "
                 "line; same: output identical to that model's ar)")
    return "\n".join(lines)
