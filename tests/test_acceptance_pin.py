"""Acceptance pinned on the real model (slow): a short cold Spec-Bench bench of SmolLM2-135M-Instruct
on CPU in float32 fails when any method's tokens per step fall below the figure recorded here.

Recorded on 2026-12-06 with msn 0.13.0, torch 2.13.0+cpu, transformers 5.25.0 on the project's
2-core CPU by the bench below (`msn bench --bench spec-bench --limit 1 --max-new-tokens 64
--methods ar,pld,lookahead,jacobi,recycle,tr-jacobi:reference:paper,tr-jacobi --cold`). Methods
whose drafts do not depend on timing are exact on a CPU and must reach their figure; `tr-jacobi`
(the automatic tree) picks its nodes by the step latency calibrated in the store, which a fresh
store measures anew (1.17-1.20 in five fresh measurements here; two cold runs on one store agree
exactly), so it must reach 90 % of its figure. A change that lowers a figure on purpose records
the new one here, with the reason in the commit.
"""

import pytest

pytestmark = pytest.mark.slow

PINNED = {"pld": 1.3496732026143792, "lookahead": 1.125340599455041, "jacobi": 1.0455696202531646,
          "recycle": 1.6857142857142857, "tr-jacobi:reference:paper": 1.5183823529411764}
MEASURED_CHOICE = {"tr-jacobi": 1.1732954545454546}


def test_no_method_accepts_less_than_its_recorded_figure(tmp_path):
    from msn.bench.harness import BenchConfig, run_bench
    from msn.fetch import fetch

    methods = ["ar", *PINNED, *MEASURED_CHOICE]
    cfg = BenchConfig(model=str(fetch("smollm2-135m-instruct")), out=str(tmp_path), bench="spec-bench", limit=1,
                      max_new_tokens=64, methods=methods, cold=True, device="cpu", dtype="float32")
    summary = run_bench(cfg, progress=False)
    got = {m: v["overall"]["mean_accepted_tokens"] for m, v in summary["methods"].items()}
    assert all(v["overall"]["match_rate"] == 1.0 for v in summary["methods"].values())
    low = {m: (got[m], want) for m, want in PINNED.items() if got[m] < want - 1e-9}
    low |= {m: (got[m], want) for m, want in MEASURED_CHOICE.items() if got[m] < 0.9 * want}
    assert not low, f"tokens per step below the recorded figure (got, recorded): {low}"
