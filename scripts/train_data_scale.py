"""Training on a million records: peak memory and time to the first optimizer step.

Writes synthetic {prompt, response} JSONL files of 1,000 and 1,000,000 records, then for each
runs ``msn train --profile`` steps of the given model (batch 4) in a fresh process, twice: with
an empty tokenization cache (cold) and with the cache the first run left (warm). Reports the
peak resident memory during training (the process's high-water mark, reset when training starts,
read when it ends) and the seconds from the start of the run to the first optimizer step.

    python scripts/train_data_scale.py --model ~/.cache/msn/models/smollm2-135m-instruct --out runs/scale
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
from pathlib import Path
from transformers import TrainerCallback
from msn.train import TrainConfig, run

def hwm_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

class Peak(TrainerCallback):
    def on_train_begin(self, *a, **k):
        Path("/proc/self/clear_refs").write_text("5")      # resets the high-water mark (Linux)
    def on_train_end(self, *a, **k):
        self.peak = hwm_kib()

model, data, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
peak = Peak()
summary = run(TrainConfig(model=model, data=data, output_dir="", profile_steps=steps, batch_size=4,
                          max_length=384, lr=1e-4, warmup=0), callbacks=[peak])
print(json.dumps({"peak_rss_mib": round(peak.peak / 1024, 1), **summary["throughput"],
                  "examples": summary["train_examples"]}))
"""

WORDS = ("sort merge list tuple index value count parse split join reverse filter map reduce key "
         "item total average string number").split()


def write_records(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.sample(WORDS, 2)
            f.write(json.dumps({"prompt": f"Write a function that takes a {a} and returns its {b} ({i}).",
                                "response": f"def {a}_{b}_{i}(x):\n    return [{b} for {b} in x if {b}]\n"}) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", default="1000,1000000")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in map(int, a.sizes.split(",")):
        data = out / f"records-{n}.jsonl"
        if not data.exists():
            write_records(data, n)
        cache = Path(tempfile.mkdtemp(prefix="msn-scale-cache-", dir=out))
        for state in ("cold", "warm"):
            env = {**os.environ, "MSN_CACHE_DIR": str(cache)}
            done = subprocess.run([sys.executable, "-c", CHILD, a.model, str(data), str(a.steps)], env=env,
                                  stdout=subprocess.PIPE, text=True)
            if done.returncode:
                print(f"records={n} {state}: failed (exit {done.returncode})", file=sys.stderr)
                return 1
            row = {"records": n, "cache": state, **json.loads(done.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
