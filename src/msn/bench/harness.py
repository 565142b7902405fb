"""The timed benchmark run: every method on every prompt, ``ar`` first, in one process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from msn.bench.prompts import Question, load_questions
from msn.bench.report import plots, summarize, table
from msn.data.records import appended_lines, encode_prompt, ensure_chat_template
from msn.decoding import cpu
from msn.decoding.config import (DEFAULT_MAX_NEW_TOKENS, DRAFT_CHOICES, METHODS, TREE_CHOICES, DecodeConfig,
                                exactness_contract)
from msn.decoding.engine import generate
from msn.decoding.request import resolve_eos
from msn.decoding.devices import context_limit, sync_device
from msn.decoding.profile import StepProfile
from msn.errors import MsnError
from msn.paths import (CALIBRATION, DECODING_STATE, LEARNED, cache_root, check_apart, empty_decoding_state, ensure_output_dir,
                       set_state_root, state_root, store_info)

# Baselines run by transformers' own generate(): plain greedy (what users run today), with a
# static cache (compiled where transformers does so), and its prompt lookup.
HF_METHODS = ("hf-generate", "hf-static", "hf-pld")
BENCH_METHODS = (*METHODS, *HF_METHODS)
DEFAULT_METHODS = ("ar", "pld", "lookahead", "jacobi", "tr-jacobi")
PLD = DecodeConfig(method="pld")  # prompt-lookup settings shared by pld and hf-pld


def split_method(name: str) -> tuple[str, str | None, str | None]:
    """``tr-jacobi:small`` -> (``tr-jacobi``, ``small``, None): a method run with a tree preset
    of its own, so several trees are compared on the same prompts in one run; a drafts name
    (``tr-jacobi:paper``, ``tr-jacobi:reference:paper``) picks TR-Jacobi's draft sources."""
    base, *parts = name.split(":")
    tree = next((p for p in parts if p in TREE_CHOICES), None)
    drafts = next((p for p in parts if p in DRAFT_CHOICES), None)
    return base, tree, drafts


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if split_method(m)[0] not in BENCH_METHODS]
    if unknown:
        raise MsnError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(BENCH_METHODS)} "
                       f"(tr-jacobi:TREE runs a tree preset of its own, e.g. tr-jacobi:small)")
    for m in methods:
        base, tree, drafts = split_method(m)
        parts = m.split(":")[1:]
        if parts and (base != "tr-jacobi" or len(parts) != (tree is not None) + (drafts is not None)):
            raise MsnError(f"method {m!r}: only tr-jacobi takes options, as tr-jacobi:TREE, tr-jacobi:DRAFTS or "
                           f"tr-jacobi:TREE:DRAFTS with TREE one of {', '.join(TREE_CHOICES)} and DRAFTS one of "
                           f"{', '.join(DRAFT_CHOICES)}")


