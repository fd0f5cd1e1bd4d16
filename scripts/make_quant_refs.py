#!/usr/bin/env python3
"""Make the dequantization reference vectors in crates/gguf/tests/data/quant/.

For every type Realm dequantizes: a few blocks of a real tensor where one of the two test
models has that type, and seeded random blocks for every type. The expected f32 values come
from gguf-py (llama.cpp's own Python package, `pip install gguf==0.19.0`), except Q8_1 and
Q8_K, which gguf-py does not dequantize: for those the script applies ggml's formula
(`d * q`) in numpy float32. Run from the repository root after `make models`.
"""
import json
import pathlib
import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

OUT = pathlib.Path("crates/gguf/tests/data/quant")
rng = np.random.default_rng(20261127)

# (block elements, block bytes, byte offsets of f16 scale fields) per ggml's ggml-common.h.
LAYOUT = {
    "F16": (1, 2, []), "BF16": (1, 2, []),
    "Q4_0": (32, 18, [0]), "Q4_1": (32, 20, [0, 2]), "Q5_0": (32, 22, [0]),
    "Q5_1": (32, 24, [0, 2]), "Q8_0": (32, 34, [0]), "Q8_1": (32, 36, [0, 2]),
    "Q2_K": (256, 84, [80, 82]), "Q3_K": (256, 110, [108]), "Q4_K": (256, 144, [0, 2]),
    "Q5_K": (256, 176, [0, 2]), "Q6_K": (256, 210, [208]), "Q8_K": (256, 292, []),
}

def reference(name, raw):
    if name == "Q8_1":
        b = raw.reshape(-1, 36)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        return (b[:, 4:].view(np.int8).astype(np.float32) * d).reshape(-1)
    if name == "Q8_K":
        b = raw.reshape(-1, 292)
        d = b[:, 0:4].copy().view(np.float32)
        return (d * b[:, 4:260].view(np.int8).astype(np.float32)).reshape(-1)
    return dequantize(raw, T[name]).reshape(-1).astype(np.float32)

def random_blocks(name, n_blocks):
    bs, ts, scales = LAYOUT[name]
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    if name == "F16":
        raw = rng.normal(0, 2, size=n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    elif name == "BF16":
        f = rng.normal(0, 2, size=n_blocks).astype(np.float32)
        raw = (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
    elif name == "Q8_K":
        raw[:, 0:4] = rng.normal(0, 0.05, size=(n_blocks, 1)).astype(np.float32).view(np.uint8)
    for at in scales:
        raw[:, at:at + 2] = rng.normal(0, 0.05, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(-1)

cases = []

def emit(case, name, raw, source):
    ref = reference(name, raw)
    (OUT / f"{case}.bin").write_bytes(raw.tobytes())
    (OUT / f"{case}.f32").write_bytes(ref.astype("<f4").tobytes())
    cases.append({"case": case, "type": name, "elements": int(ref.size), "source": source})

for name, (bs, ts, _) in LAYOUT.items():
    n_blocks = 256 if bs == 1 else 8
    emit(f"random-{name.lower()}", name, random_blocks(name, n_blocks), "seeded random blocks")

REAL = [
    ("models/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
    ("models/gemma-3-270m-q4_k_m.gguf", "gemma3"),
]
seen = set()
for path, short in REAL:
    r = gguf.GGUFReader(path)
    for t in r.tensors:
        ty = t.tensor_type.name
        if (short, ty) in seen:
            continue
        seen.add((short, ty))
        bs, ts = gguf.GGML_QUANT_SIZES[t.tensor_type]
        n_bytes = ts * (8 if bs > 1 else 64)
        raw = np.asarray(t.data).view(np.uint8).reshape(-1)[:n_bytes].copy()
        if ty == "F32":
            ref = raw.view(np.float32)
            (OUT / f"{short}-f32.bin").write_bytes(raw.tobytes())
            (OUT / f"{short}-f32.f32").write_bytes(ref.tobytes())
            cases.append({"case": f"{short}-f32", "type": "F32", "elements": int(ref.size), "source": f"{path}: {t.name}, first {n_bytes} bytes"})
            continue
        emit(f"{short}-{ty.lower()}", ty, raw, f"{path}: {t.name}, first {n_bytes} bytes")

(OUT / "manifest.json").write_text(json.dumps(cases, indent=1) + "\n")
print(f"{len(cases)} cases")
