#!/usr/bin/env bash
# The shipped adapter's default decoder warm: its recycled candidate table and scored tree steps
# learned on 40 stdlib *training* prompts (a seeded sample, none of them held out), then the 10
# held-out prompts of prompts.jsonl (heldout10.jsonl), `ar` in the same run. A store of its own
# (MSN_CACHE_DIR), so nothing learned earlier takes part. Run from a scratch folder.
set -eu
export MSN_CACHE_DIR=./cache
M=$(msn fetch smollm2-msn-code | tail -1)
cp "$M/prompts.jsonl" heldout10.jsonl
[ -f data/info.json ] || msn data stdlib-code --out data
python - <<'PY'
import json, random
from pathlib import Path
from msn.bench.prompts import write_questions
rows = [json.loads(line) for line in open("data/train.jsonl")]
random.seed(7)
write_questions(Path("train40.jsonl"), [r["prompt"] for r in random.sample(rows, 40)], "stdlib-train")
PY
msn bench --model $M --bench train40.jsonl --methods tr-jacobi --max-new-tokens 128 --warmup 1 --dtype float32 --out warm-train40
msn bench --model $M --bench heldout10.jsonl --methods ar,tr-jacobi --max-new-tokens 128 --warmup 1 --dtype float32 --out held10-warm
