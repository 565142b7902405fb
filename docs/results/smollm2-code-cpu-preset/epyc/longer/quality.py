"""What a model writes, in three figures: HumanEval on its first N problems (greedy, 320 new
tokens, batches of 8; problems passed, answers that close their code block, mean share of an
answer's lines that repeat an earlier line of it) and the same two shares on the 10 code requests
in a user's own words (128 new tokens). Lines of 3 characters or fewer are not counted.

    python quality.py MODEL REQUESTS.jsonl OUT.json [N]
"""
import json
import sys
from pathlib import Path

import torch

from msn.bench.batch import hf_batched
from msn.data.records import encode_prompt, ensure_chat_template
from msn.decoding.request import resolve_eos
from msn.evaluate import humaneval_pass1
from msn.loading import load_for_inference


def repeated_share(answer: str) -> float:
    lines = [line.strip() for line in answer.splitlines() if len(line.strip()) > 3]
    return sum(line in lines[:i] for i, line in enumerate(lines)) / max(1, len(lines))


def closed(answer: str) -> bool:
    return answer.count("```") >= 2


def main(model_path: str, requests: Path, out: Path, n: int = 40) -> None:
    torch.manual_seed(0)
    model, tok = load_for_inference(model_path, dtype="float32")
    ensure_chat_template(tok)
    he = humaneval_pass1(model, tok, max_new_tokens=320, limit=n, batch_size=8, progress=False)["results"]
    prompts = [encode_prompt(tok, [{"role": "user", "content": json.loads(line)["turns"][0]}])
               for line in requests.read_text().splitlines() if line.strip()]
    own = [tok.decode(row, skip_special_tokens=True)
           for row in hf_batched(model, prompts, 128, resolve_eos(model, None), tok.pad_token_id)]
    answers = [r["answer"] for r in he]
    result = {"model": model_path, "he_pass": sum(r["passed"] for r in he), "he_n": n,
              "he_closed": sum(map(closed, answers)), "he_rep": sum(map(repeated_share, answers)) / n,
              "own_closed": sum(map(closed, own)), "own_rep": sum(map(repeated_share, own)) / len(own),
              "own_answers": own}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "own_answers"}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), *map(int, sys.argv[4:5]))
