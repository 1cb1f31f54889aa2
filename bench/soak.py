"""Soak run: 1,000 mixed requests at concurrency 128 against a fresh server, every answer checked.

    .venv/bin/python bench/soak.py                              # 1000 requests, 128 at a time
    .venv/bin/python bench/soak.py --requests 200 --concurrency 32

Starts `vllm_serve.py` on the tiny model (built by tests/tiny_model.py, cached under bench/.cache) on
a loopback port, computes the expected answers with an in-process vLLM engine, then sends chat and
completion requests, a quarter of them streaming, all greedy with `ignore_eos` and each with its own
prompt. Every answer is checked against its request: its prompt token ids (a cross-wired answer has
another request's), its completion token ids (the engine's greedy tokens), its length, and that it
came once (one response id, one final chunk, one `[DONE]`). Prints a table (requests, errors,
duplicates/mismatches, wall time, p50/p99 latency, RSS of the server and its children at start, peak
and end) and exits 1 if any request was lost, failed, duplicated or wrong.

`tests/test_reliability.py` runs the same `plan` → `expect` → `send` → `check` on 100 requests; so this
module imports nothing with side effects at the top (bench/common.py rewrites the environment).
"""

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import time

import aiohttp

MODEL = "tiny"  # --served_model_name of the server started here
MAX_MODEL_LEN = 512
KV_BYTES = 256 << 20  # room for 128 requests in flight
STREAM_EVERY = 4  # every 4th request streams
REQUEST_TIMEOUT_S = 300  # one request, queueing included: a loaded 2-core box is slow, never this slow
RSS_SAMPLE_S = 0.5
WORDS = ("the a of to in is for on with as by at from that this which what how why when where model policy "
         "reward token value search agent tool call answer question paris weather sunny compute prove explain "
         "write list sort number prime sum json python function return step first then finally").split()


@dataclasses.dataclass
class Job:
    """One request to send: its route and body, and what its answer must hold."""

    index: int
    route: str  # "/v1/completions" or "/v1/chat/completions"
    stream: bool
    body: dict
    max_tokens: int
    prompt_ids: list = None  # expected prompt token ids, filled by `expect`
    token_ids: list = None  # expected completion token ids, filled by `expect`


@dataclasses.dataclass
class Answer:
    index: int
    status: int = None  # HTTP status; None: no answer at all (connection error, timeout)
    latency_s: float = None
    response_ids: list = dataclasses.field(default_factory=list)  # every distinct id seen in the answer
    prompt_ids: list = None
    token_ids: list = None
    finals: int = 0  # chunks or choices with a finish_reason
    done_markers: int = 0  # `data: [DONE]` lines (streaming)
    error: str = None


def plan(n, seed=0, max_tokens=(4, 24)):
    """n jobs, alternating chat and completions, every STREAM_EVERY-th streaming; prompts all distinct."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        text = f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
        tokens = rng.randint(*max_tokens)
        common = {"model": MODEL, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                  "return_token_ids": True, "stream": i % STREAM_EVERY == STREAM_EVERY - 1}
        if i % 2:
            body = {**common, "messages": [{"role": "user", "content": text}]}
            jobs.append(Job(i, "/v1/chat/completions", common["stream"], body, tokens))
        else:
            jobs.append(Job(i, "/v1/completions", common["stream"], {**common, "prompt": text}, tokens))
    return jobs


def expect(jobs, llm, tokenizer):
    """Fill each job's expected prompt ids (as the server renders them) and greedy completion ids."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    for job in jobs:
        if job.route == "/v1/completions":
            job.prompt_ids = tokenizer.encode(job.body["prompt"])
        else:
            text = tokenizer.apply_chat_template(job.body["messages"], tokenize=False, add_generation_prompt=True)
            job.prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    params = [SamplingParams(temperature=0, max_tokens=job.max_tokens, ignore_eos=True) for job in jobs]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=job.prompt_ids) for job in jobs], params, use_tqdm=False)
    for job, out in zip(jobs, outputs):
        job.token_ids = list(out.outputs[0].token_ids)
    return jobs


