"""Training data tokenized once through ``datasets``: a cache keyed by content, a bad line still
one error with its file and line, and ``msn train --profile`` measuring speed without writing."""

import json

import pytest

from msn.data import tokenized
from msn.errors import MsnError
from tiny import tiny_tokenizer, tiny_training_folder

RECORDS = [{"prompt": f"Sort list {i}", "response": "def s(x):\n    return sorted(x)  # " + "z" * (i % 4)}
           for i in range(30)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_training_folder(tmp_path_factory.mktemp("data"), RECORDS)


def test_the_second_read_comes_from_the_cache_and_a_change_tokenizes_again(folder, tmp_path, monkeypatch):
    from msn.data.records import build_examples, load_conversations

    tok = tiny_tokenizer()
    first = tokenized.tokenized_dataset(tok, str(folder / "data.jsonl"), 64)
    # The same examples as the in-memory path, with the index that seeds each one's noise.
    examples, _ = build_examples(tok, load_conversations(folder / "data.jsonl"), 64)
    assert [dict(r) for r in first] == examples

    def no_build(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenized, "_build", no_build)
    again = tokenized.tokenized_dataset(tok, str(folder / "data.jsonl"), 64)
    assert again[:] == first[:]
    changed = tmp_path / "data.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:10]))
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenized.tokenized_dataset(tok, str(changed), 64)
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenized.tokenized_dataset(tok, str(folder / "data.jsonl"), 32)       # another max_length


@pytest.mark.parametrize("line, message", [("{not json", r"bad\.jsonl:3: not valid JSON"),
                                           ('{"prompt": "a"}', r"bad\.jsonl:3: expected"),
                                           ('{"prompt": 1, "response": "b"}', r"bad\.jsonl:3: 'prompt' must be")])
def test_a_bad_line_is_one_error_with_file_and_line(tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n" + line + "\n")
    with pytest.raises(MsnError, match=message):
        tokenized.tokenized_dataset(tiny_tokenizer(), str(bad), 64)
    assert not list((tmp_path.parent).glob("**/*.partial-*"))


def test_profile_prints_the_throughput_and_writes_nothing(folder, tmp_path, monkeypatch, capsys):
    from msn.cli import EXIT_USAGE, main

    monkeypatch.chdir(tmp_path)
    base = ["train", "--model", str(folder / "model"), "--data", str(folder / "data.jsonl")]
    assert main([*base, "--profile", "3", "--batch-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["profile_steps"] == 3 and summary["global_step"] == 3
    speed = summary["throughput"]
    assert speed["tokens_per_s"] > speed["response_tokens_per_s"] > 0 and speed["seconds_to_first_step"] > 0
    assert summary["packing"] is True and speed["padding_share"] == 0
    assert list(tmp_path.iterdir()) == []
    for bad, says in ((["--profile", "0"], "--profile needs a positive"), ([], "needs --output-dir")):
        assert main([*base, *bad]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
