"""What cuBLAS (through PyTorch) takes for the projections of one Llama-3.1-8B decode step on this
GPU: each (rows, in, out) matmul in bf16, replayed from a CUDA graph, with the bytes it must read
and the bandwidth that makes. Their sum over the 32 layers and the head is the matmul part of a
decode step as a mature stack runs it, to set our own per-kernel profile against.
Usage: linear_floor.py [ROWS,...]   (default 1,8,64)"""
import json
import sys

import torch

HIDDEN, INTER, LAYERS, VOCAB, Q, KV = 4096, 14336, 32, 128256, 4096, 1024
SHAPES = {"qkv": (HIDDEN, Q + 2 * KV), "o": (Q, HIDDEN), "gate_up": (HIDDEN, 2 * INTER), "down": (INTER, HIDDEN),
          "lm_head": (HIDDEN, VOCAB)}


def time_linear(rows, k, n, reps=50):
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.linear(x, w, out=out)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            torch.nn.functional.linear(x, w, out=out)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)  # µs per matmul


result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
for rows in [int(r) for r in (sys.argv[1] if len(sys.argv) > 1 else "1,8,64").split(",")]:
    per = {}
    for name, (k, n) in SHAPES.items():
        us = time_linear(rows, k, n)
        per[name] = {"us": round(us, 1), "GB_s": round((k * n * 2) / us / 1e3, 1)}
    step = sum(per[n]["us"] for n in ("qkv", "o", "gate_up", "down")) * LAYERS + per["lm_head"]["us"]
    result["rows"][rows] = {"per_matmul": per, "step_ms": round(step / 1e3, 3)}
    print(f"rows={rows} matmuls per decode step {step / 1e3:.3f} ms: "
          + " ".join(f'{n} {v["us"]}us ({v["GB_s"]} GB/s)' for n, v in per.items()))
json.dump(result, open(sys.argv[2] if len(sys.argv) > 2 else "/dev/null", "w"), indent=1)
