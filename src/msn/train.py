"""``msn train``: MSN fine-tuning (or plain SFT with ``--no-noise``) on transformers' Trainer.

One code path for every scale: run it as is for one process (CPU or one GPU), or under
``torchrun`` / ``accelerate launch`` for several (DDP; FSDP or DeepSpeed through an
accelerate config file); the Trainer picks the set-up up from the environment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from msn.errors import MsnError, MsnInterrupted
from msn.loading import load_model, load_tokenizer
from msn.noise import NoiseConfig

log = logging.getLogger("msn.train")
PRECISIONS = ("fp32", "bf16", "fp16")
STAGING = ".final-partial"       # the final model is written here, then renamed into place


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``msn_config.json`` beside the output.

    Attributes:
        model: a local checkpoint folder (or a hub id when the hub is reachable).
        data: training records (JSONL with {"prompt","response"} or {"messages"}, or a
            file/folder ``datasets`` reads).
        output_dir: where checkpoints, the final model, tokenizer and config go.
        eval_data: optional held-out records; eval loss is on clean inputs.
        noise: MSN noise settings (``noise.enabled=False`` is plain SFT).
        max_length: tokens per sample; longer samples keep their first ``max_length``.
        epochs / max_steps: training length (``max_steps > 0`` wins).
        lr / scheduler / warmup: learning rate, transformers scheduler name, warmup
            (a fraction of the steps if < 1, else a number of steps).
        batch_size / grad_accum: per-process batch and gradient accumulation.
        precision: fp32, bf16 or fp16 (mixed precision).
        lora_r: LoRA rank; 0 trains all weights. lora_alpha / lora_dropout /
            lora_targets configure peft; merge_lora saves merged full weights.
        save_steps / eval_steps / logging_steps / save_total_limit: Trainer cadence.
        resume: continue from the newest checkpoint in ``output_dir``.
        overwrite: train from scratch into an ``output_dir`` that holds an earlier run
            (its checkpoints and final model are deleted first). Without it, or
            ``resume``, such a folder is refused.
        gradient_checkpointing: trade compute for memory.
        seed: seed of data order, noise and initialisation of LoRA weights.
        packing: padding-free batches (each batch's samples in one row, attention kept
            within each sample; see ``msn.data.collate.MsnCollator``). None (default) packs
            when ``msn.data.packing.check_packing`` finds the model keeps packed samples
            apart, else pads with a warning; True refuses such a model; False pads.
        head_at_labels: compute the vocabulary head and the loss only at positions whose next
            token carries a label (``logits_to_keep`` and ``shift_labels`` from the collator; the
            same loss). None (default) does so when ``msn.data.packing.head_at_labels_matches``
            finds the model honours them; True refuses a model that does not; False never.
        num_proc: processes that tokenize the data (default: several for large files).
        profile_steps: train this many steps, print the throughput and write no model
            (``msn train --profile N``); ``output_dir`` is then only a scratch folder.
    """

    model: str
    data: str
    output_dir: str
    eval_data: str | None = None
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    max_length: int = 1024
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 2e-5
    scheduler: str = "cosine"
    warmup: float = 0.03
    batch_size: int = 4
    grad_accum: int = 1
    precision: str = "fp32"
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    merge_lora: bool = False
    save_steps: int = 500
    eval_steps: int | None = None
    logging_steps: int = 10
    save_total_limit: int | None = 2
    resume: bool = False
    overwrite: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    packing: bool | None = None
    head_at_labels: bool | None = None
    num_proc: int | None = None
    profile_steps: int = 0

    def __post_init__(self):
        if isinstance(self.noise, dict):
            self.noise = NoiseConfig(**self.noise)
        from msn.decoding.checks import is_int, is_number

        for name in ("epochs", "lr", "warmup", "lora_dropout"):
            if not is_number(getattr(self, name)):
                raise MsnError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise MsnError(f"seed must be an integer in [0, 2^32 - 1] (numpy's range), got {self.seed!r}")
        if not 0 <= self.lora_dropout < 1:
            raise MsnError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.resume and self.overwrite:
            raise MsnError("--resume and --overwrite exclude each other: continue the run, or start it again")
        if self.precision not in PRECISIONS:
            raise MsnError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        for name in ("max_length", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) <= 0:
                raise MsnError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise MsnError(f"learning rate must be positive, got {self.lr}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise MsnError("give a positive number of epochs or max_steps")
        if self.profile_steps < 0:
            raise MsnError(f"--profile must be a positive number of steps, got {self.profile_steps}")
        if self.num_proc is not None and self.num_proc <= 0:
            raise MsnError(f"num_proc must be positive, got {self.num_proc}")
        if self.lora_r < 0:
            raise MsnError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.warmup < 0:
            raise MsnError(f"warmup must be >= 0 (a fraction of the steps if < 1, else steps), got {self.warmup}")
        from transformers import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.scheduler not in schedulers:
            raise MsnError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(schedulers)}")
        if self.eval_steps is not None and not self.eval_data:
            raise MsnError("--eval-steps needs --eval-data (held-out records to evaluate on)")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise MsnError(f"eval_steps must be positive, got {self.eval_steps}")
        if self.merge_lora and self.lora_r == 0:
            raise MsnError("--merge-lora needs --lora-r (there is no LoRA adapter to merge in full fine-tuning)")
        if self.save_total_limit is not None and self.save_total_limit < 0:
            raise MsnError(f"save_total_limit must be >= 0 (0 keeps every checkpoint), got {self.save_total_limit}")

    def to_dict(self) -> dict:
        return asdict(self)


