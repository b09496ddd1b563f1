"""Prints one `kindling bench serve --out` JSON as lines: each concurrency level's output tok/s,
TTFT and the HF baseline, then where the engine's steps went (all levels together) and how many
were replayed CUDA graphs. Usage: serve_summary.py RESULT.json LABEL"""
import json
import re
import sys

d = json.load(open(sys.argv[1]))
label = sys.argv[2]
for level in d["levels"]:
    k, h = level["kindling"], level["hf"] or {}
    print(f'{d["model"]} {label} streams={level["streams"]} tok/s={k["output_tok_s"]:.1f} '
          f'decode_p50={k["per_stream_decode_tok_s_p50"]} ttft_p50={k["ttft_p50_s"]} ttft_p99={k["ttft_p99_s"]} '
          f'errors={k["errors"]} hf={h.get("output_tok_s")}')
metrics = {}
for line in d["engine_metrics"]:
    name, value = line.rsplit(" ", 1)
    metrics[re.sub(r'model="[^"]*",?', "", name).replace("{}", "")] = float(value)
steps = metrics.get("kindling_engine_steps_total", 0) or 1
phases = {p: metrics.get(f'kindling_engine_step_seconds_total{{phase="{p}"}}', 0) / steps * 1e3
          for p in ("schedule", "forward", "sample", "deliver")}
print("  per step (all levels): " + " ".join(f"{p} {v:.2f} ms" for p, v in phases.items())
      + f' | graph steps {metrics.get("kindling_engine_graph_steps_total", 0):.0f} of {steps:.0f}')
