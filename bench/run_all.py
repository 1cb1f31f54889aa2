"""Benchmark `vllm_serve.py` against stock vLLM and in-process `vllm.LLM`, side by side, in one run.

    python bench/run_all.py            # full run (~20 min on a loaded 2-core CPU box)
    python bench/run_all.py --quick    # smoke run with tiny sizes (~4 min)
    make bench ARGS=--quick

Prints a markdown table of RATIOS (absolute times on a shared machine are noise; what runs side by
side shares the noise) and writes bench/results/results.{md,json,png}; server logs go next to them.

Scenarios (numbers: flags below)
  1 chat     N concurrent single-turn chat requests, fixed max_tokens, ignore_eos: ours vs stock vLLM
             OpenAI server vs in-process LLM.generate on the same rendered prompts (the ceiling)
  2 turns    N closed-loop conversations of several turns, max_tokens per turn drawn (seeded) from
             [turn_min, turn_max]; each turn appends the reply and a new user message: ours vs stock
  3 legacy   one VLLMClient.generate of N prompts: ours (and stock) vs in-process LLM.generate
  4 latency  sequential 1-token completions, median latency: ours vs stock
  5 sync     push every weight of a ~0.5B model: per-param vs batched vs raw gloo (bench/weight_sync.py); and
             what the transaction costs (its backup and two-phase commit): the same syncs into the server
             before it (commit BASELINE, its server and client side by side), time and peak extra host memory
  6 scaling  scenario 1 on our server with --data_parallel_size 1 vs 2
  7 streams  N concurrent streamed chats: tokens/s and median time to the first content token, ours vs stock
  8 fleet    one VLLMClient over 2 of our servers (DP 1 each, each on its own core) vs over 1 server of DP 2:
             scenario 3's generate (tokens/s), and the time of one batched weight sync (gloo) into both vs into
             the one
  9 router   vLLM's router (vllm-router) in front of scenario 8's 2 servers: N closed-loop conversations (each
             first message opens with a task statement: an agent's context), each turn one VLLMClient.chat,
             through the router with policy cache_aware vs round_robin vs the client's own spreading over the
             two URLs: tokens/s and the servers' prefix-cache hit rate (their /metrics; caches reset before each
             run); and the router's own cost: scenario 1's chat and scenario 4's latency on one server through a
             router vs direct

Method: per model, every engine (ours dp1, ours dp2, stock, in-process) is started at once and stays
up for the whole phase (an idle engine takes under 1% CPU). Each scenario first warms every target, then runs
`repeats` rounds, alternating which target goes first (each one once every process of the bench is idle:
vLLM's engines busy-wait for a while after a burst), and the ratio is taken between medians. All
engines run float32, eager, the same KV-cache bytes, max_model_len, max_num_seqs (256) and
max_num_batched_tokens (4096: the LLM-class default our workers get; stock vLLM is given it too);
VLLM_ENABLE_V1_MULTIPROCESSING stays at vLLM's default (on) everywhere, the production layout.
Models are built locally (tests/tiny_model.py) into bench/.cache/models and reused: tiny (0.6M
params, overhead-bound), medium (0.11B, compute-bound: its workload is scaled by --compute-scale),
large (0.49B, weight sync only; --quick syncs the tiny one instead, reusing the running server).
"""

import argparse
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import load  # noqa: E402
from common import RESULTS, InProcess, log, median, support  # noqa: E402

PROFILES = {
    "full": dict(models="tiny,medium", repeats=3, chat_n=64, chat_tokens=64, streams_n=64, streams_tokens=64, turns_n=16, turns=4, turn_min=8,
                 turn_max=128, legacy_n=256, legacy_tokens=32, latency_n=50, sync_model="large", sync_repeats=2,
                 compute_scale=0.375, router_n=32),
    "quick": dict(models="tiny", repeats=1, chat_n=16, chat_tokens=16, streams_n=16, streams_tokens=16, turns_n=8, turns=3, turn_min=8,
                  turn_max=32, legacy_n=64, legacy_tokens=8, latency_n=10, sync_model="tiny", sync_repeats=1,
                  compute_scale=0.375, router_n=8),
}
SCENARIOS = ("chat", "turns", "legacy", "latency", "sync", "scaling", "streams", "fleet", "router")
KV_BYTES = {"tiny": 256 << 20, "small": 256 << 20, "medium": 1 << 30, "large": 2 << 30}  # large: 32 x 512 tokens
MAX_MODEL_LEN = 2048
SYNC_MAX_MODEL_LEN = 512  # the stall's rollouts: a short prompt and 400 tokens
TARGETS = {"ours": "ours dp1", "ours_dp2": "ours dp2", "stock": "stock vLLM", "inprocess": "in-process LLM",
           "fleet_a": "ours dp1 (core 0)", "fleet_b": "ours dp1 (core 1)", "fleet": "2 x ours dp1",
           "cache_aware": "router cache_aware → 2 x ours dp1", "round_robin": "router round_robin → 2 x ours dp1",
           "spread": "VLLMClient spreading → 2 x ours dp1", "direct": "ours dp1, direct",
           "routed": "router → ours dp1"}
