import json

import pytest

from msn.bench.harness import BenchConfig, run_bench
from msn.bench.prompts import load_questions
from msn.bench.report import summarize, table
from msn.decoding import cpu
from msn.errors import MsnError
from tiny import tiny_llama_and_tokenizer

METHODS = ["ar", "pld", "lookahead", "jacobi", "tr-jacobi", "hf-pld"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama_and_tokenizer()


@pytest.fixture
def questions(tmp_path):
    p = tmp_path / "q.jsonl"
    rows = [{"question_id": i, "category": c, "turns": t} for i, (c, t) in enumerate([
        ("writing", ["def add(a, b): return a + b", "again"]), ("qa", ["The quick brown fox"]),
        ("qa", ["for i in range(10): print(i)"]), ("translation", ["class Stack: push"])])]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


class ForwardClock:
    """A fake clock whose time is the number of model forward passes so far."""

    def __init__(self, model):
        self.t = 0
        model.register_forward_hook(lambda *a: setattr(self, "t", self.t + 1))

    def __call__(self):
        return float(self.t)


def test_harness_writes_a_well_formed_summary(tiny, questions, tmp_path, capsys):
    model, tok = tiny
    clock = ForwardClock(model)
    cfg = BenchConfig(model="tiny", out=str(tmp_path / "out"), bench="spec-bench", questions=str(questions),
                      methods=METHODS, max_new_tokens=24, warmup=1)
    summary = run_bench(cfg, model=model, tokenizer=tok, clock=clock, progress=False)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(on_disk["methods"]) == set(METHODS)
    assert cpu.decided(model) and on_disk["config"]["cpu_one_row_as_two"] is cpu.padded(model)   # the kernel that ran
    assert set(on_disk["methods"]["ar"]["categories"]) == {"mt_bench", "qa", "translation"}
    for key in ("speedup", "mean_accepted_tokens", "tokens_per_s", "match_rate"):
        assert key in on_disk["methods"]["tr-jacobi"]["overall"]
    assert (tmp_path / "out" / "speedup.png").stat().st_size > 0
    assert (tmp_path / "out" / "acceptance.png").stat().st_size > 0
    records = [json.loads(l) for l in open(tmp_path / "out" / "records.jsonl")]
    assert len(records) == 4 * len(METHODS)
    for m, entry in summary["methods"].items():
        o = entry["overall"]
        assert o["match_rate"] == 1.0, m
        # Wall time is measured by the clock: here it counts forward passes, so the
        # speedup must equal the ratio of forward passes.
        recs = [r for r in records if r["method"] == m]
        ar = [r for r in records if r["method"] == "ar"]
        assert o["speedup"] == pytest.approx(sum(r["forwards"] for r in ar) / sum(r["forwards"] for r in recs))
        if o["histogram"] is not None:
            assert sum(o["histogram"].values()) == o["steps"]
    ar_forwards = sum(r["forwards"] for r in records if r["method"] == "ar")
    assert ar_forwards == sum(r["new_tokens"] for r in records if r["method"] == "ar")


def test_an_interrupted_bench_resumes_where_it_stopped(tiny, questions, tmp_path, monkeypatch):
    """A bench stopped in its third question keeps the first two; the rerun runs only the rest,
    and the result equals an uninterrupted run's (tokens, steps, forwards, profile steps)."""
    import msn.bench.harness as h

    model, tok = tiny
    # The paper's drafts: a resumed bench restarts the recycled candidate tables from the one on disk.
    # Cold: both runs start from the same learned state (a warm run leaves tr-jacobi's in the store).
    opts = dict(model="tiny", bench="spec-bench", questions=str(questions), methods=["ar", "pld", "tr-jacobi"],
                max_new_tokens=12, warmup=0, profile=True, drafts="paper", cold=True)
    straight = run_bench(BenchConfig(out=str(tmp_path / "straight"), **opts), model=model, tokenizer=tok,
                         progress=False)
    real = h.run_method
    calls = []

    def stop_in_the_third_question(model, ids, method, *a, **k):
        calls.append(method)
        if len(calls) == 3 * 2 + 3 + 1:       # question 0 has two turns, question 1 one; then one more
            raise KeyboardInterrupt
        return real(model, ids, method, *a, **k)

    monkeypatch.setattr(h, "run_method", stop_in_the_third_question)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(out=str(out), **opts), model=model, tokenizer=tok, progress=False)
    assert len((out / "progress.jsonl").read_text().splitlines()) == 1 + 2     # settings + two questions
    assert (out / h.METHOD_STATE).is_dir()          # each method's scored steps, as the second question left them
    calls.clear()
    resumed = run_bench(BenchConfig(out=str(out), **opts), model=model, tokenizer=tok, progress=False)
    assert len(calls) == 3 * 2                                                 # the last two questions only
    assert resumed["config"]["questions_from_earlier_runs"] == 2
    assert not (out / h.METHOD_STATE).exists()      # finished: the checkpoint is gone
    key = lambda r: (r["question_id"], r["method"])
    a = sorted((json.loads(l) for l in open(tmp_path / "straight" / "records.jsonl")), key=key)
    b = sorted((json.loads(l) for l in open(out / "records.jsonl")), key=key)
    assert [(r["choices"][0]["turns"], r["steps"], r["forwards"], r["accept_lengths"]) for r in a] == \
        [(r["choices"][0]["turns"], r["steps"], r["forwards"], r["accept_lengths"]) for r in b]
    assert {m: p["steps"] for m, p in straight["profile"].items()} == \
        {m: p["steps"] for m, p in resumed["profile"].items()}
    calls.clear()
    run_bench(BenchConfig(out=str(out), **opts), model=model, tokenizer=tok, progress=False)
    assert calls == []                                                         # finished: nothing to run
    with pytest.raises(MsnError, match="other settings"):
        run_bench(BenchConfig(out=str(out), **{**opts, "max_new_tokens": 8}), model=model, tokenizer=tok,
                  progress=False)


