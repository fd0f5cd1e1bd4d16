#!/usr/bin/env python3
"""Constrained output through `realm serve` (URL in argv[1], model names in argv[2:]) with
the official `openai` client: every output under a JSON Schema parses and validates (a
set of schemas, several prompts, greedy and sampled), JSON mode gives JSON objects, a GBNF
grammar (llama.cpp's `grammar` field) is matched exactly, and bad schemas are refused.
Exits non-zero (an AssertionError) on any failure."""
import json
import re
import sys

import jsonschema
import openai

url, models = sys.argv[1], sys.argv[2:]
client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer"},
            "email": {"type": ["string", "null"]},
            "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 40},
            "temperature_c": {"type": "number"},
            "conditions": {"enum": ["sunny", "cloudy", "rain", "snow"]},
            "alerts": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
        },
        "required": ["city", "temperature_c", "conditions"],
    },
    "order": {
        "$defs": {
            "item": {"type": "object", "properties": {
                "sku": {"type": "string", "maxLength": 12},
                "qty": {"type": "integer"},
            }, "required": ["sku", "qty"]},
        },
        "type": "object",
        "properties": {
            "id": {"const": "A-1"},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3},
            "paid": {"type": "boolean"},
            "note": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
        },
        "required": ["id", "items", "paid"],
    },
}
PROMPTS = [
    "Reply with JSON only.",
    "Make up an example and answer in JSON.",
    "Bonjour ! Réponds en JSON, s'il te plaît.",
]

checked = 0
for model in models:
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        for i, prompt in enumerate(PROMPTS):
            for temperature, seed in ((0, 0), (0.9, i + 1)):
                r = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"{prompt} ({name})"}],
                    response_format=fmt, temperature=temperature, seed=seed, max_tokens=400)
                text = r.choices[0].message.content
                assert r.choices[0].finish_reason == "stop", (model, name, r.choices[0].finish_reason, text)
                doc = json.loads(text)
                jsonschema.validate(doc, schema)
                checked += 1
    # JSON mode: objects, streamed too. An object the model has not closed by max_tokens
    # ends with "length" (the grammar keeps what is there a prefix of one); every one that
    # ends with "stop" parses.
    stopped = 0
    for seed in range(4):
        pieces, finish = [], None
        for chunk in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Describe a cat in a small JSON object."}],
                response_format={"type": "json_object"}, temperature=0.8 if seed else 0, seed=seed,
                max_tokens=600, stream=True):
            for c in chunk.choices:
                if c.delta.content:
                    pieces.append(c.delta.content)
                finish = c.finish_reason or finish
        text = "".join(pieces)
        assert text.lstrip().startswith("{"), text
        if finish == "stop":
            assert isinstance(json.loads(text), dict), text
            stopped += 1
            checked += 1
        else:
            assert finish == "length", finish
    assert stopped >= 1, "no JSON-mode answer completed"
    # A GBNF grammar through llama.cpp's `grammar` field.
    g = 'root ::= ("yes" | "no") ", because " [a-z ]{3,40} "."'
    for seed in range(3):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Is the sky blue?"}],
            temperature=0.7, seed=seed, max_tokens=60, extra_body={"grammar": g})
        text = r.choices[0].message.content
        assert re.fullmatch(r"(yes|no), because [a-z ]{3,40}\.", text), text
        checked += 1
    # Schemas a grammar cannot keep, and bad grammars, are 400s naming the problem.
    for bad, needle in (({"type": "string", "pattern": "^a+$"}, "pattern"),
                        ({"type": "integer", "minimum": 1}, "minimum")):
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
            raise AssertionError(f"{bad} accepted")
        except openai.BadRequestError as e:
            assert needle in str(e), e
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, extra_body={"grammar": "root ::= undefined-rule"})
        raise AssertionError("a bad grammar was accepted")
    except openai.BadRequestError as e:
        assert "not defined" in str(e), e

print(f"structured output: {checked} outputs, all valid")