def _dataset(tokenizer, path: str, cfg: "TrainConfig", what: str):
    from msn.data.tokenized import tokenized_dataset

    return tokenized_dataset(tokenizer, path, cfg.max_length, what, num_proc=cfg.num_proc)


def _latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint: one killed while being written has no trainer state
    yet, and is skipped."""
    root = Path(output_dir)
    done = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").exists()] if root.is_dir() else []
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _finished(cfg: TrainConfig, checkpoint: str) -> bool:
    """True when ``checkpoint`` already reached the length this config asks for."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    target = cfg.max_steps if cfg.max_steps > 0 else (
        state.get("max_steps") if state.get("num_train_epochs") == math.ceil(cfg.epochs) else None)
    return target is not None and state.get("global_step", 0) >= target


def _checkpointing_kwarg(enabled: bool) -> dict:
    """``activation_checkpointing`` in newer transformers, ``gradient_checkpointing`` before."""
    import inspect

    from transformers import TrainingArguments

    if not enabled:
        return {}
    params = inspect.signature(TrainingArguments.__init__).parameters
    return {"activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing": True}


def run(cfg: TrainConfig, callbacks: list | None = None) -> dict:
    """Trains and saves; returns a summary (final loss, steps, noise statistics).

    ``callbacks``: extra transformers ``TrainerCallback`` objects.
    """
    from msn.paths import FolderLock, ensure_output_dir

    if cfg.profile_steps:
        return _profile(cfg, callbacks)
    sharded = _sharding_asked()
    if cfg.merge_lora and sharded:
        raise MsnError(f"--merge-lora is not supported under {sharded[0]}: save the adapter and merge it afterwards "
                       "(peft's merge_and_unload, or msn generate/serve, which load adapter folders merged)")
    _check_inputs(cfg)
    if cfg.eval_data and not os.path.exists(cfg.eval_data):
        raise MsnError(f"eval data file {cfg.eval_data} does not exist")
    out = ensure_output_dir(cfg.output_dir, "--output-dir").resolve()
    model_dir = Path(cfg.model).expanduser()
    if model_dir.is_dir() and (out == model_dir.resolve() or out in model_dir.resolve().parents):
        raise MsnError(f"--output-dir {cfg.output_dir} is (or holds) the input model's folder {cfg.model}; "
                       "training there would overwrite the model it starts from: choose another folder")
    lock = FolderLock(out, "msn train", ".msn-train.lock")
    if int(os.environ.get("RANK", "0")) == 0:       # one process of a distributed run holds it
        lock.acquire()
    try:
        return _run_locked(cfg, callbacks)
    finally:
        lock.release()


def _check_inputs(cfg: TrainConfig) -> None:
    """The model folder and the data file exist (before any loading)."""
    if cfg.model.startswith((os.sep, ".", "~")) and not os.path.isdir(cfg.model):
        raise MsnError(f"model path {cfg.model} does not exist or is not a folder; run `msn fetch` or give a checkpoint folder")
    if not os.path.exists(cfg.data):
        raise MsnError(f"data file {cfg.data} does not exist")


