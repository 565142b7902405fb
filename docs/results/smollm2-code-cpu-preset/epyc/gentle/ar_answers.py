"""The answers a bench's `ar` wrote (what every decoder reproduces), as one JSON line each with
its question set and id: the input of ../longer/answers.py.

    python ar_answers.py OUT.jsonl HELDOUT_BENCH_FOLDER OWN_WORDS_BENCH_FOLDER
"""
import json
import sys
from pathlib import Path

from msn.data.records import write_jsonl


def main(out: str, heldout: str, own: str) -> None:
    rows = []
    for folder, name in ((heldout, "heldout"), (own, "own")):
        for line in (Path(folder) / "records.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["method"] == "ar":
                rows.append({"set": name, "question_id": r["question_id"], "answer": r["choices"][0]["turns"][0]})
    write_jsonl(Path(out), rows)


if __name__ == "__main__":
    main(*sys.argv[1:])
