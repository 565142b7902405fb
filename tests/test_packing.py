"""Padding-free (packed) training batches: the same loss as padded batches, no attention across
a sample boundary, models that would mix samples refused, and TRL's packed features split."""

import json
import warnings

import pytest
import torch

from msn.data.collate import MsnCollator
from msn.data.packing import check_head_at_labels, check_packing, head_at_labels_matches, packed_matches_alone
from msn.data.records import IGNORE_INDEX
from msn.errors import MsnError
from msn.noise import NoiseConfig
from msn.train import TrainConfig, run
from tiny import TINY_FAMILIES, tiny_model, tiny_training_folder

VOCAB = 96


def features(n=4, seed=0):
    """Samples of different lengths, a prompt (no label) then a response (labels, noise)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt, response = 3 + 2 * i, 12 + 5 * ((i * 7) % 4)
        ids = torch.randint(4, VOCAB, (prompt + response,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels, "noise_mask": [0] * prompt + [1] * response, "index": i})
    return out


def pair(**noise):
    cfg = NoiseConfig(span_len=3, num_spans=2, **noise)
    return (MsnCollator(cfg, pad_token_id=0, vocab_size=VOCAB, seed=5),
            MsnCollator(cfg, pad_token_id=0, vocab_size=VOCAB, seed=5, packing=True))


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES])
def test_packed_batch_has_the_padded_batchs_noise_and_loss(family):
    padded_c, packed_c = pair()
    feats = features()
    padded, packed = padded_c(feats), packed_c(feats)
    assert set(packed) == {"input_ids", "labels", "position_ids"} and packed["input_ids"].shape[0] == 1
    # The same noisy tokens, end to end, and positions restarting at each sample.
    lengths = [len(f["input_ids"]) for f in feats]
    rows = [padded["input_ids"][r, :n] for r, n in enumerate(lengths)]
    assert torch.equal(packed["input_ids"][0], torch.cat(rows))
    assert torch.equal(packed["position_ids"][0], torch.cat([torch.arange(n) for n in lengths]))
    assert packed_c.stats()["padding_share"] == 0 < padded_c.stats()["padding_share"]
    model = tiny_model(family, vocab_size=VOCAB)
    with torch.no_grad():
        a = model(**padded).loss
        b = model(**packed, use_cache=False).loss
    assert torch.isfinite(a) and abs(a.item() - b.item()) < 1e-5 * max(1.0, abs(a.item())), (a.item(), b.item())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2"])
def test_no_attention_crosses_a_sample_boundary(family):
    """Changing every token of the first sample leaves the second sample's logits unchanged."""
    model = tiny_model(family, vocab_size=VOCAB).eval()
    _, packed_c = pair(enabled=False)
    feats = features(2)
    batch = packed_c(feats)
    other = [dict(feats[0], input_ids=[(t + 1) % VOCAB for t in feats[0]["input_ids"]]), feats[1]]
    changed = packed_c(other)
    n0 = len(feats[0]["input_ids"])
    with torch.no_grad():
        x = model(**batch, use_cache=False).logits[0]
        y = model(**changed, use_cache=False).logits[0]
    assert (x[:n0] - y[:n0]).abs().max() > 1e-3                 # the change is visible where it belongs
    assert torch.allclose(x[n0:], y[n0:], atol=1e-5)            # and nowhere else
    assert packed_matches_alone(model, VOCAB)


