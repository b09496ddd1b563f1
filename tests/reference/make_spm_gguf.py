"""Writes a tiny llama GGUF whose tokenizer is a SentencePiece (llama-vocabulary) model, and the
SentencePiece model file beside it, so Kindling's GGUF tokenizer can be checked against the
`sentencepiece` package itself (the reference implementation of that vocabulary kind).

The tokenizer is trained on the tiny models' corpus (BPE, byte fallback, as Llama 2 and Mistral
vocabularies are); the weights are f32 draws from a seeded generator, in llama.cpp's layout.

usage: make_spm_gguf.py OUT_DIR        writes OUT_DIR/tiny-spm.gguf and OUT_DIR/tiny-spm.model
"""

import io
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
from gguf import GGUFWriter, TokenType

CORPUS = Path(__file__).resolve().parents[2] / "runtime/checkpoint/src/tiny_model/corpus.txt"
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT = 64, 160, 2, 4, 2, 256


def train(out: Path) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.read_text().splitlines()), model_writer=model, model_type="bpe",
        vocab_size=600, byte_fallback=True, character_coverage=1.0, split_digits=True,
        bos_id=1, eos_id=2, unk_id=0, minloglevel=2, num_threads=1,
        # As Llama's own: no NFKC, runs of spaces kept.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    out.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(out))


def token_type(sp, i):
    if sp.is_unknown(i):
        return TokenType.UNKNOWN
    if sp.is_control(i):
        return TokenType.CONTROL
    if sp.is_byte(i):
        return TokenType.BYTE
    return TokenType.NORMAL


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    sp = train(out / "tiny-spm.model")
    vocab = sp.get_piece_size()
    w = GGUFWriter(str(out / "tiny-spm.gguf"), "llama")
    w.add_name("tiny-spm")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i).encode() for i in range(vocab)])
    w.add_token_scores([sp.get_score(i) for i in range(vocab)])
    w.add_token_types([token_type(sp, i) for i in range(vocab)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)

    rng = np.random.default_rng(7)
    hd = HIDDEN // HEADS

    def tensor(name, rows, cols=None, scale=None):
        shape = (rows,) if cols is None else (rows, cols)
        if cols is None:  # norm weights
            data = 1.0 + 0.05 * rng.standard_normal(shape)
        else:
            data = (scale or 1.0 / np.sqrt(cols)) * rng.standard_normal(shape)
        w.add_tensor(name, data.astype(np.float32))

    # Large embedding and head scales spread the logits, so no greedy step is a near tie.
    tensor("token_embd.weight", vocab, HIDDEN, scale=1.0)
    for layer in range(LAYERS):
        p = f"blk.{layer}."
        tensor(p + "attn_norm.weight", HIDDEN)
        tensor(p + "attn_q.weight", HEADS * hd, HIDDEN)
        tensor(p + "attn_k.weight", KV_HEADS * hd, HIDDEN)
        tensor(p + "attn_v.weight", KV_HEADS * hd, HIDDEN)
        tensor(p + "attn_output.weight", HIDDEN, HEADS * hd)
        tensor(p + "ffn_norm.weight", HIDDEN)
        tensor(p + "ffn_gate.weight", FFN, HIDDEN)
        tensor(p + "ffn_up.weight", FFN, HIDDEN)
        tensor(p + "ffn_down.weight", HIDDEN, FFN)
    tensor("output_norm.weight", HIDDEN)
    # Byte tokens never win a greedy step: a random model strings them into invalid UTF-8, where
    # decoders legitimately differ (HF's byte fallback turns a whole invalid run into U+FFFD,
    # sentencepiece only its invalid bytes). Valid byte runs are checked by the round trip.
    head = rng.standard_normal((vocab, HIDDEN))
    head[[i for i in range(vocab) if sp.is_byte(i)]] = 0.0
    w.add_tensor("output.weight", head.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