@dataclass
class BenchConfig:
    """Options of ``msn bench`` (saved into ``summary.json``).

    Attributes:
        model: checkpoint folder.
        bench: spec-bench, mt-bench, humaneval or a JSONL file of questions.
        out: output folder.
        methods: decoders to compare; ``ar`` is always run first, as the baseline.
        max_new_tokens: per turn.
        questions: Spec-Bench question file (default ../shared/data/spec_bench/question.jsonl).
        limit: first K questions of each category.
        categories: keep only these categories.
        repeats: timed runs per prompt and method; the median wall time is used.
        warmup: untimed generations of every method before timing starts.
        tree: TR-Jacobi tree preset (None: ``DecodeConfig``'s default). Prompt-lookup
            settings are ``DecodeConfig``'s, shared by ``pld`` and ``hf-pld``.
        drafts: TR-Jacobi's draft sources (None: ``DecodeConfig``'s default, merged).
        cold: run without learned decoding state (scored tree steps, recycled tables:
            ``msn.paths.empty_decoding_state(LEARNED)``) and leave the store's as it was, on the
            store's calibration (step latency, the CPU kernel decision; measured and kept in the
            store where missing), so two cold runs make the same choices and give the same
            tokens per step; ``summary.json`` records how it started (``decoding_state``).
        reset_recycle: empty the model's recycled candidate table (in memory and on disk)
            before the run, so it starts cold; ``summary.json`` records how it started. Each
            method keeps a table of its own through the run, started from the same state
            (no method sees another's updates, and every repeat and the warm-up start from
            where that method was); at the end the table of ``tr-jacobi`` (else the first
            method that used one) is kept on disk. A resumed bench restarts every method's
            table from the one on disk.
        do_sample / temperature / top_k / top_p / sample_drafts / seed: sampling (``DecodeConfig``'s
            meaning). Every generation starts its own stream seeded with ``seed``, so drafting
            methods usually draw ``ar``'s tokens; match_rate is that agreement.
        profile: split each msn method's step time into forward, inputs, verification,
            host sync, cache and proposer (adds device syncs; time it apart from speedups).
        graphs: ``DecodeConfig.graphs`` of every msn method (CUDA-graph steps by default on CUDA).
        compile: ``DecodeConfig.compile`` of every msn method (compiled steps by default on CUDA;
            the warm-up pays the compilations of the shapes it meets).
        cpu_kernels / cpu_prepack: ``DecodeConfig``'s CPU kernel switches for every msn method
            (None: its default, ``auto`` unless ``MSN_CPU_GEMM`` / ``MSN_CPU_PACK`` is 0).
        device / dtype: where and how the model runs.
    """

    model: str
    out: str
    bench: str = "spec-bench"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    questions: str | None = None
    limit: int | None = None
    categories: list[str] | None = None
    repeats: int = 1
    warmup: int = 2
    tree: str | None = None
    drafts: str | None = None
    reset_recycle: bool = False
    cold: bool = False
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    sample_drafts: bool = False
    seed: int = 0
    profile: bool = False
    device: str = "auto"
    dtype: str = "auto"
    graphs: str = "auto"
    compile: str = "auto"
    cpu_kernels: str | None = None
    cpu_prepack: str | None = None

    def __post_init__(self):
        check_methods(self.methods)
        self.methods = ["ar"] + [m for m in dict.fromkeys(self.methods) if m != "ar"]
        if self.max_new_tokens <= 0:
            raise MsnError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.repeats <= 0 or self.warmup < 0:
            raise MsnError("--repeats must be positive and --warmup non-negative")
        resolved = DecodeConfig(graphs=self.graphs, compile=self.compile, **self.kernel_options(),
                                **self.sampling_options())        # validates the decoding options
        self.cpu_kernels, self.cpu_prepack = resolved.cpu_kernels, resolved.cpu_prepack     # validates the decoding options
        hf = [m for m in self.methods if m in HF_METHODS]
        if self.do_sample and hf:
            raise MsnError(f"{', '.join(hf)} run greedy only here; drop them from --methods when sampling")

    def kernel_options(self) -> dict:
        """The CPU kernel switches given (the others take ``DecodeConfig``'s defaults)."""
        return {k: v for k, v in dict(cpu_kernels=self.cpu_kernels, cpu_prepack=self.cpu_prepack).items()
                if v is not None}

    def sampling_options(self) -> dict:
        if not self.do_sample:
            return {}
        return {k: v for k, v in dict(do_sample=True, temperature=self.temperature, top_k=self.top_k,
                                      top_p=self.top_p, seed=self.seed,
                                      sample_drafts=self.sample_drafts or None).items() if v is not None}

    @property
    def sampling(self) -> bool:
        return bool(self.do_sample) and self.temperature != 0


