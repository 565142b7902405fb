#!/usr/bin/env python3
# Usage: python scripts/bench_subset.py OUT/records.jsonl 5
"""Tokens per step and speedup per method and category over the first N questions of each
category of a bench's records.jsonl (a --limit N subset of a --limit M >= N run)."""
import json, sys, collections
path, n = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(path)]
order = collections.defaultdict(list)
for r in rows:
    if r["question_id"] not in order[r["category"]]:
        order[r["category"]].append(r["question_id"])
keep = {q for c, qs in order.items() for q in qs[:n]}
acc = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0, 0.0]))   # tokens, steps, wall
for r in rows:
    if r["question_id"] not in keep:
        continue
    ch = r["choices"][0]
    for cat in (r["category"], "overall"):
        a = acc[r["method"]][cat]
        a[0] += sum(sum(x) for x in ch["accept_lengths"]); a[1] += sum(len(x) for x in ch["accept_lengths"]); a[2] += sum(ch["wall_time"])
cats = sorted({c for m in acc.values() for c in m if c != "overall"}) + ["overall"]
print("method".ljust(22), *[c[:13].rjust(14) for c in cats])
for m, d in acc.items():
    cells = [f"{d[c][0] / d[c][1]:.2f} {acc['ar'][c][2] / d[c][2]:.2f}x" for c in cats]
    print(m.ljust(22), *[x.rjust(14) for x in cells])
print(len(keep), "questions; cells: tokens per step, speedup over ar in wall time")
