"""Recycled candidates: the table, the breadth-first tree fill, persistence, and the merged
TR-Jacobi ranking of trajectory and recycled nodes."""

import random

import pytest
import torch

import msn
from msn.decoding import recycle
from msn.decoding.autotree import Outcome, candidates, node_order, Latency
from msn.decoding.recycle import RECYCLE_TEMPLATE, RecycleTable, RecycleTree
from msn.decoding.tree import REFERENCE_TREE, compile_tree


def test_the_template_is_the_anchors_80_node_tree():
    depths = [sum(len(r) == d for r in RECYCLE_TEMPLATE) for d in range(1, 7)]
    assert depths == [8, 21, 25, 15, 8, 3] and len(set(RECYCLE_TEMPLATE)) == 80
    assert all(max(r) < recycle.K for r in RECYCLE_TEMPLATE)
    tree = RecycleTree(offset=11)
    compiled = compile_tree(tree.paths)          # prefix-closed, no repeats
    assert compiled.num_inputs == 81 and compiled.num_positions == 6
    assert min(p[0] for p in tree.paths) == 11 and compiled.num_columns == 11 + tree.width


def _host_bfs(table: list[list[int]], root: int, ranks: tuple) -> int:
    tok = root
    for r in ranks:
        tok = table[tok][r]
    return tok


@pytest.mark.parametrize("walk", ["fill", "_fill_host", "_fill_device"])
def test_fill_walks_the_table_breadth_first_from_the_root(walk):
    """Both walks (NumPy for a table in host memory, torch ops elsewhere) draft every node
    of the tree from the table, breadth-first from the root."""
    g = torch.Generator().manual_seed(0)
    vocab = 50
    table = RecycleTable(vocab, "cpu")
    table.ids.copy_(torch.randint(vocab, (vocab, recycle.K), generator=g, dtype=torch.int32))
    host = table.ids.tolist()
    tree = RecycleTree(offset=3)
    cand = getattr(table, walk)(tree, 7)
    assert cand.dtype == torch.long and cand.shape == (tree.depth, 3 + tree.width)
    compiled = compile_tree(tree.paths)
    drafts = cand[compiled.node_pos, compiled.node_col].tolist()
    for ranks, path, tok in zip(tree.ranks, compiled.paths, drafts):
        assert path == tree.path(ranks)
        assert tok == _host_bfs(host, 7, ranks)
    assert cand[:, :3].eq(0).all()       # the columns of the other sources are left to them


def test_update_writes_each_inputs_top_k_into_its_row():
    table = RecycleTable(20, "cpu")
    logits = torch.randn(3, 20)
    table.update(torch.tensor([4, 9, 11]), logits)
    want = torch.topk(logits, recycle.K, dim=-1).indices
    assert torch.equal(table.ids[[4, 9, 11]].long(), want)
    assert table.ids[0].eq(0).all() and not table.cold


def test_a_small_vocabulary_keeps_what_it_has():
    table = RecycleTable(5, "cpu")
    table.update(torch.tensor([1]), torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]))
    assert table.ids[1, :5].tolist() == [1, 3, 2, 0, 4]


def test_accepted_follows_the_truth_down_the_tree():
    tree = RecycleTree()
    tokens = [[0] * tree.width for _ in range(tree.depth)]
    tokens[0][2] = 5            # node (2,) drafts 5
    tokens[1][tree.slots[(2, 1)]] = 6
    assert tree.accepted(tokens, [5, 6, 1, 1]) == (2, tree.slots[(2, 1)])
    assert tree.accepted(tokens, [4, 6]) == ()
    tokens[0][1] = 5            # a sibling before it drafts the same token: the first counts
    assert tree.accepted(tokens, [5, 6]) == (1,)


def test_tables_are_kept_on_disk_per_model_and_reset(models, tmp_path, monkeypatch):
    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(recycle, "_TABLES", {})
    model = models("llama")
    first = recycle.table_for(model, 96, "cpu")
    assert first.cold
    x = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5]])
    msn.generate(model, x, method="recycle", max_new_tokens=20)
    assert not first.cold and first.ids.any()
    first.save(force=True)
    saved = first.ids.clone()
    monkeypatch.setattr(recycle, "_TABLES", {})      # a new process
    again = recycle.table_for(model, 96, "cpu")
    assert not again.cold and torch.equal(again.ids, saved)
    r = msn.generate(model, x, method="recycle", max_new_tokens=5)
    assert r.info["recycle_table"] == "warm"
    assert recycle.reset_tables(model)
    monkeypatch.setattr(recycle, "_TABLES", {})
    assert recycle.table_for(model, 96, "cpu").cold
    other = recycle.table_for(models("qwen2"), 96, "cpu")     # another model has a table of its own
    assert other.cold


def test_a_damaged_table_file_is_a_cold_start(models, tmp_path, monkeypatch):
    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(recycle, "_TABLES", {})
    model = models("gpt2")
    path = recycle.table_for(model, 96, "cpu").path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a table")
    monkeypatch.setattr(recycle, "_TABLES", {})
    assert recycle.table_for(model, 96, "cpu").cold


def _outcome(ranks=(), recycled=(), guessed=True):
    return Outcome(tuple(ranks) + (None,) * (5 - len(ranks)), 0, guessed, 0, tuple(recycled))