async def _one(session, base_url, job, answer):
    start = time.perf_counter()
    try:
        async with session.post(base_url + job.route, json=job.body) as response:
            answer.status = response.status
            if response.status != 200:
                answer.error = (await response.text())[:300]
            elif job.stream:
                _read_stream(answer, [line async for line in response.content])
            else:
                _read_body(answer, await response.json())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    answer.latency_s = time.perf_counter() - start


def _read_body(answer, body):
    (choice,) = body["choices"]
    answer.response_ids = [body["id"]]
    answer.prompt_ids = choice.get("prompt_token_ids") or body.get("prompt_token_ids")
    answer.token_ids = choice["token_ids"]
    answer.finals = int(choice["finish_reason"] is not None)


def _read_stream(answer, lines):
    """SSE → the same fields: token ids concatenated over the chunks (so deltas work too)."""
    answer.token_ids = []
    for line in lines:
        line = line.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            answer.done_markers += 1
            continue
        chunk = json.loads(data)
        if chunk["id"] not in answer.response_ids:
            answer.response_ids.append(chunk["id"])
        answer.prompt_ids = answer.prompt_ids or chunk.get("prompt_token_ids")
        for choice in chunk["choices"]:
            answer.prompt_ids = answer.prompt_ids or choice.get("prompt_token_ids")
            answer.token_ids += choice.get("token_ids") or []
            answer.finals += int(choice.get("finish_reason") is not None)


async def _send(base_url, jobs, concurrency, headers, on_progress):
    answers = [Answer(job.index) for job in jobs]
    queue, done = list(zip(jobs, answers))[::-1], [0]
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout,
                                     headers=headers) as session:
        async def worker():
            while queue:
                job, answer = queue.pop()
                await _one(session, base_url, job, answer)
                done[0] += 1

        async def progress():
            while True:
                on_progress(done[0])
                await asyncio.sleep(RSS_SAMPLE_S)

        ticker = asyncio.create_task(progress())
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            ticker.cancel()
    return answers