class ForwardCounter:
    """Counts the model's forward passes (a forward hook), for methods that report no steps."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


@dataclass
class Run:
    tokens: list[int]
    steps: int
    accept_lengths: list[int] | None
    forwards: int
    info: dict = field(default_factory=dict)


def run_method(model, ids: torch.Tensor, method: str, cfg: BenchConfig, counter: ForwardCounter,
               profile=None) -> Run:
    before = counter.calls
    if method in HF_METHODS:
        extra = {"hf-generate": {}, "hf-static": {"cache_implementation": "static"},
                 "hf-pld": {"prompt_lookup_num_tokens": PLD.pld_tokens,
                            "max_matching_ngram_size": PLD.pld_ngram}}[method]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=cfg.max_new_tokens, eos_token_id=sorted(resolve_eos(model, None)) or None,
                             pad_token_id=model.generation_config.pad_token_id, **extra)
        forwards = counter.calls - before
        return Run(out[0, ids.shape[1]:].tolist(), forwards, None, forwards)
    method, tree, drafts = split_method(method)
    tree = tree or cfg.tree
    options = {"tree": tree} if method == "tr-jacobi" and tree is not None else {}
    if method == "tr-jacobi" and (drafts or cfg.drafts):
        options["drafts"] = drafts or cfg.drafts
    options.update(cfg.sampling_options())
    if cfg.graphs != "auto":
        options["graphs"] = cfg.graphs
    if cfg.compile != "auto":
        options["compile"] = cfg.compile
    options.update(cfg.kernel_options())
    # A long prompt's turn is cut to the context (every method alike) rather than failing the bench.
    r = generate(model, ids, method=method, max_new_tokens=cfg.max_new_tokens, profile=profile, fit_context=True,
                 **options)
    # One forward per step plus the prefill (a replayed CUDA graph calls no forward hook).
    return Run(r.tokens, r.steps, r.accept_lengths, r.steps + 1, r.info)


def decoding_state(cold: bool) -> dict:
    """How a run starts (printed, and kept in ``summary.json``): warm, with the entries of each
    kind of decoding state the store holds, or ``cold``: no learned state (scored tree steps,
    recycled tables: ``msn.paths.LEARNED``), on the store's calibration (step latency, the CPU
    kernel decision: measured and kept there where missing), so two cold runs decide alike."""
    entries = {row["kind"]: row["entries"] for row in store_info(DECODING_STATE)}
    where = str(cache_root())
    if cold:
        held = ", ".join(f"{k} {entries[k]}" for k in CALIBRATION)
        print(f"decoding state: cold (no scored tree steps, no recycled table; {where}'s are left as they are; "
              f"calibration from {where}: {held} entries, measured there where missing)", file=sys.stderr)
        return {"cold": True, "calibration": {k: entries[k] for k in CALIBRATION}, "store": where}
    held = ", ".join(f"{k} {n}" for k, n in entries.items() if n) or "nothing"
    print(f"decoding state: warm, from {where} ({held}; --cold starts without scored steps and recycled tables)",
          file=sys.stderr)
    return {"cold": False, "entries": entries, "store": where}


def run_bench(cfg: BenchConfig, model=None, tokenizer=None, clock: Callable[[], float] = time.perf_counter,
              progress: bool = True) -> dict:
    """Runs the benchmark, writes records.jsonl, summary.json and plots to ``cfg.out``,
    prints the table and, as the last stdout line, the summary as one JSON document."""
    from msn.loading import load_for_inference

    check_apart(cfg.out, "--out", {"--model": cfg.model, "--questions": cfg.questions,
                                   "--bench": cfg.bench if cfg.bench not in ("spec-bench", "mt-bench", "humaneval") else None})
    out = ensure_output_dir(cfg.out, "--out")
    questions = load_questions(cfg.bench, cfg.questions, cfg.limit, cfg.categories)
    if model is None:
        model, tokenizer = load_for_inference(cfg.model, cfg.device, cfg.dtype)
    ensure_chat_template(tokenizer)
    limit = context_limit(model)
    if limit is not None and cfg.max_new_tokens >= limit:
        raise MsnError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's context "
                       f"of {limit} positions; give at most {limit - 1} (longer prompts are cut to fit)")
    device = next(model.parameters()).device
    counter = ForwardCounter(model)
    log = Progress(out / PROGRESS, cfg, model_key(model))
    log.reusable(questions)
    state = decoding_state(cfg.cold)
    with contextlib.ExitStack() as stack:
        if cfg.cold:
            stack.enter_context(empty_decoding_state(LEARNED))
        tables = MethodTables(model, cfg, out / METHOD_STATE if log.resumed else None)
        try:
            with logging_redirect_tqdm():      # log lines above the progress bar, not at the end of its line
                records, latency, profiles = _run_all(model, tokenizer, questions, cfg, counter, clock, device,
                                                      progress, log, tables)
            tables.finished = True
        finally:
            counter.handle.remove()
            tables.keep(out / METHOD_STATE)
        one_row, prepacked = cpu.padded(model), cpu.prepacked(model)
    with open(out / "records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    summary = {"methods": summarize(records, cfg.methods), "auto_tree": auto_tree_report(records, latency),
               "profile": profiles,
               "config": {**asdict(cfg), "device": str(device), "dtype": str(model.dtype).replace("torch.", ""),
                          "torch": torch.__version__, "questions_run": len(questions),
                          "cpu_one_row_as_two": one_row,
                          "cpu_prepacked": prepacked,
                          "recycle_table": tables.started,
                          "decoding_state": state,
                          "questions_from_earlier_runs": log.resumed,
                          "exactness": exactness_contract(str(model.dtype).replace("torch.", ""), cfg.sampling) +
                          ("; shown by tests/test_sampling.py (chi-square against the exact joint). With one "
                           "seed drafting methods usually draw ar's tokens: match_rate is that agreement" if cfg.sampling
                           else "; match_rate is measured against ar")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots(summary["methods"], out)
    print(table(summary["methods"]))
    for m, rep in profiles.items():
        parts = ", ".join(f"{k[:-3]} {v:.1f}" for k, v in rep.items() if k.endswith("_ms") and k != "step_ms")
        print(f"profile {m}: {rep['step_ms']:.1f} ms/step ({parts}); outside the forward "
              f"{100 * rep['outside_forward']:.1f} %")
    for m, rep in summary["auto_tree"].items():
        print(f"{m} --tree auto: inputs chosen {rep['chosen_inputs']}; step latency t(n) ms {rep['latency']['ms']}")
    print(json.dumps(summary))
    sys.stdout.flush()
    return summary


def auto_tree_report(records: list[dict], latency: dict) -> dict:
    """For methods whose tree was chosen by measurement: the measured step latency t(n)
    and how often each tree size (inputs per step) was chosen, over all choices made."""
    from collections import Counter

    out = {}
    for m, lat in latency.items():
        counts = Counter(n for r in records if r["method"] == m for gen in r.get("trees", []) for n in gen)
        out[m] = {"latency": lat, "chosen_inputs": {str(k): counts[k] for k in sorted(counts)}}
    return out


def _timed(fn, device, clock) -> tuple[object, float]:
    sync_device(device)
    t0 = clock()
    result = fn()
    sync_device(device)
    return result, clock() - t0


PROGRESS = "progress.jsonl"


def _same_settings(old: dict | None, new: dict) -> bool:
    """Whether an earlier bench ran with ``new``'s settings; an option added to ``BenchConfig``
    since then matches when it holds its default."""
    if old is None:
        return False
    defaults = {f.name: f.default for f in fields(BenchConfig)}
    return all(old.get(k, defaults.get(k)) == v for k, v in new.items()) and set(old) <= set(new)


def question_key(q: Question) -> str:
    """A question's content key: its turns' text (a record is reused only for the same text)."""
    return hashlib.sha256(json.dumps(q.turns).encode()).hexdigest()[:16]


def model_key(model) -> str:
    """The content key of a model: a hash of its weights' bytes (so a rerun after a fine-tune into
    the same folder, or with another model at the same path, never reuses the old records)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


