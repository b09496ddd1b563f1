"""Whether HF transformers' greedy text repeats, for a checkpoint, from one load and across two:
the baseline for our engine's `pooled_text_repeats` (`bench coldstart --pool-miss`). Prints one
JSON line per load: the 24-token greedy text's ids, whether a second generate gave the same ids,
and whether the first step's logits were bit for bit the same.

usage: hf_repeat.py MODEL_DIR [PROMPT]
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    path = sys.argv[1]
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Hello, Kindling! Tell me a story."
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok.encode(prompt)], device="cuda")
    texts = []
    for load in range(2):
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, device_map="cuda")
        with torch.no_grad():
            logits = [model(ids).logits[0, -1].float().cpu() for _ in range(2)]
            out = [model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist() for _ in range(2)]
        texts.append(out[0])
        print(json.dumps({"load": load, "ids": out[0], "repeats": out[0] == out[1],
                          "first_logits_bitwise_equal": bool(torch.equal(logits[0], logits[1])),
                          "top2_gap": float(torch.topk(logits[0], 2).values.diff().abs()[0])}), flush=True)
        del model
        torch.cuda.empty_cache()
    print(json.dumps({"same_across_loads": texts[0] == texts[1]}))


if __name__ == "__main__":
    main()
