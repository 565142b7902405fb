"""The held-out columns of the cpu-preset page's quality tables, from an answers file (`ar`'s
answers as gentle.sh writes them): the share of non-trivial lines (over 3 characters) that repeat
an earlier line of the same answer and the share that are lines of the prompt, both pooled over
the answers, and the answers that close their code block.

    python answers.py QUESTIONS.jsonl ANSWERS.jsonl [ANSWERS.jsonl ...]
"""
import json
import sys

from msn.bench.prompts import load_questions
from msn.evaluate import counted_lines, repeated_line_share
from quality import closed


def main(questions: str, files: list[str]) -> None:
    prompts = {str(q.qid): set(counted_lines(q.turns[0])) for q in load_questions(questions)}
    for name in files:
        answers = [r for r in map(json.loads, open(name)) if r["set"] == "heldout"]
        total = copied = 0
        for r in answers:
            own = counted_lines(r["answer"])
            total += len(own)
            copied += sum(line in prompts[str(r["question_id"])] for line in own)
        repeated = repeated_line_share([r["answer"] for r in answers])
        print(json.dumps({"answers": name, "lines": total, "repeated": round(repeated, 3),
                          "copied_from_prompt": round(copied / total, 3), "closed": sum(closed(r["answer"]) for r in answers)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
