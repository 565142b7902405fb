import torch, time, statistics as st
ops = torch.ops.mkldnn; MM = torch.backends.mkldnn.matmul
K, N = 576, 1536
W = torch.randn(N, K).bfloat16().float()
def tm(f, n=50):
    for _ in range(5): f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return st.median(ts) * 1e3
P = ops._reorder_linear_weight(W, 64)
Pb = ops._reorder_linear_weight(W.bfloat16(), 64)
for M in (1, 3, 16, 69, 207):
    x = torch.randn(M, K)
    MM.fp32_precision = "none"
    a = tm(lambda: ops._linear_pointwise(x, P, None, "none", [], ""))
    MM.fp32_precision = "bf16"
    b = tm(lambda: ops._linear_pointwise(x, P, None, "none", [], ""))
    MM.fp32_precision = "none"
    xb = x.bfloat16()
    c = tm(lambda: ops._linear_pointwise(xb, Pb, None, "none", [], ""))
    d = tm(lambda: torch.nn.functional.linear(xb, W.bfloat16()))
    print(M, "fp32 %.3f  fp32-bf16math %.3f  bf16 packed %.3f  bf16 F.linear %.3f ms" % (a, b, c, d))
