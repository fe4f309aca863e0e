"""A tiny random Llama written to a GGUF file with the ``gguf`` package, for offline tests (through the
``gguf_writer`` fixture of conftest.py).

The file holds what transformers' GGUF reader needs for ``llama``: the ``llama.*`` hyper-parameters,
the tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ...; q and k in llama.cpp's
rotary order, which the reader undoes), and a byte-level BPE tokenizer (``tokenizer.ggml.*``: tokens,
types, merges, eos). Every tensor is float32, so the loaded weights equal the written ones exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mtp_lightning.data.tokenizer import EOT, Tokenizer

D, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 32, 2, 4, 2, 64, 128
_CONTROL, _NORMAL = 3, 1  # llama.cpp's token types


def _rotary_order(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k rows (halves of each head) to llama.cpp's (interleaved pairs), as its converter does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, texts: list[str], vocab: int = 384, seed: int = 0, arch: str = "llama",
                          logit_scale: float = 1.0) -> tuple[Path, dict[str, torch.Tensor], Tokenizer]:
    """Write the file; return it, the model's weights (HF names) and the tokenizer (a BPE trained on
    ``texts``) it holds.

    ``arch`` other than ``llama`` writes the same tensors under another ``general.architecture`` (for
    the unsupported-architecture error). ``logit_scale`` scales the output layer (sharper next-token
    distributions for the sampling tests)."""
    import gguf
    import transformers

    tok = Tokenizer.train_bpe(texts, vocab)
    pieces = tok.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(pieces)
    for piece, i in pieces.items():
        tokens[i] = piece
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.backend.to_str())["model"]["merges"]]
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   vocab_size=len(tokens), max_position_embeddings=CONTEXT,
                                   tie_word_embeddings=False, eos_token_id=tok.eot_id, bos_token_id=tok.eot_id)
    lm = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # embeddings scaled up: greedy decoding without near-ties or one repeated token
        lm.model.embed_tokens.weight.mul_(3.0)
        lm.lm_head.weight.mul_(logit_scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(D // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([_CONTROL if t == EOT else _NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.eot_id)
    w.add_bos_token_id(tok.eot_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    weights = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    for key, value in weights.items():
        module, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(module)}.{suffix}"
        a = value.numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            a = _rotary_order(a, HEADS)
        elif name.endswith("attn_k.weight"):
            a = _rotary_order(a, KV_HEADS)
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, weights, tok
