import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msn.noise import NoiseConfig
from tiny import tiny_training_folder
from msn.train import TrainConfig, run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_folder(tmp_path_factory.mktemp("train"), [
        {"prompt": f"Write add number {i}", "response": "def add(a, b):\n    return a + b  # " + "x" * (i % 7)}
        for i in range(48)])


def test_training_lowers_loss_and_saves_a_loadable_model(setup, tmp_path):
    losses = []
    from transformers import AutoModelForCausalLM, TrainerCallback

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    out = tmp_path / "msn"
    summary = run(TrainConfig(model=str(setup / "model"), data=str(setup / "data.jsonl"), output_dir=str(out),
                              eval_data=str(setup / "data.jsonl"), max_steps=36, lr=3e-3, batch_size=4,
                              logging_steps=4, save_steps=100), callbacks=[Record()])
    assert losses[-1] < 0.5 * losses[0]
    # The default noise: up to 4 spans of 5 per sample, so more than one span on average.
    noised, samples = summary["noise_stats"]["noised_positions"], summary["noise_stats"]["samples_collated"]
    assert noised % 5 == 0 and 5 * samples < noised <= 20 * samples
    assert summary["eval_loss"] < losses[0]
    AutoModelForCausalLM.from_pretrained(out)
    saved = json.loads((out / "msn_config.json").read_text())
    assert saved["config"]["noise"] == {"span_len": 5, "num_spans": 4, "source": "ahead", "enabled": True}
    assert (out / "tokenizer_config.json").exists()


def test_no_noise_is_the_same_pipeline_without_corruption(setup, tmp_path):
    summary = run(TrainConfig(model=str(setup / "model"), data=str(setup / "data.jsonl"), output_dir=str(tmp_path),
                              max_steps=4, noise=NoiseConfig(enabled=False), save_steps=100))
    assert summary["noise_stats"]["samples_collated"] >= 16 and summary["noise_stats"]["noised_positions"] == 0


def test_lora_adapter_and_merge(setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run(TrainConfig(model=str(setup / "model"), data=str(setup / "data.jsonl"), output_dir=str(tmp_path / "a"),
                    max_steps=3, lora_r=4, lr=1e-2, save_steps=100))
    assert (tmp_path / "a" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(setup / "model")
    merged_a = PeftModel.from_pretrained(base, tmp_path / "a").merge_and_unload().state_dict()
    torch.rand(1000)        # whatever drew random numbers before, the adapter starts from the run's seed
    run(TrainConfig(model=str(setup / "model"), data=str(setup / "data.jsonl"), output_dir=str(tmp_path / "m"),
                    max_steps=3, lora_r=4, lr=1e-2, merge_lora=True, save_steps=100))
    assert not (tmp_path / "m" / "adapter_config.json").exists()
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    assert set(m) == set(merged_a)
    assert max((m[k] - merged_a[k]).abs().max().item() for k in m) < 1e-6
    before = AutoModelForCausalLM.from_pretrained(setup / "model").state_dict()
    assert any((m[k] - before[k]).abs().max().item() > 1e-4 for k in m)     # it trained


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args):
    return [str(BIN / "msn"), *map(str, args)]


@pytest.mark.slow      # by default test_resume_in_a_later_epoch_equals_a_straight_run and the SIGTERM test
def test_killed_run_resumes_at_its_last_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", setup / "model", "--data", setup / "data.jsonl", "--output-dir", out,
            "--max-steps", 100, "--save-steps", 20, "--batch-size", 2, "--logging-steps", 20, "--lr", "1e-3"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint-40" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                   if (p / "trainer_state.json").exists())
    assert steps and steps[-1] < 100
    state = json.loads((out / f"checkpoint-{steps[-1]}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps[-1]
    # A checkpoint being written at kill time may be partial; the newest complete one is used.
    done = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["global_step"] == 100
    resumed = int(summary["resumed_from"].rsplit("-", 1)[1])
    assert resumed == steps[-1] and resumed >= 40


@pytest.mark.slow
def test_two_processes_match_one_process(setup, tmp_path):
    """DDP on 2 CPU processes (gloo): both ranks end with identical weights, equal within
    tolerance to one process with the same global batch."""
    worker = ROOT / "tests" / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), worker,
                          setup / "model", setup / "data.jsonl", tmp_path / "two", "2"],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, worker, setup / "model", setup / "data.jsonl", tmp_path / "one", "4"],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "two" / f"digest.rank{r}").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r0["sha"] == r1["sha"]
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    init = load_file(setup / "model" / "model.safetensors")
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # training moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def _losses(out: Path, step: int) -> dict[int, float]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_resume_in_a_later_epoch_equals_a_straight_run(setup, tmp_path):
    """40 samples at batch 2 are 20 steps per epoch: interrupt at step 47 (epoch 2, after
    checkpoint-45), resume, and every step's loss equals the uninterrupted run's."""
    from transformers import TrainerCallback

    from msn.errors import MsnInterrupted

    data = tmp_path / "data.jsonl"
    data.write_text("".join(setup.joinpath("data.jsonl").read_text().splitlines(True)[:40]))
    common = dict(model=str(setup / "model"), data=str(data), max_steps=50, batch_size=2, lr=1e-3,
                  logging_steps=1, save_total_limit=0, noise=NoiseConfig(num_spans=2))
    run(TrainConfig(output_dir=str(tmp_path / "straight"), save_steps=100, **common))

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 47:
                raise KeyboardInterrupt

    with pytest.raises(MsnInterrupted, match="checkpoint-45"):
        run(TrainConfig(output_dir=str(tmp_path / "resumed"), save_steps=15, **common), callbacks=[CtrlC()])
    summary = run(TrainConfig(output_dir=str(tmp_path / "resumed"), save_steps=15, resume=True, **common))
    assert summary["resumed_from"].endswith("checkpoint-45") and summary["global_step"] == 50
    straight, resumed = _losses(tmp_path / "straight", 50), _losses(tmp_path / "resumed", 50)
    assert sorted(straight) == sorted(resumed) == list(range(1, 51))
    for step in range(46, 51):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step


def test_resume_of_a_finished_run_does_nothing(setup, tmp_path, caplog):
    cfg = dict(model=str(setup / "model"), data=str(setup / "data.jsonl"), output_dir=str(tmp_path),
               max_steps=4, save_steps=2)
    first = run(TrainConfig(**cfg))
    again = run(TrainConfig(resume=True, **cfg))
    assert again["nothing_to_do"] and again["global_step"] == first["global_step"] == 4
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert "nothing to do" in caplog.text
