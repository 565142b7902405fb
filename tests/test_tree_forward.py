"""One tree forward equals separate forwards of each root-to-leaf path."""

import pytest
import torch

from msn.decoding import cache as kv
from msn.decoding.tree import attention_bias, compile_tree, preset_paths


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_tree_logits_equal_path_logits(family, models):
    model = models(family)
    paths, _ = preset_paths("medium")
    tree = compile_tree(tuple(paths))
    g = torch.Generator().manual_seed(0)
    context = torch.randint(3, 96, (1, 9), generator=g)
    inputs = torch.randint(3, 96, (tree.num_inputs,), generator=g)
    with torch.no_grad():
        cache = kv.new_cache(model)
        model(input_ids=context, **kv.cache_kwargs(model, cache))
        mask = attention_bias(tree, 9, torch.float32, "cpu")
        tree_logits = model(input_ids=inputs[None], position_ids=(9 + tree.depths)[None], attention_mask=mask,
                            **kv.cache_kwargs(model, cache)).logits[0]
        for row in range(tree.leaf_paths.shape[0]):
            nodes = [0] + tree.leaf_paths[row, : tree.leaf_len[row]].tolist()
            seq = torch.cat([context[0], inputs[nodes]])[None]
            path_logits = model(input_ids=seq).logits[0, 9:]
            torch.testing.assert_close(tree_logits[nodes], path_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_keep_path_packs_a_non_contiguous_path(family, models):
    """keep_path on a cache filled by hand: the kept entries, in order, then nothing else."""
    model = models(family)
    cache = kv.new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]), **kv.cache_kwargs(model, cache))
    assert kv.cache_length(cache) == 10
    # Give each layer's entries recognisable values: entry j of layer l holds 100 * l + j.
    for l, layer in enumerate(cache.layers):
        for t in (layer.keys, layer.values):
            t.copy_((100 * l + torch.arange(10, dtype=t.dtype)).view(1, 1, 10, 1).expand_as(t))
    # The last 6 entries were one step's inputs: root (index 0) plus nodes 1..5; keep root, 2 and 5.
    kv.keep_path(cache, [0, 2, 5], appended=6)
    assert kv.cache_length(cache) == 4 + 3
    for l, layer in enumerate(cache.layers):
        want = torch.tensor([0, 1, 2, 3, 4, 6, 9], dtype=layer.keys.dtype) + 100 * l
        for t in (layer.keys, layer.values):
            assert t.shape[-2] == 7
            torch.testing.assert_close(t[0, 0, :, 0], want)
            torch.testing.assert_close(t[0, -1, :, -1], want)
