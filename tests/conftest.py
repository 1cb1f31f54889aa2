"""Shared fixtures: tiny models built once per session, real `vllm_serve.py` subprocesses on loopback,
and in-process `vllm.LLM` references to compare against.

Every server started here runs on 127.0.0.1 with a free port, logs to a file that is printed when a
test fails, and is stopped by PID with SIGTERM; the fixture asserts no child process survives.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# vLLM offline and on loopback; in-process engines (one process per worker) start in ~9 s instead of ~25 s.
os.environ.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  VLLM_HOST_IP="127.0.0.1", TOKENIZERS_PARALLELISM="false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

HEALTH_TIMEOUT_S = 300  # cold start on a loaded 2-core machine, inductor compile included
STOP_TIMEOUT_S = 60
CPU_SERVER_ARGS = ["--dtype", "float32", "--enforce_eager", "--max_model_len", "512",
                   "--kv_cache_memory_bytes", str(64 << 20)]
LLM_KWARGS = dict(dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=64 << 20, seed=0,
                  logprobs_mode="processed_logprobs", max_logprobs=-1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """{"seed0", "seed1", "tied0", "tied1"} → paths of tiny models built locally."""
    import tiny_model

    root = tmp_path_factory.mktemp("models")
    specs = {"seed0": (0, False), "seed1": (1, False), "tied0": (0, True), "tied1": (1, True)}
    return {name: str(tiny_model.build(root / name, seed=seed, tied=tied)) for name, (seed, tied) in specs.items()}


class ServerProcess:
    """`python vllm_serve.py ...` as a real subprocess on a free loopback port."""

    def __init__(self, model, *extra_args, log_dir, env=None, name="server"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = pathlib.Path(log_dir) / f"{name}-{self.port}.log"
        self.args = [sys.executable, str(ROOT / "vllm_serve.py"), "--model", model, "--served_model_name", "tiny",
                     "--host", "127.0.0.1", "--port", str(self.port), *CPU_SERVER_ARGS, *extra_args]
        self.env = {**os.environ, **(env or {})}
        self.proc = None
        self.children = []

    def start(self, timeout=HEALTH_TIMEOUT_S):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    self.children = psutil.Process(self.proc.pid).children(recursive=True)
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n=80):
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self):
        """SIGTERM by PID, wait, then check that no worker process outlived the server."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        _, alive = psutil.wait_procs(children, timeout=STOP_TIMEOUT_S)
        for child in alive:
            child.kill()
        self.log.close()
        assert not alive, f"processes left behind by the server: {[c.pid for c in alive]}"
        return code

    def post(self, path, body, **kwargs):
        return requests.post(self.url + path, json=body, timeout=kwargs.pop("timeout", 300), **kwargs)

    def get(self, path, **kwargs):
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, request):
    """Factory: start_server(model, *args, env=None) → a healthy ServerProcess, stopped at session end."""
    log_dir = tmp_path_factory.mktemp("logs")
    started = []

    def start(model, *args, env=None, name="server"):
        server = ServerProcess(model, *args, log_dir=log_dir, env=env, name=name)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(models, start_server):
    """The standard tiny server: DP 1, hermes tool parser, auto tool choice, and vLLM's production layout
    (EngineCore in its own process: the worker overlaps batching rounds with engine steps)."""
    srv = start_server(models["seed0"], "--enable_auto_tool_choice", "--tool_call_parser", "hermes",
                       env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def reference_llm():
    """Factory: reference_llm(model_path) → an in-process vllm.LLM with the servers' settings (cached)."""
    from vllm import LLM

    cache = {}

    def get(model):
        if model not in cache:
            cache[model] = LLM(model=model, **LLM_KWARGS)
        return cache[model]

    return get


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failing test, print the tail of every server log it could see."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name in ("server", "start_server"):
            value = item.funcargs.get(name)
            if isinstance(value, ServerProcess) and value.proc is not None:
                report.sections.append((f"{name} log ({value.log_path})", value.log_tail()))


def chat_prompt_ids(model_path, messages, **kwargs):
    """What the server should render: apply_chat_template text, tokenized without special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return tok.encode(text, add_special_tokens=False)


def dump(obj):
    return json.dumps(obj, indent=1)[:4000]
