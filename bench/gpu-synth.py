#!/usr/bin/env python3
"""A 1B-class llama GGUF with random weights, for the GPU comparison (bench/gpu.sh synth):
16 blocks, 2048 wide, feed-forward 8192, 32 query heads sharing 8 KV heads, llama.cpp's
SentencePiece test vocabulary (32000 tokens), untied output; F16, to be quantized by
llama-quantize (Q4_K_M: about 669 MB). Written with the llama.cpp tree's own gguf-py.
Usage: gpu-synth.py LLAMA_CPP_SRC OUT.gguf"""
import math
import sys
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(src / "gguf-py"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "models"))
import numpy as np  # noqa: E402
import gguf  # noqa: E402
from make import copy_vocab  # noqa: E402

N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV = 16, 2048, 8192, 32, 8
HEAD_DIM = N_EMBD // N_HEAD

vocab = gguf.GGUFReader(str(src / "models" / "ggml-vocab-llama-spm.gguf"))
n_vocab = len(vocab.fields["tokenizer.ggml.tokens"].data)
rng = np.random.default_rng(1)


def normal(shape, std):
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)


w = gguf.GGUFWriter(str(out), "llama")
w.add_name("llama-1b-synthetic")
w.add_block_count(N_LAYER)
w.add_context_length(4096)
w.add_embedding_length(N_EMBD)
w.add_feed_forward_length(N_FF)
w.add_head_count(N_HEAD)
w.add_head_count_kv(N_HEAD_KV)
w.add_rope_freq_base(10000.0)
w.add_rope_dimension_count(HEAD_DIM)
w.add_layer_norm_rms_eps(1e-5)
w.add_vocab_size(n_vocab)
w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
copy_vocab(w, vocab)
s = 1.0 / math.sqrt(N_EMBD)
kv = N_HEAD_KV * HEAD_DIM
w.add_tensor("token_embd.weight", normal((n_vocab, N_EMBD), 0.5))
w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
w.add_tensor("output.weight", normal((n_vocab, N_EMBD), s))
for i in range(N_LAYER):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor(p + "attn_q.weight", normal((N_EMBD, N_EMBD), 2 * s))
    w.add_tensor(p + "attn_k.weight", normal((kv, N_EMBD), 2 * s))
    w.add_tensor(p + "attn_v.weight", normal((kv, N_EMBD), s))
    w.add_tensor(p + "attn_output.weight", normal((N_EMBD, N_EMBD), s))
    w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor(p + "ffn_gate.weight", normal((N_FF, N_EMBD), s))
    w.add_tensor(p + "ffn_up.weight", normal((N_FF, N_EMBD), s))
    w.add_tensor(p + "ffn_down.weight", normal((N_EMBD, N_FF), 1.0 / math.sqrt(N_FF)))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"{out}: {out.stat().st_size >> 20} MiB")
