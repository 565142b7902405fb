"""``msn export-lora``: a fine-tuned model's difference as a peft LoRA adapter, loaded merged;
shipped adapters through ``msn fetch``; the demo's MSN side; what a device run brings back."""

import json

import pytest
import torch

from msn import adapter as ad
from msn import adapter_export as ex
from msn.loading import merged_model
from msn.errors import MsnError
from tiny import tiny_checkpoint, tiny_model, tiny_tokenizer

TIED_LLAMA = dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True)


def _tuned_pair(tmp_path, family, scale=0.05, only=None):
    """``tmp_path/base`` (a tiny checkpoint) and ``tmp_path/tuned``: the same model with every
    parameter (or those whose name contains ``only``) moved by seeded noise."""
    tok = tiny_tokenizer()
    base = tiny_model(family, vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    base.save_pretrained(tmp_path / "tuned")
    tok.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned"


def _logits(model, vocab=96):
    ids = torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["tied-llama", "qwen2", "gemma"])
def test_full_rank_adapter_reproduces_the_tuned_model(tmp_path, family):
    """At full rank in float32 the merged adapter is the tuned model: a tied head (moved with the
    embedding), biases (Qwen2) and a scaled embedding (Gemma) included; norms are stored whole."""
    from msn.loading import load_model

    base, tuned = _tuned_pair(tmp_path, TIED_LLAMA if family == "tied-llama" else family)
    report = ex.export_lora(base, tuned, tmp_path / "a", rank=64, dtype="float32", log=lambda *_: None)
    # Asked above every layer's full rank (32 here), it stores the full rank, not zero padding.
    assert report["kept"]["min"] == pytest.approx(1.0) and report["rank"] == 32
    assert "model.norm" in report["whole_modules"]
    want = _logits(load_model(str(tuned)).eval())
    got = _logits(merged_model(tmp_path / "a").eval())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(load_model(str(base)).eval()), want, atol=1e-2)


