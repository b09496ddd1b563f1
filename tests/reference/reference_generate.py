"""Independent reference for Kindling's generations: greedy decoding of an HF-format llama,
qwen2, qwen3, mistral or OPT checkpoint with a plain numpy forward pass (HF semantics: explicit
head_dim, qwen3's q/k norms, mistral's sliding window, Llama 3.1 RoPE scaling; OPT's
pre-LayerNorm blocks, learned positions offset by 2, ReLU MLP, biases), reading safetensors by
hand, under the checkpoint's own tensor names. Recomputes the whole sequence for every token: no cache, no paging.

usage: reference_generate.py MODEL_DIR MAX_TOKENS PROMPT [PROMPT ...]
prints one JSON object per prompt: {"prompt", "ids", "text", "finish_reason"}
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

DTYPES = {"F32": np.float32, "F16": np.float16}


def load_safetensors(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        buf = data[start:end]
        if meta["dtype"] == "BF16":  # numpy has no bf16: widen the bits to f32
            arr = (np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=DTYPES[meta["dtype"]]).astype(np.float32)
        out[name] = arr.reshape(meta["shape"])
    return out


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def inverse_frequencies(cfg, hd):
    theta = cfg.get("rope_theta", 10000.0)
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":  # transformers' _compute_llama3_parameters
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def sliding_window(cfg):
    if cfg["model_type"] == "mistral" or cfg.get("use_sliding_window"):
        return cfg.get("sliding_window")
    return None


def forward(w, cfg, ids):
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd, eps = cfg.get("head_dim") or h // nh, cfg["rms_norm_eps"]
    t = len(ids)
    x = w["model.embed_tokens.weight"][ids]
    freqs = np.outer(np.arange(t, dtype=np.float32), inverse_frequencies(cfg, hd))
    cos = np.cos(np.concatenate([freqs, freqs], axis=-1))[:, None, :]
    sin = np.sin(np.concatenate([freqs, freqs], axis=-1))[:, None, :]
    mask = np.triu(np.full((t, t), -np.inf, dtype=np.float32), k=1)
    window = sliding_window(cfg)
    if window is not None:  # query i sees keys i - window + 1 ..= i
        mask = mask + np.tril(np.full((t, t), -np.inf, dtype=np.float32), k=-window)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        y = rms_norm(x, w[p + "input_layernorm.weight"], eps)

        def proj(name):
            out = y @ w[p + f"self_attn.{name}.weight"].T
            bias = w.get(p + f"self_attn.{name}.bias")
            return out if bias is None else out + bias

        q = proj("q_proj").reshape(t, nh, hd)
        k = proj("k_proj").reshape(t, nkv, hd)
        if p + "self_attn.q_norm.weight" in w:  # qwen3: RMSNorm over each head before RoPE
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        v = proj("v_proj").reshape(t, nkv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, nh // nkv, axis=1)
        v = np.repeat(v, nh // nkv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(t, nh * hd)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        y = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = y @ w[p + "mlp.gate_proj.weight"].T
        up = y @ w[p + "mlp.up_proj.weight"].T
        x = x + ((gate / (1.0 + np.exp(-gate))) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x[-1] @ head.T


def layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def causal_attention(q, k, v):
    """q, k, v: [t, heads, hd] -> [t, heads * hd], softmax(q k^T / sqrt(hd)) v under a causal mask."""
    t, nh, hd = q.shape
    mask = np.triu(np.full((t, t), -np.inf, dtype=np.float32), k=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v).reshape(t, nh * hd)


def forward_opt(w, cfg, ids):
    """transformers' OPTForCausalLM (do_layer_norm_before, ReLU)."""
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, t = h // nh, len(ids)
    d = "model.decoder."
    x = w[d + "embed_tokens.weight"][ids] + w[d + "embed_positions.weight"][np.arange(t) + 2]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"{d}layers.{layer}."

        def lin(name, y):
            return y @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        y = layer_norm(x, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"])
        q, k, v = (lin(f"self_attn.{n}_proj", y).reshape(t, nh, hd) for n in "qkv")
        x = x + lin("self_attn.out_proj", causal_attention(q, k, v))
        y = layer_norm(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"])
        x = x + lin("fc2", np.maximum(lin("fc1", y), 0.0))
    x = layer_norm(x, w[d + "final_layer_norm.weight"], w[d + "final_layer_norm.bias"])
    head = w.get("lm_head.weight", w[d + "embed_tokens.weight"])
    return x[-1] @ head.T


def greedy(weights, cfg, ids, max_tokens, eos):
    """Greedy decoding, recomputing the whole sequence for each token: (new ids, finish reason)."""
    out = []
    for _ in range(max_tokens):
        step = forward_opt if cfg["model_type"] == "opt" else forward
        nxt = int(np.argmax(step(weights, cfg, ids + out)))
        if nxt in eos:
            return out, "stop"
        out.append(nxt)
    return out, "length"


def main():
    model_dir, max_tokens, prompts = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    cfg = json.loads((model_dir / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    weights = load_safetensors(model_dir / "model.safetensors")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for prompt in prompts:
        out, reason = greedy(weights, cfg, tokenizer.encode(prompt).ids, max_tokens, eos)
        text = tokenizer.decode(out, skip_special_tokens=True)
        print(json.dumps({"prompt": prompt, "ids": out, "text": text, "finish_reason": reason}))


if __name__ == "__main__":
    main()
