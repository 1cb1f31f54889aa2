"""Scaffolding shared by tests/ and bench/: one prompt set, one greedy-reference builder, one server
launcher, waits on state a server reports, and the checked load (every answer against its own request).

bench/ imports this module (it puts tests/ on sys.path); nothing here imports bench/. Importing it has no
side effect beyond `os.environ` (vLLM offline, on loopback); vLLM and torch are imported where used.

Waits never measure speed: each polls a condition the server reports and has a bound that only a hang
reaches (HANG_S). A request that must still be running when the test acts is endless by construction
(`endless()`), and the test ends it itself.
"""

import asyncio
import dataclasses
import json
import os
import pathlib
import random
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time

import httpx
import requests

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           VLLM_HOST_IP="127.0.0.1", TOKENIZERS_PARALLELISM="false")
os.environ.update(ENV)

HEALTH_TIMEOUT_S = 600  # cold start on a 2-core machine busy with other work, inductor compile included
HANG_S = 300  # any single wait or request: only a hang takes this long
STOP_TIMEOUT_S = 120  # SIGTERM → exit, then the same again for its descendants before SIGKILL
POLL_S = 0.05

# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------

PROMPTS = ["Hello world", "The weather in Paris is", "def f(x):", "What is 2 + 2?",
           "Tell me a joke about the weather in Paris.", "Call a tool with JSON arguments.",
           "import json, textwrap", "The first step is"]
CHATS = [[{"role": "user", "content": "What is 2 + 2?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Call a tool."}]]
GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}  # /v1 body fields
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}


def forced_tool_call_regex(name, arguments):
    """A `structured_outputs` regex that makes the model write this hermes tool call (the tiny model would
    not)."""
    text = f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'
    return "".join("\\" + ch if ch in r".^$*+?{}[]\|()" else ch for ch in text)


def endless(prompt=PROMPTS[0], n=4096, max_tokens=400):
    """A /v1/completions body that cannot finish while a test runs (n x max_tokens tokens: 1.6M by
    default, about 10 minutes of a 2-core CPU at full speed): the test ends it by disconnecting. vLLM
    schedules first come, first served, so requests sent after it wait: use `unending` to run beside one."""
    return {"prompt": prompt, "n": n, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}


LONG_SERVER_ARGS = ["--max-model-len", str(1 << 17), "--kv-cache-memory-bytes", str(256 << 20)]


def unending(prompt=PROMPTS[0]):
    """One sequence of 130k tokens, for a server started with LONG_SERVER_ARGS: that many decode steps, each
    after the last, take minutes on any machine, and it leaves the batch room for other requests."""
    return {"prompt": prompt, "max_tokens": (1 << 17) - 64, "temperature": 1.0, "ignore_eos": True}


# ------------------------------------------------------------------------------------------------
# References: an in-process vllm.LLM with the servers' settings
# ------------------------------------------------------------------------------------------------

LLM_KWARGS = dict(dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=64 << 20, seed=0,
                  logprobs_mode="processed_logprobs", max_logprobs=-1)
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
               "--kv-cache-memory-bytes", str(64 << 20)]  # LLM_KWARGS as flags, spelled as both servers accept
STOCK_ARGS = ["--max-logprobs", "-1", "--logprobs-mode", "processed_logprobs", "--seed", "0"]  # ours' defaults
# gloo is the default on CPU; on a GPU box it lets the tests' CPU trainer sync into CUDA workers
OURS_ARGS = ["--weight-transfer-config", '{"backend": "gloo"}']


