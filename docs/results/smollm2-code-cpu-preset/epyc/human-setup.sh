# Sourced by longer/longer.sh, gentle/gentle.sh and gentle/span1-240.sh after `W=WORK` and
# `HERE=their folder`: enters WORK and lays out what their runs read there: MODEL and SHIPPED (the
# base and the shipped adapter, fetched), the human-written stdlib code set in data/, and eval.py's
# run folder (run/data-self/heldout.jsonl, the held-out questions, the requests in a user's own words).
mkdir -p "$W/run" && cd "$W"
MODEL=$(msn fetch smollm2-135m-instruct | tail -1)
SHIPPED=$(msn fetch smollm2-msn-code | tail -1)
[ -f data/info.json ] || msn data stdlib-code --out data
ln -sfn ../data run/data-self
cp "$SHIPPED/prompts.jsonl" run/heldout_questions_10x50.jsonl
python -c "from pathlib import Path; from msn.bench.prompts import CODE_REQUESTS, write_questions; \
write_questions(Path('run/own_words_questions.jsonl'), CODE_REQUESTS, 'code-request')"
# resume_flag DIR: --resume where DIR holds a complete checkpoint; nothing where it does not (msn
# train refuses --resume without one, and takes a folder that a run left before its first).
resume_flag() { compgen -G "$1/checkpoint-*/trainer_state.json" >/dev/null && echo --resume || true; }
# bench MODEL TAG: msn's default decoder cold, `ar` in the same run, on both question sets, into
# bench-SET-TAG/ (skipped where finished); each summary kept as HERE/bench-{heldout,own-words}-TAG.summary.json
# (machine paths as ~).
bench() {
  local q b
  for q in heldout:heldout_questions_10x50 own-words:own_words_questions; do
    b="bench-${q#*:}-$2"
    [ -f "$b/summary.json" ] || msn bench --model "$1" --bench "run/${q#*:}.jsonl" --methods ar,tr-jacobi \
      --max-new-tokens 128 --warmup 1 --cold --dtype float32 --out "$b"
    sed "s#\"$HOME/#\"~/#g" "$b/summary.json" > "$HERE/bench-${q%%:*}-$2.summary.json"
  done
}
