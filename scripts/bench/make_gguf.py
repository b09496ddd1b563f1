"""Writes a random-weight GGUF in a real model's shape (make_models.py's SHAPES), every matrix
quantized as Q4_K (norms f32), in llama.cpp's layout, with a byte-level BPE vocabulary of the
right size. Random bytes for the 4-bit codes and 6-bit scales, fixed small f16 super-block
scales, so every weight is finite. For the cold-start and warm-path benchmarks of a quantized 8B;
runs where the `gguf` package is (carried to the lent GPU machine as a wheel); nothing is
downloaded.

usage: make_gguf.py OUT_FILE SHAPE        e.g. make_gguf.py /tmp/models/llama3.1-8b-q4k.gguf llama3.1-8b
"""

import json
import os
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_models import SHAPES  # noqa: E402

Q4_K_BLOCK, Q4_K_BYTES = 256, 144  # values and bytes per super-block


def byte_level_alphabet():
    """GPT-2's printable stand-ins for the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def q4k(rng, rows, cols):
    assert cols % Q4_K_BLOCK == 0, cols
    data = rng.integers(0, 256, size=(rows, cols // Q4_K_BLOCK, Q4_K_BYTES), dtype=np.uint8)
    data[:, :, 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), dtype=np.uint8)  # d
    data[:, :, 2:4] = np.frombuffer(np.float16(1e-4).tobytes(), dtype=np.uint8)  # dmin
    return data.reshape(rows, cols // Q4_K_BLOCK * Q4_K_BYTES)


def main():
    out, shape = sys.argv[1], sys.argv[2]
    cfg = SHAPES[shape]
    assert cfg["model_type"] == "llama", "llama-architecture shapes only"
    t0 = time.perf_counter()
    h, ffn, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    hd = h // heads
    w = GGUFWriter(out, "llama")
    w.add_name(f"{shape}-random-q4k")
    w.add_context_length(min(cfg["max_position_embeddings"], 8192))
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    tokens = byte_level_alphabet() + ["ĠĠ"]
    tokens += [f"<filler_{i}>" for i in range(len(tokens), vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges(["Ġ Ġ"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_bos_token_id(cfg["bos_token_id"])
    rng = np.random.default_rng(0)

    def matrix(name, rows, cols):
        w.add_tensor(name, q4k(rng, rows, cols), raw_dtype=GGMLQuantizationType.Q4_K)

    def norm(name):
        w.add_tensor(name, np.ones(h, dtype=np.float32))

    matrix("token_embd.weight", vocab, h)
    for layer in range(layers):
        p = f"blk.{layer}."
        norm(p + "attn_norm.weight")
        matrix(p + "attn_q.weight", heads * hd, h)
        matrix(p + "attn_k.weight", kv_heads * hd, h)
        matrix(p + "attn_v.weight", kv_heads * hd, h)
        matrix(p + "attn_output.weight", h, heads * hd)
        norm(p + "ffn_norm.weight")
        matrix(p + "ffn_gate.weight", ffn, h)
        matrix(p + "ffn_up.weight", ffn, h)
        matrix(p + "ffn_down.weight", h, ffn)
    norm("output_norm.weight")
    matrix("output.weight", vocab, h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(json.dumps({"made": out, "bytes": os.path.getsize(out), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