def _sharding_asked() -> list[str]:
    """The sharded set-ups ``accelerate launch`` asked for (FSDP, DeepSpeed), read from the
    variables its launcher sets."""
    return [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
            if os.environ.get(var, "").lower() in ("1", "true")]


def _profile(cfg: TrainConfig, callbacks: list | None) -> dict:
    """``--profile N``: N steps in a scratch folder (deleted after), no checkpoint, no model."""
    import dataclasses
    import tempfile

    _check_inputs(cfg)
    with tempfile.TemporaryDirectory(prefix="msn-profile-") as scratch:
        probe = dataclasses.replace(cfg, output_dir=scratch, max_steps=cfg.profile_steps, eval_data=None,
                                    eval_steps=None, resume=False, overwrite=False,
                                    logging_steps=min(cfg.logging_steps, cfg.profile_steps))
        summary = _run_locked(probe, callbacks)
    return {"profile_steps": cfg.profile_steps, **summary}


class Throughput:
    """Training speed, counted on the batches the optimizer steps take: tokens and response
    tokens per second, the padding share and an ETA for each log line (``read``) and the
    whole run (``summary``); also the time from the start of ``msn train`` to the first
    optimizer step."""

    def __init__(self, started: float):
        self.started = started
        self.first_step_s: float | None = None
        self.train_start: float | None = None
        self.start_step = 0                 # the step training (re)started from
        self.tokens = self.response_tokens = self.slots = 0
        self.last = None                    # (time, tokens, response tokens, slots) at the previous log

    def count(self, inputs: dict) -> None:
        """Adds one micro-batch (padded: the attention mask marks tokens; packed: every slot is one)."""
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        self.slots += ids.numel()
        self.tokens += int(mask.sum()) if mask is not None else ids.numel()
        self.response_tokens += int((inputs["labels"] != -100).sum())

    def _counts(self, now: float):
        return now, self.tokens, self.response_tokens, self.slots

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                meter.train_start = time.monotonic()
                meter.last = meter._counts(meter.train_start)
                meter.start_step = state.global_step

            def on_step_end(self, args, state, control, **kw):
                if meter.first_step_s is None:
                    meter.first_step_s = time.monotonic() - meter.started

        return Clock()

    def read(self, state) -> dict:
        now = time.monotonic()
        t0, tok0, resp0, slots0 = self.last or self._counts(now)
        self.last = self._counts(now)
        dt = max(now - t0, 1e-9)
        done = state.global_step - self.start_step
        per_step = (now - self.train_start) / done if done and self.train_start else None
        left = max(state.max_steps - state.global_step, 0)
        return {"tokens_per_s": round((self.tokens - tok0) / dt, 1),
                "response_tokens_per_s": round((self.response_tokens - resp0) / dt, 1),
                "padding_share": round(1 - (self.tokens - tok0) / (self.slots - slots0), 4)
                if self.slots > slots0 else 0.0,
                **({"eta_s": round(per_step * left, 1)} if per_step is not None else {})}

    def summary(self) -> dict:
        wall = time.monotonic() - self.train_start if self.train_start else None
        return {"seconds_to_first_step": round(self.first_step_s, 2) if self.first_step_s is not None else None,
                "train_seconds": round(wall, 1) if wall else None,
                "tokens": self.tokens, "response_tokens": self.response_tokens,
                "tokens_per_s": round(self.tokens / wall, 1) if wall else None,
                "response_tokens_per_s": round(self.response_tokens / wall, 1) if wall else None,
                "padding_share": round(1 - self.tokens / self.slots, 4) if self.slots else 0.0}


def _earlier_run(output_dir: Path) -> str | None:
    """What an earlier run left in ``output_dir`` (a final model, checkpoints), or None."""
    if (output_dir / "msn_config.json").exists():
        return "a finished run (msn_config.json)"
    # Complete checkpoints only: one killed before its trainer state holds nothing to resume.
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    return f"an earlier run's checkpoints ({', '.join(checkpoints[:3])})" if checkpoints else None


RUN_INPUTS = "msn_run_inputs.json"   # what a run started from; --resume checks it
# Settings a resumed run must share with the run it continues (max_steps may grow).
RESUME_SAME = ("model", "max_length", "batch_size", "grad_accum", "lr", "scheduler", "warmup", "seed", "lora_r",
               "noise")


