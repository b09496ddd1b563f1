"""Writes random-weight models of real shapes (opt-125m, qwen2-0.5B, qwen3-0.6B, llama3-8B) in HF
format for the cold-start benchmark, with a tokenizer.json of the right vocabulary size (byte-level BPE alphabet plus filler
tokens). Runs where transformers and a GPU are (the lent H100); nothing is downloaded.

usage: make_models.py OUT_DIR [NAME ...]   (opt-125m, qwen2-0.5b, qwen3-0.6b, llama3-8b, llama3.1-8b, tiny-llama)
"""

import json
import os
import sys
import time

SHAPES = {
    # facebook/opt-125m (the Worker Controller and vLLM cold-start logs of the seeds).
    "opt-125m": dict(model_type="opt", hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768,
                     do_layer_norm_before=True, activation_function="relu", eos_token_id=2, bos_token_id=2,
                     pad_token_id=1),
    # A small llama for make_gguf.py's own check (dimensions multiples of 256 for Q4_K).
    "tiny-llama": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512,
                       eos_token_id=1000, bos_token_id=1001),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0,
                       eos_token_id=151643, bos_token_id=151643),
    # The seeds' own workloads (ServerlessLLM store tables): Qwen3-0.6B and Llama-3.1-8B shapes.
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, eos_token_id=151645, bos_token_id=151643),
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=131072, rope_theta=500000.0, eos_token_id=128001,
                        bos_token_id=128000, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                               high_freq_factor=4.0,
                                                               original_max_position_embeddings=8192)),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0, eos_token_id=128001, bos_token_id=128000),
}


def write_tokenizer(path, vocab_size, eos_id):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(len(vocab), vocab_size):
        vocab[f"<filler_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(path)
    # The eos id names a filler token; generation stops there like on a real model.
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()


def make(out_dir, name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = os.path.join(out_dir, name)
    if os.path.exists(os.path.join(d, "model.safetensors.index.json")) or os.path.exists(os.path.join(d, "model.safetensors")):
        return d
    t = time.perf_counter()
    cfg = dict(SHAPES[name])
    config = AutoConfig.for_model(**cfg)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(d)
    del model
    torch.cuda.empty_cache()
    write_tokenizer(os.path.join(d, "tokenizer.json"), cfg["vocab_size"], cfg["eos_token_id"])
    print(json.dumps({"made": name, "seconds": round(time.perf_counter() - t, 1)}), flush=True)
    return d


if __name__ == "__main__":
    out = sys.argv[1]
    for name in sys.argv[2:] or list(SHAPES):
        make(out, name)
