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