class Progress:
    """``OUT/progress.jsonl``: each finished question's records, written as soon as every
    method has run on it, so an interrupted bench loses at most the question in progress.
    A rerun with the same settings, model weights and ``--out`` skips the questions already
    there whose text is unchanged (a finished bench: nothing to run); a question whose text
    changed is measured again, saying so; other settings or weights are refused in one line.
    A last line cut by a kill is dropped."""

    def __init__(self, path: Path, cfg: BenchConfig, weights: str):
        self.path = path
        settings = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k != "out"}))
        settings["model_weights"] = weights
        self.done: dict[str, dict] = {}
        if path.exists():
            lines, cut = appended_lines(path, "a bench record")
            if cut:
                logging.getLogger("msn.bench").warning("%s: its last line was cut (a killed run); that question "
                                                       "is measured again", path)
            if not lines or not isinstance(lines[0], dict) or not _same_settings(lines[0].get("settings"), settings):
                old = lines[0].get("settings", {}) if lines and isinstance(lines[0], dict) else {}
                what = "other model weights" if old.get("model_weights") not in (None, weights) and \
                    _same_settings({k: v for k, v in old.items() if k != "model_weights"},
                                   {k: v for k, v in settings.items() if k != "model_weights"}) else "other settings"
                raise MsnError(f"{path.parent} holds an earlier bench with {what} ({path.name}); "
                               "give another --out, or delete that file to start again")
            self.done = {entry["question_id"]: entry for entry in lines[1:]}
            path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        else:
            path.write_text(json.dumps({"settings": settings}) + "\n")
        self.resumed = len(self.done)

    def reusable(self, questions: list[Question]) -> None:
        """Drops the records of questions whose text changed since they were measured (saying so)."""
        for q in questions:
            entry = self.done.get(q.qid)
            if entry is not None and entry.get("text_key") != question_key(q):
                logging.getLogger("msn.bench").warning(
                    "question %s changed since the earlier run in %s: measured again", q.qid, self.path.parent)
                del self.done[q.qid]
        self.resumed = len(self.done)

    def add(self, q: Question, records: dict, latency: dict, profiles: dict) -> None:
        entry = {"question_id": q.qid, "text_key": question_key(q), "records": records, "latency": latency,
                 "profile": {m: {"seconds": p.seconds, "steps": p.steps} for m, p in profiles.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


METHOD_STATE = ".method-state"     # in a bench's --out: each method's scored steps after the last finished question


class MethodTables:
    """Learned decoding state, one state per method through a bench: the model's recycled
    candidate table and the scored tree steps ``--tree auto`` and merged drafts choose from
    (``acceptance`` in msn's store). Each method's generations start from its own state, begun
    as the bench's starting state, so a method never drafts from what another one (or an
    earlier repeat of the same prompt) learnt, and its figures do not depend on which other
    methods share the run. Each method's scored steps are checkpointed in the bench's folder
    after every finished question, so a resumed bench continues them (``resume_from``); its
    recycled tables restart from the one on disk."""

    def __init__(self, model, cfg: BenchConfig, resume_from: Path | None = None):
        import tempfile

        from msn.decoding import recycle
        from msn.decoding.devices import model_device, vocab_size

        if cfg.reset_recycle:
            recycle.reset_tables(model)
        self.table = recycle.table_for(model, vocab_size(model) or 1, model_device(model))
        self.started = "cold" if self.table.cold else "warm"
        self.start = self.table.ids.clone()
        self.states: dict[str, torch.Tensor] = {}
        self.methods = cfg.methods
        self.scored = state_root("acceptance") / "acceptance"       # the scored steps the bench starts from
        self.folder = Path(tempfile.mkdtemp(prefix="msn-bench-state-"))
        self.resume_from = resume_from if resume_from is not None and resume_from.is_dir() else None
        self.finished = False
        self._before: Path | None = None
        self.reset()

    def _saved(self, method: str) -> Path:
        """Method ``method``'s scored steps as it left them (made from the start state)."""
        root = self.folder / str(self.methods.index(method))
        if not root.exists():
            root.mkdir()
            if self.scored.is_dir():
                shutil.copytree(self.scored, root / "acceptance")
        return root

    def before(self, method: str) -> None:
        """A generation of ``method`` starts from its state (every repeat from the same one)."""
        self.table.ids.copy_(self.states.get(method, self.start))
        work = self.folder / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(self._saved(method), work)
        self._before = set_state_root("acceptance", work)

    def release(self) -> None:
        """After each generation: the store's scored steps are the store's again."""
        set_state_root("acceptance", self._before)

    def after(self, method: str) -> None:
        """After a prompt's repeats: ``method``'s state is what its last generation left."""
        if not torch.equal(self.table.ids, self.states.get(method, self.start)):
            self.states[method] = self.table.ids.clone()
        saved = self._saved(method)
        shutil.rmtree(saved)
        shutil.copytree(self.folder / "work", saved)

    def reset(self) -> None:
        """Back to the state the bench started from (after the warm-up): the scored steps of a
        resumed bench's last checkpoint, else the start state for every method."""
        self.table.ids.copy_(self.start)
        self.states.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.resume_from is not None:
            shutil.copytree(self.resume_from, self.folder)
        else:
            self.folder.mkdir()

    def checkpoint(self, to: Path) -> None:
        """Writes every method's scored steps to ``to`` (beside, then renamed in)."""
        staged = to.with_name(to.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(self.folder, staged, ignore=shutil.ignore_patterns("work"))
        shutil.rmtree(to, ignore_errors=True)
        staged.rename(to)

    def keep(self, checkpoint: Path) -> None:
        """Leaves the state of ``tr-jacobi`` (else the first method that changed one) in memory
        and in the store: its recycled table, and its scored steps. A bench that ran to its end
        drops its ``checkpoint``; an interrupted one keeps it for its rerun."""
        scored = self.folder / str(self.methods.index("tr-jacobi")) / "acceptance" if "tr-jacobi" in self.methods \
            else None
        if scored is not None and scored.is_dir():
            self.scored.mkdir(parents=True, exist_ok=True)
            for f in scored.iterdir():
                shutil.copy2(f, self.scored / f.name)
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.finished:
            shutil.rmtree(checkpoint, ignore_errors=True)
        used = [m for m in self.methods if m in self.states]
        if not used:
            self.table.ids.copy_(self.start)
            return
        main = "tr-jacobi" if "tr-jacobi" in used else used[0]
        self.table.ids.copy_(self.states[main])
        self.table.dirty = True
        self.table.save(force=True)


def _run_all(model, tokenizer, questions: list[Question], cfg: BenchConfig, counter, clock, device, progress,
             log: Progress, tables: MethodTables):
    per_method: dict[tuple[str, str], dict] = {}
    latency: dict[str, dict] = {}
    profiles: dict[str, StepProfile] = {}
    for q in questions:                            # questions finished by an earlier run of this bench
        entry = log.done.get(q.qid)
        if entry is None:
            continue
        for m, rec in entry["records"].items():
            per_method[(q.qid, m)] = rec
        latency.update(entry["latency"])
        for m, part in entry["profile"].items():
            prof = profiles.setdefault(m, StepProfile(device))
            prof.steps += part["steps"]
            for k, v in part["seconds"].items():
                prof.seconds[k] += v
    todo = [q for q in questions if q.qid not in log.done]
    turns = sum(len(q.turns) for q in questions)
    bar = tqdm(total=turns * len(cfg.methods), initial=(turns - sum(len(q.turns) for q in todo)) * len(cfg.methods),
               desc="bench", unit="gen", disable=not progress, file=sys.stderr)
    if todo:
        first = encode_prompt(tokenizer, [{"role": "user", "content": todo[0].turns[0]}], device)
        warm = BenchConfig(**{**asdict(cfg), "max_new_tokens": min(16, cfg.max_new_tokens)})
        for _ in range(cfg.warmup):
            for m in cfg.methods:
                tables.before(m)
                try:
                    run_method(model, first, m, warm, counter)
                finally:
                    tables.release()
                tables.after(m)
        tables.reset()        # the warm-up drafted from the first question: nothing of it is kept
    for q in todo:
        before = {m: (p.steps, dict(p.seconds)) for m, p in profiles.items()}
        conversation: list[dict] = []
        for turn in q.turns:
            conversation.append({"role": "user", "content": turn})
            ids = encode_prompt(tokenizer, conversation, device)
            reference = None
            for m in cfg.methods:                      # ar first: the baseline, interleaved per prompt
                walls = []
                for _ in range(cfg.repeats):
                    prof = profiles.setdefault(m, StepProfile(device)) if cfg.profile and m not in HF_METHODS else None
                    tables.before(m)
                    try:
                        run, wall = _timed(lambda: run_method(model, ids, m, cfg, counter, prof), device, clock)
                    finally:
                        tables.release()
                    walls.append(wall)
                tables.after(m)
                if m == "ar":
                    reference = run.tokens
                rec = per_method.setdefault((q.qid, m), {
                    "question_id": q.qid, "category": q.category, "method": m,
                    "choices": [{"index": 0, "turns": [], "new_tokens": [], "wall_time": [], "accept_lengths": [],
                                 "steps": []}],
                    "match": True})
                choice = rec["choices"][0]
                choice["turns"].append(tokenizer.decode(run.tokens, skip_special_tokens=True))
                choice["new_tokens"].append(len(run.tokens))
                choice["wall_time"].append(statistics.median(walls))
                choice["accept_lengths"].append(run.accept_lengths)
                choice["steps"].append(run.steps)
                rec.setdefault("forwards", []).append(run.forwards)
                if run.info.get("choices"):
                    rec.setdefault("trees", []).append([c["inputs"] for c in run.info["choices"]])
                    latency[m] = run.info["latency"]
                rec["match"] = rec["match"] and run.tokens == reference
                bar.update(1)
            # The next turn follows the model's own answer, as Spec-Bench does.
            conversation.append({"role": "assistant", "content": tokenizer.decode(reference, skip_special_tokens=True)})
        spent = {}
        for m, p in profiles.items():
            steps, seconds = before.get(m, (0, dict.fromkeys(p.seconds, 0.0)))
            part = StepProfile(device)
            part.steps = p.steps - steps
            part.seconds = {k: v - seconds[k] for k, v in p.seconds.items()}
            spent[m] = part
        tables.checkpoint(log.path.parent / METHOD_STATE)      # each method's state as this question left it
        log.add(q, {m: per_method[(q.qid, m)] for m in cfg.methods}, latency, spent)
    bar.close()
    records = []
    for rec in per_method.values():
        c = rec["choices"][0]
        lengths = None if any(a is None for a in c["accept_lengths"]) else [x for a in c["accept_lengths"] for x in a]
        records.append({**rec, "new_tokens": sum(c["new_tokens"]), "wall_time": sum(c["wall_time"]),
                        "steps": sum(c["steps"]), "accept_lengths": lengths, "forwards": sum(rec["forwards"])})
    return records, latency, {m: p.report() for m, p in profiles.items()}