def test_node_order_with_one_source_is_sorted_by_acceptance():
    rng = random.Random(0)
    outcomes = [_outcome([rng.choice([0, 0, 1, 2, None]) for _ in range(3)]) for _ in range(200)]
    order = node_order(outcomes)
    counts = {p: 0 for p in REFERENCE_TREE}
    from msn.decoding.autotree import _accepted_path

    for o in outcomes:
        for p in _accepted_path(o.ranks, counts):
            counts[p] += 1
    index = {p: i for i, p in enumerate(REFERENCE_TREE)}
    assert order == sorted(REFERENCE_TREE, key=lambda p: (-counts[p], index[p]))


def test_a_recycled_node_ranks_by_what_it_adds_beyond_the_trajectory():
    tree = RecycleTree(offset=11)
    # 30 steps where the trajectory's top-1 and recycled rank 0 are both right (one token),
    # 20 steps where only recycled rank 1 is right, then its child too.
    same = [_outcome([0], [0]) for _ in range(30)]
    only = [_outcome([], [tree.slots[(1,)], tree.slots[(1, 0)]]) for _ in range(20)]
    order = node_order(same + only, REFERENCE_TREE, (tree.paths, tree.offset))
    r1, r10, r0 = tree.path((1,)), tree.path((1, 0)), tree.path((0,))
    assert order[0] == (0,)                       # 30 steps
    assert order[1:3] == [r1, r10]                # 20 each, where nothing else was right
    assert order.index(r0) > order.index(r10)     # its 30 steps were the trajectory's already
    assert len(order) == len(REFERENCE_TREE) + 80 and len(set(order)) == len(order)
    for i in range(1, len(order) + 1):            # every prefix is a tree
        compile_tree(tuple(order[:i]))


def test_merged_candidates_count_the_longer_of_both_paths():
    tree = RecycleTree(offset=11)
    lat = Latency({1: 0.01, 69: 0.01, 200: 0.01})
    outcomes = [_outcome([], [tree.slots[(0,)], tree.slots[(0, 0)], tree.slots[(0, 0, 0)]], guessed=False)
                for _ in range(10)]
    opts = candidates(outcomes, lat, 5, recycled=(tree.paths, tree.offset))
    best = max(opts, key=lambda c: c.expected_tokens)
    assert best.expected_tokens == pytest.approx(4.0) and best.recycled >= 3
    three = [c for c in opts if len(c.nodes) == 3 and not c.retrieval][0]
    assert three.expected_tokens == pytest.approx(4.0) and three.recycled == 3


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3", "mistral", "gpt2"])
def test_recycled_drafts_are_accepted_and_exact(family, models):
    """On a repetitive prompt the table learns the continuation: recycle and merged tr-jacobi
    accept several tokens per step, and both equal ar. The table starts empty (the shared
    test models' tables hold whatever earlier tests taught them), and again before the
    asserted pair: ``tr-jacobi`` with the default ``--tree auto`` picks its tree from the step
    times it measures, so what it teaches the table depends on the machine."""
    model = models(family)
    recycle.reset_tables(model)
    unit = [5, 17, 33, 8, 41, 29]
    x = torch.tensor([unit * 4])
    want = msn.generate(model, x, method="ar", max_new_tokens=40, eos_token_id=[]).tokens
    for method, opts in (("recycle", {}), ("tr-jacobi", {"tree": "reference"}), ("tr-jacobi", {})):
        r = msn.generate(model, x, method=method, max_new_tokens=40, eos_token_id=[], **opts)
        assert r.tokens == want, (family, method, opts)
    recycle.reset_tables(model)
    first = msn.generate(model, x, method="recycle", max_new_tokens=40, eos_token_id=[])
    again = msn.generate(model, x, method="recycle", max_new_tokens=40, eos_token_id=[])
    assert first.tokens == want
    assert again.tokens == want and again.mean_accepted_tokens > 1.3, again.mean_accepted_tokens


def test_paper_drafts_never_touch_the_table(models, monkeypatch):
    model = models("mistral")
    monkeypatch.setattr(recycle, "_TABLES", {})
    x = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5]])
    r = msn.generate(model, x, method="tr-jacobi", drafts="paper", tree="reference", max_new_tokens=20)
    assert recycle._TABLES == {} and "recycle_table" not in r.info
    merged = msn.generate(model, x, method="tr-jacobi", tree="reference", max_new_tokens=20)
    assert merged.tokens == r.tokens and merged.info["drafts"] == "merged"
    assert all(c["inputs"] <= 69 for c in merged.info["choices"])     # the reference size, at most


def test_a_table_made_in_a_batch_step_serves_single_generations(models, monkeypatch):
    """A batch step (inference mode) may make the model's table first; generations outside
    inference mode go on writing it."""
    model = models("phi3")
    monkeypatch.setattr(recycle, "_TABLES", {})
    x = [[5, 6, 7, 8, 5, 6, 7, 8, 5], [9, 10, 11, 9, 10, 11]]
    batch = msn.generate(model, x, method="recycle", max_new_tokens=10, eos_token_id=[])
    one = msn.generate(model, torch.tensor([x[0]]), method="recycle", max_new_tokens=10, eos_token_id=[])
    assert one.tokens == batch[0].tokens
    assert not recycle.table_for(model, 96, "cpu").ids.is_inference()