def reference(llm, prompts, params=None, **sampling):
    """RequestOutputs of `llm` for prompts given as text or token ids; `params`: a SamplingParams or one per
    prompt, else SamplingParams(**sampling)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
    return llm.generate(prompts, params or SamplingParams(**sampling), use_tqdm=False)


def greedy_ids(llm, prompts, max_tokens):
    """The completion token ids a server must return for greedy `ignore_eos` requests of `prompts`."""
    return [list(o.outputs[0].token_ids)
            for o in reference(llm, prompts, temperature=0, max_tokens=max_tokens, ignore_eos=True)]


# (N, K) of the tiny model's linear layers (hidden 128): qkv, o, gate_up, down. vLLM picks an int8 GEMM per shape.
TINY_LINEAR_SHAPES = [(256, 128), (128, 128), (512, 128), (128, 256)]
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_paths():
    """The instruction sets that choose vLLM's CPU kernels, and what they choose on this machine: its kernel
    library, the int8 GEMM of the tiny model's quantized copy, and the attention kernel of float32 and bf16.
    → {name: text}, for the pytest header and for tests that only one path can run."""
    import warnings

    with warnings.catch_warnings():  # torch's deprecation notices, printed before the header otherwise
        warnings.simplefilter("ignore")
        import torch
        from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    amx = torch.cpu._is_amx_tile_supported()
    library = ("vllm._C (AVX-512 + BF16)" if torch.cpu._is_avx512_bf16_supported() else
               "vllm._C_AVX512" if torch.cpu._is_avx512_supported() else "vllm._C_AVX2")
    sgl = [check_cpu_sgl_kernel(n, k, torch.int8) for n, k in TINY_LINEAR_SHAPES]
    int8 = ("SGL int8_scaled_mm_with_quant (AMX: bf16 or half activations only)" if all(sgl) else
            "oneDNN int8 scaled mm (any activation dtype)" if not any(sgl) else "mixed: SGL and oneDNN by shape")
    return {"isa": " ".join(f"{flag}={'yes' if flag in flags else 'no'}" for flag in ISA_FLAGS),
            "library": library, "int8_gemm": int8, "sgl_int8": all(sgl),
            "attention": f"float32 vec, bfloat16 {'amx' if amx else 'vec'}"}


def checkpoint(model_dir):
    """A trainer's tensors: the checkpoint's [(name, tensor)], in its order."""
    from safetensors.torch import load_file

    return list(load_file(str(pathlib.Path(model_dir) / "model.safetensors")).items())


class Trained:
    """The smallest `model` VLLMClient.update_model_params accepts: named_parameters() over `tensors`."""

    def __init__(self, tensors):
        self.tensors = dict(tensors)

    def named_parameters(self):
        return iter(self.tensors.items())


def chat_prompt_ids(tokenizer, messages, **kwargs):
    """What a server renders for a conversation: the template's text, tokenized without special tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def dump(obj):
    """A JSON body, shortened, for assertion messages."""
    return json.dumps(obj, indent=1)[:4000]