def test_equality_check_catches_a_wrong_decoder(tiny, questions, tmp_path, monkeypatch):
    import msn.bench.harness as h

    model, tok = tiny
    real = h.generate

    def off_by_one(model, ids, method, **kw):
        r = real(model, ids, method=method, **kw)
        if method == "jacobi":
            r.tokens[-1] = (r.tokens[-1] + 1) % 50
        return r

    monkeypatch.setattr(h, "generate", off_by_one)
    cfg = BenchConfig(model="tiny", out=str(tmp_path), questions=str(questions), methods=["ar", "jacobi", "pld"],
                      max_new_tokens=12, warmup=0)
    s = run_bench(cfg, model=model, tokenizer=tok, progress=False)
    assert s["methods"]["jacobi"]["overall"]["match_rate"] == 0.0
    assert s["methods"]["pld"]["overall"]["match_rate"] == 1.0


def test_summarize_by_hand():
    recs = [
        dict(method="ar", category="a", wall_time=4.0, new_tokens=4, steps=3, accept_lengths=[1, 1, 1], forwards=4, match=True),
        dict(method="ar", category="b", wall_time=2.0, new_tokens=2, steps=1, accept_lengths=[1], forwards=2, match=True),
        dict(method="x", category="a", wall_time=1.0, new_tokens=4, steps=1, accept_lengths=[3], forwards=2, match=True),
        dict(method="x", category="b", wall_time=2.0, new_tokens=2, steps=1, accept_lengths=[1], forwards=2, match=False),
    ]
    s = summarize(recs, ["ar", "x"])["x"]
    assert s["overall"]["repeated_lines"] is None            # no answer text recorded
    assert s["overall"]["speedup"] == pytest.approx(2.0)
    assert s["categories"]["a"]["speedup"] == pytest.approx(4.0)
    assert s["overall"]["mean_accepted_tokens"] == pytest.approx(2.0)
    assert s["overall"]["match_rate"] == 0.5
    assert s["overall"]["histogram"] == {"1": 1, "3": 1}
    # Each turn of each answer is checked for lines repeating an earlier line of that turn.
    recs[2]["choices"] = [{"turns": ["def f():\n    pass\n    pass", "def g():\n    pass"]}]
    recs[3]["choices"] = [{"turns": ["x = 1\nx = 1\nx = 1\ny = 2"]}]
    s = summarize(recs, ["ar", "x"])["x"]
    assert s["overall"]["repeated_lines"] == pytest.approx(3 / 9)
    assert s["categories"]["a"]["repeated_lines"] == pytest.approx(1 / 5)
    assert "33%" in table(summarize(recs, ["ar", "x"]))


def test_limit_and_categories(questions):
    qs = load_questions("spec-bench", str(questions), limit=1)
    assert [q.category for q in qs] == ["mt_bench", "qa", "translation"]
    assert [q.category for q in load_questions("spec-bench", str(questions), categories=["qa"])] == ["qa", "qa"]


def test_bad_bench_input(questions, tmp_path):
    with pytest.raises(MsnError, match="does not exist"):
        load_questions("spec-bench", str(tmp_path / "none.jsonl"))
    with pytest.raises(MsnError, match="unknown category"):
        load_questions("spec-bench", str(questions), categories=["poetry"])
    with pytest.raises(MsnError, match="unknown method"):
        BenchConfig(model="m", out="o", methods=["ar", "medusa"])
    for bad in ("tr-jacobi:huge", "pld:small", "tr-jacobi:", "tr-jacobi:paper:merged", "recycle:paper"):
        with pytest.raises(MsnError, match="only tr-jacobi takes"):
            BenchConfig(model="m", out="o", methods=["ar", bad])


