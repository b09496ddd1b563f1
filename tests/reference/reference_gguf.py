"""Independent reference for Kindling's GGUF path: dequantizes every tensor of a GGUF file with the
`gguf` PyPI package (llama.cpp's own Python reader), undoes the converter's Q/K row permutation,
and runs reference_generate.py's HF-semantics numpy forward. The tokenizer is rebuilt from the
file's metadata with the `tokenizers` Python package as llama.cpp describes it (byte-level BPE;
`smollm`: digits split one by one, then GPT-2's regex). A SentencePiece (`llama`) vocabulary is
run by the `sentencepiece` package itself, from the `.model` file beside the GGUF.

usage: reference_gguf.py GGUF_FILE MAX_TOKENS PROMPT [PROMPT ...]
prints one JSON object per prompt: {"prompt", "prompt_ids", "ids", "text", "finish_reason"}
"""

import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).parent))
from reference_generate import greedy  # noqa: E402

NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types[0].name == "ARRAY":
        if f.types[-1].name == "STRING":
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    value = f.parts[f.data[0]]
    return bytes(value).decode("utf-8") if f.types[0].name == "STRING" else value.tolist()[0]


def unpermute(w, heads):
    """Inverse of convert_hf_to_gguf.py's LlamaModel.permute (rows regrouped for interleaved RoPE)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load(path):
    reader = GGUFReader(path)
    arch = field(reader, "general.architecture")
    g = lambda k, d=None: field(reader, f"{arch}.{k}") if field(reader, f"{arch}.{k}") is not None else d  # noqa: E731
    cfg = {
        "model_type": arch, "hidden_size": g("embedding_length"), "num_attention_heads": g("attention.head_count"),
        "num_key_value_heads": g("attention.head_count_kv"), "num_hidden_layers": g("block_count"),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-5), "rope_theta": g("rope.freq_base", 10000.0),
    }
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest == "attn_q.weight" and arch == "llama":
                w = unpermute(w, cfg["num_attention_heads"])
            if rest == "attn_k.weight" and arch == "llama":
                w = unpermute(w, cfg["num_key_value_heads"])
            weights[f"model.layers.{layer}.{NAMES[rest]}"] = w
        elif t.name == "token_embd.weight":
            weights["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            weights["model.norm.weight"] = w
        elif t.name == "output.weight":
            weights["lm_head.weight"] = w
    return reader, cfg, weights


class SentencePieceReference:
    """llama.cpp's conventions around sentencepiece: BOS first when the file says so."""

    def __init__(self, model_file, bos, add_bos):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.prefix = [bos] if add_bos else []

    def encode(self, text):
        return self.prefix + self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(ids)


class HfReference:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text):
        return self.tok.encode(text).ids

    def decode(self, ids):
        return self.tok.decode(ids)


def tokenizer_from(reader, path):
    if field(reader, "tokenizer.ggml.model") == "llama":
        add_bos = field(reader, "tokenizer.ggml.add_bos_token")
        return SentencePieceReference(Path(path).with_suffix(".model"), field(reader, "tokenizer.ggml.bos_token_id"),
                                      True if add_bos is None else bool(add_bos))
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    types = field(reader, "tokenizer.ggml.token_type")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact", "codeshell"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return HfReference(tok)


def main():
    path, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    reader, cfg, weights = load(path)
    tok = tokenizer_from(reader, path)
    eos = {field(reader, "tokenizer.ggml.eos_token_id")}
    for prompt in prompts:
        ids = tok.encode(prompt)
        out, reason = greedy(weights, cfg, ids, max_tokens, eos)
        print(json.dumps({"prompt": prompt, "prompt_ids": ids, "ids": out, "text": tok.decode(out),
                          "finish_reason": reason}), flush=True)


if __name__ == "__main__":
    main()
