"""Load generators over HTTP (aiohttp): the same code drives our server and stock vLLM.

Every request samples at temperature 1 with `ignore_eos`, so each produces exactly `max_tokens`
tokens whatever the (random) model says, and the token counts match between servers.
"""

import asyncio
import json
import random
import time

import aiohttp
import requests

from common import percentile

MODEL = "tiny"  # --served_model_name of every server the benchmark starts
WORDS = ("the a an of to in is was for on with as by at from that this which what how why when where "
         "model policy reward token value search agent tool call answer question paris weather sunny "
         "compute prove explain write list sort number prime sum json python function return step "
         "first then finally because therefore however data batch sample learn train update gradient").split()
TIMEOUT = aiohttp.ClientTimeout(total=3600)


def sentence(rng, lo=8, hi=24):
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "?"


def conversations(n, seed=0):
    """n single-turn conversations: a short system prompt and one user question each."""
    rng = random.Random(seed)
    return [[{"role": "system", "content": "You are a helpful assistant. " + sentence(rng, 4, 12)},
             {"role": "user", "content": sentence(rng)}] for _ in range(n)]


def turn_plan(n, turns, lo, hi, seed=0, task=None):
    """Per conversation: its first messages, the follow-up user messages, and max_tokens per turn. `task`:
    (fewest, most) words of a task statement that opens each first user message (an agent's context)."""
    rng = random.Random(seed + 1)
    firsts = conversations(n, seed)
    if task:
        for messages in firsts:
            messages[-1]["content"] = f"Task: {sentence(rng, *task)} {messages[-1]['content']}"
    return [{"messages": firsts[i], "followups": [sentence(rng) for _ in range(turns - 1)],
             "max_tokens": [rng.randint(lo, hi) for _ in range(turns)]} for i in range(n)]


def plain_prompts(n, seed=0):
    rng = random.Random(seed + 2)
    return [sentence(rng, 12, 40) for _ in range(n)]


async def _post(session, url, body):
    async with session.post(url, json=body) as response:
        data = await response.json(content_type=None)
        if response.status != 200:
            raise RuntimeError(f"{url} → {response.status}: {str(data)[:500]}")
        return data


def _session(limit):
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=TIMEOUT)


async def _chat_burst(base_url, convs, max_tokens):
    async with _session(len(convs)) as session:
        async def one(messages):
            start = time.perf_counter()
            data = await _post(session, base_url + "/v1/chat/completions",
                               {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 1.0,
                                "ignore_eos": True})
            return time.perf_counter() - start, data["usage"]["completion_tokens"]

        start = time.perf_counter()
        results = await asyncio.gather(*(one(m) for m in convs))
        wall = time.perf_counter() - start
    latencies = [lat for lat, _ in results]
    tokens = sum(t for _, t in results)
    return {"wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99)}


def chat_burst(base_url, convs, max_tokens):
    """All conversations at once, one request each → tokens/s over the wall time, p50/p99 latency."""
    return asyncio.run(_chat_burst(base_url, convs, max_tokens))


async def _stream_burst(base_url, convs, max_tokens):
    async with _session(len(convs)) as session:
        async def one(messages):
            start, first, tokens = time.perf_counter(), None, 0
            body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 1.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with session.post(base_url + "/v1/chat/completions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"stream → {response.status}: {(await response.text())[:500]}")
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[len(b"data: "):])
                    if first is None and any((c.get("delta") or {}).get("content") for c in chunk["choices"]):
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            return first, tokens

        start = time.perf_counter()
        results = await asyncio.gather(*(one(m) for m in convs))
        wall = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    return {"wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile([f for f, _ in results if f is not None], 50)}


def stream_burst(base_url, convs, max_tokens):
    """All conversations at once, streamed → tokens/s over the wall time, median time to the first content."""
    return asyncio.run(_stream_burst(base_url, convs, max_tokens))


async def _multi_turn(base_url, plan):
    async with _session(len(plan)) as session:
        async def conversation(item):
            messages, tokens = list(item["messages"]), 0
            for turn, max_tokens in enumerate(item["max_tokens"]):
                data = await _post(session, base_url + "/v1/chat/completions",
                                   {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                                    "temperature": 1.0, "ignore_eos": True})
                tokens += data["usage"]["completion_tokens"]
                messages.append({"role": "assistant", "content": data["choices"][0]["message"]["content"] or ""})
                if turn < len(item["followups"]):
                    messages.append({"role": "user", "content": item["followups"][turn]})
            return tokens

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(conversation(item) for item in plan)))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall}


def multi_turn(base_url, plan):
    """Closed loop: every conversation sends its next turn as soon as its previous reply is back."""
    return asyncio.run(_multi_turn(base_url, plan))


async def _sequential(base_url, n):
    async with _session(1) as session:
        latencies = []
        for i in range(n + 1):
            start = time.perf_counter()
            await _post(session, base_url + "/v1/completions",
                        {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 1.0})
            if i:  # the first one warms the connection
                latencies.append(time.perf_counter() - start)
    return {"p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99), "n": n}


def sequential_latency(base_url, n):
    """n one-token completions, one at a time → median and p99 latency."""
    return asyncio.run(_sequential(base_url, n))


PREFIX_CACHE = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")  # counters, in tokens


def prefix_cache(urls):
    """vLLM's prefix-cache counters summed over the servers' /metrics → (hits, queries), in prompt tokens."""
    totals = [0.0, 0.0]
    for url in urls:
        response = requests.get(url + "/metrics", timeout=60)
        response.raise_for_status()
        for line in response.text.splitlines():
            for i, name in enumerate(PREFIX_CACHE):
                if line.startswith((name + "{", name + " ")):
                    totals[i] += float(line.rsplit(" ", 1)[1])
    return tuple(totals)