def tokenizer_of(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


# ------------------------------------------------------------------------------------------------
# Processes: servers on free loopback ports, stopped by PID with nothing left behind
# ------------------------------------------------------------------------------------------------


def free_port():
    """A free loopback port below the kernel's ephemeral range: a server binds its port only once its replicas
    loaded, and meanwhile an outgoing connection or a port-0 listener (vLLM's, gloo's) never takes one of these."""
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if os.path.exists("/proc/sys/net/ipv4/ip_local_port_range") else 32768
    for _ in range(1000):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_until(predicate, what, timeout=HANG_S):
    """Poll `predicate()` until it returns a true value, which is returned; only a hang reaches `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(POLL_S)
    return value


def descendants(pid):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def stop_process(proc, known=(), timeout=STOP_TIMEOUT_S):
    """SIGTERM by PID, wait, SIGKILL on timeout; then wait for every descendant, those seen earlier (`known`)
    included, since a parent that exits may leave them orphaned. → the PIDs that had to be killed."""
    import psutil

    children = list({c.pid: c for c in [*known, *descendants(proc.pid)]}.values())
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    return [c.pid for c in alive]


class Server:
    """`python vllm_serve.py` (kind "ours") or stock `vllm serve` (kind "stock") as a subprocess on a free
    loopback port, logging to a file. `launch()` returns at once, `wait_healthy()` polls /health."""

    def __init__(self, model, *args, kind="ours", log_dir, name=None, env=None, served_name="tiny", script=None,
                 tls=None, uds=None):
        self.kind, self.model, self.name = kind, model, name or kind
        self.port = free_port()
        self.tls, self.uds = tls, uds  # (certificate, key) files: HTTPS only; a socket's path: no TCP port
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        listen = ["--uds", uds] if uds else ["--host", "127.0.0.1", "--port", str(self.port)]
        listen += ["--ssl-certfile", tls[0], "--ssl-keyfile", tls[1]] if tls else []
        self.log_path = pathlib.Path(log_dir) / f"{self.name}-{self.port}.log"
        script = script or ROOT / "vllm_serve.py"  # bench/ runs an earlier commit's copy beside it
        entry = [str(script)] if kind == "ours" else ["-m", "vllm.entrypoints.openai.api_server"]
        extra = STOCK_ARGS if kind == "stock" else OURS_ARGS
        self.args = [sys.executable, *entry, "--model", model, "--served-model-name", served_name,
                     *listen, *extra, *args]
        self.env = {**os.environ, **ENV, **(env or {})}
        self.proc = self.log = None
        self.children, self.left_behind, self.exit_code = [], [], None
        self.startup_s = self.stop_s = None  # seconds to healthy, and from SIGTERM to exit (bench/ reports them)

    def launch(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.launched = time.perf_counter()
        # its own process group: a test can Ctrl-C the server's whole tree (os.killpg), and nothing else
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(ROOT), start_new_session=True)
        return self

    def wait_healthy(self, timeout=HEALTH_TIMEOUT_S):
        def healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with self.http() as http:
                    return http.get("/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(healthy, f"{self.name} healthy", timeout)
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"{self.name} not healthy after {timeout} s:\n{self.log_tail()}") from None
        self.children = descendants(self.proc.pid)
        self.startup_s = time.perf_counter() - self.launched
        return self

    def start(self, timeout=HEALTH_TIMEOUT_S):
        return self.launch().wait_healthy(timeout)

    def stop(self):
        """SIGTERM and wait; → the exit status. `left_behind`: descendants that outlived it (then killed)."""
        if self.proc is not None and self.exit_code is None:
            start = time.perf_counter()
            self.left_behind = stop_process(self.proc, self.children)
            self.stop_s, self.exit_code = time.perf_counter() - start, self.proc.returncode
            self.log.close()
        return self.exit_code

    def http(self):
        """An httpx client of the server however it listens (TCP, TLS with its own certificate, a Unix socket)."""
        verify = ssl.create_default_context(cafile=self.tls[0]) if self.tls else True
        transport = httpx.HTTPTransport(uds=self.uds, verify=verify) if self.uds else None
        return httpx.Client(base_url=self.url, verify=verify, transport=transport, timeout=HANG_S)

    def log_tail(self, n=80):
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_text(self):
        if self.log and not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def post(self, path, body, **kwargs):
        return requests.post(self.url + path, json=body, timeout=kwargs.pop("timeout", HANG_S), **kwargs)

    def get(self, path, **kwargs):
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", HANG_S), **kwargs)

    def health(self):
        """/health's body: {"status", "requests_running", "requests_aborted", ...}."""
        return self.get("/health").json()

    def wait_for_health(self, predicate, timeout=HANG_S):
        """Poll /health until `predicate(body)`; → that body."""
        seen = {}

        def check():
            seen["last"] = self.health()
            return predicate(seen["last"])

        try:
            wait_until(check, "/health condition", timeout)
        except TimeoutError:
            raise TimeoutError(f"/health never met the condition within {timeout} s; last: {seen.get('last')}") \
                from None
        return seen["last"]


class Router:
    """vLLM's router (`vllm-router`: Rust behind a Python launcher) in front of `urls`, on a free loopback
    port, logging to a file, stopped by PID like a server."""

    def __init__(self, urls, *args, log_dir, policy="cache_aware"):
        self.port = free_port()
        self.url, self.name = f"http://127.0.0.1:{self.port}", f"router-{self.port}"
        self.log_path = pathlib.Path(log_dir) / f"{self.name}.log"
        self.args = [sys.executable, "-m", "vllm_router.launch_router", "--host", "127.0.0.1", "--port",
                     str(self.port), "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                     "--policy", policy, *args, "--worker-urls", *urls]
        self.proc = self.log = None
        self.left_behind, self.exit_code = [], None

    def start(self, timeout=HEALTH_TIMEOUT_S):
        """Launch, and return once it answers and lists every worker it was given."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     env={**os.environ, **ENV}, start_new_session=True)
        given = self.args[self.args.index("--worker-urls") + 1:]

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                return len(self.workers()) == len(given)
            except (requests.RequestException, ValueError, KeyError):
                return False

        wait_until(ready, f"{self.name} ready", timeout)
        return self

    def workers(self):
        return requests.get(self.url + "/list_workers", timeout=HANG_S).json()["urls"]

    def remove(self, url):
        """Take a server from behind the router (its /remove_worker), and wait until the router no longer lists
        it."""
        requests.post(self.url + "/remove_worker", params={"url": url}, timeout=HANG_S).raise_for_status()
        wait_until(lambda: url not in self.workers(), f"{url} gone from {self.name}")

    def add(self, url):
        """Put a server behind the router (its /add_worker), and wait until the router lists it."""
        requests.post(self.url + "/add_worker", params={"url": url}, timeout=HANG_S).raise_for_status()
        wait_until(lambda: url in self.workers(), f"{url} behind {self.name}")

    def stop(self):
        if self.proc is not None and self.exit_code is None:
            self.left_behind = stop_process(self.proc)
            self.exit_code = self.proc.returncode
            self.log.close()
        return self.exit_code

    def log_text(self):
        if self.log and not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")


# ------------------------------------------------------------------------------------------------
# Checked load: requests with distinct prompts, every answer checked against its own request
# ------------------------------------------------------------------------------------------------

WORDS = ("the a of to in is for on with as by at from that this which what how why when where model policy "
         "reward token value search agent tool call answer question paris weather sunny compute prove explain "
         "write list sort number prime sum json python function return step first then finally").split()
STREAM_EVERY = 4  # every 4th request streams


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


def plan(n, seed=0, max_tokens=(4, 24), model="tiny"):
    """n jobs, alternating chat and completions, every STREAM_EVERY-th streaming; prompts all distinct."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        text = f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
        tokens = rng.randint(*max_tokens)
        common = {"model": model, "max_tokens": tokens, **GREEDY, "stream": i % STREAM_EVERY == STREAM_EVERY - 1}
        if i % 2:
            body = {**common, "messages": [{"role": "user", "content": text}]}
            jobs.append(Job(i, "/v1/chat/completions", common["stream"], body, tokens))
        else:
            jobs.append(Job(i, "/v1/completions", common["stream"], {**common, "prompt": text}, tokens))
    return jobs


def expect(jobs, llm, tokenizer):
    """Fill each job's expected prompt ids (as the server renders them) and greedy completion ids."""
    from vllm import SamplingParams

    for job in jobs:
        job.prompt_ids = (tokenizer.encode(job.body["prompt"]) if job.route == "/v1/completions"
                          else chat_prompt_ids(tokenizer, job.body["messages"]))
    params = [SamplingParams(temperature=0, max_tokens=job.max_tokens, ignore_eos=True) for job in jobs]
    for job, out in zip(jobs, reference(llm, [job.prompt_ids for job in jobs], params=params)):
        job.token_ids = list(out.outputs[0].token_ids)
    return jobs


async def _one(session, base_url, job, answer):
    import aiohttp

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


async def _send(base_url, jobs, concurrency, headers, on_progress, progress_s):
    import aiohttp

    answers = [Answer(job.index) for job in jobs]
    queue, done = list(zip(jobs, answers))[::-1], [0]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=HANG_S)) as session:
        async def worker():
            while queue:
                job, answer = queue.pop()
                await _one(session, base_url, job, answer)
                done[0] += 1

        async def progress():
            while True:
                on_progress(done[0])
                await asyncio.sleep(progress_s)

        ticker = asyncio.create_task(progress())
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            ticker.cancel()
    return answers


def send(base_url, jobs, concurrency, api_key=None, on_progress=lambda done: None, progress_s=0.5):
    """All jobs, `concurrency` in flight at any time → one Answer per job, in job order. `on_progress(done)`
    is called every `progress_s` with the number of answers so far."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return asyncio.run(_send(base_url, jobs, concurrency, headers, on_progress, progress_s))


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
    for process in [psutil.Process(pid), *descendants(pid)]:
        try:
            cmdline = " ".join(process.cmdline())
            label = ("server" if process.pid == pid else "tracker" if "resource_tracker" in cmdline
                     else "replica" if "spawn_main" in cmdline else process.name())
            found[f"{label}#{sum(k.startswith(label) for k in found)}"] = process.memory_info().rss
        except psutil.Error:
            pass
    return found


def latency_figures(answers):
    """→ (p50, p99) latency in seconds."""
    cuts = statistics.quantiles([a.latency_s for a in answers if a.latency_s is not None], n=100, method="inclusive")
    return cuts[49], cuts[98]
