"""``MsnCollator`` as the ``data_collator`` of TRL's ``SFTTrainer``: noise on the inputs,
clean labels, on TRL's own prompt-completion preparation and on msn's pre-tokenized data."""

import warnings

import pytest
import torch

from msn.data.collate import MsnCollator
from msn.data.records import IGNORE_INDEX
from msn.noise import NoiseConfig
from tiny import tiny_model, tiny_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = [("Write a function that sorts a list.", "def sort(x):\n    return sorted(x)\n" * 3),
         ("Add two numbers.", "def add(a, b):\n    return a + b\n" * 3)] * 4


class Recording(MsnCollator):
    """Keeps every batch it makes, with the clean ids it was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def __call__(self, features):
        batch = super().__call__(features)
        self.seen.append(([list(f["input_ids"]) for f in features], batch))
        return batch


def train(tmp_path, dataset, **config):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    collator = Recording(NoiseConfig(span_len=3, num_spans=2), pad_token_id=tok.pad_token_id,
                         vocab_size=len(tok), seed=1)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                         save_strategy="no", logging_steps=1, use_cpu=True, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                 data_collator=collator)
        trainer.train()
    return collator


def check(collator, responses_only: bool):
    assert len(collator.seen) >= 3        # the data loader may collate one batch ahead
    noisy = 0
    for clean, batch in collator.seen:
        for row, ids in enumerate(clean):
            n = len(ids)
            labels = batch["labels"][row, :n]
            inputs = batch["input_ids"][row, :n]
            kept = labels != IGNORE_INDEX
            assert kept.any()
            # Labels are the clean ids wherever they count; noise only where a label counts.
            assert torch.equal(labels[kept], torch.tensor(ids)[kept])
            changed = inputs != torch.tensor(ids)
            assert not (changed & ~kept).any()
            noisy += int(changed.sum())
            if responses_only:
                assert not kept[0]          # the prompt carries no label
    assert noisy > 0


def test_msn_collator_with_trl_prompt_completion_data(tmp_path):
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                                        "completion": [{"role": "assistant", "content": c}]} for p, c in PAIRS])
    check(train(tmp_path, data), responses_only=True)


def test_msn_collator_with_msn_pretokenized_data(tmp_path):
    from msn.data.records import tokenize_conversation

    tok = tiny_tokenizer()
    rows = []
    for i, (p, c) in enumerate(PAIRS):
        t = tokenize_conversation(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": c}], 256)
        rows.append({"input_ids": t.input_ids, "labels": t.labels, "noise_mask": t.noise_mask, "index": i})
    data = datasets.Dataset.from_list(rows)
    collator = train(tmp_path, data, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    check(collator, responses_only=True)


def test_packed_msn_collator_in_sftrainer_and_trls_own_padding_free_refusal(tmp_path):
    """MsnCollator(packing=True) trains under SFTTrainer with one padding-free row per batch;
    TRL's own padding-free mode refuses a custom collator in one line (its ValueError)."""
    tok = tiny_tokenizer()
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                                        "completion": [{"role": "assistant", "content": c}]} for p, c in PAIRS])
    collator = Recording(NoiseConfig(span_len=3, num_spans=2), pad_token_id=tok.pad_token_id,
                         vocab_size=len(tok), seed=1, packing=True)
    args = trl.SFTConfig(output_dir=str(tmp_path / "a"), max_steps=3, per_device_train_batch_size=2, report_to=[],
                         save_strategy="no", logging_steps=1, use_cpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=tiny_model("llama", vocab_size=len(tok)), args=args, train_dataset=data,
                                 processing_class=tok, data_collator=collator)
        losses = [e["loss"] for e in trainer.train() and trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for clean, batch in collator.seen:
        lengths = [len(ids) for ids in clean]
        assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
        assert torch.equal(batch["position_ids"][0], torch.cat([torch.arange(n) for n in lengths]))
        changed = batch["input_ids"][0] != torch.tensor(sum(clean, []))
        assert not (changed & (batch["labels"][0] == IGNORE_INDEX)).any()     # noise only where a label counts
    padding_free = trl.SFTConfig(output_dir=str(tmp_path / "b"), max_steps=1, report_to=[], use_cpu=True,
                                 padding_free=True, max_length=None)
    with pytest.raises(ValueError, match="custom data collator is not supported"):
        trl.SFTTrainer(model=tiny_model("llama", vocab_size=len(tok)), args=padding_free, train_dataset=data,
                       processing_class=tok, data_collator=collator)