class DropsPositions(torch.nn.Module):
    """A model whose code ignores ``position_ids`` (as some remote code does): packed samples
    then attend to each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids=None, position_ids=None, **kw):
        return self.inner(input_ids=input_ids, **kw)


def test_a_model_that_mixes_packed_samples_is_refused_or_padded(caplog):
    mixing = DropsPositions(tiny_model("llama", vocab_size=VOCAB))
    assert not packed_matches_alone(mixing, VOCAB)
    with pytest.raises(MsnError, match="--packing: this model .* lets packed samples attend to each other"):
        check_packing(mixing, VOCAB, asked=True)
    assert check_packing(mixing, VOCAB, asked=None) is False and "padded batches instead" in caplog.text
    assert check_packing(tiny_model("llama", vocab_size=VOCAB), VOCAB, asked=None) is True
    assert check_packing(tiny_model("llama", vocab_size=VOCAB), VOCAB, asked=False) is False


def test_trl_packed_features_are_split_into_their_samples():
    """A feature holding several samples (``seq_lengths``) is noised and positioned per sample;
    a padded collator refuses it in one line."""
    feats = features(3)
    joined = {"input_ids": sum((f["input_ids"] for f in feats), []),
              "completion_mask": sum(([int(l != IGNORE_INDEX) for l in f["labels"]] for f in feats), []),
              "seq_lengths": [len(f["input_ids"]) for f in feats]}
    _, packed_c = pair()
    batch = packed_c([joined])
    starts = [0]
    for n in joined["seq_lengths"][:-1]:
        starts.append(starts[-1] + n)
    assert (batch["position_ids"][0] == 0).nonzero().flatten().tolist() == starts
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert packed_c.samples == 3 and packed_c.noised_positions == 3 * 6
    with pytest.raises(MsnError, match="seq_lengths.*packing=True"):
        pair()[0]([joined])
    with pytest.raises(MsnError, match="do not split"):
        packed_c([dict(joined, seq_lengths=[5, 5])])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_training_folder(tmp_path_factory.mktemp("pack"), [
        {"prompt": f"Write function {i}" + " please" * (i % 5),
         "response": "def f(a, b):\n    return a + b  # " + "x y " * (i % 9)} for i in range(24)])


def _step_losses(out):
    state = json.loads(sorted(out.glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_packed_training_follows_the_padded_run(folder, tmp_path):
    """Same seed and samples: every step's loss and the eval loss of a packed run equal the padded
    run's within float tolerance; the log carries the throughput."""
    common = dict(model=str(folder / "model"), data=str(folder / "data.jsonl"), eval_data=str(folder / "data.jsonl"),
                  max_steps=6, batch_size=4, lr=1e-3, warmup=0, logging_steps=1, save_steps=6,
                  noise=NoiseConfig(num_spans=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded = run(TrainConfig(output_dir=str(tmp_path / "padded"), packing=False, **common))
        packed = run(TrainConfig(output_dir=str(tmp_path / "packed"), packing=True, **common))
    assert packed["packing"] and not padded["packing"]
    a, b = _step_losses(tmp_path / "padded"), _step_losses(tmp_path / "packed")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=2e-4)
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=2e-4)
    assert packed["noise_stats"]["noised_positions"] == padded["noise_stats"]["noised_positions"]
    assert packed["throughput"]["padding_share"] == 0 < padded["throughput"]["padding_share"]
    state = json.loads((tmp_path / "packed" / "checkpoint-6" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert all(e["tokens_per_s"] > 0 and e["response_tokens_per_s"] > 0 for e in logged)
    assert logged[-1]["eta_s"] == 0 and all(e["eta_s"] >= 0 for e in logged)
    assert packed["throughput"]["seconds_to_first_step"] > 0


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES])
def test_the_head_at_labelled_positions_gives_the_full_heads_loss(family):
    """Padded and packed batches with ``head_at_labels``: the model computes the head at the
    labelled positions only (K rows of logits) and the loss equals the full head's."""
    feats = features()
    cfg = NoiseConfig(span_len=3, num_spans=2)
    model = tiny_model(family, vocab_size=VOCAB)
    assert head_at_labels_matches(model, VOCAB)
    for packing in (False, True):
        plain = MsnCollator(cfg, pad_token_id=0, vocab_size=VOCAB, seed=5, packing=packing)(feats)
        kept = MsnCollator(cfg, pad_token_id=0, vocab_size=VOCAB, seed=5, packing=packing, head_at_labels=True)(feats)
        assert torch.equal(kept["input_ids"], plain["input_ids"]) and torch.equal(kept["labels"], plain["labels"])
        k = int(kept["logits_to_keep"].sum())
        assert k == int((plain["labels"][:, 1:] != IGNORE_INDEX).sum()) == kept["shift_labels"].numel()
        assert k < plain["labels"].numel() - plain["labels"].shape[0]        # the prompts' positions are left out
        with torch.no_grad():
            a = model(**plain, use_cache=False)
            b = model(**kept, use_cache=False)
        assert b.logits.numel() == k * a.logits.shape[-1]
        assert abs(a.loss.item() - b.loss.item()) < 1e-5 * max(1.0, abs(a.loss.item())), (family, packing)


