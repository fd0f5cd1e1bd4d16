#!/usr/bin/env python3
"""Load test against a running `realm serve` (argv: URL MODEL SERVER_PID WEIGHT_BYTES):
1, 4 and 16 concurrent streaming clients, 4 greedy requests each, on loopback. Every
response must be complete and identical to the lone request's text for its prompt; the
server's resident memory may grow by per-tenant state only, never by a copy of the
weights per tenant. Prints one JSON line with the figures."""
import asyncio, json, sys, time

import httpx

url, model, pid, weight_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# --peer: the server is another one (llama-server) measured the same way: its batched texts
# may differ from its lone ones (its numerics depend on the batch), it may not stream usage,
# and it has no /health session count.
PEER = "--peer" in sys.argv[5:]
PROMPTS = ["What is the capital of France? Answer in one word.", "Name three colours.", "Count from one to five.",
           "What is 2 + 2?"]
MAX_TOKENS = 24


def rss(kind="VmRSS"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(kind + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no " + kind)


# Per finished request: time to its first piece, and the gaps between its pieces (seconds).
TTFT, GAPS = [], []


async def stream_one(client, prompt):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    text, usage, done, finish = [], None, False, None
    sent, last = time.perf_counter(), None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, (r.status_code, await r.aread())
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                if c["delta"].get("content"):
                    now = time.perf_counter()
                    if last is None:
                        TTFT.append(now - sent)
                    else:
                        GAPS.append(now - last)
                    last = now
                text.append(c["delta"].get("content") or "")
                finish = c.get("finish_reason") or finish
    if PEER:
        assert done and finish, (done, finish)
        return "".join(text), usage["completion_tokens"] if usage else len([t for t in text if t])
    assert done and usage and finish, (done, usage, finish)
    return "".join(text), usage["completion_tokens"]


async def client_loop(client, idx, n, expected):
    tokens = 0
    for i in range(n):
        p = PROMPTS[(idx + i) % len(PROMPTS)]
        text, n_tok = await stream_one(client, p)
        assert PEER or text == expected[p], (p, text, expected[p])
        tokens += n_tok
    return tokens


async def scrape(client):
    """Realm's counters that the run reports as differences: queue time, cached prompt tokens,
    batching rounds and the time in them."""
    m = {}
    for line in (await client.get(url + "/metrics")).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("realm_queue_seconds_sum", "realm_queue_seconds_count", "realm_prompt_tokens_total",
                    "realm_prompt_tokens_cached_total", "realm_batched_rounds", "realm_batched_round_seconds",
                    "realm_batched_product_seconds"):
            m[name] = float(value)
    return m


async def main():
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        expected = {}
        for p in PROMPTS:  # lone requests: the reference texts
            expected[p] = (await stream_one(client, p))[0]
        base = rss()
        out = {"rss_before": base}
        for clients in (1, 4, 16):
            TTFT.clear()
            GAPS.clear()
            before = None if PEER else await scrape(client)
            t = time.perf_counter()
            toks = await asyncio.gather(*(client_loop(client, c, 4, expected) for c in range(clients)))
            dt = time.perf_counter() - t
            out[f"tokens_per_s_{clients}"] = sum(toks) / dt
            out[f"requests_{clients}"] = clients * 4
            if not PEER:
                after = await scrape(client)
                d = {k: after[k] - before[k] for k in after}
                out[f"queue_mean_ms_{clients}"] = 1e3 * d["realm_queue_seconds_sum"] / max(1, d["realm_queue_seconds_count"])
                out[f"cached_pct_{clients}"] = 100 * d["realm_prompt_tokens_cached_total"] / max(1, d["realm_prompt_tokens_total"])
                # Rounds (0 with --no-batch): their mean length, the share of the run's time
                # inside them and, of that, in shared products.
                rounds = d.get("realm_batched_rounds", 0)
                out[f"round_ms_{clients}"] = 1e3 * d.get("realm_batched_round_seconds", 0) / max(1, rounds)
                out[f"in_rounds_pct_{clients}"] = 100 * d.get("realm_batched_round_seconds", 0) / dt
                out[f"products_pct_{clients}"] = 100 * d.get("realm_batched_product_seconds", 0) / max(
                    1e-9, d.get("realm_batched_round_seconds", 0))
            for name, xs in (("ttft", TTFT), ("itl", GAPS)):
                xs = sorted(xs)
                for q in (50, 99):
                    out[f"{name}_p{q}_ms_{clients}"] = 1e3 * xs[min(len(xs) - 1, len(xs) * q // 100)] if xs else 0.0
        peak = rss("VmHWM")
        out["rss_peak"] = peak
        growth = peak - base
        out["rss_growth_per_tenant"] = growth / 16
        # 16 tenants at once: a copy of the weights each would add 16 × weight_bytes.
        assert growth / 16 < weight_bytes / 2, (growth, weight_bytes)
        if not PEER:
            # Tenant start (Prometheus buckets): the bound of the bucket holding the median,
            # and how many starts took a new tenant.
            buckets, total = [], 0
            for line in (await client.get(url + "/metrics")).text.splitlines():
                if line.startswith('realm_tenant_start_seconds_bucket{le="'):
                    le = line.split('"')[1]
                    buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
                elif line.startswith("realm_tenant_start_seconds_count "):
                    total = float(line.split()[1])
                elif line.startswith("realm_tenants_reused_total "):
                    out["tenants_reused"] = float(line.split()[1])
            out["tenant_starts"] = total
            out["tenant_start_p50_le_ms"] = 1e3 * next(le for le, n in sorted(buckets) if n >= total / 2)
            r = await client.get(url + "/health")
            assert r.json()["sessions_in_use"] == 0, r.json()
        print(json.dumps(out))

asyncio.run(main())
