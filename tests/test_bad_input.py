"""Every mistake a user can make ends in one clear line and a non-zero exit, never a
traceback: the CLI (one ``msn: error:`` line, exit 2) and the Python API (``MsnError``)."""

import json

import pytest
import torch

import msn
from msn.cli import EXIT_INTERRUPTED, EXIT_USAGE, main
from msn.errors import MsnError, MsnInterrupted
from tiny import tiny_checkpoint

# (arguments, a fragment of the message). Placeholders in braces are files made per test.
CLI_CASES = [
    (["generate", "--model", "/no/such/model", "--prompt", "hi"], "does not exist"),
    (["generate", "--model", "{ckpt}", "--prompt", ""], "empty prompt"),
    (["generate", "--model", "{ckpt}", "--prompt", "  \n"], "empty prompt"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "100000"], "exceeds the model's context"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "10000000000"], "exceeds the model's context"),
    (["generate", "--model", "{ckpt}", "--prompt-file", "/no/prompt.txt"], "--prompt-file /no/prompt.txt does not exist"),
    (["generate", "--model", "{ckpt}", "--prompt-file", "{latin1}"], "not UTF-8"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--warmup", "-1"], "--warmup"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--device", "nonsense"], "unknown device"),
    (["serve", "--model", "/no/such/model"], "does not exist"),
    (["serve", "--model", "{ckpt}", "--max-batch", "0"], "--max-batch must be a positive integer"),
    (["serve", "--model", "{ckpt}", "--port", "70000"], "--port must be in 0..65535"),
    (["serve", "--model", "{ckpt}", "--host", "192.0.2.1"], "cannot listen on 192.0.2.1"),
    (["serve", "--model", "{ckpt}", "--method", "pld", "--tree", "small"], "--tree: they need --method tr-jacobi"),
    (["export-generate", "{good}"], "is a file, not a folder"),
    (["train", "--model", "/no/such/model", "--data", "d.jsonl", "--output-dir", "o"], "does not exist"),
    (["train", "--model", "{ckpt}", "--data", "/no/data.jsonl", "--output-dir", "o"], "data file"),
    (["train", "--model", "{ckpt}", "--data", "{empty}", "--output-dir", "o"], "empty"),
    (["train", "--model", "{ckpt}", "--data", "{badschema}", "--output-dir", "o"], ":1: expected"),
    (["train", "--model", "{ckpt}", "--data", "{badtype}", "--output-dir", "o"], ":1: 'response' must be a string, got int"),
    (["train", "--model", "{ckpt}", "--data", "{latin1}", "--output-dir", "o"], "latin1.jsonl:2: not UTF-8"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--noise-len", "0"], "span length"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--noise-len", "-3"], "span length"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "{good}"], "is a file, not a folder"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "{good}/sub"], "which is a file"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "/proc/msn-out"], "cannot be created or written"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--scheduler", "banana"], "unknown scheduler 'banana'"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--warmup", "-1"], "warmup must be >= 0"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--lora-r", "4",
      "--lora-targets", "nosuchmod", "--max-steps", "1"], "--lora-targets nosuchmod"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--eval-steps", "5"], "--eval-steps needs --eval-data"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--merge-lora"], "--merge-lora needs --lora-r"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--resume"], "no checkpoint"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--no-noise", "--noise-spans", "2"],
     "--noise-spans: they have no effect with --no-noise"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--lora-alpha", "8"],
     "--lora-alpha: they need --lora-r"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--method", "ar", "--tree", "small"],
     "--tree: they need --method tr-jacobi"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--method", "pld", "--window", "3"],
     "--window: they need --method jacobi"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--methods", "ar,pld", "--tree", "small"], "--tree: they need tr-jacobi"),
    (["reproduce", "--preset", "ablation", "--noise-spans", "4", "--out", "o"], "--noise-spans: they need a preset other"),
    (["reproduce", "--preset", "smoke", "--models", "base,gpt4", "--out", "o"], "unknown model(s) gpt4"),
    (["reproduce", "--preset", "smoke", "--noise-spans", "0", "--out", "o"], "noise spans must be positive"),
    (["reproduce", "--preset", "smoke", "--models", "base,msn-4spans-lora", "--out", "o"],
     "an adapter needs its model: add msn-4spans"),
    (["reproduce", "--preset", "smoke", "--base-model", "/nonexistent/m", "--out", "o"], "does not exist"),
    (["reproduce", "--preset", "smoke", "--data", "/tmp", "--out", "o"], "no train.jsonl or heldout.jsonl"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--temperature", "-1"], "temperature must be a number >= 0"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--top-k", "0"], "top_k must be an integer >= 1"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--sample-drafts"], "--sample-drafts needs sampling"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--temperature", "0.7", "--methods", "ar,hf-pld"],
     "hf-pld run greedy only"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--questions", "/no/q.jsonl"], "does not exist"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--methods", "ar,medusa"], "unknown method"),
    (["bench", "--model", "/no/such/model", "--out", "o", "--bench", "{good}"], "does not exist"),
    (["bench", "--model", "{ckpt}", "--out", "{good}", "--bench", "{good}"], "is the --bench file"),
    (["data", "stdlib-code", "--out", "{good}/x"], "which is a file"),
    (["fetch", "no-such-model"], "unknown model"),
    # Numbers that are not numbers, and seeds beyond 64 bits.
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--temperature", "nan"], "--temperature: expected a finite"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--top-p", "nan"], "--top-p: expected a finite number"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--temperature", "abc"], "--temperature: expected a number"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--temperature", "0.5", "--seed", str(2**64)],
     "seed must be an integer in [-2^63, 2^64 - 1]"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--lr", "nan"], "--lr: expected a finite"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--epochs", "nan"], "--epochs: expected"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--epochs", "inf"], "--epochs: expected"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--warmup", "-inf"], "--warmup: expected"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--seed", str(2**64)],
     "seed must be an integer in [0, 2^32 - 1]"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--lora-r", "4", "--lora-dropout", "1"],
     "lora_dropout must be in [0, 1)"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--max-steps", "x"], "--max-steps: invalid int"),
    # Files that are not what they should be.
    (["generate", "--model", "{ckpt}", "--prompt", "caf\udce9"], "--prompt is not valid UTF-8"),
    (["generate", "--model", "{trunc}", "--prompt", "hi"], "model.safetensors is truncated or corrupt"),
    (["train", "--model", "{trunc}", "--data", "{good}", "--output-dir", "o"], "model.safetensors is truncated"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--bench", "{arrays}"], "arrays.jsonl:1: expected a JSON object"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--bench", "{strings}"], "strings.jsonl:2: expected a JSON object"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--questions", "{latin1q}"], "latin1q.jsonl:2: not UTF-8"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--questions", "{folder}"], "is a folder, not a file"),
    (["bench", "--model", "{ckpt}", "--out", "o", "--bench", "{good}", "--max-new-tokens", "100000"],
     "--max-new-tokens 100000 leaves no room for a prompt"),
    # Folders that must not be written into.
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "{ckpt}"], "is (or holds) the input model's"),
    (["train", "--model", "{ckpt}", "--data", "{good}", "--output-dir", "o", "--resume", "--overwrite"],
     "--resume and --overwrite exclude each other"),
    (["serve", "--model", "{ckpt}", "--max-body-mb", "0"], "--max-body-mb must be a positive number"),
    (["serve", "--model", "{ckpt}", "--api-key", " "], "--api-key must be a non-empty string"),
    (["generate", "--model", "HuggingFaceTB/NoSuchModel-135M", "--prompt", "hi"], "msn fetch"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--method", "nope"], "--method: invalid choice"),
    (["export-lora", "--base", "/no/such/model", "--tuned", "{ckpt}", "--out", "o", "--rank", "4"], "does not exist"),
    (["export-lora", "--base", "{ckpt}", "--tuned", "{ckpt}", "--out", "o", "--rank", "4"], "equals the base model"),
    (["export-lora", "--base", "{ckpt}", "--tuned", "{ckpt}", "--out", "o", "--rank", "4", "--budget-mib", "2"],
     "not allowed with argument"),
    (["export-lora", "--base", "{ckpt}", "--tuned", "{ckpt}", "--out", "o", "--budget-mib", "-1"],
     "--budget-mib must be positive"),
    (["export-lora", "--base", "{ckpt}", "--tuned", "{ckpt}", "--out", "{good}", "--rank", "4"], "is a file, not a folder"),
    (["export-lora", "--base", "{ckpt}", "--tuned", "{ckpt}", "--out", "o", "--rank", "4", "--dtype", "int8"],
     "unknown dtype"),
    (["fetch", "no-such-model"], "unknown model 'no-such-model'"),
    (["generate", "--model", "{adapter_nobase}", "--prompt", "hi"], "names no base model"),
]
if not torch.cuda.is_available():
    CLI_CASES.append((["generate", "--model", "{ckpt}", "--prompt", "hi", "--device", "cuda"], "no CUDA device"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("bad") / "model")


@pytest.fixture
def files(tmp_path, ckpt):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    (tmp_path / "badtype.jsonl").write_text(json.dumps({"prompt": "a", "response": 3}) + "\n")
    (tmp_path / "good.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"prompt": "a", "response": "b"}).encode() + b"\n"
                                            + '{"prompt": "caf\xe9", "response": "b"}\n'.encode("latin-1"))
    import shutil

    trunc = tmp_path / "trunc"
    shutil.copytree(ckpt, trunc)
    weights = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp_path / "arrays.jsonl").write_text('["turns", "hi"]\n')
    (tmp_path / "strings.jsonl").write_text('{"prompt": "hi"}\n"just a string"\n')
    (tmp_path / "latin1q.jsonl").write_bytes(b'{"prompt": "a"}\n' + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "adapter_nobase").mkdir()
    (tmp_path / "adapter_nobase" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    return {"{adapter_nobase}": str(tmp_path / "adapter_nobase"), "{ckpt}": str(ckpt), "{trunc}": str(trunc), "{arrays}": str(tmp_path / "arrays.jsonl"),
            "{strings}": str(tmp_path / "strings.jsonl"), "{latin1q}": str(tmp_path / "latin1q.jsonl"),
            "{folder}": str(tmp_path / "folder"), "{empty}": str(tmp_path / "empty.jsonl"), "{badschema}": str(tmp_path / "bad.jsonl"),
            "{badtype}": str(tmp_path / "badtype.jsonl"), "{good}": str(tmp_path / "good.jsonl"),
            "{latin1}": str(tmp_path / "latin1.jsonl")}


def _fill(arg: str, files: dict) -> str:
    for key, value in files.items():
        arg = arg.replace(key, value)
    return arg


@pytest.mark.parametrize("args, message", CLI_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CLI_CASES])
def test_cli_mistakes_are_one_line(args, message, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main([_fill(a, files) for a in args])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.startswith("msn: error")]
    assert len(lines) == 1 and message in lines[0], err[-1500:]


