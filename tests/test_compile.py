"""Compiled steps (``compile="on"``): the fixed-shape step compiled by torch.compile (inductor's
C++ kernels on this CPU) returns exactly the tokens of eager decoding and of ``ar``."""

import pytest
import torch

import msn
from msn.errors import MsnError

PROMPT = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(0))


# Slow: compiling is off on a CPU unless asked (compile="auto" compiles on CUDA only), and a cold
# inductor build of the two step shapes takes half a minute on 2 cores.
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3", "mistral"])
def test_compiled_steps_equal_eager_steps_and_ar(family, models):
    model = models(family)
    want = msn.generate(model, PROMPT, method="ar", max_new_tokens=24, eos_token_id=[]).tokens
    for method, opts in (("ar", {}), ("tr-jacobi", {"tree": "small", "drafts": "paper"})):
        eager = msn.generate(model, PROMPT, method=method, max_new_tokens=24, eos_token_id=[], **opts)
        compiled = msn.generate(model, PROMPT, method=method, max_new_tokens=24, eos_token_id=[], compile="on", **opts)
        step = compiled.info["step"]
        assert step["compiled"] and step["compiled_shapes"] >= 1 and step["compile_s"] > 0, step
        assert "step" not in eager.info                  # eager: the growing cache, nothing compiled
        assert compiled.tokens == eager.tokens == want, (family, method)
        assert compiled.steps == eager.steps             # the same drafts accepted step by step
        again = msn.generate(model, PROMPT, method=method, max_new_tokens=24, eos_token_id=[], compile="on", **opts)
        assert again.tokens == want and again.info["step"]["compiled_shapes"] == step["compiled_shapes"]


def test_compile_options_are_checked():
    with pytest.raises(MsnError, match="compile must be one of"):
        msn.DecodeConfig(compile="yes")
    with pytest.raises(MsnError, match="greedy decoding"):
        msn.DecodeConfig(compile="on", do_sample=True, temperature=0.7)
    assert msn.DecodeConfig().compile == "auto"
