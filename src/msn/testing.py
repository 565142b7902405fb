"""Tiny random models and a tiny tokenizer, built from configs in code (no downloads).

Used by the test suite and handy for users' own tests of the decoding contract.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Each entry: model_type and the config fields that make it tiny.
TINY_FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, use_sliding_window=False),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None),
    "gemma": dict(model_type="gemma", num_key_value_heads=1, head_dim=8),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, pad_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=512),
}


def tiny_model(family: str = "llama", vocab_size: int = 96, seed: int = 0, dtype=torch.float32,
               attn_implementation: str = "sdpa"):
    """A 2-layer random causal LM of ``family`` with hidden size 32, in eval mode.

    Weights use a wide initializer so greedy choices are far from ties.
    """
    spec = dict(TINY_FAMILIES[family])
    model_type = spec.pop("model_type")
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, initializer_range=0.4,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if model_type == "gpt2":
        common = dict(vocab_size=vocab_size, initializer_range=0.4, bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(model_type, **{**common, **spec})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()
