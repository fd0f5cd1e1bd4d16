#!/usr/bin/env python3
"""Small random-weight GGUFs for architecture and RoPE-scaling tests (no real weights needed).

Each model is a real architecture's tensor names, shapes and metadata over a real vocabulary
from llama.cpp's own tokenizer suite, with weights drawn from numpy's legacy RandomState
(its stream is frozen across numpy versions), written with the llama.cpp tree's own gguf-py.
F32 files are written here; quantized ones are made from them with llama.cpp's
`llama-quantize`. `tests/models/sha256sums` pins every file, so the references made from
them by llama.cpp (tests/reference/tiny-models/) stay valid: a mismatch is an error.

Usage: make.py LLAMA_CPP_DIR OUT_DIR          (scripts/test-models.sh runs it)
"""

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import gguf

# The Llama 3 tokenizer (tokenizer.ggml.pre = llama-bpe, no add_bos_token key: llama.cpp
# adds BOS by default for this pre-tokenizer).
LLAMA3_VOCAB = "models/ggml-vocab-llama-bpe.gguf"

# Shape of the tiny llama: 2 blocks, 64 wide, 2 query heads of 32 sharing 1 KV head.
N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV = 2, 64, 128, 2, 1
HEAD_DIM = N_EMBD // N_HEAD
N_CTX_TRAIN = 2048
# The context Llama 3's factors and the linear scaling were "trained" for.
N_CTX_ORIG = 256
ROPE_BASE = 500000.0
# The 256-wide models get an output projection of their own: tied to so small a model's
# embeddings, the logits would echo the last token (see `wide`).
UNTIED_OUTPUT = False
# Gemma 2's embedding scale (its output is always tied: the 256-wide one needs smaller
# embeddings not to echo the last token).
GEMMA_EMB_STD = 0.1


def llama3_rope_factors(base, dim, factor, low, high, orig_ctx):
    """Llama 3's per-pair frequency divisors (the `rope_freqs` tensor), as Meta defines them:
    high-frequency pairs unchanged, low-frequency ones divided by `factor`, a smooth ramp
    between the two wavelengths."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / (base ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < orig_ctx / high:
            out.append(1.0)
        elif wavelen > orig_ctx / low:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def copy_vocab(w, vocab):
    """Every tokenizer.* key of a suite vocabulary, as the file has it."""
    for name, field in vocab.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vt = field.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            values = field.contents()
            w.add_array(name, values) if sub == gguf.GGUFValueType.STRING else \
                w.add_key_value(name, values, vt, sub_type=sub)
        else:
            w.add_key_value(name, field.contents(), vt)


# The writers share these pieces, called in each file's order (the order is the bytes, which
# tests/models/sha256sums pins).


def begin(path, vocab, seed, arch, n_layer=None):
    """A writer for `arch` with the hyper-parameters every model has, in the order all the
    files have them; weights drawn from `seed`. Returns the writer, the draw and the vocab
    size."""
    rng = np.random.RandomState(seed)
    n_vocab = len(vocab.fields["tokenizer.ggml.tokens"].data)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(path.stem)
    w.add_block_count(N_LAYER if n_layer is None else n_layer)
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    return w, normal, n_vocab


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def norm(w, normal, name, n=None):
    w.add_tensor(name, 1.0 + normal((N_EMBD if n is None else n,), 0.1))


def embeddings(w, normal, n_vocab):
    """Token embeddings, the final norm, and (256 wide) an output projection of its own."""
    w.add_tensor("token_embd.weight", normal((n_vocab, N_EMBD), 0.5))
    norm(w, normal, "output_norm.weight")
    if UNTIED_OUTPUT:
        w.add_tensor("output.weight", normal((n_vocab, N_EMBD), 4.0 / math.sqrt(N_EMBD)))


def qkv(w, normal, p, q_rows):
    kv = N_HEAD_KV * HEAD_DIM
    w.add_tensor(p + "attn_q.weight", normal((q_rows, N_EMBD), 0.5 / math.sqrt(N_EMBD) * 4))
    w.add_tensor(p + "attn_k.weight", normal((kv, N_EMBD), 0.5 / math.sqrt(N_EMBD) * 4))
    w.add_tensor(p + "attn_v.weight", normal((kv, N_EMBD), 1.0 / math.sqrt(N_EMBD)))


def ffn(w, normal, p):
    """The feed-forward norm and SwiGLU/GeGLU weights."""
    norm(w, normal, p + "ffn_norm.weight")
    w.add_tensor(p + "ffn_gate.weight", normal((N_FF, N_EMBD), 1.0 / math.sqrt(N_EMBD)))
    w.add_tensor(p + "ffn_up.weight", normal((N_FF, N_EMBD), 1.0 / math.sqrt(N_EMBD)))
    w.add_tensor(p + "ffn_down.weight", normal((N_EMBD, N_FF), 1.0 / math.sqrt(N_FF)))


def write_llama(path, vocab, seed, rope_freqs=None, scaling=None, bias=False, arch="llama",
                rope_base=ROPE_BASE, extra=None):
    """Llama's blocks; `arch`, `rope_base` and `extra` (float keys under `arch.`) for the
    architectures that are llama's blocks with other metadata (Mistral 3)."""
    w, normal, n_vocab = begin(path, vocab, seed, arch)
    w.add_rope_freq_base(rope_base)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if scaling is not None:
        kind, factor, orig_ctx = scaling
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(orig_ctx)
    for key, value in (extra or {}).items():
        w.add_float32(f"{arch}.{key}", value)
    copy_vocab(w, vocab)

    # numpy shapes are ggml's dims reversed: (rows, row length).
    embeddings(w, normal, n_vocab)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        norm(w, normal, p + "attn_norm.weight")
        qkv(w, normal, p, N_EMBD)
        if bias:
            w.add_tensor(p + "attn_q.bias", normal((N_EMBD,), 0.1))
        w.add_tensor(p + "attn_output.weight", normal((N_EMBD, N_EMBD), 1.0 / math.sqrt(N_EMBD)))
        ffn(w, normal, p)
    finish(w)


