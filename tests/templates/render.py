#!/usr/bin/env python3
"""Renders every chat template of llama.cpp's `models/templates/` (the tree the references
come from) with Python's jinja2 as Hugging Face's `apply_chat_template` sets it up: a
sandboxed environment with trim_blocks and lstrip_blocks, the loopcontrols extension, the
`{% generation %}` tag, the globals `raise_exception` and `strftime_now` (here at a fixed time, 2024-07-26 10:11:12, so
the output is stable), a `tojson` filter with ensure_ascii off, and bos/eos tokens "<s>" /
"</s>". Each template runs on a few conversations; the output, or the error, goes to
tests/reference/templates.jsonl, which crates/tokenizer/tests/templates.rs renders with
Realm and compares byte for byte.
Usage: tests/templates/render.py LLAMA_CPP_SRC   (needs jinja2: tests/requirements.txt)"""
import datetime
import json
import sys
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox

NOW = datetime.datetime(2024, 7, 26, 10, 11, 12)

CASES = [
    ([{"role": "user", "content": "Hello"}], True),
    ([{"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "What is 2+2?"}], True),
    ([{"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Tell me a joke."}], True),
    ([{"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Tell me a joke."}], False),
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Name a color."},
      {"role": "assistant", "content": "Blue."}], False),
]


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class Generation(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}`, which transformers adds (to mark the
    assistant's tokens): renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def environment():
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: NOW.strftime(fmt)
    return env


def main():
    src = Path(sys.argv[1]) / "models" / "templates"
    out = Path(__file__).resolve().parent.parent / "reference" / "templates.jsonl"
    env = environment()
    lines = []
    for path in sorted(src.glob("*.jinja")):
        source = path.read_text(encoding="utf-8")
        for i, (messages, gen) in enumerate(CASES):
            rec = {"template": path.name, "case": i}
            try:
                rec["output"] = env.from_string(source).render(
                    messages=messages, add_generation_prompt=gen, bos_token="<s>",
                    eos_token="</s>")
            except Exception as e:  # the template refuses (tools, images, roles, …)
                rec["error"] = f"{type(e).__name__}: {e}"
            lines.append(json.dumps(rec, ensure_ascii=False))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors = sum('"error"' in l for l in lines)
    print(f"{len(lines)} renderings of {len(lines) // len(CASES)} templates, {errors} errors -> {out}")


if __name__ == "__main__":
    main()
