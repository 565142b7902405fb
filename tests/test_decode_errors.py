import pytest
import torch

import msn
from msn.errors import MsnError


def test_flash_attention_is_refused_with_a_hint():
    from tiny import tiny_model

    m = tiny_model("llama")
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(MsnError, match="sdpa"):
        msn.generate(m, torch.ones(1, 4, dtype=torch.long), max_new_tokens=3)
