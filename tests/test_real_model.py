"""End to end on the real SmolLM2-135M-Instruct (downloads ~93 MB once): run with -m slow."""

import json

import pytest

import msn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from msn.fetch import fetch
    from msn.loading import load_for_inference

    return load_for_inference(str(fetch("smollm2-135m-instruct")), "cpu", "float32")


def test_tr_jacobi_equals_ar_on_spec_bench_prompts(smollm2):
    from msn.bench.prompts import default_questions_path, load_questions
    from msn.data.records import encode_prompt

    model, tok = smollm2
    for q in load_questions("spec-bench", str(default_questions_path()), limit=1):
        ids = encode_prompt(tok, [{"role": "user", "content": q.turns[0]}])
        ar = msn.generate(model, ids, method="ar", max_new_tokens=48)
        for m in ("tr-jacobi", "pld", "lookahead", "jacobi"):
            assert msn.generate(model, ids, method=m, max_new_tokens=48).tokens == ar.tokens, (q.qid, m)


def test_stdlib_data_and_lora_training(tmp_path):
    from msn.data.stdlib_code import build
    from msn.fetch import fetch
    from msn.train import TrainConfig, run

    info = build(tmp_path / "data", progress=False)
    assert info["train_examples"] > 1000 and info["heldout_examples"] > 100
    train_mods = {json.loads(l)["module"].split(".")[0] for l in open(tmp_path / "data" / "train.jsonl")}
    assert not train_mods & set(info["heldout_modules"])
    summary = run(TrainConfig(model=str(fetch("smollm2-135m-instruct")), data=str(tmp_path / "data" / "train.jsonl"),
                              output_dir=str(tmp_path / "out"), max_steps=2, lora_r=8, batch_size=2,
                              max_length=256, save_steps=100))
    assert summary["global_step"] == 2 and (tmp_path / "out" / "adapter_model.safetensors").exists()
