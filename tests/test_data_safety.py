"""Nothing a command writes corrupts a model or a result, and every mistake is one line: the
classes of issue 35, at least two cases each (one ``msn: error:`` line, its exit code, no
traceback; or the safe outcome itself)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msn.cli import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USAGE, main
from msn.errors import MsnError
from tiny import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny base and a tuned copy of it (every linear weight moved by a few percent)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("pair")
    base = tiny_checkpoint(root / "base")
    tuned = tiny_checkpoint(root / "tuned")
    m = AutoModelForCausalLM.from_pretrained(tuned)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    m.save_pretrained(tuned)
    return base, tuned


def _one_line(capsys, argv, fragment, code=EXIT_USAGE):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("msn: error:") and fragment in err[-1], err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


# -- 1. No command writes into a folder that holds one of its inputs ----------------------------

@pytest.mark.parametrize("which", ["--tuned", "--base"])
def test_export_lora_never_writes_into_its_inputs(capsys, pair, which):
    base, tuned = pair
    target = tuned if which == "--tuned" else base
    before = _files(target)
    _one_line(capsys, ["export-lora", "--base", str(base), "--tuned", str(tuned), "--out", str(target), "--rank", "2"],
              f"the {which} folder")
    assert _files(target) == before
    _one_line(capsys, ["export-lora", "--base", str(base), "--tuned", str(tuned), "--out", str(target / "sub"),
                       "--rank", "2"], "lies inside")


def test_bench_and_self_distill_never_write_into_a_model_or_their_data(capsys, pair, tmp_path):
    base, _ = pair
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"turns": ["hi"]}) + "\n")
    before = _files(base)
    _one_line(capsys, ["bench", "--model", str(base), "--out", str(base), "--bench", str(q)], "the --model folder")
    other = tiny_checkpoint(tmp_path / "other")
    _one_line(capsys, ["bench", "--model", str(base), "--out", str(other), "--bench", str(q)], "holds a model")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    _one_line(capsys, ["data", "self-distill", "--model", str(base), "--data", str(data), "--out", str(data)],
              "the --data folder")
    _one_line(capsys, ["data", "self-distill", "--model", str(base), "--data", str(data), "--out", str(base)],
              "the --model folder")
    assert _files(base) == before


def test_stale_staging_from_a_killed_export_is_never_moved_in(pair, tmp_path):
    from msn.adapter_export import export_lora

    base, tuned = pair
    out = tmp_path / "adapter"
    (out / ".export-staging").mkdir(parents=True)
    (out / ".export-staging" / "junk.safetensors").write_bytes(b"\0" * 4096)   # what a SIGKILL left
    export_lora(base, tuned, out, rank=2, log=lambda *_: None)
    assert not (out / "junk.safetensors").exists() and not (out / ".export-staging").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).is_absolute()      # loads from any working folder


# -- 2. Results keyed by content ------------------------------------------------------------------

def test_bench_rerun_measures_a_changed_question_again_and_refuses_other_weights(pair, tmp_path, caplog):
    from msn.bench.harness import BenchConfig, run_bench

    base, tuned = pair
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "turns": [t]}) + "\n" for i, t in enumerate(["hi", "yo"])))
    cfg = BenchConfig(model=str(base), out=str(tmp_path / "b"), bench=str(q), methods=["ar", "pld"],
                      max_new_tokens=6, warmup=0)
    first = run_bench(cfg, progress=False)
    q.write_text("".join(json.dumps({"question_id": i, "turns": [t]}) + "\n" for i, t in enumerate(["hi", "other"])))
    caplog.set_level("WARNING")
    again = run_bench(cfg, progress=False)
    assert again["config"]["questions_from_earlier_runs"] == 1        # "hi" kept, the edited one measured anew
    assert "question 1 changed" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "b" / "records.jsonl").read_text().splitlines()]
    assert first["config"]["questions_run"] == again["config"]["questions_run"] == 2 and len(records) == 4
    # The same path holding other weights: refused, naming the weights.
    import shutil

    shutil.copy(tuned / "model.safetensors", tmp_path / "swapped.safetensors")
    moved = tmp_path / "m"
    shutil.copytree(base, moved)
    cfg2 = BenchConfig(**{**cfg.__dict__, "model": str(moved), "out": str(tmp_path / "c")})
    run_bench(cfg2, progress=False)
    shutil.copy(tmp_path / "swapped.safetensors", moved / "model.safetensors")
    with pytest.raises(MsnError, match="other model weights"):
        run_bench(cfg2, progress=False)


def test_duplicate_question_ids_and_empty_method_lists_are_refused(capsys, pair, tmp_path):
    base, _ = pair
    q = tmp_path / "dup.jsonl"
    q.write_text("".join(json.dumps({"question_id": 7, "turns": [t]}) + "\n" for t in ("a", "b")))
    _one_line(capsys, ["bench", "--model", str(base), "--out", str(tmp_path / "o"), "--bench", str(q)],
              "question_id 7 was used on line 1")
    _one_line(capsys, ["bench", "--model", str(base), "--out", str(tmp_path / "o"), "--methods", ""],
              "--methods is empty")
    _one_line(capsys, ["bench", "--model", str(base), "--out", str(tmp_path / "o"), "--methods", ",,"],
              "--methods is empty")


# -- 3. Reads that do not trust what is on disk ---------------------------------------------------

def test_a_cut_last_progress_line_is_dropped_and_measured_again(pair, tmp_path):
    from msn.bench.harness import BenchConfig, run_bench

    base, _ = pair
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "turns": [t]}) + "\n" for i, t in enumerate(["hi", "yo"])))
    cfg = BenchConfig(model=str(base), out=str(tmp_path / "b"), bench=str(q), methods=["ar"], max_new_tokens=5,
                      warmup=0)
    first = run_bench(cfg, progress=False)
    progress = tmp_path / "b" / "progress.jsonl"
    lines = progress.read_text().splitlines()
    progress.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])    # killed mid-write
    again = run_bench(cfg, progress=False)
    assert again["config"]["questions_from_earlier_runs"] == 1
    assert again["methods"]["ar"]["overall"]["new_tokens"] == first["methods"]["ar"]["overall"]["new_tokens"]


def test_truncated_fetched_model_and_adapter_weights_are_caught(pair, tmp_path, capsys):
    from msn import fetch as f
    from msn.adapter_export import export_lora

    base, tuned = pair
    folder = tmp_path / "cached"
    import shutil

    shutil.copytree(base, folder)
    f._write_manifest(folder)
    assert f._damaged(folder) is None
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "model.safetensors has 1000 bytes" in f._damaged(folder)
    adapter = tmp_path / "adapter"
    export_lora(base, tuned, adapter, rank=2, log=lambda *_: None)
    w = adapter / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    _one_line(capsys, ["generate", "--model", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"],
              "cannot apply the adapter")


def test_resume_after_the_training_data_changed_is_refused(pair, tmp_path, capsys):
    base, _ = pair
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"answer {i} " * 3}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    args = ["train", "--model", str(base), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--save-steps", "1", "--batch-size", "2", "--max-length", "64"]
    assert main(args) == 0
    import shutil

    shutil.rmtree(out / "checkpoint-2")
    (out / "msn_config.json").unlink()
    data.write_text(data.read_text().replace("answer", "reply"))
    _one_line(capsys, [*args, "--resume"], "the training data changed")
    _one_line(capsys, [*args, "--resume", "--lr", "0.5"], "--lr changed")


def test_an_msn_model_prompts_file_that_is_not_json_is_one_line(pair, tmp_path, capsys):
    base, tuned = pair
    import shutil

    msn_model = tmp_path / "msnm"
    shutil.copytree(tuned, msn_model)
    (msn_model / "prompts.jsonl").write_text("{not json\n")
    start = time.perf_counter()
    _one_line(capsys, ["demo", "--model", str(base), "--msn-model", str(msn_model), "--repeats", "1"],
              "prompts.jsonl:1: not valid JSON")
    _one_line(capsys, ["demo", "--model", str(base), "--msn-model", str(tmp_path / "junk"), "--repeats", "1"],
              "--msn-model")
    # Both refused before the base demo ran (it prints its header first).
    assert "msn demo:" not in capsys.readouterr().out and time.perf_counter() - start < 30


def test_demo_out_that_cannot_be_written_is_refused_first(pair, tmp_path, capsys):
    base, _ = pair
    _one_line(capsys, ["demo", "--model", str(base), "--out", str(tmp_path), "--msn-model", "none"], "is a folder")
    _one_line(capsys, ["demo", "--model", str(base), "--out", "/proc/msn-report.json", "--msn-model", "none"],
              "cannot be written")


# -- 4. The process boundary ----------------------------------------------------------------------

def _msn(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "msn", *args], env=env, **kw)


def test_broken_pipe_and_closed_streams_exit_quietly(pair, tmp_path):
    base, _ = pair
    gen = ["generate", "--model", str(base), "--prompt", "hi", "--max-new-tokens", "40", "--method", "ar"]
    # The reader goes away at once (`msn generate ... | head -c 0`).
    p = _msn(gen, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(120) == EXIT_BROKEN_PIPE and "Traceback" not in err, err
    # Standard output closed before the start (`>&-`), and `--prompt -` with standard input closed.
    p = _msn(gen, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(), close_fds=True,
             preexec_fn=lambda: os.close(1))
    err = p.stderr.read().decode()
    assert p.wait(120) == EXIT_USAGE and "standard output is closed" in err and "Traceback" not in err, err
    p = _msn(["generate", "--model", str(base), "--prompt", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
             preexec_fn=lambda: os.close(0))
    out, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_USAGE and "standard input is closed" in err.decode(), err


def test_sigterm_during_training_is_handled_like_ctrl_c(pair, tmp_path):
    base, _ = pair
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"answer {i} " * 3}) + "\n" for i in range(8)))
    p = _msn(["train", "--model", str(base), "--data", str(data), "--output-dir", str(tmp_path / "run"),
              "--max-steps", "100000", "--save-steps", "1", "--batch-size", "2", "--max-length", "64"],
             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((tmp_path / "run").glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    err = p.stderr.read().decode()
    assert p.wait(120) == EXIT_INTERRUPTED, err
    assert "msn: interrupted; continue with --resume (from" in err and "Traceback" not in err, err


# -- 6. Quiet oddities ----------------------------------------------------------------------------

def test_rank_above_full_rank_and_an_unrelated_base(pair, tmp_path, capsys):
    from msn.adapter_export import export_lora

    base, tuned = pair
    report = export_lora(base, tuned, tmp_path / "a", rank=10_000, log=lambda *_: None)
    assert report["rank"] == 32                 # the largest full rank of a changed layer, no zero padding
    stranger = tiny_checkpoint(tmp_path / "stranger", seed=5)
    _one_line(capsys, ["export-lora", "--base", str(stranger), "--tuned", str(tuned), "--out", str(tmp_path / "b"),
                       "--rank", "2"], "was not fine-tuned from this base")


# -- 5. Server edges -------------------------------------------------------------------------------

def test_lone_surrogates_get_a_400_naming_the_field(pair):
    import httpx2 as httpx
    from fastapi.testclient import TestClient

    from msn.loading import load_for_inference
    from msn.serve import Server

    base, _ = pair
    model, tok = load_for_inference(str(base), "cpu", "float32")
    srv = Server(model, tok, name="tiny", method="ar", max_batch=2)
    with TestClient(srv.app) as client:
        raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", r.text
        r = client.post("/v1/completions", content=b'{"model": "tiny", "prompt": "\\udfff", "max_tokens": 2}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    del httpx


def test_a_client_that_never_finishes_its_head_is_disconnected():
    import socket
    import threading

    import uvicorn

    from msn.serve import head_timeout_protocol
    from test_serve import free_port

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                       http=head_timeout_protocol(0.5)))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline
        time.sleep(0.05)
    try:
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")         # and never the blank line
        slow.settimeout(5)
        start = time.time()
        assert slow.recv(100) == b"" and time.time() - start < 4     # closed by the server
        fast = socket.create_connection(("127.0.0.1", port))         # a whole head is still served
        fast.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        fast.settimeout(5)
        assert b"200" in fast.recv(100)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


# -- 5b. A batch is checked whole before any decoding ---------------------------------------------

def test_a_bad_prompt_in_a_batch_is_named_before_any_row_decodes(pair, monkeypatch):
    import msn
    from msn.decoding import batch as b
    from msn.loading import load_for_inference

    base, _ = pair
    model, _ = load_for_inference(str(base), "cpu", "float32")
    decoded = []
    real_step = b.BatchDecoder.step
    monkeypatch.setattr(b.BatchDecoder, "step", lambda self: decoded.append(1) or real_step(self))
    good = [5, 6, 7]
    with pytest.raises(MsnError, match=r"prompt 2 of the batch: .*outside the vocabulary|prompt 2 of the batch"):
        msn.generate(model, [good, good, [5, 10**6]], method="ar", max_new_tokens=4)
    with pytest.raises(MsnError, match="prompt 1 of the batch: .*context"):
        msn.generate(model, [good, list(range(3, 90)) * 40], method="pld", max_new_tokens=4)
    assert decoded == []