def test_tree_variants_run_side_by_side(tiny, questions, tmp_path):
    """``tr-jacobi:TREE`` runs that tree on the same prompts as the other methods: each
    variant's steps are those of a generation with that tree, and all equal ar."""
    import msn
    from msn.data.records import encode_prompt, ensure_chat_template

    model, tok = tiny
    ensure_chat_template(tok)
    methods = ["ar", "tr-jacobi:chain:paper", "tr-jacobi:reference:paper"]
    cfg = BenchConfig(model="tiny", out=str(tmp_path / "out"), questions=str(questions), methods=methods,
                      max_new_tokens=16, warmup=0, categories=["qa"])
    summary = run_bench(cfg, model=model, tokenizer=tok, progress=False)
    assert list(summary["methods"]) == methods
    records = {r["method"]: r for r in (json.loads(l) for l in open(tmp_path / "out" / "records.jsonl"))
               if r["question_id"] == "1"}
    ids = encode_prompt(tok, [{"role": "user", "content": "The quick brown fox"}], "cpu")
    for tree in ("chain", "reference"):
        r = msn.generate(model, ids, method="tr-jacobi", tree=tree, drafts="paper", max_new_tokens=16)
        assert records[f"tr-jacobi:{tree}:paper"]["steps"] == r.steps and records[f"tr-jacobi:{tree}:paper"]["match"]
    with pytest.raises(MsnError, match="unknown benchmark"):
        load_questions("nobench")


def test_real_spec_bench_file_loads_when_present():
    from msn.bench.prompts import default_questions_path

    try:
        path = default_questions_path()
    except MsnError:
        pytest.skip("../shared/data/spec_bench/question.jsonl not present")
    qs = load_questions("spec-bench", str(path), limit=2)
    assert len(qs) == 12 and sum(len(q.turns) == 2 for q in qs) == 2
    assert len(load_questions("mt-bench", str(path))) == 80


def test_each_method_drafts_from_its_own_table(tiny, questions, tmp_path, monkeypatch):
    """With --reset-recycle the table starts cold; recycle's steps in the bench are those of
    recycle alone over the same prompts from an empty table: the warm-up, the repeats and the
    other methods on the same prompt leave nothing in what it drafts from."""
    import msn
    from msn.data.records import encode_prompt, ensure_chat_template
    from msn.decoding import recycle

    model, tok = tiny
    ensure_chat_template(tok)
    monkeypatch.setattr(recycle, "_TABLES", {})
    cfg = BenchConfig(model="tiny", out=str(tmp_path / "out"), questions=str(questions),
                      methods=["ar", "tr-jacobi", "recycle"], max_new_tokens=16, warmup=1, repeats=2,
                      categories=["qa"], reset_recycle=True)
    summary = run_bench(cfg, model=model, tokenizer=tok, progress=False)
    assert summary["config"]["recycle_table"] == "cold"
    assert summary["methods"]["recycle"]["overall"]["match_rate"] == 1.0
    records = {r["question_id"]: r for r in (json.loads(l) for l in open(tmp_path / "out" / "records.jsonl"))
               if r["method"] == "recycle"}
    kept = recycle.table_for(model, len(tok), "cpu")
    assert kept.path().exists()          # the bench leaves its tr-jacobi table on disk
    recycle.reset_tables(model)
    for qid, text in (("1", "The quick brown fox"), ("2", "for i in range(10): print(i)")):
        ids = encode_prompt(tok, [{"role": "user", "content": text}], "cpu")
        alone = msn.generate(model, ids, method="recycle", max_new_tokens=16)
        assert records[qid]["steps"] == alone.steps, qid


def test_the_demo_pairs_runs_and_checks_outputs(tiny):
    from msn.bench.demo import DemoPrompt, run_demo

    model, tok = tiny
    prompts = (DemoPrompt("copy", "Repeat: the quick brown fox, the quick brown fox"), DemoPrompt("code", "def add"))
    lines = []
    report = run_demo(model, tok, prompts=prompts, max_new_tokens=12, repeats=2, log=lines.append)
    assert report["all_identical"] and len(report["prompts"]) == 2 and len(lines) == 2
    for row in report["prompts"]:
        assert len(row["ar_walls"]) == len(row["method_walls"]) == 2
        pairs = sorted(a / b for a, b in zip(row["ar_walls"], row["method_walls"]))
        assert row["speedup"] == pytest.approx((pairs[0] + pairs[1]) / 2, rel=1e-2)
    product = 1.0
    for row in report["prompts"]:
        product *= row["speedup"]
    assert report["geomean_speedup"] == pytest.approx(product ** 0.5, rel=1e-2)
