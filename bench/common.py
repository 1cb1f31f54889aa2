"""Shared pieces of the benchmark: paths, model cache, the engines it runs side by side, statistics.

Servers are tests/support.py's `Server` (our `vllm_serve.py` or stock vLLM on a free loopback port,
stopped by PID with whatever it left behind killed); `InProcess` is the in-process ceiling.
"""

import json
import os
import pathlib
import select
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # support.py and tiny_model.py: one copy, shared with the tests

import support  # noqa: E402  (sets vLLM's offline, loopback environment)

# VLLM_ENABLE_V1_MULTIPROCESSING is left at vLLM's default (on) for every engine, ours, stock and
# in-process alike: the engine core in its own process is the production layout.
os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)

HEALTH_TIMEOUT_S = 900  # cold start of the biggest model on a loaded 2-core machine

# Engine settings shared by every engine of a run. max_num_seqs / max_num_batched_tokens are pinned
# because vLLM's CPU defaults differ between the LLM class (256 / 4096, what our workers and the
# in-process reference get) and the OpenAI server (128 / 2048): stock gets the LLM-class values.
IDLE_CORES = 0.25  # every target's processes together below this (in cores, idle engines included)...
IDLE_WINDOW_S = 0.5  # ...over this window: the machine is quiet enough for the next measurement
IDLE_TIMEOUT_S = 60  # give up waiting (and say so) after this
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 4096


# ------------------------------------------------------------------------------------------------
# Models: built locally with tests/tiny_model.py, cached under bench/.cache/models
# ------------------------------------------------------------------------------------------------

MODEL_SPECS = {  # name → tiny_model.build kwargs
    "tiny": dict(hidden_size=128, num_layers=2),
    "small": dict(hidden_size=256, num_layers=4, intermediate_size=1024),  # weight sync in --quick (~3.7M)
    "medium": dict(hidden_size=768, num_layers=12, intermediate_size=3072),  # ~0.1B: compute matters
    "large": dict(hidden_size=1024, num_layers=24, intermediate_size=5632),  # ~0.5B: weight sync
}


def model_path(name):
    """Build the model on first use (into a temp dir, renamed when complete); reuse it afterwards."""
    spec = {"seed": 0, "tied": False, **MODEL_SPECS[name]}
    out = CACHE / "models" / name
    stamp = out / "bench_spec.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return str(out)
    import tiny_model

    log(f"building model {name} {spec} ...")
    tmp = out.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny_model.build(tmp, **spec)
    stamp_tmp = tmp / "bench_spec.json"
    stamp_tmp.write_text(json.dumps(spec))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


def param_count(path):
    """Parameters in a safetensors checkpoint, read from its header only."""
    total = 0
    for file in pathlib.Path(path).glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, meta in header.items():
            if key != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    return total


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def server(kind, model, *, max_model_len, kv_bytes, dp=1, extra=(), name=None, env=None, script=None):
    """Our server ("ours", or an earlier commit's `script`) or stock vLLM ("stock") with this run's engine
    settings, not yet launched."""
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len),
            "--kv-cache-memory-bytes", str(kv_bytes), "--max-num-seqs", str(MAX_NUM_SEQS)]
    if kind == "ours":
        args += ["--data_parallel_size", str(dp), "--log_level", "warning"]
    else:
        args += ["--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), "--disable-uvicorn-access-log",
                 "--disable-log-stats"]
    name = f"{name or f'{kind}-dp{dp}'}-{pathlib.Path(model).name}"
    return support.Server(model, *args, *extra, kind=kind, log_dir=RESULTS, name=name, env=env, script=script)


class InProcess:
    """`bench/inprocess.py`: a `vllm.LLM` in a subprocess answering JSON commands (replies on a pipe)."""

    def __init__(self, model, *, max_model_len, kv_bytes):
        self.model, self.name = model, f"inprocess-{pathlib.Path(model).name}"
        self.args = [sys.executable, str(BENCH / "inprocess.py"), "--model", model, "--max-model-len",
                     str(max_model_len), "--kv-bytes", str(kv_bytes), "--max-num-seqs", str(MAX_NUM_SEQS)]
        self.proc = self.log_file = None
        self.children, self.stop_s, self.left_behind = [], None, []

    def launch(self):
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.log_path = RESULTS / f"{self.name}.log"
        self.log_file = open(self.log_path, "w")
        read_fd, write_fd = os.pipe()
        self.started = time.monotonic()
        self.proc = subprocess.Popen([*self.args, "--reply-fd", str(write_fd)], stdin=subprocess.PIPE,
                                     stdout=self.log_file, stderr=subprocess.STDOUT, pass_fds=[write_fd],
                                     cwd=str(ROOT), env=os.environ, text=True)
        os.close(write_fd)
        self.replies = os.fdopen(read_fd, "r")
        return self

    def wait_healthy(self, timeout=HEALTH_TIMEOUT_S):
        self._read(timeout)  # the first line says it is ready
        self.startup_s = time.monotonic() - self.started
        self.children = support.descendants(self.proc.pid)
        return self

    def _read(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.replies], [], [], 1.0)
            if ready:
                line = self.replies.readline()
                if line:
                    reply = json.loads(line)
                    if "error" in reply:
                        raise RuntimeError(f"inprocess: {reply['error']}")
                    return reply
            if self.proc.poll() is not None:
                raise RuntimeError(f"inprocess exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"inprocess gave no answer within {timeout} s")

    def call(self, timeout=1800, **command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def stop(self):
        if self.proc is None or self.stop_s is not None:
            return
        start = time.monotonic()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # EOF: the runner exits on its own
                self.proc.wait(support.STOP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.left_behind = support.stop_process(self.proc, self.children)
        self.stop_s = time.monotonic() - start
        if self.log_file:
            self.log_file.close()
            self.log_file = None


def settle():
    """Wait until every process this bench started is idle. vLLM's EngineCore and workers busy-wait for a
    while after their last request, so a target measured right after another ran beside that one's spinning
    processes (a probe on tiny streams: the second target of a round lost up to 2x). → seconds waited."""
    import psutil

    def busy_s(processes):
        total = 0.0
        for p in processes:
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    start = time.monotonic()
    while time.monotonic() - start < IDLE_TIMEOUT_S:
        processes = support.descendants(os.getpid())
        before = busy_s(processes)
        time.sleep(IDLE_WINDOW_S)
        if busy_s(processes) - before < IDLE_CORES * IDLE_WINDOW_S:
            return time.monotonic() - start
    log(f"not idle after {IDLE_TIMEOUT_S} s; measuring anyway")
    return time.monotonic() - start


def start_all(procs):
    """Launch everything at once, then wait for each; on any failure stop them all."""
    try:
        for p in procs:
            p.launch()
        for p in procs:
            p.wait_healthy(HEALTH_TIMEOUT_S)
            log(f"{p.name} ready after {p.startup_s:.0f} s")
    except BaseException:
        stop_all(procs)
        raise
    return procs


def stop_all(procs):
    """Stop them in parallel (each stop is mostly waiting)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(procs))) as pool:
        list(pool.map(lambda p: p.stop(), procs))


def tail(path, n=40):
    try:
        return "\n".join(pathlib.Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def percentile(values, q):
    """Linear-interpolated percentile, q in [0, 100]."""
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def median(values):
    return percentile(values, 50)
