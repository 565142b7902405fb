"""Test fixtures: tiny random models and a tiny tokenizer, built from configs in code
(no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from msn.data.records import FALLBACK_CHAT_TEMPLATE

# Each entry: model_type and the config fields that make it tiny.
TINY_FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, use_sliding_window=False),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None),
    "gemma": dict(model_type="gemma", num_key_value_heads=1, head_dim=8),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, pad_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=2048),
}


# Hybrid and sliding-window attention: a sliding layer and a full one (or sliding layers
# only, for Mistral-style configs), a window of WINDOW positions. Eager attention where
# transformers offers no sdpa for the family.
WINDOW = 12
_TWO = ["sliding_attention", "full_attention"]
HYBRID_FAMILIES: dict[str, dict] = {
    "gemma3_text": dict(model_type="gemma3_text", num_key_value_heads=1, head_dim=8, layer_types=_TWO),
    "gemma2": dict(model_type="gemma2", num_key_value_heads=1, head_dim=8, layer_types=_TWO),
    "cohere2": dict(model_type="cohere2", num_key_value_heads=2, layer_types=_TWO),
    "gpt_oss": dict(model_type="gpt_oss", num_key_value_heads=2, head_dim=8, layer_types=_TWO,
                    num_local_experts=4, num_experts_per_tok=2),
    "olmo3": dict(model_type="olmo3", num_key_value_heads=2, layer_types=_TWO),
    "mistral_window": dict(model_type="mistral", num_key_value_heads=2),
    "qwen2_window": dict(model_type="qwen2", num_key_value_heads=2, use_sliding_window=True, max_window_layers=1),
    "qwen3_window": dict(model_type="qwen3", num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                         max_window_layers=1),
}
EAGER_ONLY = ("gemma2", "gpt_oss")


def tiny_hybrid(family: str, seed: int = 0, window: int = WINDOW):
    """A 2-layer random model of a hybrid/sliding-window ``family`` with a ``window``-position window."""
    spec = dict(HYBRID_FAMILIES[family], sliding_window=window)
    attn = "eager" if family in EAGER_ONLY else "sdpa"
    return tiny_model(spec, seed=seed, attn_implementation=attn)


def tiny_model(family: str | dict = "llama", vocab_size: int = 96, seed: int = 0, dtype=torch.float32,
               attn_implementation: str = "sdpa", context: int = 2048):
    """A 2-layer random causal LM of ``family`` (a ``TINY_FAMILIES`` name, or such an entry)
    with hidden size 32 and ``context`` positions, in eval mode.

    Weights use a wide initializer so greedy choices are far from ties.
    """
    spec = dict(TINY_FAMILIES[family] if isinstance(family, str) else family)
    model_type = spec.pop("model_type")
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=context, initializer_range=0.4,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if model_type == "gpt2":
        common = dict(vocab_size=vocab_size, initializer_range=0.4, bos_token_id=1, eos_token_id=2)
        spec["n_positions"] = context
    config = AutoConfig.for_model(model_type, **{**common, **spec})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
_CORPUS = (
    "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. "
    "Write a function that sorts a list. for i in range(10): print(i)\n"
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n"
)


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in memory on a few lines, with ChatML specials
    (``<|im_end|>`` is EOS, as in SmolLM2) and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = FALLBACK_CHAT_TEMPLATE  # ChatML
    return fast


def tiny_checkpoint(path, family: str = "llama", seed: int = 0):
    """Saves a tiny random model plus ``tiny_tokenizer`` to ``path``; returns the path."""
    tok = tiny_tokenizer()
    model = tiny_model(family, vocab_size=len(tok), seed=seed)
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_training_folder(folder, records: list[dict]):
    """``folder/model`` (a tiny checkpoint) and ``folder/data.jsonl`` holding ``records``; returns ``folder``."""
    import json

    tiny_checkpoint(folder / "model")
    with open(folder / "data.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return folder


def tiny_llama_and_tokenizer():
    """A tiny Llama and ``tiny_tokenizer``, with the tokenizer's end and padding ids in the
    model's generation config (what the bench and the server read)."""
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
