"""Checks on the lent GPU machine, where torch and transformers are (CI has neither):

  opt DIR       our numpy OPT reference (tests/reference) against transformers' OPTForCausalLM on
                the same tiny checkpoint: greedy ids must be equal. This checks the reference
                itself, which CI then uses to check Kindling.
  gguf FILE OUT transformers loads the GGUF (dequantizing with the `gguf` package), saves it as an
                HF directory in OUT (bf16, tokenizer included) for the baselines, and prints its
                greedy answer to a chat question, to set beside Kindling's.
  tokens FILE KINDLING TEXT...
                token ids of each text from transformers' tokenizer for the GGUF (its own
                converter, the model's reference tokenizer) against `kindling models tokenize`.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Once upon a time", "The lighthouse keeper climbed the stairs", "A small boat"]


def check_opt(model_dir):
    out = subprocess.run([sys.executable, ROOT / "tests/reference/reference_generate.py", model_dir, "24", *PROMPTS],
                         check=True, capture_output=True, text=True).stdout
    ours = [json.loads(line)["ids"] for line in out.splitlines()]
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        hf.append(gen[0, ids.shape[1]:].tolist())
    same = [a == b[:len(a)] for a, b in zip(ours, hf)]
    print(json.dumps({"check": "numpy OPT reference vs transformers OPTForCausalLM", "equal": same,
                      "reference": ours, "transformers": hf}))
    return all(same)


def check_gguf(file, out_dir):
    file = Path(file)
    tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.bfloat16)
    model = model.to("cuda").eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to("cuda")
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    print(json.dumps({"check": "transformers on the GGUF (dequantized, bf16, GPU)", "answer": answer}), flush=True)
    # A GGUF-loaded model refuses save_pretrained: copy its (dequantized) weights into a plain one.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    plain.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return True


def check_tokens(file, kindling, texts):
    file = Path(file)
    tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    same = []
    for text in texts:
        theirs = tok.encode(text)
        out = subprocess.run([kindling, "models", "tokenize", str(file), text], check=True, capture_output=True, text=True)
        ours = json.loads(out.stdout)["ids"]
        same.append(ours == theirs)
        print(json.dumps({"text": text, "equal": ours == theirs, "kindling": ours, "transformers": theirs}))
    return all(same)


if __name__ == "__main__":
    if sys.argv[1] == "tokens":
        ok = check_tokens(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif sys.argv[1] == "opt":
        ok = check_opt(sys.argv[2])
    else:
        ok = check_gguf(sys.argv[2], sys.argv[3])
    sys.exit(0 if ok else 1)
