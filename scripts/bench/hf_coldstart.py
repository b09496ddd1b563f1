"""The baseline: a fresh Python process with HF transformers, from nothing to the first token.
Prints one JSON line with its phases; the caller times the whole process from spawn.

usage: hf_coldstart.py MODEL_DIR
"""

import time

t0 = time.perf_counter()
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402,F401

t1 = time.perf_counter()
torch.zeros(1, device="cuda")
t2 = time.perf_counter()
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda")
torch.cuda.synchronize()
t3 = time.perf_counter()
ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device="cuda")
model.generate(ids, max_new_tokens=1, do_sample=False)
torch.cuda.synchronize()
t4 = time.perf_counter()
print(json.dumps({"import_s": round(t1 - t0, 3), "cuda_ctx_s": round(t2 - t1, 3), "load_s": round(t3 - t2, 3),
                  "first_token_s": round(t4 - t3, 3)}))
