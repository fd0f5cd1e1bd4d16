#!/usr/bin/env python3
"""The official `openai` client against a running `realm serve` (URL in argv[1], model
name in argv[2]): non-streaming and streaming chat, legacy completions, /v1/models, and
error cases. Exits non-zero (an AssertionError) on any mismatch."""
import json
import sys

import openai

url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
ask = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

# /v1/models lists the served model.
ids = [m.id for m in client.models.list().data]
assert model in ids, ids

# Non-streaming chat, greedy: the answer and its accounting.
r = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=16)
text = r.choices[0].message.content
assert "Paris" in text, text
assert r.choices[0].message.role == "assistant"
assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 16, r.usage
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

# Streaming chat gives the same greedy text, piece by piece, then usage.
pieces, finish, usage = [], None, None
for chunk in client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(pieces) == text, (pieces, text)
assert len(pieces) > 1, pieces
assert finish == r.choices[0].finish_reason, finish
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage

# max_tokens is honoured and reported as "length".
r2 = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a long story."}],
                                    temperature=0, max_tokens=5)
assert r2.choices[0].finish_reason == "length" and r2.usage.completion_tokens == 5, r2

# The same seed gives the same sampled text.
a = client.chat.completions.create(model=model, messages=ask, temperature=0.9, seed=7, max_tokens=12)
b = client.chat.completions.create(model=model, messages=ask, temperature=0.9, seed=7, max_tokens=12)
assert a.choices[0].message.content == b.choices[0].message.content

# Legacy completions: raw text continuation, stop strings.
c = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=8)
assert "Paris" in c.choices[0].text, c.choices[0].text
c2 = client.completions.create(model=model, prompt="1, 2, 3, 4,", temperature=0, max_tokens=20, stop=["7"])
assert "7" not in c2.choices[0].text and c2.choices[0].finish_reason == "stop", c2.choices[0]
streamed = "".join(x.choices[0].text for x in client.completions.create(
    model=model, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True) if x.choices)
assert streamed == c.choices[0].text, (streamed, c.choices[0].text)

# Embeddings: unit vectors of the model's width, deterministic, closer for related texts.
texts = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Quarterly tax filing deadlines for corporations."]
e = client.embeddings.create(model=model, input=texts)
vecs = [d.embedding for d in sorted(e.data, key=lambda d: d.index)]
assert len(vecs) == 3 and len(set(map(len, vecs))) == 1 and len(vecs[0]) >= 64, [len(v) for v in vecs]
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
for v in vecs:
    assert abs(dot(v, v) - 1.0) < 1e-3, dot(v, v)
assert dot(vecs[0], vecs[1]) > dot(vecs[0], vecs[2]), (dot(vecs[0], vecs[1]), dot(vecs[0], vecs[2]))
assert e.usage.prompt_tokens > 10, e.usage
single = client.embeddings.create(model=model, input=texts[0]).data[0].embedding
assert max(abs(a - b) for a, b in zip(single, vecs[0])) < 1e-6

# Errors come back as OpenAI errors with the right status.
try:
    client.chat.completions.create(model="no-such-model", messages=ask)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.code == "model_not_found", e
try:
    client.chat.completions.create(model=model, messages=ask, temperature=5)
    raise AssertionError("temperature 5 accepted")
except openai.BadRequestError as e:
    assert e.code == "invalid_value", e
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=4)
    raise AssertionError("over-long prompt accepted")
except openai.BadRequestError as e:
    assert e.code == "context_length_exceeded", e

# Log-probabilities (chat): per token the chosen one and the top alternatives, best first;
# greedy picks the most likely; streamed ones are the same.
import math
lp = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=8,
                                    logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content
assert lp.choices[0].message.content == "".join(t.token for t in content), content
for t in content:
    assert len(t.top_logprobs) == 3, t
    assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob, t
    assert all(a.logprob >= b.logprob for a, b in zip(t.top_logprobs, t.top_logprobs[1:])), t
    assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1.0 + 1e-5, t
    assert bytes(t.bytes).decode("utf-8", "replace") == t.token, t