def _fingerprint(path: str | None) -> str | None:
    """sha256 of a data file (of the names and sizes of a folder's files), or None."""
    import hashlib

    from msn.paths import sha256_file

    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p)} {f.stat().st_size}\n".encode())
    return h.hexdigest()


def _same_inputs(cfg: TrainConfig, out: Path, resuming: bool) -> None:
    """A fresh run records its data's fingerprints and settings in ``RUN_INPUTS``; a resumed run
    whose data or settings differ from them is refused (it would continue another run)."""
    cfg_d = asdict(cfg)
    now = {"data": _fingerprint(cfg.data), "eval_data": _fingerprint(cfg.eval_data),
           **{k: cfg_d[k] for k in RESUME_SAME}}
    path = out / RUN_INPUTS
    if resuming and path.exists():
        before = json.loads(path.read_text())
        changed = [k for k in now if k in before and before[k] != now[k]]
        if changed:
            what = ", ".join("the training data" if k == "data" else "the eval data" if k == "eval_data"
                             else f"--{k.replace('_', '-')}" for k in changed)
            raise MsnError(f"--resume: {what} changed since the run in {out} started; resume with the same, or "
                           "pass --overwrite to train from scratch")
        return
    if not resuming:
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(now, indent=2) + "\n")
        tmp.replace(path)


