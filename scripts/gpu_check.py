"""One device check, one JSON file: what the GPU lines of the fast-step work need measured.

    python scripts/gpu_check.py (--model PATH | --gguf FILE | --config DIR) [--out gpu_check.json]
                                [--device cuda] [--parts ...] [--limit 1] [--max-new-tokens 128]

Parts (``--parts``, in this order by default):
1. lossless: every method equals ar token for token on six tiny model families in float32
   on the device, with CUDA graphs on and off (plus the tiny models' sampling agreement);
2. latency: the step latency t(n) ladder after 100 tokens, eager against graphs, float32 and
   bfloat16, and with graphs after 1,000 tokens (larger buffers)
   (``--config DIR``: a model of that config with random weights, which costs the same);
   profile: where a 69-input step's time goes, eager and replayed (torch.profiler);
3. bench: msn bench on Spec-Bench with ar, hf-generate, pld, jacobi, recycle, tr-jacobi:paper
   (the paper's drafts, auto size), tr-jacobi (merged drafts, auto size) and
   tr-jacobi:reference (merged drafts at the reference size) in one run, the recycled
   candidate table started cold, graphs on (the default on CUDA);
4. bf16: on the real model, how many outputs equal ar's in bfloat16, where they first
   differ, and the per-step agreement of the tree's argmax with a one-token forward;
5. hf_static: ar against transformers' generate with a static cache (it may compile; last);
6. compiled: compiled steps (``compile="on"``, then replayed) of ar, pld, tr-jacobi (auto)
   and tr-jacobi:reference beside transformers' compiled static-cache generate
   (``hf-static``), every compilation paid by a warm-up question first;
7. own_words (issue 36's own-words line, which names no device): the shipped
   ``smollm2-msn-code`` adapter merged into the base (``--gguf``/``--model``: SmolLM2-135M-Instruct)
   against the base, on ``msn.bench.prompts.CODE_REQUESTS``, float32, the rows ``msn reproduce``
   scores there (``ar``, the reference tree without retrieval, ``tr-jacobi`` with it, and the
   default decoder one request at a time, cold), each prompt's figures kept;
8. shapes: t(n) for n = 1 ... 69 of random-weight bfloat16 models with the shapes of
   Llama-3.2-1B and Llama-3-8B (``SHAPES``), eager, replayed and (1B) compiled (n = 1 and 69),
   and a projection of tr-jacobi's speedup over ar at those sizes from the measured t(n)
   and the acceptance the reference run measured (``ACCEPTANCE``): a projection, not a
   measurement of a 1B/8B MSN model (``projection``, written as markdown by ``--projection``).

A ``claims`` block checks the GPU acceptance lines from what was measured. Runs offline;
parts that fail are reported in the JSON with their error, the rest goes on. Tested on CPU
with a tiny model: ``--device cpu --model TINY --limit 1 --max-new-tokens 16``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))          # tiny model fixtures


def lossless(device: str) -> dict:
    import msn
    from tiny import TINY_FAMILIES, tiny_model

    graph_modes = ("off", "on") if device.startswith("cuda") else ("off",)
    out = {}
    for family in TINY_FAMILIES:
        model = tiny_model(family).to(device)
        bad, steps = [], {}
        g = torch.Generator().manual_seed(0)
        for i in range(4):
            unit = torch.randint(3, 96, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
            x = unit.repeat(8)[: 8 + 2 * i][None].to(device)
            want = msn.generate(model, x, method="ar", max_new_tokens=32, eos_token_id=[], graphs="off").tokens
            sampled = msn.generate(model, x, method="ar", max_new_tokens=32, eos_token_id=[], do_sample=True, seed=i)
            for m in ("ar", "jacobi", "tr-jacobi", "pld", "lookahead", "recycle"):
                for tree, drafts in ((("auto", None), ("reference", None), ("reference", "paper"))
                                     if m == "tr-jacobi" else ((None, None),)):
                    opts = {k: v for k, v in (("tree", tree), ("drafts", drafts)) if v}
                    for graphs in graph_modes:
                        r = msn.generate(model, x, method=m, max_new_tokens=32, eos_token_id=[], graphs=graphs,
                                         **opts)
                        if r.tokens != want:
                            bad.append([i, m, tree, graphs])
                        if "step" in r.info:
                            steps = r.info["step"]
                    if m == "ar":
                        continue
                    got = msn.generate(model, x, method=m, max_new_tokens=32, eos_token_id=[], do_sample=True,
                                       seed=i, **opts).tokens
                    if got != sampled.tokens:
                        bad.append([i, m, tree, "sampled"])
        out[family] = {"prompts": 4, "mismatches": bad, "graph_steps": steps}
    out["all_equal"] = all(not v["mismatches"] for v in out.values() if isinstance(v, dict))
    out["graph_modes"] = list(graph_modes)
    return out


def bf16_agreement(path: str, device: str, prompts: list, max_new: int) -> dict:
    import msn
    from msn.loading import load_for_inference

    model, tok = load_for_inference(path, device, "bfloat16")
    rows = []
    for ids in prompts:
        ids = ids.to(device)
        ar = msn.generate(model, ids, method="ar", max_new_tokens=max_new).tokens
        row = {}
        for m in ("pld", "jacobi", "tr-jacobi"):
            got = msn.generate(model, ids, method=m, max_new_tokens=max_new).tokens
            first = next((i for i, (a, b) in enumerate(zip(ar, got)) if a != b), None)
            row[m] = {"identical": got == ar, "first_difference": first}
        rows.append(row)
    per_step = step_agreement(model, prompts[0].to(device), max_new)
    return {"per_prompt": rows, "per_step_agreement": per_step,
            "match_rate": {m: sum(r[m]["identical"] for r in rows) / len(rows) for m in rows[0]}}


@torch.inference_mode()
def step_agreement(model, ids, max_new: int) -> float:
    """Share of positions where the argmax of a 6-input chain step (drafts = the true continuation)
    equals the argmax of a one-token step on the same prefix, along ar's output."""
    import msn
    from msn.decoding import cache as kv

    ar = msn.generate(model, ids, method="ar", max_new_tokens=max_new, eos_token_id=[]).tokens
    seq = ids[0].tolist() + ar
    agree = total = 0
    for start in range(ids.shape[1], len(seq) - 6, 6):
        cache = kv.new_cache(model)
        model(input_ids=torch.tensor([seq[:start]], device=ids.device), **kv.cache_kwargs(model, cache))
        chain = torch.tensor([seq[start : start + 6]], device=ids.device)
        wide = model(input_ids=chain, **kv.cache_kwargs(model, cache)).logits[0].argmax(-1)
        for j in range(6):
            cache = kv.new_cache(model)
            one = model(input_ids=torch.tensor([seq[: start + j + 1]], device=ids.device),
                        **kv.cache_kwargs(model, cache)).logits[0, -1].argmax()
            agree += int(one == wide[j])
            total += 1
    return agree / max(total, 1)