streamed_lp = []
for chunk in client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=8,
                                            logprobs=True, top_logprobs=3, stream=True):
    for c in chunk.choices:
        if c.logprobs and c.logprobs.content:
            streamed_lp.extend(c.logprobs.content)
assert [(t.token, t.logprob) for t in streamed_lp] == [(t.token, t.logprob) for t in content]
assert client.chat.completions.create(model=model, messages=ask, max_tokens=2).choices[0].logprobs is None
# Legacy completions: tokens, their log-probabilities, alternatives and text offsets.
cl = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=6, logprobs=2)
l = cl.choices[0].logprobs
assert "".join(l.tokens) == cl.choices[0].text, (l.tokens, cl.choices[0].text)
assert len(l.token_logprobs) == len(l.tokens) == len(l.top_logprobs) == len(l.text_offset)
assert all(max(top.values()) == lp_ for top, lp_ in zip(l.top_logprobs, l.token_logprobs)), l
assert l.text_offset == [sum(len(t.encode()) for t in l.tokens[:i]) for i in range(len(l.tokens))]

# JSON mode (tests/serve/structured.py covers schemas and grammars on both models).
j = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Reply with a JSON object."}],
                                   max_tokens=200, temperature=0, response_format={"type": "json_object"})
if j.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(j.choices[0].message.content), dict), j.choices[0].message.content
else:
    assert j.choices[0].message.content.lstrip().startswith("{"), j.choices[0].message.content

# Tool calls round-trip: a required call is constrained to the tool's parameter schema and
# comes back as tool_calls; the tool's answer goes back in and the model uses it.
import jsonschema
params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
          "required": ["city", "unit"]}
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": params}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
conv = [{"role": "user", "content": "What is the weather in Paris?"}]
for seed, choice in ((0, "required"), (1, {"type": "function", "function": {"name": "get_weather"}})):
    t = client.chat.completions.create(model=model, messages=conv, tools=tools, tool_choice=choice,
                                       temperature=0.7 if seed else 0, seed=seed, max_tokens=120)
    assert t.choices[0].finish_reason == "tool_calls", t.choices[0]
    call = t.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_"), call
    if choice != "required":
        assert call.function.name == "get_weather", call
    if call.function.name == "get_weather":
        jsonschema.validate(json.loads(call.function.arguments), params)
call = t.choices[0].message.tool_calls[0]
conv.append(t.choices[0].message.model_dump(exclude_none=True))
conv.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "sunny"})})
follow = client.chat.completions.create(model=model, messages=conv, tools=tools, temperature=0, max_tokens=40)
assert follow.choices[0].message.content and follow.choices[0].finish_reason in ("stop", "length"), follow
assert "18" in follow.choices[0].message.content, follow.choices[0].message.content
# Streamed: the call arrives as a tool_calls delta, then finish_reason "tool_calls".
deltas, finish = [], None
for chunk in client.chat.completions.create(model=model, messages=conv[:1], tools=tools, tool_choice="required",
                                            temperature=0, max_tokens=120, stream=True):
    for c in chunk.choices:
        deltas.extend(c.delta.tool_calls or [])
        finish = c.finish_reason or finish
assert finish == "tool_calls" and len(deltas) == 1 and deltas[0].index == 0, (finish, deltas)
json.loads(deltas[0].function.arguments)
# tool_choice "none": no calls parsed out; unknown names are 400s.
n = client.chat.completions.create(model=model, messages=conv[:1], tools=tools, tool_choice="none", max_tokens=8)
assert n.choices[0].message.tool_calls is None, n
try:
    client.chat.completions.create(model=model, messages=conv[:1], tools=tools, max_tokens=2,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
    raise AssertionError("an unknown tool was accepted")
except openai.BadRequestError as e:
    assert e.param == "tool_choice", e

# Parameters Realm does not implement are refused by name, not ignored.
try:
    client.chat.completions.create(model=model, messages=ask, max_tokens=2, logit_bias={"42": 5})
    raise AssertionError("logit_bias ignored")
except openai.BadRequestError as e:
    assert e.code == "unsupported_parameter" and e.param == "logit_bias", e
print("openai client: all checks passed")