# Qwen 3 (qwen3: per-head q/k RMS norms) and Qwen 2 (qwen2: q/k/v biases): llama's shape
# with NeoX RoPE and tied output, over the Qwen 2 vocabulary of llama.cpp's tokenizer suite.
QWEN2_VOCAB = "models/ggml-vocab-qwen2.gguf"


def write_qwen(path, vocab, seed, arch):
    """qwen3: per-head q/k RMS norms; qwen2: biases on q, k and v."""
    w, normal, n_vocab = begin(path, vocab, seed, arch)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    copy_vocab(w, vocab)
    embeddings(w, normal, n_vocab)
    kv = N_HEAD_KV * HEAD_DIM
    for i in range(N_LAYER):
        p = f"blk.{i}."
        norm(w, normal, p + "attn_norm.weight")
        qkv(w, normal, p, N_HEAD * HEAD_DIM)
        if arch == "qwen3":
            norm(w, normal, p + "attn_q_norm.weight", HEAD_DIM)
            norm(w, normal, p + "attn_k_norm.weight", HEAD_DIM)
        else:
            w.add_tensor(p + "attn_q.bias", normal((N_HEAD * HEAD_DIM,), 0.5))
            w.add_tensor(p + "attn_k.bias", normal((kv,), 0.5))
            w.add_tensor(p + "attn_v.bias", normal((kv,), 0.5))
        w.add_tensor(p + "attn_output.weight", normal((N_EMBD, N_HEAD * HEAD_DIM), 1.0 / math.sqrt(N_EMBD)))
        ffn(w, normal, p)
    finish(w)


# Phi-3 (phi3): q, k and v fused in attn_qkv, gate and up in ffn_up (gate rows first), an
# output of its own, over the Phi-3 vocabulary of llama.cpp's tokenizer suite.
PHI3_VOCAB = "models/ggml-vocab-phi-3.gguf"


