"""msn's proposer inside a vLLM engine (runs in .venv-vllm: scripts/test-vllm.sh): greedy
outputs equal vLLM's own without speculation, and a sampled pass completes."""

import os
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

MODEL = Path(os.environ.get("MSN_VLLM_MODEL", Path.home() / ".cache" / "msn" / "models" / "smollm2-135m-instruct"))
PROMPTS = [[{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog, "
                                        "the quick brown fox jumps over the lazy dog."}],
           [{"role": "user", "content": "Write a Python function that returns the sum of a list."}],
           [{"role": "user", "content": "Name three colors."}]]


@pytest.fixture(scope="module")
def outputs():
    if not (MODEL / "config.json").exists():
        pytest.skip(f"no model at {MODEL} (msn fetch smollm2-135m-instruct, or set MSN_VLLM_MODEL)")
    from vllm import LLM, SamplingParams

    got = {}
    for name, spec in (("none", None), ("msn", {"method": "custom_class", "model": "msn.vllm.MsnProposer",
                                                "num_speculative_tokens": 5})):
        llm = LLM(model=str(MODEL), dtype="float32", gpu_memory_utilization=0.3, max_model_len=2048, max_num_seqs=4,
                  speculative_config=spec, seed=0, enforce_eager=True)
        greedy = llm.chat(PROMPTS, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
        got[name] = [list(o.outputs[0].token_ids) for o in greedy]
        if name == "msn":
            sampled = llm.chat(PROMPTS, SamplingParams(temperature=0.7, max_tokens=24, seed=0), use_tqdm=False)
            got["sampled"] = [list(o.outputs[0].token_ids) for o in sampled]
        del llm
    return got


def test_greedy_outputs_equal_no_speculation(outputs):
    assert outputs["msn"] == outputs["none"]
    assert all(len(t) > 0 for t in outputs["none"])


def test_a_sampled_pass_completes(outputs):
    assert all(len(t) > 0 for t in outputs["sampled"])
