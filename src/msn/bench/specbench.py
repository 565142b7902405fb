"""Entry point with the signature Spec-Bench's evaluation scripts call.

In a Spec-Bench ``evaluation/inference_*.py`` script::

    from msn.bench.specbench import forward
    run_eval(model=model, tokenizer=tokenizer, forward_func=forward, ...)
"""

from __future__ import annotations

import torch

from msn.decoding.engine import generate


def forward(inputs, model, tokenizer, max_new_tokens: int, method: str = "tr-jacobi", **options):
    """Decodes ``inputs.input_ids`` (1, T) and returns what Spec-Bench expects.

    Returns:
        (output_ids, new_token, steps, accept_lengths): output_ids (1, T + new) with the
        prompt; new_token, the number of new tokens; steps, forwards after prefill;
        accept_lengths, tokens accepted per step.
    """
    input_ids = inputs["input_ids"] if not isinstance(inputs, torch.Tensor) else inputs
    input_ids = torch.as_tensor(input_ids)
    eos = tokenizer.eos_token_id if getattr(model.generation_config, "eos_token_id", None) is None else None
    r = generate(model, input_ids, method=method, max_new_tokens=max_new_tokens, eos_token_id=eos, **options)
    new = torch.tensor([r.tokens], dtype=input_ids.dtype, device=input_ids.device)
    output_ids = torch.cat([input_ids, new], dim=1)
    return output_ids, len(r.tokens), r.steps, list(r.accept_lengths)
