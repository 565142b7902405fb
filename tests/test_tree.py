import pytest
import torch

from msn.decoding.tree import (TREE_PRESETS, attention_bias, chain, compile_tree, preset_paths,
                               topk_tree)
from msn.errors import MsnError

SPEC = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))


def test_compiled_parents_depths_and_order():
    t = compile_tree(SPEC)
    assert t.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert t.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert t.node_pos.tolist() == [0, 0, 1, 1, 1, 2]
    assert t.node_col.tolist() == [0, 1, 0, 1, 0, 0]
    assert (t.num_positions, t.num_columns, t.num_inputs) == (3, 2, 7)


def test_mask_is_the_ancestor_relation():
    t = compile_tree(SPEC)
    paths = [()] + list(t.paths)
    for i, pi in enumerate(paths):
        for j, pj in enumerate(paths):
            assert bool(t.ancestor[i, j]) == (pi[: len(pj)] == pj), (pi, pj)


def test_leaf_path_tables():
    t = compile_tree(SPEC)
    rows = [t.leaf_paths[r, : t.leaf_len[r]].tolist() for r in range(t.leaf_paths.shape[0])]
    assert rows == [[1, 4], [2, 5], [1, 3, 6]]
    assert t.leaf_valid.sum(1).tolist() == t.leaf_len.tolist()


def test_attention_bias_shape_and_values():
    t = compile_tree(SPEC)
    bias = attention_bias(t, context_len=4, dtype=torch.float32, device="cpu")
    assert bias.shape == (1, 1, 7, 11)
    assert (bias[0, 0, :, :4] == 0).all()
    assert torch.equal(bias[0, 0, :, 4:] == 0, t.ancestor)


def test_empty_tree_is_root_only():
    t = compile_tree(())
    assert t.num_inputs == 1 and t.parents.tolist() == [-1]


@pytest.mark.parametrize("bad", [((0, 0),), ((0,), (0,)), ((),), ((0,), (-1,))])
def test_malformed_trees_are_refused(bad):
    with pytest.raises(MsnError, match="malformed tree"):
        compile_tree(bad)


def test_reference_preset_has_the_papers_shape():
    paths, k = preset_paths("reference")
    counts = [sum(len(p) == d for p in paths) for d in range(1, 5)]
    assert k == 10 and counts == [10, 28, 23, 2] and len(paths) == 63
    compile_tree(tuple(paths))  # prefix-closed


def test_reference_preset_is_the_documented_node_list_in_its_order():
    """The 63 nodes exactly as the authors' code (and Medusa's mc_sim_7b_63) lists them,
    read from the project's background document where it is beside the repository."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "shared" / "docs" / "background.md"
    if not doc.exists():
        pytest.skip("../shared/docs/background.md is not beside this checkout")
    text = doc.read_text()
    listing = text[text.index("(0) (0,0) (1)"): text.index("2. *Retrieval branch.*")]
    documented = [tuple(int(x) for x in m.split(",")) for m in re.findall(r"\(([\d,]+)\)", listing)]
    paths, _ = preset_paths("reference")
    assert len(documented) == 63 and paths == documented


def test_topk_tree_prefers_low_ranks():
    paths = topk_tree((3, 2), 3)
    assert paths == [(0,), (1,), (2,), (0, 0), (0, 1)]


def test_every_preset_compiles():
    for name in TREE_PRESETS:
        paths, _ = preset_paths(name)
        compile_tree(tuple(paths + chain(5, column=99)))
    with pytest.raises(MsnError, match="unknown tree preset"):
        preset_paths("huge")


def test_cli_tree_choices_match_the_presets():
    from msn.decoding.config import TREE_CHOICES

    assert set(TREE_CHOICES) == {"auto", *TREE_PRESETS}