def load(source: dict, device: str, dtype: str):
    """The model to measure: a checkpoint, or (``config``) random weights of that architecture."""
    if source.get("config"):
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(source["config"])
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=getattr(torch, dtype))
        return model.to(device).eval()
    from msn.loading import load_for_inference

    return load_for_inference(source["path"], device, dtype)[0]


def latency(source: dict, device: str) -> dict:
    from msn.decoding import static_steps
    from msn.decoding.timing import measure_step_latency

    out = {}
    for dtype in ("float32", "bfloat16"):
        model = load(source, device, dtype)
        row = {"eager_ms": {str(n): round(1e3 * s, 3) for n, s in measure_step_latency(model).items()}}
        if device.startswith("cuda"):
            row["graphs_ms"] = {str(n): round(1e3 * s, 3)
                                for n, s in measure_step_latency(model, graphs=True).items()}
            row["graphs_step"] = static_steps.steps_for(model).describe()
            # A long request's steps read larger buffers: the same ladder after 1,000 tokens.
            row["graphs_ms_context_1000"] = {str(n): round(1e3 * s, 3) for n, s in
                                             measure_step_latency(model, graphs=True, context=1000).items()}
            row["graphs_step_context_1000"] = static_steps.steps_for(model).describe()
        for mode in ("eager_ms", "graphs_ms", "graphs_ms_context_1000"):
            if mode in row and "69" in row[mode]:
                row[mode.replace("_ms", "_69_over_1")] = round(row[mode]["69"] / row[mode]["1"], 3)
        out[dtype] = row
        del model
    return out


