"""Step latency ladder: fp32 prepacked (msn 0.16.1) against bf16x3 on AMX (float32 activations split
into three bfloat16 parts, oneDNN with fpmath bf16, float32 out). Usage: bf16x3-ladder.py MODEL_FOLDER"""
import sys, torch
from msn.loading import load_for_inference
from msn.decoding.config import DecodeConfig
from msn.decoding.timing import prepare_model, measure_step_latency
from msn.decoding import cpu
model, tok = load_for_inference(sys.argv[1], dtype="float32")
orig = cpu._linear_pointwise
MM = torch.backends.mkldnn.matmul
def bf3(x, w, b, *rest):
    hi = x.bfloat16().float(); r = x - hi
    mid = r.bfloat16().float(); lo = r - mid
    n = x.shape[0]
    MM.fp32_precision = "bf16"
    try:
        y = orig(torch.cat([hi, mid, lo]), w, None, "none", [], "")
    finally:
        MM.fp32_precision = "none"
    y = y[:n] + y[n:2 * n] + y[2 * n:]
    return y if b is None else y + b
lad = (1, 2, 3, 4, 8, 16, 32, 69)
cfg = DecodeConfig()
prepare_model(model, cfg)
for r in range(2):
    for name, fn in (("fp32", orig), ("bf16x3", bf3)):
        cpu._linear_pointwise = fn
        t = measure_step_latency(model, lad, repeats=7)
        print(r, name, "plain_rows", cpu.plain_rows(model), {n: round(v * 1000, 1) for n, v in t.items()}, flush=True)