def _run_locked(cfg: TrainConfig, callbacks: list | None) -> dict:
    started = time.monotonic()
    import shutil

    import torch
    from transformers import Trainer, TrainingArguments

    from msn.data.collate import MsnCollator, epoch_callback
    from msn.data.packing import check_head_at_labels, check_packing, use_packed_attention
    from msn.data.records import ensure_chat_template

    out = Path(cfg.output_dir)
    shutil.rmtree(out / STAGING, ignore_errors=True)      # a final save that was killed midway
    earlier = _earlier_run(out)
    if earlier and not cfg.resume:
        if not cfg.overwrite:
            raise MsnError(f"--output-dir {cfg.output_dir} holds {earlier}; pass --resume to continue it, "
                           "--overwrite to delete it and train from scratch, or choose another folder")
        log.warning("--overwrite: deleting %s in %s", earlier, out)
        for p in out.glob("checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
        (out / "msn_config.json").unlink(missing_ok=True)
    latest = _latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if cfg.resume and latest is None:
        raise MsnError(f"--resume: no checkpoint-* folder in {cfg.output_dir}")
    _same_inputs(cfg, out, resuming=latest is not None)
    if latest is not None and _finished(cfg, latest):
        final = Path(cfg.output_dir) / "msn_config.json"
        if final.exists():
            log.warning("the run in %s is finished (%s); nothing to do", cfg.output_dir, Path(latest).name)
            return {**json.loads(final.read_text())["summary"], "nothing_to_do": True}
        # Killed during the final save: the newest checkpoint holds the final weights.
        log.warning("%s reached the requested steps but the final model was not saved; saving it now", latest)
        return _save_from_checkpoint(cfg, latest)
    model = load_model(cfg.model, dtype=torch.float32)
    tokenizer = load_tokenizer(cfg.model)
    if ensure_chat_template(tokenizer):
        log.warning("the tokenizer has no chat template; using ChatML")
    restore = use_packed_attention(model) if cfg.packing is not False else None
    packing = check_packing(model, len(tokenizer), cfg.packing)
    if restore and not packing:
        model.set_attn_implementation(restore)
    head_at_labels = check_head_at_labels(model, len(tokenizer), cfg.head_at_labels)

    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(cfg.seed)      # the adapter's initial weights come from the run's seed, whatever ran before
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        try:
            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                     task_type="CAUSAL_LM"))
        except ValueError as e:
            raise MsnError(f"--lora-targets {cfg.lora_targets}: {str(e).splitlines()[0]}") from None
    collator = MsnCollator(cfg.noise, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), seed=cfg.seed,
                           packing=packing, head_at_labels=head_at_labels)
    eval_collator = MsnCollator(NoiseConfig(enabled=False), tokenizer.pad_token_id, len(tokenizer), packing=packing)
    is_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="no" if cfg.profile_steps else "steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit or None,
        eval_strategy="steps" if cfg.eval_data and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps,
        seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        **_checkpointing_kwarg(cfg.gradient_checkpointing),
        ddp_backend="gloo" if is_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        use_cpu=is_cpu,
    )
    # Several processes: the first tokenizes into the cache, the others then read it.
    with args.main_process_first(desc="tokenizing the data"):
        train_set = _dataset(tokenizer, cfg.data, cfg, "training")
        eval_set = _dataset(tokenizer, cfg.eval_data, cfg, "eval") if cfg.eval_data else None
    meter = Throughput(started)

    class MsnTrainer(Trainer):
        def get_eval_dataloader(self, eval_dataset=None):
            self.data_collator, saved = eval_collator, self.data_collator
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = saved

        def training_step(self, model, inputs, *rest, **kw):
            meter.count(inputs)
            return super().training_step(model, inputs, *rest, **kw)

        def log(self, logs, *rest, **kw):
            if "loss" in logs:
                logs.update(meter.read(self.state), noise_too_short=collator.too_short)
            super().log(logs, *rest, **kw)

    trainer = MsnTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                         data_collator=collator, processing_class=tokenizer,
                         callbacks=[epoch_callback(collator), meter.callback(), *(callbacks or [])])
    if "FSDP" in _sharding_asked() and not trainer.is_fsdp_enabled:
        raise MsnError("the accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only (on this machine it "
                       "would train unsharded); on CPUs use DDP: torchrun --nproc_per_node N -m msn train ...")
    resume_from = latest
    if resume_from:
        log.warning("resuming from %s", resume_from)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        last = _latest_checkpoint(cfg.output_dir)
        raise MsnInterrupted(f"continue with --resume (from {last})" if last else
                             "no checkpoint was saved yet (lower --save-steps)") from None

    summary = {
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "resumed_from": resume_from,
        "noise_stats": collator.stats(),
        "train_examples": len(train_set),
        "packing": packing,
        "head_at_labels": head_at_labels,
        "throughput": meter.summary(),
    }
    if eval_set is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    if collator.too_short:
        log.warning("%d sample(s) had a response too short for a noise span and stayed clean", collator.too_short)
    model, state = trainer.model, None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # Sharded weights: every process takes part in gathering the whole state dict.
        state = trainer.accelerator.get_state_dict(trainer.model)
        model = trainer.accelerator.unwrap_model(trainer.model)
    if restore and packing:
        (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation(restore)
    if trainer.is_world_process_zero() and not cfg.profile_steps:
        save_final(model, tokenizer, cfg, summary, state_dict=state)
    return summary


def _save_from_checkpoint(cfg: TrainConfig, checkpoint: str) -> dict:
    """The final model of a finished run, saved again from its last checkpoint."""
    import torch

    if cfg.lora_r > 0:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(cfg.model, dtype=torch.float32), checkpoint)
    else:
        model = load_model(checkpoint, dtype=torch.float32)
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state.get("log_history", []) if "loss" in e]
    summary = {"train_loss": losses[-1] if losses else None, "global_step": state.get("global_step"),
               "resumed_from": checkpoint, "final_saved_from_checkpoint": True}
    save_final(model, load_tokenizer(checkpoint if (Path(checkpoint) / "tokenizer_config.json").exists()
                                     else cfg.model), cfg, summary)
    return summary


def save_final(model, tokenizer, cfg: TrainConfig, summary: dict, state_dict: dict | None = None) -> None:
    """Writes the final model, tokenizer and ``msn_config.json`` into ``cfg.output_dir``.

    ``state_dict``: the gathered weights of a sharded (FSDP, DeepSpeed) model; None saves
    ``model``'s own."""
    import transformers

    from msn.paths import replace_folder_files
    from msn.version import __version__

    out = Path(cfg.output_dir)
    staged = out / STAGING
    if cfg.lora_r > 0 and cfg.merge_lora:
        model = model.merge_and_unload()
    # Written beside the folder, then renamed in, msn_config.json last: a kill at any moment
    # leaves complete files only, and msn_config.json marks a complete final model.
    model.save_pretrained(staged, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(staged)
    record = {"msn_version": __version__, "transformers_version": transformers.__version__,
              "config": cfg.to_dict(), "summary": summary}
    (staged / "msn_config.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "msn_config.json").unlink(missing_ok=True)
    replace_folder_files(staged, out, last="msn_config.json")
