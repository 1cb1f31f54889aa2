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

The plan and its checks are tests/support.py's (`plan` → `expect` → `send` → `check`), which
tests/test_reliability.py runs on 100 requests.
"""

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import support  # noqa: E402  (on sys.path through common)
from support import check, expect, latency_figures, plan, rss_by_process, send  # noqa: E402

MAX_MODEL_LEN = 512
KV_BYTES = 256 << 20  # room for 128 requests in flight


def tree_rss(pid):
    """RSS in bytes of a process and all its descendants."""
    return sum(rss_by_process(pid).values())


def main():
    log, model_path = common.log, common.model_path
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=256, help="requests sent (and checked) before RSS is measured")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = model_path("tiny")
    server = common.server("ours", model, max_model_len=MAX_MODEL_LEN, kv_bytes=KV_BYTES, name="soak").launch()
    try:
        # the reference engine in this process, while the server starts (in-process engine: ~10 s, 1.7 GiB)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from transformers import AutoTokenizer
        from vllm import LLM

        llm = LLM(model=model, **support.LLM_KWARGS)
        tokenizer = AutoTokenizer.from_pretrained(model)
        warmup = expect(plan(args.warmup, seed=args.seed + 1), llm, tokenizer)
        jobs = expect(plan(args.requests, seed=args.seed), llm, tokenizer)
        del llm
        server.wait_healthy(common.HEALTH_TIMEOUT_S)
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