def send(base_url, jobs, concurrency, api_key=None, on_progress=lambda done: None):
    """All jobs, `concurrency` in flight at any time → one Answer per job, in job order. `on_progress(done)`
    is called every RSS_SAMPLE_S with the number of answers so far."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return asyncio.run(_send(base_url, jobs, concurrency, headers, on_progress))


def check(jobs, answers):
    """→ {"requests", "answered", "errors", "duplicates", "prompt_mismatches", "token_mismatches", "bad"}."""
    seen, duplicates, errors, prompt_bad, token_bad, bad = {}, 0, 0, 0, 0, []
    for job, answer in zip(jobs, answers):
        if answer.status != 200 or answer.error:
            errors += 1
            bad.append((job.index, answer.status, answer.error))
            continue
        once = len(answer.response_ids) == 1 and answer.finals == 1 and answer.done_markers == int(job.stream)
        for rid in answer.response_ids:
            duplicates += rid in seen
            seen[rid] = job.index
        if not once:
            duplicates += 1
            bad.append((job.index, "answered more than once", answer.response_ids, answer.finals, answer.done_markers))
        if answer.prompt_ids != job.prompt_ids:
            prompt_bad += 1
            bad.append((job.index, "prompt ids", answer.prompt_ids, job.prompt_ids))
        elif answer.token_ids != job.token_ids:
            token_bad += 1
            bad.append((job.index, "token ids", answer.token_ids, job.token_ids))
    return {"requests": len(jobs), "answered": sum(a.status is not None for a in answers), "errors": errors,
            "duplicates": duplicates, "prompt_mismatches": prompt_bad, "token_mismatches": token_bad, "bad": bad}


def rss_by_process(pid):
    """{label: RSS in bytes} of a server process and all its descendants, labelled by role."""
    import psutil

    found = {}
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                cmdline = " ".join(process.cmdline())
                label = ("server" if process.pid == pid else "tracker" if "resource_tracker" in cmdline
                         else "dp-worker" if "spawn_main" in cmdline else process.name())
                found[f"{label}#{sum(k.startswith(label) for k in found)}"] = process.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return found


def tree_rss(pid):
    """RSS in bytes of a process and all its descendants."""
    return sum(rss_by_process(pid).values())


def latency_figures(answers):
    """→ (p50, p99) latency in seconds."""
    cuts = statistics.quantiles([a.latency_s for a in answers if a.latency_s is not None], n=100, method="inclusive")
    return cuts[49], cuts[98]


def main():
    from common import Server, log, model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=256, help="requests sent (and checked) before RSS is measured")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = model_path("tiny")
    server = Server("ours", model, max_model_len=MAX_MODEL_LEN, kv_bytes=KV_BYTES, name="soak").launch()
    try:
        # the reference engine in this process, while the server starts (in-process engine: ~10 s, 1.7 GiB)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from transformers import AutoTokenizer
        from vllm import LLM

        llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                  kv_cache_memory_bytes=64 << 20, seed=0)
        tokenizer = AutoTokenizer.from_pretrained(model)
        warmup = expect(plan(args.warmup, seed=args.seed + 1), llm, tokenizer)
        jobs = expect(plan(args.requests, seed=args.seed), llm, tokenizer)
        del llm
        server.wait_healthy()
        warm = check(warmup, send(server.url, warmup, args.concurrency))
        log(f"warm-up: {warm['requests']} requests, {warm['errors']} errors")
        rss = {"start": tree_rss(server.proc.pid), "peak": 0}
        by_process = {"start": rss_by_process(server.proc.pid)}

        def sample(done):  # the peak, and the first sample past each quarter of the run
            now = tree_rss(server.proc.pid)
            rss["peak"] = max(rss["peak"], now)
            rss.setdefault(f"{100 * (4 * done // len(jobs)) // 4}%", now)

        start = time.perf_counter()
        answers = send(server.url, jobs, args.concurrency, on_progress=sample)
        wall = time.perf_counter() - start
        rss["end"] = tree_rss(server.proc.pid)
        by_process["end"] = rss_by_process(server.proc.pid)
        rss["peak"] = max(rss["peak"], rss["end"])
        result = check(jobs, answers)
    finally:
        server.stop()
    p50, p99 = latency_figures(answers)
    tokens = sum(len(job.token_ids) for job in jobs)
    rows = [("requests", f"{result['requests']} ({sum(j.stream for j in jobs)} streaming, "
                         f"{sum(j.route.endswith('chat/completions') for j in jobs)} chat)"),
            ("concurrency", args.concurrency), ("answered", result["answered"]), ("errors", result["errors"]),
            ("duplicates", result["duplicates"]),
            ("mismatches (prompt / tokens)", f"{result['prompt_mismatches']} / {result['token_mismatches']}"),
            ("wall time", f"{wall:.1f} s ({tokens / wall:.0f} completion tok/s)"),
            ("latency p50 / p99", f"{p50:.2f} s / {p99:.2f} s"),
            ("RSS start / 25% / 50% / 75% / end", " / ".join(f"{rss[k] / 2**20:.0f}" if k in rss else "-"
                                                         for k in ("start", "25%", "50%", "75%", "end")) + " MiB"),
            ("RSS peak", f"{rss['peak'] / 2**20:.0f} MiB (server and all its child processes)"),
            ("RSS by process, start → end", ", ".join(
                f"{name.removesuffix('#0')} {start / 2**20:.0f} → {by_process['end'].get(name, 0) / 2**20:.0f}"
                for name, start in by_process["start"].items()) + " MiB"),
            ("server stop", f"{server.stop_s:.1f} s, {len(server.left_behind)} process(es) left behind")]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    for line in result["bad"][:10]:
        print("  bad:", line)
    ok = not (result["errors"] or result["duplicates"] or result["prompt_mismatches"] or result["token_mismatches"]
              or server.left_behind)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