@pytest.fixture(scope="module")
def model(models):
    return models("llama")


API_CASES = [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
    (dict(input_ids=torch.ones(2, 1, 4, dtype=torch.long)), r"shape \(1, T\)"),
    (dict(input_ids="1 2 3"), "must be a tensor"),
    (dict(input_ids=torch.ones(1, 4)), "integer token ids, got dtype float32"),
    (dict(input_ids=torch.ones(1, 4, dtype=torch.bool)), "integer token ids"),
    (dict(input_ids=torch.tensor([[3, 4, 96]])), "token id 96, outside the model's vocabulary"),
    (dict(input_ids=torch.tensor([[3, -1, 5]])), "token id -1, outside"),
    (dict(input_ids=torch.ones(1, 2100, dtype=torch.long)), "does not fit the model's context"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=10**10), "exceeds the model's context"),
    (dict(method="beam"), "unknown method"),
    (dict(tree="huge"), "unknown tree preset"),
    (dict(window=0), "window must be positive"),
    (dict(window="5"), "window must be an integer"),
    (dict(colour="red"), "unknown decoding option"),
    (dict(tree=[]), "malformed tree: it has no node"),
    (dict(tree=[(0,), (1, 0)]), "malformed tree: .* prefix-closed"),
    (dict(tree=[(0,), ()]), "malformed tree: empty path"),
    (dict(tree=[(0,), ("a",)]), "malformed tree: path .* non-integer entry"),
    (dict(tree=[(0,), (0.5,)]), "malformed tree: path .* non-integer entry"),
    (dict(tree=[(0,), 1]), "malformed tree: each path is a sequence"),
    (dict(eos_token_id="</s>"), "eos_token_id must be a token id or a list of token ids"),
    (dict(eos_token_id=[2, "x"]), "eos_token_id must be"),
    (dict(retrieve_len=100000), "retrieve_len must be at most 256"),
    (dict(method="jacobi", window=10**6), "window must be at most 256"),
    (dict(method="pld", pld_tokens=5000), "pld_tokens must be at most 256"),
    (dict(method="lookahead", lookahead_ngram=100), "lookahead_ngram must be at most 16"),
    (dict(seed=2**64), r"seed must be an integer in \[-2\^63, 2\^64 - 1\]"),
    (dict(seed=-2**63 - 1), r"seed must be an integer in"),
]


