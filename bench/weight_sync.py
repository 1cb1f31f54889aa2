"""Weight sync: push every tensor of a checkpoint into a running server, three ways, and time them.

    python bench/weight_sync.py --url URL --model PATH [--repeats 2] [--bucket-bytes N] --out FILE

(a) per-parameter `VLLMClient.update_named_param`, (b) batched `update_named_params`, and (c) the
limit: a raw gloo broadcast of the same packed buckets between this process and a bare receiver
process (`--receiver`), over the same transport (a two-process group made by vLLM's
`stateless_init_torch_distributed_process_group`, as the client and the server's workers use).
The sender is the client's own bucket sender (same packing, same overlap of packing and sending);
the receiver only receives, into a fresh buffer per bucket as the server's workers must, with the
allocator setting the server gives its workers (THP_MEM_ALLOC_ENABLE=1); no weight loading.
Each path also reports the core-seconds the machine spent (`cpu_s`): on a small CPU box the
transfer alone keeps every core busy, so `cpu_s` says which work a path adds. A path is timed
until the server has loaded the last tensor: its workers hold a lock until then, and
`reset_prefix_cache` waits for that lock.

Then the weight-update stall (`stall`), drain vs keep: --rollouts streams of --rollout-tokens are running
when a batched sync starts; the time until generation makes progress again.

The tensors pushed are the checkpoint's own, so the model is unchanged: greedy output before and
after must match (`weights_intact`). Paths run interleaved, repeat by repeat, to share the noise.
Runs in its own process so that its copy of the weights is freed at the end.

With --server-pid, each sync also reports the host memory it adds: the peak RSS of the server's whole process
tree during it, above the RSS before it (`peak_extra_bytes`). --client-dir imports `vllm_client` from another
directory (an earlier commit's, against that commit's server) and --syncs-only skips (c) and the stall: how
run_all.py measures what the weight-update transaction costs against the server before it.
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import ROOT, median  # noqa: E402
from support import free_port  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=900)


def gloo_group(port, rank):
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group("127.0.0.1", port, rank, 2, backend="gloo", timeout=TIMEOUT)


def receiver(port, sizes, repeats):
    """Rank 0 (the store host, like the server's first worker): receive every bucket, `repeats` times."""
    import torch

    group = gloo_group(port, 0)
    for _ in range(repeats):
        for size in sizes:
            buffer = torch.empty(size, dtype=torch.uint8)
            group.broadcast(buffer, root=1).wait()
        group.barrier().wait()
    group.shutdown()


def raw_push(group, buckets, buffers):
    from vllm_client import _broadcast_buckets

    start = time.perf_counter()
    # the client's own sender, with its own kept buffers
    _broadcast_buckets(group, 1, buckets, buffers, lambda work: work.wait())
    group.barrier().wait()  # the receiver has everything
    return time.perf_counter() - start


def stall(url, client, named, keep, rollouts, tokens):
    """The weight-update stall: `rollouts` streams of `tokens` tokens are running when a batched sync starts
    → seconds from the sync request until generation makes progress again: with `keep`, the first token a
    frozen stream produces after the update; with drain (the default), the first token of a request sent
    right after it (the running ones had to finish first)."""
    import threading

    import requests

    streams = []

    def stream(prompt, record):
        body = {"model": client._model_id(), "prompt": prompt, "max_tokens": tokens, "temperature": 1.0,
                "ignore_eos": True, "stream": True}
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=3600) as response:
            for line in response.iter_lines():
                if line.startswith(b"data: {"):
                    record.append(time.perf_counter())

    def started(prompt, record):
        thread = threading.Thread(target=stream, args=(prompt, record))
        thread.start()
        streams.append(thread)

    records = [[] for _ in range(rollouts)]
    for i, record in enumerate(records):
        started(f"Rollout {i}: the weather in Paris is", record)
    while not all(records):  # every rollout is generating
        time.sleep(0.01)
    client.pause_mode = "keep" if keep else "wait"
    start = time.perf_counter()
    client.update_named_params(named)
    client.reset_prefix_cache()
    synced = time.perf_counter()
    if keep:
        while not any(t > synced for record in records for t in record):
            time.sleep(0.001)
        resumed = min(t for record in records for t in record if t > synced)
    else:
        fresh = []
        started("After the sync, the weather in Paris is", fresh)
        while not fresh:
            time.sleep(0.001)
        resumed = fresh[0]
    for thread in streams:
        thread.join()
    return resumed - start


def tree_rss(pid):
    import psutil

    total = 0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRSS:
    """The server tree's RSS sampled every 20 ms while the block runs; `extra`: its peak above the RSS before."""

    def __init__(self, pid):
        self.pid, self.extra = pid, None

    def __enter__(self):
        import threading

        self.before = self.peak = tree_rss(self.pid) if self.pid else 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.pid and not self.done.wait(0.02):
            self.peak = max(self.peak, tree_rss(self.pid))

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.extra = self.peak - self.before if self.pid else None