def test_lower_rank_is_the_truncated_svd_and_reports_what_it_keeps(tmp_path):
    base, tuned = _tuned_pair(tmp_path, "llama")
    report = ex.export_lora(base, tuned, tmp_path / "a", rank=4, dtype="float32", log=lambda *_: None)
    from msn.loading import load_model

    b, t, m = (load_model(str(p)) for p in (base, tuned, tmp_path / "a"))
    name = "model.layers.0.mlp.up_proj"
    with torch.no_grad():
        delta = t.get_submodule(name).weight - b.get_submodule(name).weight
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        torch.testing.assert_close(m.get_submodule(name).weight - b.get_submodule(name).weight,
                                   (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-4)
    kept = report["per_layer"][name]["kept"]
    assert kept == pytest.approx(float((s[:4] ** 2).sum() / (s ** 2).sum()), rel=1e-5) and 0 < kept < 1
    assert 0 < report["kept"]["overall"] < 1
    full = _logits(t)
    assert (_logits(m) - full).abs().max() > 1e-3     # truncated: not the tuned model any more
    saved = json.loads((tmp_path / "a" / ad.REPORT).read_text())
    assert saved["rank"] == 4 and saved["bytes"] == (tmp_path / "a" / ad.ADAPTER_WEIGHTS).stat().st_size


def test_budget_picks_a_rank_that_fits(tmp_path):
    base, tuned = _tuned_pair(tmp_path, "llama")
    report = ex.export_lora(base, tuned, tmp_path / "a", budget_mib=0.3, log=lambda *_: None)
    assert 1 <= report["rank"] < 32 and report["dtype"] == "bfloat16"
    assert report["bytes"] <= 0.3 * ex.MiB
    with pytest.raises(MsnError, match="not even rank 1 fits"):
        ex.export_lora(base, tuned, tmp_path / "b", budget_mib=0.01, log=lambda *_: None)


def test_peft_loads_the_folder_and_msn_decodes_it_merged(tmp_path):
    """A standard peft adapter: PeftModel.from_pretrained (unmerged, untied head) gives the merged
    model's logits; msn loads the folder (no config.json, no tokenizer) as the tuned model, and its
    greedy decoding equals the tuned model's."""
    from peft import PeftModel

    import msn
    from msn.loading import load_for_inference, load_model

    base, tuned = _tuned_pair(tmp_path, "qwen2")
    ex.export_lora(base, tuned, tmp_path / "a", rank=64, dtype="float32", log=lambda *_: None)
    peft = PeftModel.from_pretrained(load_model(str(base)), str(tmp_path / "a")).eval()
    torch.testing.assert_close(_logits(peft), _logits(merged_model(tmp_path / "a")), atol=1e-4, rtol=1e-4)
    model, tok = load_for_inference(str(tmp_path / "a"), device="cpu", dtype="float32")
    ref, _ = load_for_inference(str(tuned), device="cpu", dtype="float32")
    ids = torch.tensor([tok.encode("def add(a, b):")])
    assert msn.generate(model, ids, method="tr-jacobi", max_new_tokens=12).tokens == \
        msn.generate(ref, ids, method="ar", max_new_tokens=12).tokens


def test_what_export_refuses(tmp_path):
    base, tuned = _tuned_pair(tmp_path, "llama")
    other = tiny_checkpoint(tmp_path / "other", "qwen2")
    with pytest.raises(MsnError, match="parameter"):
        ex.export_lora(other, tuned, tmp_path / "x", rank=2, log=lambda *_: None)
    with pytest.raises(MsnError, match="equals the base model"):
        ex.export_lora(base, base, tmp_path / "x", rank=2, log=lambda *_: None)
    norms_only = _tuned_pair(tmp_path / "n", "llama", only="norm")[1]
    with pytest.raises(MsnError, match="a LoRA adapter needs a changed linear layer"):
        ex.export_lora(base, norms_only, tmp_path / "x", rank=2, log=lambda *_: None)
    with pytest.raises(MsnError, match="exactly one of --rank and --budget-mib"):
        ex.export_lora(base, tuned, tmp_path / "x", log=lambda *_: None)
    with pytest.raises(MsnError, match="--rank must be positive"):
        ex.export_lora(base, tuned, tmp_path / "x", rank=0, log=lambda *_: None)


def test_the_cli_writes_an_adapter(tmp_path, capsys):
    from msn.cli import main

    base, tuned = _tuned_pair(tmp_path, "llama", only="layers.1")
    assert main(["export-lora", "--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "a"),
                 "--rank", "3"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rank"] == 3 and 0 < printed["kept"]["overall"] < 1
    report = json.loads((tmp_path / "a" / ad.REPORT).read_text())
    assert report["unchanged_parameters"] > 0 and all("layers.1" in n for n in report["per_layer"])
    assert main(["export-lora", "--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "b")]) == 2


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A known base model already in the cache, and an adapter over it shipped in a stand-in
    for msn/adapters/; returns (cache dir, adapter folder, tuned checkpoint)."""
    from msn import fetch as f

    base, tuned = _tuned_pair(tmp_path, "llama")
    cache = tmp_path / "models"         # $MSN_CACHE_DIR/models: where fetch looks by default
    cache.mkdir()
    base.rename(cache / "tiny-base")
    (cache / "tiny-base" / f.DONE_MARKER).write_text("tiny\n")
    monkeypatch.setitem(f.KNOWN_MODELS, "tiny-base", f.KnownModel(parts=(), version="0", sha256="0" * 64,
                                                                  license="test", description="test"))
    monkeypatch.setitem(f.KNOWN_ADAPTERS, "tiny-msn", f.KnownAdapter(base="tiny-base", description="t",
                                                                     license="test"))
    monkeypatch.setattr(f, "adapters_dir", lambda: tmp_path / "adapters")
    folder = tmp_path / "adapters" / "tiny-msn"
    ex.export_lora(cache / "tiny-base", tuned, folder, rank=64, dtype="float32", base_ref="tiny-base",
                   log=lambda *_: None)
    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path))
    return cache, folder, tuned


def test_fetch_merges_a_shipped_adapter_once(shipped):
    from msn.fetch import fetch
    from msn.loading import load_model

    cache, folder, tuned = shipped
    (folder / "prompts.jsonl").write_text(json.dumps({"turns": ["def f():"]}) + "\n")
    target = fetch("tiny-msn", cache, log=lambda *_: None)
    assert (target / "config.json").exists() and (target / "tokenizer_config.json").exists()
    assert (target / "prompts.jsonl").exists() and not (target / "adapter_config.json").exists()
    torch.testing.assert_close(_logits(load_model(str(target))), _logits(load_model(str(tuned))),
                               atol=1e-4, rtol=1e-4)
    mtime = (target / "config.json").stat().st_mtime_ns
    assert fetch("tiny-msn", cache, log=lambda *_: None) == target
    assert (target / "config.json").stat().st_mtime_ns == mtime          # the second fetch did nothing


def test_fetch_without_a_produced_adapter_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from msn import fetch as f
    from msn.cli import main

    monkeypatch.setattr(f, "adapters_dir", lambda: tmp_path / "none")
    with pytest.raises(MsnError, match="no smollm2-msn-code adapter in this copy of msn"):
        f.fetch("smollm2-msn-code", tmp_path, log=lambda *_: None)
    assert main(["fetch", "smollm2-msn-code", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "msn reproduce --preset cpu" in err


def test_the_shipped_adapter_folder_is_complete_or_absent():
    """The repository ships smollm2-msn-code whole (weights, config, card, prompts) or not at all."""
    from msn.fetch import KNOWN_ADAPTERS, adapters_dir

    for name in KNOWN_ADAPTERS:
        folder = adapters_dir() / name
        present = [f for f in (ad.ADAPTER_WEIGHTS, ad.ADAPTER_CONFIG, "README.md", "prompts.jsonl")
                   if (folder / f).exists()]
        assert present in ([], [ad.ADAPTER_WEIGHTS, ad.ADAPTER_CONFIG, "README.md", "prompts.jsonl"]), name
        if present:
            assert json.loads((folder / ad.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == \
                KNOWN_ADAPTERS[name].base


def test_the_demo_puts_the_msn_model_beside_the_base(shipped, tmp_path):
    """With an MSN model at hand the demo decodes its held-out prompts on both models, ar and the
    fast method, and checks each output against its own model's ar."""
    from msn.bench.demo import main

    cache, folder, _ = shipped
    prompts = ["def add(a, b):", "class Stack:"]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in prompts))
    out = tmp_path / "demo.json"
    assert main(str(cache / "tiny-base"), max_new_tokens=8, repeats=1, msn_model=str(folder), code_repeats=1,
                out=str(out)) == 0
    report = json.loads(out.read_text())["heldout_code"]
    for side in ("base", "msn"):
        assert [r["kind"] for r in report[side]["prompts"]] == ["held-out 1", "held-out 2"]
        assert report[side]["all_identical"]
    assert main(str(cache / "tiny-base"), max_new_tokens=8, repeats=1, msn_model="none", out=str(out)) == 0
    assert "heldout_code" not in json.loads(out.read_text())


def test_collect_brings_back_few_small_files_that_join(tmp_path, monkeypatch):
    """What a device run returns: results and the shipped adapter, weights in parts under the
    return limit that join to the same bytes, its base named as the known model it is."""
    from msn import fetch as f
    from msn.experiments import reproduce as r

    base, tuned = _tuned_pair(tmp_path, "llama")
    (base / f.DONE_MARKER).write_text(f"converted from x.gguf {'a' * 64}\n")
    monkeypatch.setitem(f.KNOWN_MODELS, "tiny-base", f.KnownModel(parts=(), version="0", sha256="a" * 64,
                                                                  license="test", description="test"))
    out = tmp_path / "run"
    ex.export_lora(base, tuned, out / "msn-lora", rank=8, dtype="float32", log=lambda *_: None)
    for name in ("README.md", "prompts.jsonl"):
        (out / "msn-lora" / name).write_text("x\n")
    (out / "results.json").write_text(json.dumps({"adapter": {"model": "msn-lora"}}))
    (out / "results.md").write_text("# r\n")
    limit = (out / "msn-lora" / ad.ADAPTER_WEIGHTS).stat().st_size // 2 + 1
    monkeypatch.setattr(r, "RETURN_PART_BYTES", limit)
    written = r.collect(out, tmp_path / "back")
    assert len(written) <= 8 and all(p.stat().st_size <= limit for p in written if "part" in p.name)
    parts = sorted((tmp_path / "back" / "adapter").glob("adapter_model.safetensors.part*"))
    assert len(parts) == 2
    assert b"".join(p.read_bytes() for p in parts) == (out / "msn-lora" / ad.ADAPTER_WEIGHTS).read_bytes()
    config = json.loads((tmp_path / "back" / "adapter" / ad.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "tiny-base"
