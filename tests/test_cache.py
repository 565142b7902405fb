"""msn's store of what outlives a run: ``msn cache info`` shows it, ``msn cache clear`` deletes it,
``--cold`` runs start without learned state, on the store's calibration, and leave the learned
state as it was, and inside a bench a method's figures do not depend on the other methods."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from msn import paths
from msn.bench.harness import BenchConfig, run_bench
from tiny import tiny_llama_and_tokenizer

BIN = Path(sys.executable).parent
METHODS = ["ar", "pld", "jacobi", "tr-jacobi", "recycle"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    root = tmp_path / "store"
    monkeypatch.setenv("MSN_CACHE_DIR", str(root))
    return root


def _msn(*args, store):
    import os

    return subprocess.run([str(BIN / "msn"), *args], capture_output=True, text=True,
                          env={**os.environ, "MSN_CACHE_DIR": str(store)})


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def test_info_shows_each_kind_and_clear_deletes_decoding_state_only(store):
    paths.write_stored("latency", {"model": "a"}, {"seconds": [1.0]})
    paths.write_stored("acceptance", {"model": "a"}, [[1, 2]])
    (store / "models" / "m").mkdir(parents=True)
    (store / "models" / "m" / "w.bin").write_bytes(b"x" * 2048)
    info = json.loads(_msn("cache", "info", "--json", store=store).stdout)
    rows = {r["kind"]: r for r in info["kinds"]}
    assert info["store"] == str(store) and set(rows) == set(paths.STORE_KINDS)
    assert rows["latency"]["entries"] == rows["acceptance"]["entries"] == rows["models"]["entries"] == 1
    assert rows["models"]["bytes"] == 2048 and rows["recycle"]["entries"] == 0
    table = _msn("cache", "info", store=store).stdout
    assert "latency" in table and str(store) in table
    cleared = _msn("cache", "clear", store=store)
    assert cleared.returncode == 0 and "cleared latency: 1 entries" in cleared.stdout
    assert not (store / "latency").exists() and not (store / "acceptance").exists()
    assert (store / "models" / "m" / "w.bin").exists()              # fetched models stay unless named
    assert _msn("cache", "clear", "models", store=store).returncode == 0 and not (store / "models").exists()
    bad = _msn("cache", "clear", "nonsense", store=store)
    assert bad.returncode == 2 and "unknown cache kind 'nonsense'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama_and_tokenizer()


def test_cold_bench_runs_measure_the_same_and_leave_the_store_as_it_was(tiny, store, tmp_path, capsys):
    model, tok = tiny
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [t]}) + "\n" for i, t in enumerate(
        ["def add(a, b): return a + b", "for i in range(10): print(i)", "class Stack: push pop"])))

    def bench(name, cold):
        cfg = BenchConfig(model="tiny", out=str(tmp_path / name), bench="spec-bench", questions=str(q),
                          methods=METHODS, max_new_tokens=24, warmup=0, cold=cold)
        summary = run_bench(cfg, model=model, tokenizer=tok, progress=False)
        return summary, {m: v["overall"]["mean_accepted_tokens"] for m, v in summary["methods"].items()}

    warm, _ = bench("warm", cold=False)            # fills the store
    assert warm["config"]["decoding_state"]["cold"] is False
    before = _files(store)
    assert any(k.startswith(("latency", "acceptance", "recycle")) for k in before)
    first, a = bench("cold1", cold=True)
    second, b = bench("cold2", cold=True)
    state = first["config"]["decoding_state"]
    assert state["cold"] is True and state["calibration"]["latency"] >= 1 and a == b
    assert _files(store) == before                 # nothing read into, nothing written over
    err = capsys.readouterr().err
    assert "decoding state: cold" in err and "decoding state: warm" in err
    again, _ = bench("warm2", cold=False)
    entries = again["config"]["decoding_state"]["entries"]
    assert entries["acceptance"] >= 1 and entries["recycle"] >= 1


def test_a_recycled_table_made_cold_is_not_saved_over_the_stores(store):
    from msn.decoding import recycle

    key = {"weights": "w", "k": 8}
    with paths.empty_decoding_state():
        table = recycle.RecycleTable(16, "cpu", 8, key)
        inside = table.path()
        table.ids[3, 0] = 7
        table.dirty = True
        table.save(force=True)
        assert inside.exists() and not str(inside).startswith(str(store))
    table.save(force=True)                          # as at exit: its folder is gone, and stays gone
    assert not (store / "recycle").exists() and not inside.parent.exists()
    assert recycle.RecycleTable(16, "cpu", 8, key).path().parent == store / "recycle"


def test_cold_runs_on_a_fresh_store_agree_and_a_method_ignores_the_others(tiny, store, tmp_path):
    """On a store with nothing in it, the first cold run measures the calibration and keeps it, the
    second reads it: the same tokens per step for every method, the latency-chosen trees too.
    And a method's tokens per step are the same whichever other methods share the run (each
    starts from the bench's starting state and learns alone)."""
    model, tok = tiny
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [t]}) + "\n" for i, t in enumerate(
        ["x = [1, 2, 3]; y = [1, 2, 3]; z = [1, 2, 3]", "the cat sat on the mat, the cat sat on", "a b c a b c a"])))

    def bench(name, methods, cold=True):
        cfg = BenchConfig(model="tiny", out=str(tmp_path / name), bench="spec-bench", questions=str(q),
                          methods=methods, max_new_tokens=24, warmup=1, cold=cold)
        summary = run_bench(cfg, model=model, tokenizer=tok, progress=False)
        return {m: v["overall"]["mean_accepted_tokens"] for m, v in summary["methods"].items()}

    every = ["ar", "pld", "tr-jacobi", "tr-jacobi:reference", "recycle", "tr-jacobi:small"]
    first = bench("one", every)
    assert (store / "latency").is_dir() and not (store / "acceptance").exists()   # calibration kept, nothing learnt
    assert bench("two", every) == first
    for method in ("tr-jacobi:reference", "recycle", "tr-jacobi"):
        assert bench(f"alone-{method}", ["ar", method])[method] == first[method], method
    warm = bench("warm", ["ar", "tr-jacobi:reference", "tr-jacobi"], cold=False)
    assert warm["tr-jacobi"] == first["tr-jacobi"] and warm["tr-jacobi:reference"] == first["tr-jacobi:reference"]
    assert (store / "acceptance").is_dir()          # a warm run keeps tr-jacobi's scored steps


def test_a_library_user_passes_a_store_of_their_own(store, tmp_path):
    """decoding_store(folder): the block's decoding state is read from and kept in the user's
    folder, msn's store untouched; the folder keeps it for the next block."""
    import msn
    from tiny import tiny_model
    import torch

    model = tiny_model("qwen2").eval()
    mine = tmp_path / "mine"
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5]])
    with paths.decoding_store(mine):
        msn.generate(model, ids, method="tr-jacobi", max_new_tokens=12, eos_token_id=[])
    kept = _files(mine)
    assert any(k.startswith("latency/") for k in kept) and any(k.startswith("acceptance/") for k in kept)
    assert not any(k.split("/")[0] in paths.DECODING_STATE for k in _files(store))
    with pytest.raises(paths.MsnError, match="unknown kind of decoding state 'weights'"):
        with paths.decoding_store(mine, kinds=("weights",)):
            pass
