"""What models write, in three figures each: HumanEval on its first 40 problems (greedy, the cpu
preset's 320 new tokens, batches of 8; problems passed, answers that close their code block, mean
share of an answer's lines that repeat an earlier line of it) and the same two on the code requests
in a user's own words (128 new tokens; the answers are kept). Lines of 3 characters or fewer are
not counted. One row per LABEL=MODEL in OUT.json; a rerun skips the labels already there.

    python quality.py OUT.json REQUESTS.jsonl LABEL=MODEL [LABEL=MODEL ...]
"""
import json
import sys
from pathlib import Path

from msn.bench.batch import hf_batched
from msn.bench.prompts import load_questions
from msn.data.records import encode_prompt, ensure_chat_template
from msn.decoding.request import resolve_eos
from msn.evaluate import humaneval_pass1, repeated_line_share
from msn.experiments.reproduce import PRESETS
from msn.loading import load_for_inference

HUMANEVAL_PROBLEMS = 40
HUMANEVAL_BATCH = 8
REQUEST_TOKENS = 128


def repeated_share(answer: str) -> float:
    return repeated_line_share([answer]) or 0.0


def closed(answer: str) -> bool:
    return answer.count("```") >= 2


def row(label: str, model_path: str, requests: Path) -> dict:
    model, tok = load_for_inference(model_path, dtype="float32")
    ensure_chat_template(tok)
    he = humaneval_pass1(model, tok, max_new_tokens=PRESETS["cpu"].humaneval_tokens, limit=HUMANEVAL_PROBLEMS,
                         batch_size=HUMANEVAL_BATCH, progress=False)["results"]
    prompts = [encode_prompt(tok, [{"role": "user", "content": q.turns[0]}]) for q in load_questions(str(requests))]
    own = [tok.decode(ids, skip_special_tokens=True)
           for ids in hf_batched(model, prompts, REQUEST_TOKENS, resolve_eos(model, None), tok.pad_token_id)]
    answers = [r["answer"] for r in he]
    figures = {"he_pass": sum(r["passed"] for r in he), "he_n": len(he), "he_closed": sum(map(closed, answers)),
               "he_rep": sum(map(repeated_share, answers)) / len(he), "own_closed": sum(map(closed, own)),
               "own_rep": sum(map(repeated_share, own)) / len(own)}
    return {"model": label, **{k: round(v, 4) for k, v in figures.items()}, "own_answers": own}


def main(out: Path, requests: Path, pairs: list[str]) -> None:
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for label, model_path in (pair.split("=", 1) for pair in pairs):
        if all(r["model"] != label for r in rows):
            rows.append(row(label, model_path, requests))
            out.write_text(json.dumps({"rows": rows}, indent=1))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "own_answers"}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
