"""transformers' ``model.generate(custom_generate=DIR)`` runs msn's decoders and returns what
``msn.generate`` returns (and what transformers' own greedy generate returns)."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

import msn
from msn.cli import main
from msn.errors import MsnError
from tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), family="qwen2")
    out = tmp_path_factory.mktemp("export")
    assert main(["export-generate", str(out)]) == 0
    assert (out / "custom_generate" / "generate.py").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path), str(out)


@pytest.mark.parametrize("method", ["tr-jacobi", "pld", "ar"])
def test_custom_generate_equals_msn_generate(setup, method):
    model, tok, folder = setup
    enc = tok(["def add(a, b):\n    return a + b\n\ndef add(a, b):"], return_tensors="pt")
    out = model.generate(**enc, custom_generate=folder, trust_remote_code=True, msn_method=method, max_new_tokens=24)
    mine = msn.generate(model, enc["input_ids"], method=method, max_new_tokens=24)
    assert out[0, enc["input_ids"].shape[1]:].tolist()[: len(mine.tokens)] == mine.tokens
    plain = model.generate(**enc, do_sample=False, max_new_tokens=24)
    assert torch.equal(out, plain)


def test_custom_generate_on_a_left_padded_batch(setup):
    model, tok, folder = setup
    enc = tok(["def add(a, b):", "The quick brown fox jumps over the lazy dog. The quick"], return_tensors="pt",
              padding=True, padding_side="left")
    out = model.generate(**enc, custom_generate=folder, trust_remote_code=True, msn_method="tr-jacobi",
                         msn_tree="small", max_new_tokens=16)
    assert torch.equal(out, model.generate(**enc, do_sample=False, max_new_tokens=16))


def test_custom_generate_streams_and_refuses_what_it_cannot_do(setup):
    model, tok, folder = setup
    enc = tok(["class Stack:"], return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(**enc, custom_generate=folder, trust_remote_code=True, streamer=streamer, max_new_tokens=12)
    text = "".join(streamer)
    assert text == tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    with pytest.raises(MsnError, match="num_beams"):
        model.generate(**enc, custom_generate=folder, trust_remote_code=True, num_beams=2, max_new_tokens=4)


def test_custom_generate_takes_the_lengths_plain_generate_takes(setup):
    model, tok, folder = setup
    enc = tok(["def add(a, b):"], return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = model.generate(**enc, do_sample=False)            # neither length given: max_length 20
        out = model.generate(**enc, custom_generate=folder, trust_remote_code=True)
    assert torch.equal(out, plain)
    short = model.generate(**enc, custom_generate=folder, trust_remote_code=True, max_length=enc["input_ids"].shape[1] + 2)
    assert short.shape[1] <= enc["input_ids"].shape[1] + 2
    with pytest.raises(MsnError, match="max_length=2 leaves no room after the"):
        model.generate(**enc, custom_generate=folder, trust_remote_code=True, max_length=2)