def step_profile(source: dict, device: str, n: int = 69) -> dict:
    """Where an n-input step's time goes, eager and replayed: the top operations by device
    time and by host time (torch.profiler, 3 steps after 2 warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    from msn.decoding import cache as kv
    from msn.decoding import static_steps
    from msn.decoding.devices import context_limit, vocab_size
    from msn.decoding.step import fixed_step, prefill, tree_step
    from msn.decoding.tree import chain

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = load(source, device, dtype)
        limit = context_limit(model)
        top = min(1000, vocab_size(model))
        g = torch.Generator().manual_seed(0)
        for graphs in ((False, True) if device.startswith("cuda") else (False,)):
            cache = kv.new_cache(model)
            prefill(model, torch.randint(3, top, (1, 128), generator=g).to(device), cache)
            paths, cand = tuple(chain(n - 1)), torch.randint(3, top, (n - 1, 1), generator=g).to(device)
            steps = static_steps.steps_for(model) if graphs else None
            if steps is not None:
                steps.begin(cache, 128 + 6 * n + static_steps.STEP_ROOM, limit)
            length = [128]

            def run():
                if steps is not None:
                    return fixed_step(steps, model, 0, paths, cand)
                new, fb = tree_step(model, cache, length[0], 0, paths, cand, limit)
                length[0] += 1 + fb.accepted

            for _ in range(2):
                run()
            torch.cuda.synchronize() if device.startswith("cuda") else None
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                for _ in range(3):
                    run()
                torch.cuda.synchronize() if device.startswith("cuda") else None
            wall = (time.perf_counter() - t0) / 3
            rows = []
            for e in prof.key_averages():
                dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
                rows.append((e.key, round(e.self_cpu_time_total / 3e3, 3), round(dev / 3e3, 3), e.count // 3))
            out[f"{dtype} {'graphs' if graphs else 'eager'}"] = {
                "step_ms_profiled": round(1e3 * wall, 3),
                "device_ms_per_step": round(sum(r[2] for r in rows), 3),
                "top_device": [r for r in sorted(rows, key=lambda r: -r[2])[:12]],
                "top_host": [r for r in sorted(rows, key=lambda r: -r[1])[:12]],
                "columns": ["op", "self host ms/step", "self device ms/step", "calls/step"]}
        del model
    return out


def _overall(summary: dict, pick: tuple[str, ...]) -> dict:
    """Each method's ``pick`` figures over all questions of a ``run_bench`` summary."""
    return {m: {k: v["overall"][k] for k in pick} for m, v in summary["methods"].items()}


def bench(path: str, device: str, limit: int, max_new: int, out_dir: Path, categories, questions) -> dict:
    from msn.bench.harness import BenchConfig, run_bench

    common = dict(model=path, bench="spec-bench", questions=questions, limit=limit, max_new_tokens=max_new, device=device,
                  dtype="float32", warmup=2, categories=categories)
    main = run_bench(BenchConfig(out=str(out_dir / "bench"), methods=["ar", "hf-generate", "pld", "jacobi", "recycle",
                                                                        "tr-jacobi:paper", "tr-jacobi",
                                                                        "tr-jacobi:reference"], reset_recycle=True,
                                 **common))
    pick = ("speedup", "mean_accepted_tokens", "tokens_per_s", "match_rate")
    rows = _overall(main, pick)
    return {"methods": rows, "auto_tree": main["auto_tree"]}


