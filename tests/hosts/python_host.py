"""Realm's self-contained component (realm-standalone.wasm) from Python, through the
`wasmtime` package's component API: `Component`, `Linker.add_wasip2()`, then the
`realm:inference` exports called directly (load, session, generate, streaming `next()`).

Usage: python_host.py COMPONENT MODEL_DIR MODEL_PATH PROMPT MAX_TOKENS
Prints one JSON object: the generated ids and text, and the guest's usage and timings.
"""
import json
import sys
import time

from wasmtime import Engine, Store, WasiConfig
from wasmtime.component import Component, Linker, Record, Variant


def ok(result, what):
    """A `result<T, error>`: the value, or the error raised."""
    if isinstance(result, Variant):
        raise SystemExit(f"{what} failed: {result.tag}: {result.payload}")
    return result


def record(**fields):
    r = Record()
    for name, value in fields.items():
        setattr(r, name.replace("_", "-"), value)
    return r


def main():
    wasm, model_dir, model, prompt, max_tokens = sys.argv[1:6]
    engine = Engine()
    store = Store(engine)
    wasi = WasiConfig()
    wasi.preopen_dir(model_dir, model_dir)
    wasi.inherit_stderr()
    store.set_wasi(wasi)
    linker = Linker(engine)
    linker.add_wasip2()
    instance = linker.instantiate(store, Component.from_file(engine, wasm))
    runtime = instance.get_export_index(store, "realm:inference/runtime@0.1.0")

    def func(name):
        return instance.get_func(store, instance.get_export_index(store, name, runtime))

    m = ok(func("[static]model.load")(store, model), "load")
    session = ok(func("[method]model.session")(store, m, 0), "session")
    params = record(
        max_tokens=int(max_tokens), temperature=0.0, top_k=40, top_p=0.95, min_p=0.05,
        repeat_penalty=1.0, repeat_last_n=64, seed=0, stop=[], ignore_eog=False,
    )
    messages = [record(role="user", content=prompt)]
    started = time.perf_counter()
    generation = ok(func("[method]session.generate")(store, session, messages, params), "generate")
    next_piece = func("[method]generation.next")
    text, pieces = "", 0
    while True:
        chunk = ok(next_piece(store, generation), "next")
        if chunk is None:
            break
        text += chunk.text
        pieces += 1
    seconds = time.perf_counter() - started
    ids = func("[method]generation.tokens")(store, generation)
    usage = func("[method]generation.usage")(store, generation)
    for r in (generation, session, m):
        r.drop(store)
    print(json.dumps({
        "ids": ids, "text": text, "pieces": pieces, "seconds": seconds,
        # The guest's own clock (WASI), the same numbers every host reports.
        "prompt_tokens": getattr(usage, "prompt-tokens"),
        "generated_tokens": getattr(usage, "generated-tokens"),
        "prefill_ns": getattr(usage, "prefill-ns"),
        "decode_ns": getattr(usage, "decode-ns"),
    }))


if __name__ == "__main__":
    main()