def busy_cpu_s():
    """Core-seconds the whole machine has spent busy (all processes, kernel included) so far."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url")
    parser.add_argument("--model")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bucket-bytes", type=int, default=256 << 20)
    parser.add_argument("--out")
    parser.add_argument("--receiver", action="store_true")
    parser.add_argument("--port", type=int)
    parser.add_argument("--sizes")
    parser.add_argument("--rollouts", type=int, default=32, help="streams running when the stall's sync starts")
    parser.add_argument("--rollout-tokens", type=int, default=400)
    parser.add_argument("--server-pid", type=int, help="report each sync's peak extra host memory (its tree's RSS)")
    parser.add_argument("--client-dir", help="import vllm_client from here (an earlier commit's)")
    parser.add_argument("--syncs-only", action="store_true", help="only (a) and (b): no raw push, no stall")
    args = parser.parse_args()
    if args.receiver:
        return receiver(args.port, json.loads(args.sizes), args.repeats)
    if args.client_dir:
        sys.path.insert(0, args.client_dir)

    import torch
    from safetensors.torch import load_file

    from vllm_client import VLLMClient, _buckets

    torch.set_num_threads(1)  # like a trainer's sender thread; the server gets the other core
    named = [(name, tensor) for file in sorted(pathlib.Path(args.model).glob("*.safetensors"))
             for name, tensor in load_file(file).items()]
    total_bytes = sum(t.numel() * t.element_size() for _, t in named)
    buckets = _buckets(named, args.bucket_bytes)
    sizes = [sum(t.numel() * t.element_size() for t in bucket) for bucket in buckets]

    port = free_port()
    recv = None if args.syncs_only else subprocess.Popen(
        [sys.executable, __file__, "--receiver", "--port", str(port), "--sizes", json.dumps(sizes), "--repeats",
         str(args.repeats)], cwd=str(ROOT))
    try:
        group = None if args.syncs_only else gloo_group(port, 1)
        client = VLLMClient(base_url=args.url, group_port=free_port(), connection_timeout=60)
        probe = dict(prompts=["The weather in Paris is"], temperature=0.0, max_tokens=8, logprobs=None)
        before = client.generate(**probe)["completion_ids"]
        start = time.perf_counter()
        client.init_communicator(device="cpu")
        init_s = time.perf_counter() - start

        times = {"per_param": [], "batched": []} if args.syncs_only else {"per_param": [], "batched": [], "raw": []}
        cpu, memory = {path: [] for path in times}, {path: [] for path in times}
        raw_buffers = []

        def timed(path, push):
            cpu_start = busy_cpu_s()
            with PeakRSS(args.server_pid if path != "raw" else None) as rss:
                times[path].append(push())
            cpu[path].append(busy_cpu_s() - cpu_start)
            memory[path].append(rss.extra)

        def per_param():
            start = time.perf_counter()
            for name, tensor in named:
                client.update_named_param(name, tensor)
            client.reset_prefix_cache()  # returns once the last tensor is loaded
            return time.perf_counter() - start

        def batched():
            start = time.perf_counter()
            client.update_named_params(named, bucket_bytes=args.bucket_bytes)
            client.reset_prefix_cache()
            return time.perf_counter() - start

        for _ in range(args.repeats):
            timed("per_param", per_param)
            timed("batched", batched)
            if not args.syncs_only:
                timed("raw", lambda: raw_push(group, buckets, raw_buffers))
        stalls = {"drain": [], "keep": []}
        for r in range(0 if args.syncs_only else args.repeats):  # alternating which goes first
            for mode in (("drain", "keep") if r % 2 == 0 else ("keep", "drain")):
                stalls[mode].append(stall(args.url, client, named, mode == "keep", args.rollouts, args.rollout_tokens))
        client.pause_mode = "wait"
        client.close_communicator()
        after = client.generate(**probe)["completion_ids"]
        client.close()
        if recv is not None:
            group.shutdown()
            recv.wait(60)
    finally:
        if recv is not None and recv.poll() is None:
            recv.kill()
            recv.wait()
    result = {"params": sum(t.numel() for _, t in named), "tensors": len(named), "bytes": total_bytes,
              "buckets": len(buckets), "bucket_bytes": args.bucket_bytes, "init_communicator_s": init_s,
              "times_s": times, **{f"{k}_s": median(v) for k, v in times.items()},
              "cpu_s": {k: median(v) for k, v in cpu.items()}, "cpu_count": os.cpu_count(),
              "weights_intact": before == after, "stall_s": {k: median(v) for k, v in stalls.items()},
              "stall_times_s": stalls, "rollouts": [args.rollouts, args.rollout_tokens],
              "peak_extra_bytes": {k: median(v) if None not in v else None for k, v in memory.items()}}
    result["gb_per_s"] = {k: total_bytes / 1e9 / result[f"{k}_s"] for k in times}
    text = json.dumps(result, indent=1)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # the receiver's allocator, as the server's workers
    main()