def own_words(path: str, device: str, max_new: int, out_dir: Path) -> dict:
    """The shipped MSN adapter merged into ``path`` (its base) against ``path``, on the code
    requests in a user's own words: each decoder's tokens per step and match with ``ar``, per
    prompt too, and the default decoder's ratio (the issue asks at least 1.2)."""
    from msn.bench.prompts import CODE_REQUESTS, write_questions
    from msn.data.records import ensure_chat_template
    from msn.experiments.reproduce import OWN_WORDS_METHODS, acceptance
    from msn.fetch import shipped_adapter
    from msn.loading import load_for_inference, load_tokenizer, merged_model

    questions = write_questions(out_dir / "own_words_questions.jsonl", CODE_REQUESTS, "code-request")
    adapter = shipped_adapter("smollm2-msn-code")
    if adapter is None:
        raise RuntimeError("this copy of msn ships no smollm2-msn-code adapter")
    merged = out_dir / "smollm2-msn-code"
    if not (merged / "config.json").exists():
        merged_model(adapter, base=path).save_pretrained(merged)
        load_tokenizer(path).save_pretrained(merged)
    rows = {}
    for name, folder in (("base", path), ("smollm2-msn-code", str(merged))):
        model, tok = load_for_inference(folder, device, "float32")
        ensure_chat_template(tok)
        rows[name] = acceptance(model, tok, questions, OWN_WORDS_METHODS, max_new, len(CODE_REQUESTS),
                                progress=False, per_prompt=True)
        del model
    ratio = {m: round(rows["smollm2-msn-code"][m]["mean_accepted_tokens"] / rows["base"][m]["mean_accepted_tokens"], 3)
             for m in OWN_WORDS_METHODS if m != "ar"}
    return {"models": rows, "msn_over_base": ratio, "prompts": len(CODE_REQUESTS), "max_new_tokens": max_new}


def hf_static(path: str, device: str, max_new: int, out_dir: Path, questions) -> dict:
    from msn.bench.harness import BenchConfig, run_bench

    s = run_bench(BenchConfig(out=str(out_dir / "bench-hf-static"), model=path, bench="spec-bench", limit=1,
                              questions=questions,
                              categories=["qa", "summarization", "translation"], max_new_tokens=max_new, device=device,
                              dtype="float32", warmup=2, methods=["ar", "hf-generate", "hf-static"]))
    pick = ("speedup", "tokens_per_s", "match_rate")
    return _overall(s, pick)


# Shapes of the models users fine-tune (from their published configs); random weights cost the same.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rope_theta=500000.0),
}
# A CPU test of the part: the same code on shapes a CPU steps in milliseconds.
TINY_SHAPES = {name: dict(cfg, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=512) for name, cfg in SHAPES.items()}
# Mean accepted tokens per step of tr-jacobi (reference tree, 69 inputs) measured by the reference
# run (SmolLM2-135M fine-tuned on code, H200, float32; ../shared/docs/background.md section 3b).
ACCEPTANCE = {"base": 2.08, "plain SFT": 2.28, "MSN, 1 span": 3.14, "MSN, 4 spans": 3.48}
REFERENCE_INPUTS = 69
# Shapes whose compiled t(1) and t(69) are measured too: each compilation of a 16-layer graph takes
# tens of seconds, and the 8B graph's would not fit the call beside the compiled bench.
COMPILED_SHAPES = ("llama-3.2-1b",)


