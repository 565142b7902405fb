"""Nothing a user does with ``msn train`` destroys data: the input model's folder, a folder
another run is writing, a finished run, and a model being saved when the process dies."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msn.cli import EXIT_USAGE, main
from msn.train import STAGING, TrainConfig, run
from tiny import tiny_training_folder

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_folder(tmp_path_factory.mktemp("safety"), [
        {"prompt": f"add {i}", "response": "def add(a, b):\n    return a + b"} for i in range(16)])


def _cfg(setup, out, **kw):
    return TrainConfig(model=str(setup / "model"), data=str(setup / "data.jsonl"), output_dir=str(out),
                       max_steps=2, batch_size=2, save_steps=1, logging_steps=1, **kw)


def _error(capsys, *args) -> str:
    code = main(["train", *map(str, args)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "Traceback" not in err, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith("msn: error")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_the_input_models_folder_is_refused(setup, capsys):
    before = (setup / "model" / "model.safetensors").read_bytes()
    base = ["--model", setup / "model", "--data", setup / "data.jsonl", "--max-steps", 1]
    assert "is (or holds) the input model's folder" in _error(capsys, *base, "--output-dir", setup / "model")
    assert "is (or holds) the input model's folder" in _error(capsys, *base, "--output-dir", setup)
    assert (setup / "model" / "model.safetensors").read_bytes() == before


def test_a_folder_another_run_writes_is_refused_and_a_stale_lock_is_taken_over(setup, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".msn-train.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": other.pid}))
        line = _error(capsys, "--model", setup / "model", "--data", setup / "data.jsonl", "--output-dir", out)
        assert f"another msn train (pid {other.pid}) is writing into" in line
    finally:
        other.kill()
        other.wait()
    summary = run(_cfg(setup, out))          # the lock's process has ended: stale, taken over
    assert summary["global_step"] == 2 and not (out / ".msn-train.lock").exists()


def test_a_finished_run_is_refused_without_resume_or_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "run"
    run(_cfg(setup, out))
    weights = (out / "model.safetensors").read_bytes()
    args = ["--model", setup / "model", "--data", setup / "data.jsonl", "--output-dir", out, "--max-steps", 2,
            "--batch-size", 2]
    assert "holds a finished run (msn_config.json); pass --resume" in _error(capsys, *args)
    assert (out / "model.safetensors").read_bytes() == weights
    assert "--resume and --overwrite exclude each other" in _error(capsys, *args, "--resume", "--overwrite")
    again = run(_cfg(setup, out, overwrite=True, seed=7))
    assert again["global_step"] == 2 and again["resumed_from"] is None
    assert json.loads((out / "msn_config.json").read_text())["config"]["seed"] == 7


def test_an_interrupted_final_save_is_redone_on_resume(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run(_cfg(setup, out))
    # What a kill during the final save leaves: a staging folder, no msn_config.json.
    (out / "msn_config.json").unlink()
    (out / STAGING).mkdir()
    (out / STAGING / "model.safetensors").write_bytes(b"half")
    with pytest.raises(ValueError, match="holds an earlier run's checkpoints"):
        run(_cfg(setup, out))
    summary = run(_cfg(setup, out, resume=True))
    assert summary["global_step"] == 2 and (out / "msn_config.json").exists() and not (out / STAGING).exists()
    AutoModelForCausalLM.from_pretrained(out)


def _loadable_or_resumable(setup, out: Path, args: list) -> str:
    """'final' when the folder holds a complete model, else 'resumed' after --resume finished it."""
    from transformers import AutoModelForCausalLM

    if (out / "msn_config.json").exists():
        AutoModelForCausalLM.from_pretrained(out)
        return "final"
    done = subprocess.run([str(BIN / "msn"), *args, "--resume"], capture_output=True, text=True)
    if done.returncode == EXIT_USAGE and "no checkpoint" in done.stderr:
        return "no checkpoint yet"
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["global_step"] == 6
    AutoModelForCausalLM.from_pretrained(out)
    return "resumed"


@pytest.mark.slow
def test_kill_9_during_checkpoint_and_final_saves(setup, tmp_path):
    """20 runs killed at random moments of their saves (a checkpoint every step, then the final
    model): each leaves a loadable final model or a folder that resumes to the end."""
    rng = random.Random(0)

    def start(out):
        args = ["train", "--model", str(setup / "model"), "--data", str(setup / "data.jsonl"), "--output-dir",
                str(out), "--max-steps", "6", "--save-steps", "1", "--batch-size", "2", "--logging-steps", "1"]
        proc = subprocess.Popen([str(BIN / "msn"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not any(out.glob("checkpoint-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        return proc, args, time.time()

    # When saving happens: from the first checkpoint folder, the final save's start (its staging
    # folder appears) and end (msn_config.json appears), in an uninterrupted run.
    timed = tmp_path / "timed"
    proc, _, t0 = start(timed)
    stage = None
    while not (timed / "msn_config.json").exists() and proc.poll() is None:
        if stage is None and (timed / STAGING).exists():
            stage = time.time() - t0
        time.sleep(0.001)
    span = time.time() - t0
    stage = stage or 0.8 * span
    proc.wait()
    seen = []
    for i in range(20):
        out = tmp_path / f"run{i}"
        proc, args, _ = start(out)
        # Even runs die during the checkpoint saves, odd ones during the final save.
        time.sleep(rng.uniform(0, stage) if i % 2 == 0 else rng.uniform(stage, 1.02 * span))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.append(_loadable_or_resumable(setup, out, args))
    print(f"final save starts {stage:.3f} s and ends {span:.3f} s after the first checkpoint; kill -9 outcomes:", {k: seen.count(k) for k in set(seen)})
    assert "no checkpoint yet" not in seen