class IgnoresKeep(torch.nn.Module):
    """A model whose forward has no logits_to_keep: the head runs everywhere."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, **kw):
        kw.pop("logits_to_keep", None), kw.pop("shift_labels", None)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=use_cache)


def test_a_model_without_the_head_arguments_is_refused_or_computes_every_position():
    plain = IgnoresKeep(tiny_model("llama", vocab_size=VOCAB))
    assert not head_at_labels_matches(plain, VOCAB)
    with pytest.raises(MsnError, match="--head-at-labels: this model .* does not compute its loss"):
        check_head_at_labels(plain, VOCAB, asked=True)
    assert check_head_at_labels(plain, VOCAB, asked=None) is False
    assert check_head_at_labels(tiny_model("llama", vocab_size=VOCAB), VOCAB, asked=False) is False


def test_training_with_the_head_at_labels_follows_the_full_head(folder, tmp_path):
    """Same seed and samples, packed: every step's loss and the eval loss equal the full head's."""
    common = dict(model=str(folder / "model"), data=str(folder / "data.jsonl"), eval_data=str(folder / "data.jsonl"),
                  max_steps=6, batch_size=4, lr=1e-3, warmup=0, logging_steps=1, save_steps=6,
                  noise=NoiseConfig(num_spans=2), packing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = run(TrainConfig(output_dir=str(tmp_path / "full"), head_at_labels=False, **common))
        kept = run(TrainConfig(output_dir=str(tmp_path / "kept"), **common))
    assert kept["head_at_labels"] and not full["head_at_labels"]
    a, b = _step_losses(tmp_path / "full"), _step_losses(tmp_path / "kept")
    assert len(a) == len(b) == 6 and b == pytest.approx(a, rel=2e-4)
    assert kept["eval_loss"] == pytest.approx(full["eval_loss"], rel=2e-4)


def test_packed_sdpa_attends_per_sample_and_falls_back_elsewhere(monkeypatch):
    """msn's packed sdpa runs causal sdpa on each sample's slice of a packed row, gives the
    padded model's logits, and leaves every other call (a padding mask, decoding) to sdpa."""
    from msn.data import packing

    model = tiny_model("llama", vocab_size=VOCAB).eval()
    assert packing.use_packed_attention(model) == "sdpa"
    assert model.config._attn_implementation == packing.PACKED_SDPA
    calls = []
    real = packing.packed_attention

    def counting(module, q, *a, **k):
        calls.append(q.shape[2])
        return real(module, q, *a, **k)

    from transformers import AttentionInterface
    AttentionInterface.register(packing.PACKED_SDPA, counting)
    try:
        padded_c, packed_c = pair(enabled=False)
        feats = features(3)
        with torch.no_grad():
            a = model(**padded_c(feats)).logits
            b = model(**packed_c(feats), use_cache=False).logits[0]
            greedy = model.generate(torch.tensor([feats[0]["input_ids"]]), max_new_tokens=4, do_sample=False)
        ends = [0]
        for f in feats:
            ends.append(ends[-1] + len(f["input_ids"]))
        for row, (s, e) in enumerate(zip(ends[:-1], ends[1:])):
            assert torch.allclose(a[row, : e - s], b[s:e], atol=1e-5)
        assert greedy.shape[1] == len(feats[0]["input_ids"]) + 4
        assert packing._sample_bounds(torch.cat([torch.arange(e - s) for s, e in zip(ends[:-1], ends[1:])])[None]) \
            == list(zip(ends[:-1], ends[1:]))
        assert packing.packed_matches_alone(model, VOCAB)
    finally:
        AttentionInterface.register(packing.PACKED_SDPA, real)
    assert ends[-1] in calls and 1 in calls        # the packed row, and decoding one token at a time