def shape_model(name: str, device: str, tiny: bool = False):
    """A random-weight bfloat16 Llama of the named shape, made on the device (no host copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(TINY_SHAPES if tiny else SHAPES)[name])
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.eval()


def shapes(device: str, tiny: bool = False) -> dict:
    """t(n) of each ``SHAPES`` model: eager, replayed (CUDA) and compiled (n = 1 and 69), in ms."""
    from msn.decoding.timing import measure_step_latency

    ms = lambda d: {str(n): round(1e3 * s, 3) for n, s in d.items()}     # noqa: E731
    out = {}
    for name in SHAPES:
        model = shape_model(name, device, tiny)
        row = {"parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
               "eager_ms": ms(measure_step_latency(model))}
        cuda = device.startswith("cuda")
        if cuda:
            row["graphs_ms"] = ms(measure_step_latency(model, graphs=True))
        if name in COMPILED_SHAPES:
            t0 = time.time()
            row["compiled_ms"] = ms(measure_step_latency(model, ladder=(1, REFERENCE_INPUTS), graphs=cuda,
                                                         compiled=True))
            row["compiled_measure_s"] = round(time.time() - t0, 1)
        out[name] = row
        del model
        if cuda:
            torch.cuda.empty_cache()
    return out


def projection(shape_rows: dict) -> list[dict]:
    """tr-jacobi's projected speedup over ar per shape and training: accepted tokens per step
    (``ACCEPTANCE``) x t(1) / t(69), both from the one kind of step msn's default would run
    there (compiled and replayed where measured, else replayed, else eager)."""
    rows = []
    big = str(REFERENCE_INPUTS)
    for name, row in shape_rows.items():
        if not isinstance(row, dict):
            continue
        kind = next((k for k in ("compiled_ms", "graphs_ms", "eager_ms") if {"1", big} <= set(row.get(k, {}))), None)
        if kind is None:
            continue
        step = kind.replace("_ms", "")
        one, tree = (row[kind]["1"], step), (row[kind][big], step)
        for training, accepted in ACCEPTANCE.items():
            rows.append({"shape": name, "training": training, "t1_ms": one[0], "t1_step": one[1],
                         "t69_ms": tree[0], "t69_step": tree[1], "t69_over_t1": round(tree[0] / one[0], 3),
                         "accepted_tokens": accepted, "projected_speedup": round(accepted * one[0] / tree[0], 2)})
    return rows


def projection_markdown(report: dict) -> str:
    rows = projection(report.get("shapes", {}))
    lines = [f"# Projection: tr-jacobi's speedup over ar at 1B and 8B shapes ({report.get('device', '?')})", "",
             "**A projection, not a measurement of a 1B/8B MSN model.** Step costs t(n) are measured on random-weight "
             "bfloat16 models with the shapes of Llama-3.2-1B and Llama-3-8B (`scripts/gpu_check.py --parts shapes`, "
             "configs in `SHAPES`; weights do not change a step's cost); the accepted tokens per step are those the "
             "reference run measured for tr-jacobi's reference tree (69 inputs) on SmolLM2-135M fine-tuned on code "
             "(background.md section 3b). Projected speedup = accepted tokens x t(1) / t(69), both t of the kind "
             "of step msn runs there by default (compiled and replayed where measured, else replayed). A larger "
             "model's own acceptance may differ.", "",
             "| shape | training | t(1) ms | t(69) ms | t(69)/t(1) | accepted tokens/step | projected speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['training']} | {r['t1_ms']} ({r['t1_step']}) | {r['t69_ms']} ({r['t69_step']}) "
                     f"| {r['t69_over_t1']} | {r['accepted_tokens']} | {r['projected_speedup']}x |")
    return "\n".join(lines) + "\n"


def compiled(path: str, device: str, max_new: int, out_dir: Path, questions) -> dict:
    """ar, pld, tr-jacobi (auto) and tr-jacobi:reference with compiled steps against transformers'
    compiled static-cache generate, one question per category of three, after a warm-up
    question of a fourth category at full length in the same process (every compilation of
    both sides lands there, outside the timing)."""
    from msn.bench.harness import BenchConfig, run_bench

    methods = ["ar", "hf-static", "pld", "tr-jacobi", "tr-jacobi:reference"]
    common = dict(model=path, bench="spec-bench", questions=questions, limit=1, max_new_tokens=max_new, device=device,
                  dtype="float32", methods=methods, compile="on")
    t0 = time.time()
    run_bench(BenchConfig(out=str(out_dir / "bench-compiled-warmup"), categories=["math_reasoning"], warmup=1, **common))
    warm_s = round(time.time() - t0, 1)
    s = run_bench(BenchConfig(out=str(out_dir / "bench-compiled"), categories=["qa", "summarization", "translation"],
                              warmup=1, reset_recycle=True, **common))
    pick = ("speedup", "mean_accepted_tokens", "tokens_per_s", "match_rate")
    rows = _overall(s, pick)
    base = rows.get("hf-static", {}).get("tokens_per_s")
    for m in rows:
        if base:
            rows[m]["over_hf_static"] = round(rows[m]["tokens_per_s"] / base, 3)
    return {"methods": rows, "warmup_s": warm_s}


def claims(report: dict) -> dict:
    """The GPU acceptance lines, checked from what was measured (None where a part is missing)."""
    out = {}
    lat = report.get("latency", {}).get("float32", {})
    if "graphs_69_over_1" in lat:
        out["graph_step_69_over_1"] = {"value": lat["graphs_69_over_1"], "limit": 1.3,
                                       "holds": lat["graphs_69_over_1"] <= 1.3}
    rows = report.get("bench", {}).get("methods", {})
    for name in ("tr-jacobi", "tr-jacobi:reference"):
        if name in rows and rows[name]["mean_accepted_tokens"]:
            share = rows[name]["speedup"] / rows[name]["mean_accepted_tokens"]
            out[f"{name}: speedup over ar / accepted tokens"] = {"value": round(share, 3), "limit": 0.75,
                                                                 "holds": share >= 0.75}
        if name in rows and rows.get("hf-generate", {}).get("tokens_per_s"):
            over = rows[name]["tokens_per_s"] / rows["hf-generate"]["tokens_per_s"]
            out[f"{name}: over hf-generate"] = {"value": round(over, 3), "limit": 2.0, "holds": over >= 2.0}
    if "lossless" in report and "all_equal" in report["lossless"]:
        out["lossless"] = {"holds": report["lossless"]["all_equal"]}
    comp = report.get("compiled", {}).get("methods", {})
    if comp.get("hf-static", {}).get("tokens_per_s"):
        for name, limit in (("ar", 1.0), ("tr-jacobi", 1.3)):
            if name in comp:
                v = comp[name]["over_hf_static"]
                out[f"compiled {name} over compiled hf-static"] = {"value": v, "limit": limit, "holds": v >= limit}
    own = report.get("own_words", {})
    if "msn_over_base" in own:
        v = own["msn_over_base"]["default"]
        same = all(r[m]["match_rate"] == 1.0 for r in own["models"].values() for m in r if m != "ar")
        out["own words: default decoder, smollm2-msn-code over base"] = {"value": v, "limit": 1.2,
                                                                        "holds": v >= 1.2 and same}
    rows = projection(report.get("shapes", {}))
    if rows:
        out["projection rows"] = {"value": len(rows), "holds": True}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint folder")
    src.add_argument("--gguf", help="a GGUF file to convert first (e.g. SmolLM2-135M-Instruct, carried in two parts)")
    src.add_argument("--config", help="a folder with a config.json: random weights (lossless and latency only)")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--limit", type=int, default=2, help="Spec-Bench questions per category (bench)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--categories", help="comma-separated Spec-Bench categories (default all)")
    ap.add_argument("--questions", default=str(ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"),
                    help="Spec-Bench question.jsonl (default ../shared/data/spec_bench/question.jsonl)")
    ap.add_argument("--parts", default="lossless,latency,profile,bench,bf16,hf_static,compiled,own_words,shapes")
    ap.add_argument("--tiny-shapes", action="store_true", help="shapes: tiny stand-ins of SHAPES (a CPU test)")
    ap.add_argument("--projection", help="also write the projection table (markdown) here, from the shapes part")
    a = ap.parse_args()

    out_path = Path(a.out)
    work = out_path.parent / (out_path.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    report.update({"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
                   "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    import transformers

    report["transformers"] = transformers.__version__
    path = a.model
    if a.gguf:
        from msn.fetch import convert_gguf

        path = str(convert_gguf(a.gguf, work / "model"))
    source = {"config": a.config} if a.config else {"path": path}

    def prompts():
        from msn.data.records import encode_prompt, ensure_chat_template
        from msn.loading import load_tokenizer

        tok = load_tokenizer(path)
        ensure_chat_template(tok)
        questions = [json.loads(l) for l in open(a.questions)]
        return [encode_prompt(tok, [{"role": "user", "content": q["turns"][0]}]) for q in questions[::40][:4]]

    categories = a.categories.split(",") if a.categories else None
    jobs = {"lossless": lambda: lossless(a.device),
            "latency": lambda: latency(source, a.device),
            "profile": lambda: step_profile(source, a.device),
            "bench": lambda: bench(path, a.device, a.limit, a.max_new_tokens, work, categories, a.questions),
            "bf16": lambda: bf16_agreement(path, a.device, prompts(), min(a.max_new_tokens, 64)),
            "hf_static": lambda: hf_static(path, a.device, a.max_new_tokens, work, a.questions),
            "compiled": lambda: compiled(path, a.device, a.max_new_tokens, work, a.questions),
            "own_words": lambda: own_words(path, a.device, a.max_new_tokens, work),
            "shapes": lambda: shapes(a.device, a.tiny_shapes)}
    for name in a.parts.split(","):
        t0 = time.time()
        try:
            report[name] = jobs[name]()
        except Exception as e:  # one failing part must not lose the others
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        report[f"{name}_s"] = round(time.time() - t0, 1)
        report["claims"] = claims(report)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{name}: {report[f'{name}_s']} s", file=sys.stderr, flush=True)
    if a.projection and projection(report.get("shapes", {})):
        Path(a.projection).write_text(projection_markdown(report))
    print(json.dumps(report["claims"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
