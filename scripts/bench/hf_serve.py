"""HF transformers baseline for `kindling bench serve`: batched greedy `generate` over the same
prompts with the same output length (min = max new tokens), one batch per concurrency level.
Time to first token is a separate generate of one new token for the same batch.

usage: hf_serve.py MODEL_DIR LEVELS_JSON OUTPUT_TOKENS DEVICE
LEVELS_JSON: [{"streams": N, "prompts": [...]}, ...]; prints a JSON list of results.
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

model_dir, levels_path, output_tokens, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
levels = json.load(open(levels_path))
dtype = torch.bfloat16 if device == "cuda" else torch.float32
tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
tokenizer.pad_token_id = 0
tokenizer.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device).eval()


def timed_generate(batch, new_tokens):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


results = []
for level in levels:
    batch = tokenizer(level["prompts"], return_tensors="pt", padding=True).to(device)
    timed_generate(batch, 2)  # warm-up: kernels, allocator
    first, _ = timed_generate(batch, 1)
    wall, out = timed_generate(batch, output_tokens)
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    results.append({"streams": level["streams"], "output_tokens": tokens, "wall_s": round(wall, 4),
                    "output_tok_s": round(tokens / wall, 4), "ttft_p50_s": round(first, 4),
                    "ttft_p99_s": round(first, 4)})
    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
print(json.dumps(results))