def write_phi3(path, vocab, seed, longrope=None):
    """Phi-3; `longrope` = (original context, attention factor): Phi-3.5/128k's per-pair
    long and short RoPE factors (llama.cpp takes the long ones when its context is larger
    than the original one) and the magnitude scale the converter computes."""
    w, normal, n_vocab = begin(path, vocab, seed, "phi3")
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if longrope is not None:
        orig_ctx, attn_factor = longrope
        w.add_rope_scaling_attn_factors(attn_factor)
        w.add_rope_scaling_orig_ctx_len(orig_ctx)
    copy_vocab(w, vocab)
    w.add_tensor("token_embd.weight", normal((n_vocab, N_EMBD), 0.5))
    norm(w, normal, "output_norm.weight")
    w.add_tensor("output.weight", normal((n_vocab, N_EMBD), 1.0 / math.sqrt(N_EMBD)))
    if longrope is not None:
        # Made after the others, so the weights equal phi3-tiny's.
        half = HEAD_DIM // 2
        w.add_tensor("rope_factors_long.weight", np.linspace(1.0, 16.0, half).astype(np.float32))
        w.add_tensor("rope_factors_short.weight", np.linspace(1.0, 1.5, half).astype(np.float32))
    kv = N_HEAD_KV * HEAD_DIM
    for i in range(N_LAYER):
        p = f"blk.{i}."
        norm(w, normal, p + "attn_norm.weight")
        qkv_rows = np.concatenate([normal((N_EMBD, N_EMBD), 0.5 / math.sqrt(N_EMBD) * 4),
                                   normal((kv, N_EMBD), 0.5 / math.sqrt(N_EMBD) * 4),
                                   normal((kv, N_EMBD), 1.0 / math.sqrt(N_EMBD))])
        w.add_tensor(p + "attn_qkv.weight", qkv_rows)
        w.add_tensor(p + "attn_output.weight", normal((N_EMBD, N_EMBD), 1.0 / math.sqrt(N_EMBD)))
        norm(w, normal, p + "ffn_norm.weight")
        w.add_tensor(p + "ffn_up.weight", normal((2 * N_FF, N_EMBD), 1.0 / math.sqrt(N_EMBD)))
        w.add_tensor(p + "ffn_down.weight", normal((N_EMBD, N_FF), 1.0 / math.sqrt(N_FF)))
    finish(w)


def write_smollm3(path, vocab, seed, n_layer=4):
    """SmolLM3 (smollm3): llama's blocks, no RoPE on every fourth (so four of them here)."""
    w, normal, n_vocab = begin(path, vocab, seed, "smollm3", n_layer)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    copy_vocab(w, vocab)
    embeddings(w, normal, n_vocab)
    for i in range(n_layer):
        p = f"blk.{i}."
        norm(w, normal, p + "attn_norm.weight")
        qkv(w, normal, p, N_EMBD)
        w.add_tensor(p + "attn_output.weight", normal((N_EMBD, N_EMBD), 1.0 / math.sqrt(N_EMBD)))
        ffn(w, normal, p)
    finish(w)


def write_gemma2(path, vocab, seed, n_layer=4):
    """Gemma 2 (gemma2): post-norms, GELU, NeoX RoPE, attention and final logit soft-capping
    (small caps here, so that they bite), and an 8-position sliding window on the even layers
    (so that it matters within a prompt and 32 tokens)."""
    w, normal, n_vocab = begin(path, vocab, seed, "gemma2", n_layer)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_attn_logit_softcapping(5.0)
    w.add_final_logit_softcapping(10.0)
    w.add_sliding_window(8)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    copy_vocab(w, vocab)
    # Small embeddings (the output is tied to them), so that the answer is not the last token
    # again but what attention made of the context.
    w.add_tensor("token_embd.weight", normal((n_vocab, N_EMBD), GEMMA_EMB_STD))
    norm(w, normal, "output_norm.weight")
    kv = N_HEAD_KV * HEAD_DIM
    for i in range(n_layer):
        p = f"blk.{i}."
        norm(w, normal, p + "attn_norm.weight")
        # Strong attention (scores of tens, outputs as large as the residual), so that the
        # soft-capping and the window change the answers.
        w.add_tensor(p + "attn_q.weight", normal((N_EMBD, N_EMBD), 2.0))
        w.add_tensor(p + "attn_k.weight", normal((kv, N_EMBD), 2.0))
        w.add_tensor(p + "attn_v.weight", normal((kv, N_EMBD), 1.0))
        w.add_tensor(p + "attn_output.weight", normal((N_EMBD, N_EMBD), 1.0))
        norm(w, normal, p + "post_attention_norm.weight")
        ffn(w, normal, p)
        norm(w, normal, p + "post_ffw_norm.weight")
    finish(w)