ROUTER_TASK_WORDS = (80, 160)  # scenario 9's task statement: 2-3 of vLLM's 128-token CPU cache blocks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few minutes")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    parser.add_argument("--replot", action="store_true", help="only redraw results.png from results.json")
    add = lambda name, kind, help: parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind,  # noqa
                                                       help=f"{help} (full: {PROFILES['full'][name]}, "
                                                            f"quick: {PROFILES['quick'][name]})")
    add("models", str, "comma-separated models for scenarios 1-4 and 6, of " + ",".join(common.MODEL_SPECS))
    add("repeats", int, "measured rounds per scenario and target")
    add("chat_n", int, "[1,6] concurrent chat requests")
    add("chat_tokens", int, "[1,6] max_tokens per chat request")
    add("streams_n", int, "[7] concurrent streamed chats")
    add("streams_tokens", int, "[7] max_tokens per streamed chat")
    add("turns_n", int, "[2] concurrent conversations")
    add("turns", int, "[2] turns per conversation")
    add("turn_min", int, "[2] smallest max_tokens of a turn")
    add("turn_max", int, "[2] largest max_tokens of a turn")
    add("legacy_n", int, "[3] prompts in the one VLLMClient.generate call")
    add("legacy_tokens", int, "[3] max_tokens per prompt")
    add("latency_n", int, "[4] sequential 1-token requests")
    add("sync_model", str, "[5] model whose weights are pushed")
    add("sync_repeats", int, "[5] rounds of each weight-sync path")
    add("router_n", int, "[9] concurrent conversations (their turns: the --turn* sizes)")
    add("compute_scale", float, "[1-4,6] on models other than tiny, request counts and token lengths are "
        "multiplied by this (a 0.1B model decodes ~100 tokens/s on 2 cores)")
    args = parser.parse_args(argv)
    for key, value in PROFILES["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m for m in args.models.split(",") if m]
    args.only = [s for s in args.only.split(",") if s]
    for name in [*args.models, args.sync_model]:
        if name not in common.MODEL_SPECS:
            parser.error(f"unknown model {name!r}; one of {', '.join(common.MODEL_SPECS)}")
    if unknown := set(args.only) - set(SCENARIOS):
        parser.error(f"unknown scenarios {sorted(unknown)}")
    return args


# ------------------------------------------------------------------------------------------------
# Rounds: warm every target, then `repeats` rounds in rotating order
# ------------------------------------------------------------------------------------------------


def rounds(name, targets, run, repeats, warmup=None):
    """targets: {key: target}; run(key, target) → metrics dict. → {key: [metrics per round]}."""
    out = {key: [] for key in targets}
    start = time.monotonic()
    for key, target in targets.items():
        (warmup or run)(key, target)
    keys = list(targets)
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            common.settle()  # the previous target's engines stop spinning first
            out[key].append(run(key, targets[key]))
        shown = {k: next(out[k][-1][f] for f in ("tokens_per_s", "p50_s", "wall_s") if f in out[k][-1]) for k in keys}
        log(f"{name} round {r + 1}/{repeats}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    log(f"{name} done in {time.monotonic() - start:.0f} s")
    return out


def summarize(per_round, fields):
    """Median over rounds of each field a target reports."""
    return {key: {f: median([m[f] for m in ms]) for f in fields if f in ms[0]} for key, ms in per_round.items() if ms}


# ------------------------------------------------------------------------------------------------
# Scenarios 1-4 and 6 on one model
# ------------------------------------------------------------------------------------------------


SIZED = ("chat_n", "chat_tokens", "streams_n", "streams_tokens", "turns_n", "turn_min", "turn_max", "legacy_n", "legacy_tokens")


def workload(args, model_name):
    """The sizes for this model: as given on tiny, scaled by --compute-scale on bigger ones."""
    scale = 1.0 if model_name == "tiny" else args.compute_scale
    return argparse.Namespace(**{**vars(args), **{k: max(1, round(getattr(args, k) * scale)) for k in SIZED}})


def run_model_phase(model_name, args, results):
    args = workload(args, model_name)
    path = common.model_path(model_name)
    kv, want = KV_BYTES[model_name], set(args.only)
    procs = {}
    if want & {"chat", "turns", "legacy", "latency", "scaling", "streams", "router"} or args.sync_model == model_name:
        procs["ours"] = common.server("ours", path, max_model_len=MAX_MODEL_LEN, kv_bytes=kv)
    if want & {"chat", "turns", "legacy", "latency", "streams"}:
        procs["stock"] = common.server("stock", path, max_model_len=MAX_MODEL_LEN, kv_bytes=kv)
    if want & {"chat", "legacy"}:
        procs["inprocess"] = InProcess(path, max_model_len=MAX_MODEL_LEN, kv_bytes=kv)
    if want & {"scaling", "fleet"}:
        procs["ours_dp2"] = common.server("ours", path, max_model_len=MAX_MODEL_LEN, kv_bytes=kv, dp=2)
    if want & {"fleet", "router"}:  # two servers, each on its own core as the DP-2 server puts its replicas (unpinned, both
        # bind their OpenMP threads to every core, and the fleet ran at 0.52x of DP 2 on the medium model)
        for i, key in enumerate(("fleet_a", "fleet_b")):
            procs[key] = common.server("ours", path, max_model_len=MAX_MODEL_LEN, kv_bytes=kv, name=key.replace("_", "-"),
                                       env={"VLLM_CPU_OMP_THREADS_BIND": str(i % os.cpu_count())})
    phase = results["models"].setdefault(model_name, {"params": common.param_count(path), "scenarios": {},
                                                      "sizes": {k: getattr(args, k) for k in SIZED}})
    log(f"phase {model_name} ({phase['params'] / 1e6:.1f}M params): starting {', '.join(procs)}")
    common.start_all(list(procs.values()))
    try:
        phase["startup_s"] = {k: p.startup_s for k, p in procs.items()}
        scenarios = phase["scenarios"]
        convs = load.conversations(args.chat_n)

        if want & {"chat", "scaling"}:
            targets = {k: p for k, p in procs.items() if k in ("ours", "stock", "inprocess") and "chat" in want
                       or k in ("ours", "ours_dp2") and "scaling" in want}

            def chat(key, target, n_tokens=args.chat_tokens):
                if key == "inprocess":
                    r = target.call(conversations=convs, max_tokens=n_tokens, temperature=1.0, ignore_eos=True)
                    # all requests start together and end on the same step: latency = wall time
                    return {"tokens_per_s": r["completion_tokens"] / r["seconds"], "p50_s": r["seconds"],
                            "p99_s": r["seconds"], "wall_s": r["seconds"], "completion_tokens": r["completion_tokens"]}
                return load.chat_burst(target.url, convs, n_tokens)

            scenarios["chat"] = guarded(lambda: rounds(f"chat/{model_name}", targets, chat, args.repeats,
                                                       warmup=lambda k, t: chat(k, t, min(4, args.chat_tokens))),
                                        f"chat on {model_name}")

        if "streams" in want:
            stream_convs = load.conversations(args.streams_n, seed=3)
            targets = {k: procs[k] for k in ("ours", "stock")}
            scenarios["streams"] = guarded(lambda: rounds(
                f"streams/{model_name}", targets, lambda k, t: load.stream_burst(t.url, stream_convs, args.streams_tokens),
                args.repeats, warmup=lambda k, t: load.stream_burst(t.url, stream_convs, 2)), f"streams on {model_name}")

        if "turns" in want:
            plan = load.turn_plan(args.turns_n, args.turns, args.turn_min, args.turn_max)
            targets = {k: procs[k] for k in ("ours", "stock")}
            warm_plan = load.turn_plan(args.turns_n, 2, 2, 4, seed=1)
            scenarios["turns"] = guarded(lambda: rounds(f"multi-turn/{model_name}", targets, lambda k, t: load.multi_turn(t.url, plan), args.repeats,
                                                        warmup=lambda k, t: load.multi_turn(t.url, warm_plan)),
                                         f"multi-turn on {model_name}")

        if "legacy" in want:
            prompts = load.plain_prompts(args.legacy_n)
            targets = {k: procs[k] for k in ("ours", "stock", "inprocess")}

            def legacy(key, target, n_tokens=args.legacy_tokens):
                if key == "inprocess":
                    r = target.call(prompts=prompts, max_tokens=n_tokens, temperature=1.0, ignore_eos=True, logprobs=0)
                    return {"tokens_per_s": r["completion_tokens"] / r["seconds"], "wall_s": r["seconds"]}
                return client_generate(key, target.url, prompts, n_tokens)

            scenarios["legacy"] = guarded(lambda: rounds(f"legacy/{model_name}", targets, legacy, args.repeats,
                                                         warmup=lambda k, t: legacy(k, t, 2)),
                                          f"legacy generate on {model_name}")

        if "latency" in want:
            targets = {k: procs[k] for k in ("ours", "stock")}
            scenarios["latency"] = guarded(lambda: rounds(f"latency/{model_name}", targets, lambda k, t: load.sequential_latency(t.url, args.latency_n),
                                                          args.repeats, warmup=lambda k, t: load.sequential_latency(t.url, 3)),
                                           f"latency on {model_name}")

        if "fleet" in want:
            scenarios.update(run_fleet(model_name, path, {"fleet": [procs["fleet_a"].url, procs["fleet_b"].url],
                                                          "ours_dp2": [procs["ours_dp2"].url]}, args))

        if "router" in want:
            scenarios.update(run_router(model_name, path, procs, args))

        if "sync" in want and args.sync_model == model_name:
            results["sync"] = run_sync(procs["ours"], path, args)
    finally:
        common.stop_all(list(procs.values()))
        phase["stop_s"] = {k: p.stop_s for k, p in procs.items()}
        phase["left_behind"] = {k: len(p.left_behind) for k, p in procs.items()}


def run_fleet(model_name, path, targets, args):
    """Scenario 8: targets {key: [urls]}, driven by one VLLMClient each. → {"fleet": rounds, "fleet_sync": rounds}."""
    from vllm_client import VLLMClient

    prompts, named = load.plain_prompts(args.legacy_n), support.checkpoint(path)

    def generate(key, urls, n_tokens=args.legacy_tokens):
        return client_generate(key, urls, prompts, n_tokens)

    def sync(key, urls):
        with VLLMClient(base_url=urls, group_port=support.free_port()) as client:
            client.init_communicator(device="cpu")
            start = time.perf_counter()
            client.update_named_params(named)
            wall = time.perf_counter() - start
            client.close_communicator()
        return {"wall_s": wall}

    return {"fleet": guarded(lambda: rounds(f"fleet/{model_name}", targets, generate, args.repeats,
                                            warmup=lambda k, t: generate(k, t, 2)), f"fleet on {model_name}"),
            "fleet_sync": guarded(lambda: rounds(f"fleet sync/{model_name}", targets, sync, args.repeats),
                                  f"fleet weight sync on {model_name}")}


def run_router(model_name, path, procs, args):
    """Scenario 9: vLLM's router in front of our servers. → {"router": rounds (conversations over the fleet),
    "router_chat", "router_latency": rounds (one server, through a router vs direct)}."""
    from transformers import AutoTokenizer

    fleet = [procs["fleet_a"].url, procs["fleet_b"].url]
    routers = {policy: support.Router(fleet, log_dir=RESULTS, policy=policy) for policy in ("cache_aware", "round_robin")}
    routers["routed"] = support.Router([procs["ours"].url], log_dir=RESULTS, policy="round_robin")
    try:
        for router in routers.values():
            router.start(common.HEALTH_TIMEOUT_S)
        tokenizer = AutoTokenizer.from_pretrained(path)
        plan = load.turn_plan(args.router_n, args.turns, args.turn_min, args.turn_max, seed=9, task=ROUTER_TASK_WORDS)
        warm = load.turn_plan(args.router_n, 2, 2, 4, seed=10, task=ROUTER_TASK_WORDS)
        targets = {"cache_aware": routers["cache_aware"].url, "round_robin": routers["round_robin"].url,
                   "spread": fleet}
        talk = lambda key, url, plan=plan: client_turns(url, plan, tokenizer, fleet)  # noqa: E731
        out = {"router": guarded(lambda: rounds(f"router/{model_name}", targets, talk, args.repeats,
                                                warmup=lambda k, url: talk(k, url, warm)), f"router on {model_name}")}
        one = {"direct": procs["ours"].url, "routed": routers["routed"].url}
        convs = load.conversations(args.chat_n)
        out["router_chat"] = guarded(lambda: rounds(
            f"router chat/{model_name}", one, lambda k, url: load.chat_burst(url, convs, args.chat_tokens),
            args.repeats, warmup=lambda k, url: load.chat_burst(url, convs, min(4, args.chat_tokens))),
            f"router chat on {model_name}")
        out["router_latency"] = guarded(lambda: rounds(
            f"router latency/{model_name}", one, lambda k, url: load.sequential_latency(url, args.latency_n),
            args.repeats, warmup=lambda k, url: load.sequential_latency(url, 3)), f"router latency on {model_name}")
        return out
    finally:
        for router in routers.values():
            router.stop()


def client_turns(base_url, plan, tokenizer, fleet):
    """Scenario 2's closed-loop conversations through one VLLMClient (a thread per conversation, a `chat` call
    per turn, its reply decoded into the next turn), so that every target of scenario 9 runs the same client
    code. → tokens/s, wall time and the fleet's prefix-cache hit rate over the run."""
    from concurrent.futures import ThreadPoolExecutor

    from vllm_client import VLLMClient

    with VLLMClient(base_url=base_url, max_concurrent_chats=len(plan)) as client:
        def conversation(item):
            messages, tokens = list(item["messages"]), 0
            for turn, max_tokens in enumerate(item["max_tokens"]):
                ids = client.chat([messages], max_tokens=max_tokens, temperature=1.0,
                                  generation_kwargs={"ignore_eos": True})["completion_ids"][0]
                tokens += len(ids)
                messages.append({"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)})
                if turn < len(item["followups"]):
                    messages.append({"role": "user", "content": item["followups"][turn]})
            return tokens

        with VLLMClient(base_url=fleet) as each:
            each.reset_prefix_cache()  # every run starts cold: each round replays the same first turns
        before = load.prefix_cache(fleet)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(plan)) as pool:
            tokens = sum(pool.map(conversation, plan))
        wall = time.perf_counter() - start
    hits, queries = (after - then for after, then in zip(load.prefix_cache(fleet), before))
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens,
            "hit_rate": hits / queries if queries else 0.0}


def client_generate(key, base_url, prompts, n_tokens):
    """One VLLMClient.generate of `prompts` (scenarios 3 and 8) → its tokens/s and wall time."""
    from vllm_client import VLLMClient

    with VLLMClient(base_url=base_url) as client:
        start = time.perf_counter()
        out = client.generate(prompts, max_tokens=n_tokens, generation_kwargs={"ignore_eos": True})
        wall = time.perf_counter() - start
    tokens = sum(len(ids) for ids in out["completion_ids"])
    assert tokens == len(prompts) * n_tokens, f"{key}: {tokens} tokens"
    return {"tokens_per_s": tokens / wall, "wall_s": wall}


def guarded(fn, what):
    """A failing scenario is recorded and reported; the others still run."""
    try:
        return fn()
    except Exception as exc:
        log(f"FAILED {what}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


# ------------------------------------------------------------------------------------------------
# Scenario 5: weight sync, in a subprocess (it holds a full copy of the weights)
# ------------------------------------------------------------------------------------------------


BASELINE = "4413858"  # the server before a weight update became a transaction (issue 23): what it costs


def run_sync(server, path, args, name="weight_sync", extra=()):
    out = RESULTS / f"{name}.json"
    out.unlink(missing_ok=True)
    log(f"{name}: {common.param_count(path) / 1e6:.1f}M params, {args.sync_repeats} round(s) per path")
    cmd = [sys.executable, str(common.BENCH / "weight_sync.py"), "--url", server.url, "--model", path,
           "--repeats", str(args.sync_repeats), "--out", str(out), "--server-pid", str(server.proc.pid), *extra]
    with open(RESULTS / f"{name}.log", "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(common.ROOT), timeout=3600)
    if proc.returncode != 0 or not out.exists():
        log(f"FAILED {name} (exit {proc.returncode}); see {RESULTS / f'{name}.log'}")
        return {"error": f"exit {proc.returncode}: {common.tail(RESULTS / f'{name}.log', 15)}"}
    result = json.loads(out.read_text())
    result["model"] = args.sync_model
    return result


# BASELINE runs with today's settings of vLLM's message queues (vllm_serve.quiet_queues, run where the
# baseline's module-level code runs in every process), so that the ratio is the transaction's alone
BASELINE_QUEUES = """
from vllm.distributed.device_communicators import shm_broadcast as _queues  # added by bench/run_all.py
from vllm.platforms import current_platform as _platform

_queues.SHM_READER_RECHECK_INTERVAL_MS = {recheck}
if _platform.is_cpu():
    _queues.SpinCondition.__init__.__defaults__ = ({spin},)

"""


def baseline_files():
    """BASELINE's vllm_serve.py and vllm_client.py, from git, in their own directory → that directory."""
    import re

    where = RESULTS / f"baseline-{BASELINE}"
    where.mkdir(parents=True, exist_ok=True)
    ours = (common.ROOT / "vllm_serve.py").read_text()
    queues = BASELINE_QUEUES.format(**{key: re.search(rf"^QUEUE_{key.upper()}_\w* = ([\d.]+)", ours, re.M).group(1)
                                       for key in ("recheck", "spin")})
    for name in ("vllm_serve.py", "vllm_client.py"):
        text = subprocess.run(["git", "show", f"{BASELINE}:{name}"], cwd=str(common.ROOT), capture_output=True,
                              text=True, check=True).stdout
        if name == "vllm_serve.py":
            head, main = text.rsplit('\nif __name__ == "__main__":', 1)
            text = f'{head}\n{queues}\nif __name__ == "__main__":{main}'
        (where / name).write_text(text)
    return where


def run_sync_phase(args, results):
    path = common.model_path(args.sync_model)
    for key, script, extra in (("sync", None, ()), ("sync_baseline", "baseline", ("--syncs-only",))):
        where = baseline_files() if script else None
        server = common.server("ours", path, max_model_len=SYNC_MAX_MODEL_LEN, kv_bytes=KV_BYTES[args.sync_model],
                               script=where / "vllm_serve.py" if where else None, name=key)
        log(f"phase weight sync on {args.sync_model}: starting {'the ' + BASELINE if where else 'our'} server")
        common.start_all([server])
        try:
            results[key] = guarded(lambda: run_sync(server, path, args, key, [*extra, *(
                ["--client-dir", str(where)] if where else [])]), key)
            results[key]["startup_s"] = server.startup_s
        finally:
            common.stop_all([server])


# ------------------------------------------------------------------------------------------------
# Report: ratio rows → markdown table, JSON, PNG
# ------------------------------------------------------------------------------------------------


def ratio_rows(results):
    """[{scenario, model, metric, ratio, target, better}] with ratio = ours relative to the reference."""
    rows = []

    def add(scenario, model, metric, num, den, target=None, better="higher"):
        if num is None or den is None or not den:
            return
        ratio = num / den
        ok = None if target is None else (ratio >= target if better == "higher" else ratio <= target)
        rows.append({"scenario": scenario, "model": model, "metric": metric, "ratio": ratio, "target": target,
                     "better": better, "ok": ok})

    for model, phase in results["models"].items():
        s = phase["scenarios"]
        med = {name: summarize(v, ("tokens_per_s", "p50_s", "p99_s", "wall_s")) for name, v in s.items()
               if name in ("chat", "legacy") and "error" not in v}
        med |= {name: summarize(v, ("tokens_per_s", "wall_s")) for name, v in s.items()
                if name == "turns" and "error" not in v}
        med |= {name: summarize(v, ("p50_s", "p99_s")) for name, v in s.items() if name == "latency" and "error" not in v}
        med |= {name: summarize(v, ("tokens_per_s", "wall_s")) for name, v in s.items()
                if name in ("fleet", "fleet_sync") and "error" not in v}
        med |= {name: summarize(v, ("tokens_per_s", "ttft_p50_s")) for name, v in s.items()
                if name == "streams" and "error" not in v}
        med |= {name: summarize(v, ("tokens_per_s", "hit_rate", "p50_s")) for name, v in s.items()
                if name in ("router", "router_chat", "router_latency") and "error" not in v}
        get = lambda name, key, field: med.get(name, {}).get(key, {}).get(field)  # noqa: E731
        add("1 chat", model, "tokens/s ours / stock", get("chat", "ours", "tokens_per_s"),
            get("chat", "stock", "tokens_per_s"), 0.97)
        add("1 chat", model, "tokens/s ours / in-process", get("chat", "ours", "tokens_per_s"),
            get("chat", "inprocess", "tokens_per_s"), 0.9)
        add("1 chat", model, "p50 latency ours / stock", get("chat", "ours", "p50_s"), get("chat", "stock", "p50_s"),
            better="lower")
        add("1 chat", model, "p99 latency ours / stock", get("chat", "ours", "p99_s"), get("chat", "stock", "p99_s"),
            better="lower")
        add("2 multi-turn", model, "tokens/s ours / stock", get("turns", "ours", "tokens_per_s"),
            get("turns", "stock", "tokens_per_s"), 0.97)
        add("2 multi-turn", model, "wall time ours / stock", get("turns", "ours", "wall_s"),
            get("turns", "stock", "wall_s"), better="lower")
        add("3 legacy generate", model, "tokens/s ours / in-process", get("legacy", "ours", "tokens_per_s"),
            get("legacy", "inprocess", "tokens_per_s"), 0.9)
        add("3 legacy generate", model, "tokens/s stock / in-process", get("legacy", "stock", "tokens_per_s"),
            get("legacy", "inprocess", "tokens_per_s"))
        add("4 per-request latency", model, "median ours / stock", get("latency", "ours", "p50_s"),
            get("latency", "stock", "p50_s"), 1.0, better="lower")
        add("4 per-request latency", model, "p99 ours / stock", get("latency", "ours", "p99_s"),
            get("latency", "stock", "p99_s"), better="lower")
        add("7 streams", model, "tokens/s ours / stock", get("streams", "ours", "tokens_per_s"),
            get("streams", "stock", "tokens_per_s"), 0.97)
        add("7 streams", model, "time to first token p50 ours / stock", get("streams", "ours", "ttft_p50_s"),
            get("streams", "stock", "ttft_p50_s"), 1.1, better="lower")
        add("6 scaling", model, "chat tokens/s dp2 / dp1", get("chat", "ours_dp2", "tokens_per_s"),
            get("chat", "ours", "tokens_per_s"))
        add("8 many servers", model, "generate tokens/s, 2 servers x dp1 / 1 server x dp2",
            get("fleet", "fleet", "tokens_per_s"), get("fleet", "ours_dp2", "tokens_per_s"))
        add("8 many servers", model, "weight sync time, 2 servers x dp1 / 1 server x dp2",
            get("fleet_sync", "fleet", "wall_s"), get("fleet_sync", "ours_dp2", "wall_s"), better="lower")
        hit = lambda key: get("router", key, "hit_rate")  # noqa: E731
        for num, den in (("cache_aware", "spread"), ("round_robin", "spread"), ("cache_aware", "round_robin")):
            names = [TARGETS[key].split(" → ")[0] for key in (num, den)]
            add("9 router", model, f"conversations tokens/s, {names[0]} / {names[1]}",
                get("router", num, "tokens_per_s"), get("router", den, "tokens_per_s"))
            if None not in (hit(num), hit(den)):
                add("9 router", model, f"prefix-cache hit rate, {names[0]} / {names[1]} "
                    f"({hit(num):.0%} / {hit(den):.0%})", hit(num), hit(den))
        add("9 router", model, "one server, chat tokens/s: through a router / direct",
            get("router_chat", "routed", "tokens_per_s"), get("router_chat", "direct", "tokens_per_s"))
        add("9 router", model, "one server, latency median: through a router / direct",
            get("router_latency", "routed", "p50_s"), get("router_latency", "direct", "p50_s"), better="lower")
    sync = results.get("sync")
    if sync and "error" not in sync:
        label = f"{sync['model']} ({sync['params'] / 1e6:.1f}M)"
        add("5 weight sync", label, "batched: raw time / path time", sync["raw_s"], sync["batched_s"], 0.7)
        add("5 weight sync", label, "per-param: raw time / path time", sync["raw_s"], sync["per_param_s"])
        if "stall_s" in sync:
            add("5 weight sync", label, "stall, drain / raw time", sync["stall_s"]["drain"], sync["raw_s"],
                better="lower")
            add("5 weight sync", label, "stall, keep / raw time", sync["stall_s"]["keep"], sync["raw_s"],
                better="lower")
        before = results.get("sync_baseline")
        if before and "error" not in before:
            for path in ("batched", "per_param"):
                add("5 weight sync", label, f"{path} time, transaction / {BASELINE}", sync[f"{path}_s"],
                    before[f"{path}_s"], better="lower")
                extra = (sync.get("peak_extra_bytes") or {}).get(path), (before.get("peak_extra_bytes") or {}).get(path)
                if None not in extra:
                    add("5 weight sync", label, f"{path} peak extra host memory, transaction / {BASELINE} "
                        f"({extra[0] / 2**30:.2f} / {extra[1] / 2**30:.2f} GiB)", max(extra[0], 1), max(extra[1], 1),
                        better="lower")
    return rows


def fmt_target(row):
    if row["target"] is None:
        return "info (" + ("higher" if row["better"] == "higher" else "lower") + " is better)"
    return ("≥ " if row["better"] == "higher" else "≤ ") + f"{row['target']:g}x"


def markdown(results, rows):
    lines = ["| Scenario | Model | Ratio | Value | Target | |", "|---|---|---|---:|---|---|"]
    for r in rows:
        mark = "" if r["ok"] is None else ("ok" if r["ok"] else "**MISS**")
        lines.append(f"| {r['scenario']} | {r['model']} | {r['metric']} | {r['ratio']:.2f}x | {fmt_target(r)} | {mark} |")
    errors = [f"- {model} / {name}: {v['error']}" for model, phase in results["models"].items()
              for name, v in phase["scenarios"].items() if "error" in v]
    if results.get("sync", {}).get("error"):
        errors.append(f"- weight sync: {results['sync']['error']}")
    return "\n".join(lines + (["", "Failed scenarios:", *errors] if errors else []))


def details(results):
    """Absolute numbers (noisy: for context only) and process facts."""
    lines = ["| Model | Scenario | Target | tokens/s | p50 s | p99 s | wall s |", "|---|---|---|---:|---:|---:|---:|"]
    for model, phase in results["models"].items():
        for name, per_round in phase["scenarios"].items():
            if "error" in per_round:
                continue
            for key, ms in per_round.items():
                m = lambda f: f"{median([x[f] for x in ms]):.3f}" if ms and f in ms[0] else ""  # noqa: E731
                lines.append(f"| {model} | {name} | {TARGETS[key]} | {m('tokens_per_s')} | {m('p50_s')} | "
                             f"{m('p99_s')} | {m('wall_s')} |")
    lines.append("")
    for model, phase in results["models"].items():
        fmt = lambda d: ", ".join(f"{TARGETS[k]} {v:.0f} s" for k, v in d.items() if v is not None)  # noqa: E731
        sizes = ", ".join(f"{k}={v}" for k, v in phase.get("sizes", {}).items())
        lines.append(f"- {model} ({phase['params'] / 1e6:.1f}M params; {sizes}): startup "
                     f"{fmt(phase.get('startup_s', {}))}; stop after SIGTERM {fmt(phase.get('stop_s', {}))}")
        conversations = phase["scenarios"].get("router", {})
        if conversations and "error" not in conversations:
            lines.append("  - scenario 9, prefix-cache hit rate (median): " + ", ".join(
                f"{TARGETS[k]} {median([m['hit_rate'] for m in ms]):.1%}" for k, ms in conversations.items()))
        left = {TARGETS[k]: n for k, n in phase.get("left_behind", {}).items() if n}
        if left:
            lines.append(f"  - processes still alive after SIGTERM + exit, killed by the benchmark: {left}")
    sync = results.get("sync")
    if sync and "error" not in sync:
        lines.append(f"- weight sync {sync['model']}: {sync['params'] / 1e6:.1f}M params, {sync['bytes'] / 1e9:.2f} GB "
                     f"in {sync['tensors']} tensors / {sync['buckets']} bucket(s) of {sync['bucket_bytes'] >> 20} MiB; "
                     f"per-param {sync['per_param_s']:.2f} s, batched {sync['batched_s']:.2f} s, "
                     f"raw gloo {sync['raw_s']:.2f} s; weights intact after sync: {sync['weights_intact']}")
        if "cpu_s" in sync:
            cpu = sync["cpu_s"]
            lines.append(f"  - busy core-seconds of the whole machine ({sync['cpu_count']} cores): per-param "
                         f"{cpu['per_param']:.1f}, batched {cpu['batched']:.1f}, raw gloo {cpu['raw']:.1f}")
    return "\n".join(lines)


def plot(rows, path):
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator

    # a log axis has no 0 (a scenario that produced nothing: the table still shows it)
    rows = sorted((r for r in rows if r["ratio"] > 0), key=lambda r: int(r["scenario"].split()[0]))
    if not rows:
        return
    # Log axis centred on 1: a 200x stall and a 0.9x miss both stay readable, and 2x is as long as 1/2x
    extreme = max(max(v, 1 / v) for r in rows for v in (r["ratio"], r["target"] or 1))
    limit = 10 ** (1.15 * math.log10(extreme) + 0.1)  # room for the value beyond the longest bar
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, ax = plt.subplots(figsize=(12, 0.27 * (len(rows) + 1.5 * len(scenarios)) + 1.6))
    y, ticks, labels = 0.0, [], []
    for g, scenario in enumerate(scenarios):
        top = y
        ax.text(0.005, y, scenario, transform=ax.get_yaxis_transform(), fontweight="bold", fontsize=9, va="center")
        for r in (r for r in rows if r["scenario"] == scenario):
            y += 1
            color, text = ("tab:gray", "black") if r["ok"] is None else ("tab:green", "darkgreen") if r["ok"] \
                else ("tab:red", "firebrick")
            ax.barh(y, r["ratio"] - 1, left=1, height=0.7, color=color)
            if r["target"] is not None:
                ax.plot(r["target"], y, marker="|", markersize=13, mew=2.5, color="black", zorder=3)
            # the value goes beyond both the bar and the target tick, on the bar's side of 1, in the bar's
            # colour: a bar near 1x is too thin to show its own
            right = r["ratio"] >= 1
            x = (max if right else min)(r["ratio"], r["target"] or r["ratio"])
            ax.annotate(f"{r['ratio']:.2f}x", (x, y), xytext=(5 if right else -5, 0), textcoords="offset points",
                        ha="left" if right else "right", va="center", fontsize=8, color=text,
                        fontweight="normal" if r["ok"] is None else "bold")
            ticks.append(y)
            labels.append(f"{r['metric']} [{r['model']}], {fmt_target(r)}")
        if g % 2 == 0:  # alternate shading: where one scenario ends is seen without reading
            ax.axhspan(top - 0.5, y + 0.5, color="0.93", zorder=0)
        y += 1.5
    ax.set_ylim(y - 1, -0.5)
    ax.set_xscale("log")
    ax.set_xlim(1 / limit, limit)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_locator(LogLocator(subs=(2, 5)))
    ax.grid(axis="x", which="both", color="0.8", linewidth=0.5)
    ax.set_axisbelow(True)
    ax.axvline(1.0, color="0.3", linewidth=1)
    ax.set_yticks(ticks, labels, fontsize=7.5)
    ax.tick_params(axis="y", length=0)
    ax.legend([Patch(color="tab:green"), Patch(color="tab:red"), Patch(color="tab:gray"),
               Line2D([], [], marker="|", markersize=11, mew=2.5, color="black", linestyle="")],
              ["meets its target", "misses its target", "no target (info)", "target"], loc="lower right", fontsize=8)
    ax.set_xlabel("ratio, log scale (1x: parity with the reference; ≥ / ≤ in a label: which side is better)")
    ax.set_title("vllm_serve.py relative to its references")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # tight_layout alone clips the longest labels at 110 dpi
    plt.close(fig)


def environment():
    import psutil

    try:
        version = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                                 text=True, timeout=120).stdout.strip()
    except subprocess.SubprocessError:
        version = None
    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "load_avg": os.getloadavg(), "python": platform.python_version(), "vllm": version,
            "platform": platform.platform(), "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                    capture_output=True, text=True,
                                                                    cwd=common.ROOT).stdout.strip()}


def main(argv=None):
    args = parse_args(argv)
    if vars(args).pop("replot"):  # popped: not a setting of a run, so not in its config
        plot(ratio_rows(json.loads((RESULTS / "results.json").read_text())), RESULTS / "results.png")
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: every server gets stopped
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = {"config": {k: v for k, v in vars(args).items()}, "environment": environment(), "models": {}}
    log(f"{'quick' if args.quick else 'full'} run: models {args.models}, scenarios {args.only}")
    try:
        for model in args.models:
            if set(args.only) - {"sync"} or args.sync_model == model:
                run_model_phase(model, args, results)
        if "sync" in args.only and "sync" not in results:
            run_sync_phase(args, results)
    finally:
        results["elapsed_s"] = time.monotonic() - started
        (RESULTS / "results.json").write_text(json.dumps(results, indent=1, default=str))  # raw data first
        report(args, results)


def report(args, results):
    rows = results["ratios"] = ratio_rows(results)
    table = markdown(results, rows)
    title = f"# Benchmark ({'quick' if args.quick else 'full'} run, {results['elapsed_s'] / 60:.1f} min)"
    note = ("Quick run: sizes are for a smoke test; its ratios (weight sync above all, on a 2 MB model) say "
            "little.\n\n" if args.quick else "")
    cfg = ", ".join(f"{k}={v}" for k, v in results["config"].items())
    (RESULTS / "results.md").write_text(f"{title}\n\n{note}{table}\n\n## Absolute numbers (noisy)\n\n"
                                        f"{details(results)}\n\nConfig: {cfg}\n\nEnvironment: {results['environment']}\n")
    (RESULTS / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(rows, RESULTS / "results.png")
    print(f"\n{title}\n\n{note}{table}\n")
    log(f"wrote {RESULTS / 'results.md'}, results.json, results.png in {results['elapsed_s']:.0f} s")

if __name__ == "__main__":
    main()