@pytest.mark.parametrize("kwargs, match", API_CASES, ids=[str(k)[:40] for k, _ in API_CASES])
def test_api_mistakes_raise_one_clear_error(model, kwargs, match):
    args = dict(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=5, method="tr-jacobi")
    args.update(kwargs)
    with pytest.raises(MsnError, match=match) as info:
        msn.generate(model, args.pop("input_ids"), **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad, match", [("/some/checkpoint", "not the path '/some/checkpoint'"),
                                        (object(), "Hugging Face causal LM")])
def test_api_model_that_is_not_a_model(bad, match):
    with pytest.raises(MsnError, match=match):
        msn.generate(bad, torch.ones(1, 4, dtype=torch.long), max_new_tokens=3)


def test_interrupt_exits_130_with_the_way_to_continue(monkeypatch, capsys, tmp_path):
    import msn.train

    def interrupted(cfg, callbacks=None):
        raise MsnInterrupted("continue with --resume (from o/checkpoint-10)")

    monkeypatch.setattr(msn.train, "run", interrupted)
    code = main(["train", "--model", str(tmp_path), "--data", "d.jsonl", "--output-dir", "o"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INTERRUPTED == 130
    assert err == ["msn: interrupted; continue with --resume (from o/checkpoint-10)"]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"msn {msn.__version__}"


SAMPLING_CASES = [
    (dict(do_sample=True, temperature=-0.5), "temperature must be a number >= 0"),
    (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_k=0), "top_k must be an integer >= 1"),
    (dict(do_sample=True, top_k=2.5), "top_k must be an integer >= 1"),
    (dict(temperature=0.7), "temperature need do_sample=True"),
    (dict(top_k=5, top_p=0.9), "top_k, top_p need do_sample=True"),
    (dict(sample_drafts=True), "sample_drafts need do_sample=True"),
    (dict(do_sample="yes"), "do_sample must be True or False"),
    (dict(generator=torch.Generator()), "a generator needs do_sample=True"),
    (dict(do_sample=True, generator=42), "generator must be a torch.Generator"),
    (dict(do_sample=True, temperature=float("nan")), "temperature must be a number >= 0"),
    (dict(do_sample=True, temperature=float("inf")), "temperature must be a number >= 0"),
    (dict(do_sample=True, temperature=1e300), "temperature must be at most 1e6"),
    (dict(do_sample=True, top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, temperature=0.5, seed=2**64), "seed must be an integer in"),
]


@pytest.mark.parametrize("temperature", [0.0, 1e-45, 1e-30, 9e-6])
def test_a_temperature_below_1e5_is_greedy(model, temperature):
    """Below MIN_TEMPERATURE sampling is greedy by definition (logits / T overflows float32)."""
    ids = torch.tensor([[3, 4, 5, 6, 7, 3, 4]])
    greedy = msn.generate(model, ids, method="ar", max_new_tokens=12).tokens
    for method in ("ar", "tr-jacobi"):
        got = msn.generate(model, ids, method=method, max_new_tokens=12, do_sample=True, temperature=temperature,
                           seed=3)
        assert got.tokens == greedy


@pytest.mark.parametrize("kwargs, match", SAMPLING_CASES, ids=[str(k)[:40] for k, _ in SAMPLING_CASES])
def test_sampling_mistakes_raise_one_clear_error(model, kwargs, match):
    with pytest.raises(MsnError, match=match):
        msn.generate(model, torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, **kwargs)


def test_a_generator_on_another_device_is_refused():
    from msn.decoding.sampling import check_generator

    check_generator(torch.Generator(), torch.device("cpu"))
    with pytest.raises(MsnError, match=r"generator is on cpu but the model is on meta; create it with"):
        check_generator(torch.Generator(), torch.device("meta"))
