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


def test_stdlib_requests_ask_for_the_same_functions_in_a_users_words(tmp_path):
    """The cpu preset's requests: a stdlib record's prompt becomes "... a Python function that
    returns ...", its docstring's imperative in the third person; methods, private functions and
    docstrings that do not start with a verb are left out; skipped indices never appear; the
    same records give the same file."""
    import random

    from msn.data.stdlib_code import PROMPT, _third_person, as_request, write_requests

    assert [_third_person(v) for v in ("Return", "Returns", "Check", "Process", "Copy", "Push", "Say")] == \
        ["returns", "returns", "checks", "processes", "copies", "pushes", "says"]

    def rec(name, sig, doc):
        return {"prompt": PROMPT.format(name=name, signature=sig, module="statistics", doc=doc),
                "response": f"```python\ndef {name}{sig}: ...\n```", "module": "statistics"}

    good = rec("mean", "(data)", "Return the sample arithmetic mean of data.\n\nIf data is empty, raise.")
    asked = as_request(good, random.Random(0))
    assert "returns the sample arithmetic mean of data" in asked["prompt"]
    assert "Docstring" not in asked["prompt"] and "If data is empty" not in asked["prompt"]
    assert asked["response"] == good["response"] and asked["module"] == "statistics"
    for bad in (rec("mean", "(self, data)", "Return the mean of data."),
                rec("_mean", "(data)", "Return the mean of data."),
                rec("mean", "(data)", "The mean of data, as a float."),
                rec("mean", "(data)", "Return it."),
                {"prompt": "Write a haiku", "response": "x"}):
        assert as_request(bad, random.Random(0)) is None
    records = [rec(f"f{i}", "(x)", f"Compute the value number {i} of x.") for i in range(6)]
    assert write_requests(records, tmp_path / "a", skip={1, 4}) == 4
    rows = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert [r["response"] for r in rows] == [records[i]["response"] for i in (0, 2, 3, 5)]
    assert all("computes the value number" in r["prompt"] for r in rows)
    write_requests(records, tmp_path / "b", skip={1, 4})
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
