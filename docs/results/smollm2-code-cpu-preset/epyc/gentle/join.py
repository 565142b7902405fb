"""The training set of span1-240.sh's `mix` run: the base model's own answers (a self-distilled
folder's train.jsonl) and as many human-written answers to *other* prompts of the stdlib code
set (a seeded sample), so that half the samples teach the model's own text and half the
human-written answers' habit of restating the docstring. heldout.jsonl is the human-written one.

    python join.py SELF_DIR HUMAN_DIR OUT_DIR
"""
import json
import random
import shutil
import sys
from pathlib import Path

from msn.data.records import write_jsonl


def main(own: str, human: str, out: str) -> None:
    own_rows = [json.loads(line) for line in (Path(own) / "train.jsonl").read_text().splitlines()]
    asked = {r["prompt"] for r in own_rows}
    others = [json.loads(line) for line in (Path(human) / "train.jsonl").read_text().splitlines()]
    others = [r for r in others if r["prompt"] not in asked]
    rows = own_rows + random.Random(42).sample(others, len(own_rows))
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(human) / "heldout.jsonl", dest / "heldout.jsonl")
    write_jsonl(dest / "train.jsonl", rows)
    print(f"{dest / 'train.jsonl'}: {len(own_rows)} own answers + {len(own_rows)} human-written")


if __name__ == "__main__":
    main(*sys.argv[1:])