def write_mistral3(path, vocab, seed):
    """Mistral 3 (mistral3): llama's blocks, 256 wide (so that llama-quantize makes real
    Q4_K blocks), its own output, YaRN with the file's β and log multiplier, and Llama 4's
    attention temperature stepping every 8 positions (the original context), so that both
    prompts and decoding cross its steps."""
    wide(write_llama, path, vocab, seed, arch="mistral3", rope_base=1000000.0,
         scaling=("yarn", 4.0, 8),
         extra={"rope.scaling.yarn_beta_fast": 16.0, "rope.scaling.yarn_beta_slow": 2.0,
                "rope.scaling.yarn_log_multiplier": 0.5, "attention.temperature_scale": 0.5})

def wide(write, *args, **kw):
    """`write` at 256 wide (4 query heads of 64 sharing 2 KV heads, FFN 512), rows that
    llama-quantize can hold in Q4_K (the 64-wide models fall back to other types)."""
    g = globals()
    names = ("N_EMBD", "N_FF", "N_HEAD", "N_HEAD_KV", "HEAD_DIM", "UNTIED_OUTPUT", "GEMMA_EMB_STD")
    saved = {k: g[k] for k in names}
    g.update(N_EMBD=256, N_FF=512, N_HEAD=4, N_HEAD_KV=2, HEAD_DIM=64, UNTIED_OUTPUT=True,
             GEMMA_EMB_STD=0.02)
    try:
        write(*args, **kw)
    finally:
        g.update(saved)


