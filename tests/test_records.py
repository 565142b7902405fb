import json

import pytest

from msn.data.records import build_examples, load_conversations, tokenize_conversation
from msn.errors import MsnError
from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_prompt_response_masks(tok):
    t = tokenize_conversation(tok, [{"role": "user", "content": "Write add"},
                                    {"role": "assistant", "content": "def add(a, b): return a + b"}], 512)
    special = set(tok.all_special_ids)
    labelled = [i for i, l in enumerate(t.labels) if l != -100]
    assert labelled and labelled == list(range(labelled[0], len(t.input_ids)))
    assert tok.decode([t.input_ids[i] for i in labelled if t.noise_mask[i]]) == "def add(a, b): return a + b"
    assert all(t.input_ids[i] not in special for i, m in enumerate(t.noise_mask) if m)
    assert all(t.labels[i] == t.input_ids[i] for i in labelled)


def test_every_assistant_turn_is_a_response(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first"}, {"role": "user", "content": "two"},
            {"role": "assistant", "content": "second"}]
    t = tokenize_conversation(tok, msgs, 512)
    noised_text = tok.decode([i for i, m in zip(t.input_ids, t.noise_mask) if m])
    assert noised_text == "firstsecond"


def test_truncation_keeps_the_start_and_drops_empty(tok):
    conv = [{"role": "user", "content": "x " * 50}, {"role": "assistant", "content": "yes"}]
    examples, dropped = build_examples(tok, [conv], max_length=10)
    assert examples == [] and dropped == 1
    t = tokenize_conversation(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b " * 50}], 20)
    assert len(t.input_ids) == 20


def test_bad_records_name_file_and_line(tmp_path):
    good = json.dumps({"prompt": "a", "response": "b"})
    with pytest.raises(MsnError, match=r"d.jsonl:2: not valid JSON"):
        load_conversations(write(tmp_path, [good, "{oops"]))
    with pytest.raises(MsnError, match=r"d.jsonl:3: expected"):
        load_conversations(write(tmp_path, [good, good, json.dumps({"question": "a"})]))
    with pytest.raises(MsnError, match=r"d.jsonl:1: no assistant message"):
        load_conversations(write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "hi"}]})]))
    with pytest.raises(MsnError, match="empty"):
        load_conversations(write(tmp_path, [""]))
    with pytest.raises(MsnError, match="does not exist"):
        load_conversations(tmp_path / "missing.jsonl")


def test_other_formats_through_datasets(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,response\nhello,world\n")
    assert load_conversations(p) == [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]]