def main():
    llama_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    vocab = gguf.GGUFReader(str(llama_dir / "src" / LLAMA3_VOCAB))
    freqs = llama3_rope_factors(ROPE_BASE, HEAD_DIM, factor=8.0, low=1.0, high=4.0, orig_ctx=N_CTX_ORIG)

    # The same weights (seed 1) with and without Llama 3's frequency factors.
    write_llama(out / "llama3-tiny.f32.gguf", vocab, seed=1, rope_freqs=freqs)
    write_llama(out / "llama3-tiny-no-rope-freqs.f32.gguf", vocab, seed=1)
    # The RoPE scalings llama.cpp reads from metadata for llama-family files.
    write_llama(out / "llama-tiny-linear.f32.gguf", vocab, seed=1, scaling=("linear", 4.0, N_CTX_ORIG))
    write_llama(out / "llama-tiny-yarn.f32.gguf", vocab, seed=1, scaling=("yarn", 4.0, 64))
    # What Realm must refuse rather than run wrong: q biases (llama.cpp adds them) and
    # Phi-3's long/short factors, which Realm does not implement for llama files.
    write_llama(out / "llama-tiny-q-bias.f32.gguf", vocab, seed=1, bias=True)
    write_llama(out / "llama-tiny-longrope.f32.gguf", vocab, seed=1, scaling=("longrope", 4.0, 64))

    qwen_vocab = gguf.GGUFReader(str(llama_dir / "src" / QWEN2_VOCAB))
    write_qwen(out / "qwen3-tiny.f32.gguf", qwen_vocab, seed=2, arch="qwen3")
    write_qwen(out / "qwen2-tiny.f32.gguf", qwen_vocab, seed=3, arch="qwen2")
    phi3_vocab = gguf.GGUFReader(str(llama_dir / "src" / PHI3_VOCAB))
    write_phi3(out / "phi3-tiny.f32.gguf", phi3_vocab, seed=4)
    # LongRoPE: llama.cpp's reference runs with a 1024-token context and Realm's tests with
    # the model's 2048, so both take the long factors at an original context of 64 and the
    # short ones at 4096.
    write_phi3(out / "phi3-tiny-longrope-long.f32.gguf", phi3_vocab, seed=4, longrope=(64, 1.19))
    write_phi3(out / "phi3-tiny-longrope-short.f32.gguf", phi3_vocab, seed=4, longrope=(4096, 1.19))
    write_smollm3(out / "smollm3-tiny.f32.gguf", vocab, seed=5)
    spm_vocab = gguf.GGUFReader(str(llama_dir / "src" / "models/ggml-vocab-llama-spm.gguf"))
    write_gemma2(out / "gemma2-tiny.f32.gguf", spm_vocab, seed=6)
    write_mistral3(out / "mistral3-tiny.f32.gguf", spm_vocab, seed=7)

    # The same architectures 256 wide, for Q4_K_M (made from these F32 files, then the F32
    # files are removed: only the quantized ones are tested).
    wide_freqs = lambda: llama3_rope_factors(ROPE_BASE, 64, factor=8.0, low=1.0, high=4.0,
                                             orig_ctx=N_CTX_ORIG)
    wide(lambda: write_llama(out / "llama3-wide.f32.gguf", vocab, seed=11, rope_freqs=wide_freqs()))
    wide(write_qwen, out / "qwen3-wide.f32.gguf", qwen_vocab, seed=12, arch="qwen3")
    wide(write_qwen, out / "qwen2-wide.f32.gguf", qwen_vocab, seed=13, arch="qwen2")
    wide(write_phi3, out / "phi3-wide.f32.gguf", phi3_vocab, seed=14)
    wide(write_smollm3, out / "smollm3-wide.f32.gguf", vocab, seed=15)

    quantize = llama_dir / "build" / "bin" / "llama-quantize"
    # (Q4_K needs rows of 256 values: only the 256-wide Mistral 3 gets it; the others are
    # 64 wide.)
    for src, dst, ty in [("llama3-tiny.f32.gguf", "llama3-tiny.q8_0.gguf", "Q8_0"),
                         ("qwen3-tiny.f32.gguf", "qwen3-tiny.q8_0.gguf", "Q8_0"),
                         ("qwen3-tiny.f32.gguf", "qwen3-tiny.q4_0.gguf", "Q4_0"),
                         ("qwen2-tiny.f32.gguf", "qwen2-tiny.q8_0.gguf", "Q8_0"),
                         ("qwen2-tiny.f32.gguf", "qwen2-tiny.q4_0.gguf", "Q4_0"),
                         ("phi3-tiny.f32.gguf", "phi3-tiny.q8_0.gguf", "Q8_0"),
                         ("phi3-tiny.f32.gguf", "phi3-tiny.q4_0.gguf", "Q4_0"),
                         ("phi3-tiny-longrope-long.f32.gguf", "phi3-tiny-longrope-long.q8_0.gguf", "Q8_0"),
                         ("smollm3-tiny.f32.gguf", "smollm3-tiny.q8_0.gguf", "Q8_0"),
                         ("smollm3-tiny.f32.gguf", "smollm3-tiny.q4_0.gguf", "Q4_0"),
                         ("llama3-tiny.f32.gguf", "llama3-tiny.q4_0.gguf", "Q4_0"),
                         ("gemma2-tiny.f32.gguf", "gemma2-tiny.q4_0.gguf", "Q4_0"),
                         ("mistral3-tiny.f32.gguf", "mistral3-tiny.q4_0.gguf", "Q4_0"),
                         ("gemma2-tiny.f32.gguf", "gemma2-tiny.q8_0.gguf", "Q8_0"),
                         ("mistral3-tiny.f32.gguf", "mistral3-tiny.q8_0.gguf", "Q8_0"),
                         ("mistral3-tiny.f32.gguf", "mistral3-tiny.q4_k_m.gguf", "Q4_K_M")]:
        subprocess.run([str(quantize), str(out / src), str(out / dst), ty],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wide(write_gemma2, out / "gemma2-wide.f32.gguf", spm_vocab, seed=16)
    for arch in ("llama3", "qwen3", "qwen2", "phi3", "smollm3", "gemma2"):
        src = out / f"{arch}-wide.f32.gguf"
        subprocess.run([str(quantize), str(src), str(out / f"{arch}-wide.q4_k_m.gguf"), "Q4_K_M"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        src.unlink()

    sums = Path(__file__).with_name("sha256sums")
    want = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip()) \
        if sums.exists() else {}
    bad = []
    for f in sorted(out.glob("*.gguf")):
        got = hashlib.sha256(f.read_bytes()).hexdigest()
        print(f"{got}  {f.name}")
        if want and want.get(f.name) != got:
            bad.append(f.name)
    if bad:
        sys.exit(f"generated files differ from tests/models/sha256sums: {', '.join(bad)} "
                 "(the references in tests/reference/tiny-models were made from the pinned files)")


if __name__ == "__main__":
    main()
