"""Client for `vllm_serve.py` (and stock `vllm serve`): TRL's `VLLMClient` API over the OpenAI routes.

    from vllm_client import VLLMClient

    with VLLMClient(base_url="http://127.0.0.1:8000", connection_timeout=240) as client:
        out = client.generate(["Hello, AI!", "Tell me a joke"], n=2, max_tokens=32, logprobs=5)
        out["prompt_ids"], out["completion_ids"], out["logprobs"], out["logprob_token_ids"]
        client.chat([[{"role": "user", "content": "What is 2 + 2?"}]], max_tokens=8)

        client.init_communicator(device=0)   # join the weight-sync group as its last rank
        client.update_model_params(model)    # every named parameter, packed in 256 MiB broadcasts
        client.reset_prefix_cache()
        client.close_communicator()

Generation goes to `/v1/completions` (one request for all prompts) and `/v1/chat/completions` (one
request per conversation, sent concurrently so the server batches them); both ask for token ids
(`return_token_ids`, `return_tokens_as_token_ids`), so the same calls work against stock vLLM.
Results keep TRL's legacy shape. Prompts with images and teacher logprobs use this server's side routes.

Many servers: `base_url` may list several (a list, or comma-separated). Prompts are spread over them by the
load this client has in flight on each, results come back in input order, and the prompts of a server that
dies or answers 503 go once to the others. One weight-sync group spans them all: each bucket is broadcast
once and every server receives it.

Weight sync speaks both dialects: TRL's legacy one (/init_communicator, the trainer as the last rank; this
server's) and stock vLLM's weight-transfer API (/init_weight_transfer_engine, the trainer as rank 0; chosen
when the server lacks the legacy routes, or with `weight_sync="stock"`), so the same trainer code syncs
into this server and into stock `vllm serve`. Only the standard library and `requests` are imported here:
torch, vLLM and transformers are imported by the methods that need them.
"""

import atexit
import base64
import contextlib
import copy
import datetime
import io
import itertools
import math
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError

DEFAULT_TIMEOUT_S = 600.0  # per HTTP call and per weight broadcast: a big batch on a busy server is slow
HEALTH_PROBE_TIMEOUT_S = 5.0  # one /health probe of check_server
MAX_RETRIES = 3  # resends of a request that never reached the server, or of an idempotent one
RETRY_BACKOFF_S = 0.5  # doubled after every retry
WEIGHT_BUCKET_BYTES = 256 << 20  # default bucket of update_named_params (the server's default too)
WEIGHT_ALIGN_BYTES = 16  # each tensor of a bucket starts at a multiple of this (the server views it as its dtype)
WEIGHT_LAYOUT = 2  # the bucket layout sent to /update_named_params: tensors padded to WEIGHT_ALIGN_BYTES
DEFAULT_PACKED_BYTES = 1 << 30  # stock dialect's chunk size: vLLM's default (both sides must agree)
LEGACY_KEYS = ("prompt_ids", "completion_ids", "logprobs", "logprob_token_ids")  # TRL's generation result
VERSIONED_KEYS = (*LEGACY_KEYS, "weight_versions")  # with return_weight_versions=True
BINARY_KEYS = ("logprobs", "logprob_token_ids", "actual_logprobs", "actual_token_ids")  # binary sequence logprobs
JSON_MIN_LOGPROB = -9999.0  # servers send -inf logprobs (outside top_p/top_k) as this, JSON having no infinity


class VLLMClientError(requests.RequestException):
    """Any failed call. `status_code`: the HTTP status, None when no answer came; `message`: the server's text."""

    def __init__(self, message, status_code=None, response=None):
        super().__init__(f"{status_code}: {message}" if status_code else message, response=response)
        self.message, self.status_code = message, status_code


@dataclass(eq=False)
class Server:
    """One server the client drives: its URL, the address its weight-sync group is reached at, the completions
    this client has in flight there, and whether it failed (skipped while others answer)."""
    url: str
    host: str
    load: int = 0
    down: bool = False


class VLLMClient:
    """TRL's `VLLMClient`: same constructor, methods, defaults and return shapes.

    `base_url` wins over `host`/`server_port`; the weight-sync group connects to `host` (or the address
    `base_url` resolves to) on `group_port`. `timeout` bounds every HTTP call and weight broadcast;
    `api_key` (default: env VLLM_API_KEY) is sent as a bearer token; `max_concurrent_chats` caps the
    conversations `chat` keeps in flight on each server. `base_url` may name several servers (a list, or
    comma-separated): generation is spread over them, weight sync reaches all of them.
    """

    def __init__(self, base_url=None, host="0.0.0.0", server_port=8000, group_port=51216, connection_timeout=0.0,
                 *, timeout=DEFAULT_TIMEOUT_S, api_key=None, max_concurrent_chats=64, weight_sync=None,
                 pause_mode="wait"):
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(pool_maxsize=max(10, max_concurrent_chats)))
        self.session.mount("https://", HTTPAdapter(pool_maxsize=max(10, max_concurrent_chats)))
        api_key = api_key or os.environ.get("VLLM_API_KEY")
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        if base_url is not None:
            self.servers = [_server(url) for url in (base_url.split(",") if isinstance(base_url, str) else base_url)]
        else:
            self.server_port = server_port
            self.servers = [Server(f"http://{host}:{server_port}", host)]
        self.base_url, self.host = self.servers[0].url, self.servers[0].host
        self.group_port, self.timeout, self.max_concurrent_chats = group_port, timeout, max_concurrent_chats
        self.group = []  # the servers of the open weight-sync group
        self.broadcasts = 0  # weight broadcasts sent (one per bucket, whatever the number of servers)
        self._lock = threading.Lock()  # guards each server's `load`
        self.rank = None  # this client's rank in the weight-sync group (the last one)
        self.communicator = None  # gloo ProcessGroup or PyNcclCommunicator, after init_communicator
        self._pack_buffers = []  # gloo: update_named_params' two bucket buffers, freed by close_communicator
        self.model = None  # served model id, read from /v1/models on first use
        self._device, self._backend = None, None
        # "legacy" (TRL's /init_communicator, this server's), "stock" (vLLM's weight-transfer routes), or None:
        # stock's against a server that lacks the legacy routes, else legacy
        self.weight_sync, self.pause_mode, self._in_update = weight_sync, pause_mode, False
        self._session = False  # a weight update that per-parameter updates opened (reset_prefix_cache commits it)
        self._version = None  # the version the update in progress commits under
        self.packed_bytes = DEFAULT_PACKED_BYTES  # stock dialect: bytes per packed broadcast (sent at init)
        self._exiting = False
        self.check_server(connection_timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.communicator is not None:
            self.close_communicator()
        self.session.close()

    # --- HTTP ----------------------------------------------------------------------------------------

    def _request(self, method, path, json=None, timeout=None, idempotent=False, server=None):
        """One call to `server` (default: the first) → its JSON body. Resends only what never reached the
        server, or idempotent calls: a resent weight update would desynchronize the broadcasts that follow it."""
        timeout, url = timeout or self.timeout, (server.url if server else self.base_url) + path
        for attempt in range(MAX_RETRIES + 1):
            try:
                response = self.session.request(method, url, json=json, timeout=timeout)
                break
            except requests.RequestException as exc:
                retry = isinstance(exc, requests.ConnectionError) and (idempotent or _never_sent(exc))
                if not retry or attempt == MAX_RETRIES:
                    what = f"no answer within {timeout} s" if isinstance(exc, requests.ReadTimeout) else exc
                    raise VLLMClientError(f"{method} {url}: {what}") from exc
                time.sleep(RETRY_BACKOFF_S * 2**attempt)
        if response.status_code >= 400:
            message = _error_message(response)
            raise VLLMClientError(f"{url}: {message}" if len(self.servers) > 1 else message, response.status_code,
                                  response)
        return response.json() if response.content else {}

    def _live(self):
        """The servers to use: those that did not fail, or all of them if every one did (they may be back)."""
        return [s for s in self.servers if not s.down] or list(self.servers)

    def _each(self, method, path, json=None, idempotent=False, servers=None):
        """The same call to every server (default: the live ones), at once → their bodies, in order. The first
        failure is raised once all calls ended."""
        outcomes = self._outcomes(method, path, json, idempotent, self._live() if servers is None else servers)
        for result in outcomes:
            if isinstance(result, VLLMClientError):
                raise result
        return outcomes

    def _outcomes(self, method, path, json, idempotent, servers):
        """The same call to `servers`, at once → each one's body or VLLMClientError, in order. A server that
        does not answer is marked down."""
        def call(server):
            try:
                return self._request(method, path, json, idempotent=idempotent, server=server)
            except VLLMClientError as exc:
                server.down = server.down or _gone(exc)
                return exc

        if len(servers) == 1 or self._exiting:
            return [call(server) for server in servers]
        with ThreadPoolExecutor(len(servers)) as pool:
            return list(pool.map(call, servers))

    def _spread(self, count, run, weight=1):
        """Items 0..count-1 (prompts, conversations, sequences) over the live servers by load: each server gets
        one contiguous part and `run(server, part, done)` puts each finished item's result in `done[i]`. The
        unfinished items of a server that died or answered 503 go once to the others. → results in input order."""
        done, pending, failed, errors = {}, list(range(count)), set(), []
        for _ in range(2):  # the first try, then the one resend
            servers = [s for s in self._live() if s not in failed]
            if not servers:
                break
            lost = []
            with ThreadPoolExecutor(len(servers)) as pool:
                parts = _split(pending, [s.load for s in servers], weight)
                futures = [(s, part, pool.submit(self._run_on, s, part, weight, run, done))
                           for s, part in zip(servers, parts) if part]
                for server, part, future in futures:
                    try:
                        future.result()
                    except VLLMClientError as exc:
                        if not _gone(exc):
                            raise
                        server.down = True
                        failed.add(server)
                        errors.append(exc)
                        lost += [i for i in part if i not in done]
            if not lost:
                return [done[i] for i in range(count)]
            pending = sorted(lost)
        if len(self.servers) == 1:
            raise errors[-1]
        raise VLLMClientError(f"No server left for {len(pending)} of {count} items: "
                              + "; ".join(e.message for e in errors), errors[-1].status_code)

    def _run_on(self, server, part, weight, run, done):
        with self._lock:
            server.load += len(part) * weight
        try:
            run(server, part, done)
        finally:
            with self._lock:
                server.load -= len(part) * weight

    def _model_id(self):
        if self.model is None:
            self.model = self._request("GET", "/v1/models", idempotent=True)["data"][0]["id"]
        return self.model

    def check_server(self, total_timeout=0.0, retry_interval=2.0):
        """Poll GET /health on every server until each answered 200 (a server marked down is back in use
        then); raise VLLMClientError after `total_timeout` seconds."""
        deadline, problems = time.monotonic() + total_timeout, {server.url: None for server in self.servers}
        while True:
            for server in self.servers:
                if server.url not in problems:
                    continue
                try:
                    response = self.session.get(f"{server.url}/health", timeout=HEALTH_PROBE_TIMEOUT_S)
                    if response.status_code == 200:
                        server.host = response.headers.get("X-Forwarded-For", server.host)  # behind a proxy
                        server.down = False
                        del problems[server.url]
                        continue
                    problems[server.url] = f"status {response.status_code}"
                except requests.RequestException as exc:
                    problems[server.url] = str(exc)
            self.host = self.servers[0].host
            if not problems:
                return
            if time.monotonic() >= deadline:
                url, problem = next(iter(problems.items()))
                raise VLLMClientError(f"The vLLM server at {url} is not up after {total_timeout} s: {problem}")
            time.sleep(retry_interval)

    def get_world_size(self):
        """Number of vLLM workers (tensor_parallel_size * data_parallel_size), summed over the servers."""
        return sum(info["world_size"] for info in self._each("GET", "/get_world_size", idempotent=True))

    # --- generation ----------------------------------------------------------------------------------

    def generate(self, prompts, images=None, n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0,
                 min_p=0.0, max_tokens=16, logprobs=0, structured_outputs_regex=None, generation_kwargs=None,
                 return_weight_versions=False):
        """Completions for text or token-id prompts → {prompt_ids, completion_ids, logprobs, logprob_token_ids}.

        `logprobs=k`: per position the sampled token plus the top k, by logprob descending; None: none.
        `images`: one list of PIL images (or None) per prompt, sent through the legacy /generate/ route.
        `return_weight_versions`: also `weight_versions`, per completion the weights that sampled its tokens,
        [{version, start, end}] over its token indexes (None from a server that does not report them).
        """
        sampling = _sampling(n, repetition_penalty, temperature, top_p, top_k, min_p, max_tokens)
        sampling["logprobs"] = logprobs
        if return_weight_versions:
            sampling["return_weight_versions"] = True
        keys = VERSIONED_KEYS if return_weight_versions else LEGACY_KEYS
        if images is not None:
            images = [[_png_base64(image) for image in row] if row else None for row in images]
            body = {**sampling, "structured_outputs_regex": structured_outputs_regex,
                    "generation_kwargs": generation_kwargs or {}}

            def run(server, part, done):
                result = self._request("POST", "/generate/", json={
                    **body, "prompts": _pick(prompts, part), "images": _pick(images, part)}, server=server)
                done.update(zip(part, _per_prompt(result, n, keys)))
        else:
            body = {"model": self._model_id(), **sampling, **_token_id_flags(structured_outputs_regex),
                    **(generation_kwargs or {})}

            def run(server, part, done):
                choices = sorted(self._request("POST", "/v1/completions", json={**body, "prompt": _pick(prompts, part)},
                                               server=server)["choices"], key=lambda c: c["index"])
                prompt_ids = [c["prompt_token_ids"] for c in choices[::body["n"]]]  # prompt-major: n per prompt
                done.update(zip(part, _per_prompt(_legacy_result(prompt_ids, choices, body["logprobs"]), body["n"],
                                                  keys)))
        return _joined(self._spread(len(prompts), run, weight=n), keys)

    def chat(self, messages, n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
             max_tokens=16, logprobs=0, structured_outputs_regex=None, generation_kwargs=None,
             chat_template_kwargs=None, tools=None, chat_template=None, return_weight_versions=False):
        """Completions for a batch of conversations, same result shape as `generate`.

        Callable `tools` become JSON schemas (rendered into the prompt, never called); `image_pil` parts
        become data-URI `image_url` parts.
        """
        body = {"model": self._model_id(),
                **_sampling(n, repetition_penalty, temperature, top_p, top_k, min_p, max_tokens),
                **_token_id_flags(structured_outputs_regex),
                **_chat_options(logprobs, tools, chat_template, chat_template_kwargs), **(generation_kwargs or {}),
                **({"return_weight_versions": True} if return_weight_versions else {})}

        def run(server, part, done):
            def send(i):
                response = self._request("POST", "/v1/chat/completions",
                                         json={**body, "messages": _openai_messages(messages[i])}, server=server)
                choices = sorted(response["choices"], key=lambda c: c["index"])
                done[i] = _legacy_result([response["prompt_token_ids"]], choices, logprobs)

            with ThreadPoolExecutor(max(1, min(self.max_concurrent_chats, len(part)))) as pool:
                list(pool.map(send, part))
        return _joined(self._spread(len(messages), run, weight=n),
                       VERSIONED_KEYS if return_weight_versions else LEGACY_KEYS)

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100, temperature=1.0, use_binary=True,
                              chunk_size=0, max_concurrent_requests=4):
        """Teacher top-k logprobs of every completion position of prompt+completion `sequences`.

        → {logprobs, logprob_token_ids} ([seq][position][k]); binary mode adds actual_logprobs and
        actual_token_ids ([seq][position][1]) and pads each position to k with -inf / id 0.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        body = {"top_logprobs": top_logprobs, "temperature": temperature,
                "response_format": "binary" if use_binary else "json"}

        def run(server, part, done):
            size = chunk_size if chunk_size > 0 else max(1, len(part))

            def send(chunk):
                response = self._request("POST", "/get_sequence_logprobs", json={
                    **body, "sequences": _pick(sequences, chunk), "prompt_lengths": _pick(prompt_lengths, chunk)},
                    idempotent=True, server=server)
                rows = _decode_binary_logprobs(response) if use_binary else response
                done.update((i, {key: [rows[key][j]] for key in rows}) for j, i in enumerate(chunk))

            with ThreadPoolExecutor(max(1, min(max_concurrent_requests, -(-len(part) // size)))) as pool:
                list(pool.map(send, [part[i:i + size] for i in range(0, len(part), size)]))
        return _joined(self._spread(len(sequences), run), BINARY_KEYS if use_binary else LEGACY_KEYS[2:])

    def image_features(self, images, max_concurrent_requests=64):
        """TRL 1.16's: per prompt, its images (PIL) rendered into vLLM's multimodal features by
        /v1/chat/completions/render (a server started with --enable-scale-out); None for a prompt without."""
        def render(row):
            if not row:
                return None
            content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png_base64(image)}}
                       for image in row]
            return self._request("POST", "/v1/chat/completions/render", json={
                "model": self._model_id(), "messages": [{"role": "user", "content": content}], "max_tokens": 1},
                idempotent=True)["features"]

        with ThreadPoolExecutor(max(1, min(max_concurrent_requests, len(images)))) as pool:
            return list(pool.map(render, images))

    def reset_prefix_cache(self):
        """Also commits an open session of per-parameter updates (TRL's per-parameter sync ends here)."""
        self._end_session()
        self._each("POST", "/reset_prefix_cache", idempotent=True)

    # --- weight sync ---------------------------------------------------------------------------------

    def init_communicator(self, device=0):
        """Join the servers' weight-sync group (every live server's workers, one group): as its last rank in
        TRL's legacy dialect, as rank 0 (the group's host) in stock vLLM's. gloo on CPU servers, else NCCL
        on `device`."""
        import torch

        self._leave_group()  # a group of an earlier init: its NCCL communicator is not reused
        self.group, self._in_update, self._session = self._live(), False, False
        # names this group in every call: once a newer trainer's group replaced it, the servers refuse ours (409)
        self.session.headers["X-Weight-Sync-Group"] = uuid.uuid4().hex
        infos = self._each("GET", "/get_world_size", idempotent=True, servers=self.group)
        legacy = ["weight_sync_backend" in info for info in infos]
        self.weight_sync = self.weight_sync or ("legacy" if all(legacy) else "stock")
        self._device = _as_device(device)
        sizes = [info["world_size"] for info in infos]
        if self.weight_sync == "stock":
            return self._init_stock(sizes)
        if not all(legacy):
            raise VLLMClientError(f"{self.group[legacy.index(False)].url} does not speak TRL's weight-sync "
                                  "protocol: one group uses one dialect (weight_sync='stock' for all).")
        self._backend = self._transport({info["weight_sync_backend"] for info in infos})
        world_size = sum(sizes) + 1
        self.rank = world_size - 1
        # The first server's first worker hosts the group's TCP store, at an address every rank reaches
        store_host = _store_host([s.host for s in self.group])
        offsets = list(itertools.accumulate(sizes[:-1], initial=0))
        device = _device_uuid(torch, self._device)
        for server, offset in zip(self.group, offsets):
            body = {"host": store_host, "port": self.group_port, "world_size": world_size,
                    "client_device_uuid": device}
            self._request("POST", "/init_communicator", json={**body, "rank_offset": offset}
                          if len(self.group) > 1 else body, server=server)
        self.communicator = self._join_group(world_size, store_host)
        atexit.register(self._close_at_exit)

    def _transport(self, backends):
        """The servers' one transport, usable from `self._device`; refused before any group forms otherwise."""
        backend = backends.pop() if len(backends) == 1 else None
        if backend not in ("gloo", "nccl"):
            raise VLLMClientError(f"The servers' weight transfer is {backend or 'mixed'!r}: this client speaks gloo "
                                  "or NCCL, one for the whole group (--weight-transfer-config '{\"backend\": "
                                  "\"nccl\"}', or gloo on CPU servers).")
        if backend == "nccl" and getattr(self._device, "type", None) != "cuda":
            raise VLLMClientError(f"The server transfers weights over NCCL, which needs a CUDA device; got "
                                  f"{self._device}. On a CPU server, use --weight-transfer-config "
                                  "'{\"backend\": \"gloo\"}'.")
        return backend

    def _init_stock(self, sizes):
        """Stock dialect: host the group as rank 0 while the servers' workers join it, server i's after server
        i-1's (their init calls return once they did)."""
        configs = []
        for server in self.group:
            try:
                configs.append(self._request("GET", "/server_info?config_format=json", idempotent=True,
                                             server=server)["vllm_config"])
            except VLLMClientError as exc:
                if exc.status_code != 404:
                    raise
                raise VLLMClientError(f"{server.url} does not speak stock vLLM's weight-transfer API (no "
                                      "/server_info): one group uses one dialect.") from exc
        self._backend = self._transport({(c.get("weight_transfer_config") or {}).get("backend") for c in configs})
        world_size, offsets = sum(sizes) + 1, list(itertools.accumulate(sizes[:-1], initial=1))
        remote = [s.host for s in self.group if not _is_loopback(s.host)]
        self.rank, address = 0, _local_address_towards(remote[0] if remote else self.group[0].host)
        init_info = {"master_address": address, "master_port": self.group_port, "world_size": world_size,
                     "packed": True, "packed_buffer_size_bytes": self.packed_bytes}
        with ThreadPoolExecutor(len(self.group)) as pool:
            joined = [pool.submit(self._request, "POST", "/init_weight_transfer_engine",
                                  {"init_info": {**init_info, "rank_offset": offset}}, server=server)
                      for server, offset in zip(self.group, offsets)]
            if self._backend == "gloo":
                from vllm.distributed.utils import stateless_init_torch_distributed_process_group

                self.communicator = stateless_init_torch_distributed_process_group(
                    address, self.group_port, 0, world_size, backend="gloo",
                    timeout=datetime.timedelta(seconds=self.timeout or DEFAULT_TIMEOUT_S))
            else:
                import torch
                from vllm.distributed.weight_transfer.nccl_common import trainer_init

                with torch.cuda.device(self._device):
                    self.communicator = _enabled(trainer_init(init_info))
            for future in joined:
                future.result()
        atexit.register(self._close_at_exit)

    def _join_group(self, world_size, store_host):
        """Connect to the TCP store the first server's first worker hosts, as rank `self.rank`."""
        timeout_s = self.timeout or DEFAULT_TIMEOUT_S
        host = self.group[0].host if store_host == "0.0.0.0" else store_host
        if self._backend == "gloo":
            from vllm.distributed.utils import stateless_init_torch_distributed_process_group

            return stateless_init_torch_distributed_process_group(
                host, self.group_port, self.rank, world_size, backend="gloo",
                timeout=datetime.timedelta(seconds=timeout_s))
        import torch
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup
        from vllm.utils.nccl import unpinned_nccl_env

        group = StatelessProcessGroup.create(host=host, port=self.group_port, rank=self.rank,
                                             world_size=world_size, store_timeout=int(timeout_s))
        with torch.cuda.device(self._device), unpinned_nccl_env():
            return _enabled(PyNcclCommunicator(group, device=self._device))

    def _members(self):
        """The servers of the open group (before any init: the live ones, which then answer that none is open)."""
        return self.group or self._live()

    # One weight update: _open, the tensors (announced to every server, then broadcast once), _commit. Any
    # failure on any server ends in _abandon: every server rolls back to the weights it had, and the group
    # closes (the next init_communicator starts clean).

    @contextlib.contextmanager
    def _update(self):
        """One update on every server of the group; inside an open one (nested, or a session of per-parameter
        updates), that one's."""
        if self._in_update:
            yield
            return
        self._open()
        try:
            yield
        except BaseException:
            self._abandon()
            raise
        self._commit()

    def _open(self):
        """Name the update's version (one past the highest the servers report; None where a server reports
        none) and, in stock's dialect, pause generation (`pause_mode`) and start the update."""
        servers = self._members()
        self._version = self._next_version(servers)
        self._in_update = True
        if self.weight_sync == "stock":
            try:
                self._each("POST", f"/pause?mode={self.pause_mode}", servers=servers)
                self._each("POST", "/start_weight_update", {}, servers=servers)
            except BaseException:
                self._abandon()
                raise

    def _next_version(self, servers):
        try:
            versions = [info["weight_version"] for info in self._each("GET", "/weight_info", idempotent=True,
                                                                      servers=servers)]
        except VLLMClientError as exc:
            if exc.status_code == 404:  # a server without versions (TRL's own)
                return None
            raise
        return str(1 + max(int(v) if str(v).isdigit() else 0 for v in versions))

    def _commit(self):
        """Every server took the whole update: each commits it under its version, then resumes (stock); all
        of them must then report that version."""
        servers, version = self._members(), self._version
        try:
            self._each("POST", "/finish_weight_update", {"weight_version": version} if version else {},
                       servers=servers)
            if self.weight_sync == "stock":
                self._each("POST", "/resume", servers=servers)
        except BaseException:
            self._abandon()
            raise
        self._in_update = self._session = False
        if version is not None:
            reported = self._each("GET", "/weight_info", idempotent=True, servers=servers)
            stale = [s.url for s, info in zip(servers, reported) if info["weight_version"] != version]
            if stale:
                raise VLLMClientError(f"After the weight update to version {version}, these servers report another "
                                      f"version: {stale}.")

    def _abandon(self):
        """An update failed somewhere: leave the group (a server still waiting for a broadcast stops now), and
        ask every server to roll back and close its side (a server that already took everything would
        otherwise wait for a commit). Best effort: a server that is gone rolled back on its own."""
        self._in_update = self._session = False
        self._leave_group()
        close = "/shutdown_weight_transfer_engine" if self.weight_sync == "stock" else "/close_communicator"
        for path in ["/abort_weight_update", close] + (["/resume"] if self.weight_sync == "stock" else []):
            self._outcomes("POST", path, {}, False, self._members())
        self.group = []

    def _end_session(self):
        """Commit the session that per-parameter updates opened, if one is open: vLLM rebuilds each layer from
        the tensors of one session, so a layer's tensors (q, k and v of a fused projection) must share one."""
        if self._session:
            self._commit()

    def _announced(self, path, body):
        """POST `body` to every server of the group from threads, while this thread broadcasts (`_sending`):
        → the futures of their answers, which come once the server took everything."""
        pool = ThreadPoolExecutor(len(self._members()))
        futures = [pool.submit(self._request, "POST", path, body, server=server) for server in self._members()]
        pool.shutdown(wait=False)
        return futures

    def _broadcast(self, tensor, announced=()):
        """One tensor to every server. gloo: watched until sent, ending early if an announce failed (the servers
        then never receive) or at `timeout`."""
        self.broadcasts += 1
        if self._backend == "gloo":
            self._await(self.communicator.broadcast(tensor.cpu().contiguous(), root=self.rank), announced)
        else:  # raw memory goes on the wire: one contiguous tensor on the group's device
            self.communicator.broadcast(tensor.to(self._device).contiguous(), src=self.rank)
            if self.weight_sync != "stock":
                self.communicator.group.barrier()  # TRL's protocol: both sides barrier on the store

    def _await(self, work, announced=()):
        """A gloo broadcast's completion, within `timeout`; an announce that failed meanwhile is raised."""
        deadline, pause = time.monotonic() + (self.timeout or DEFAULT_TIMEOUT_S), 0.0001
        while not work.is_completed():
            for future in announced:
                if future.done() and future.exception() is not None:
                    raise future.exception()
            if time.monotonic() > deadline:
                raise VLLMClientError(f"A weight broadcast did not complete within {self.timeout} s.")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        work.wait()

    @contextlib.contextmanager
    def _sending(self):
        """Around a sync's broadcasts. NCCL: on the group's device, after the work already queued on its
        current stream (an optimizer step still writing the weights), and done only once that stream sent
        everything, within `timeout` (the caller may change the weights right after)."""
        if self._backend != "nccl":
            yield
            return
        import torch

        with torch.cuda.device(self._device):
            yield
            sent = torch.cuda.Event()
            sent.record()
            if not _completed(sent.query, self.timeout or DEFAULT_TIMEOUT_S):
                raise VLLMClientError(f"The weight broadcast did not complete within {self.timeout} s.")

    def _leave_group(self):
        """Drop our side of the group: gloo's is shut down; NCCL's destroyed (aborted: a broadcast still
        posted ends instead of spinning on the GPU)."""
        comm, self.communicator, self._pack_buffers = self.communicator, None, []
        if comm is not None:
            with contextlib.suppress(Exception):
                (comm.destroy if hasattr(comm, "destroy") else comm.shutdown)()

    @contextlib.contextmanager
    def weight_update(self):
        """Newer TRL's spelling of one sync step: push weights inside the block, which is one update on every
        server: committed on a clean exit (stock dialect: generation paused, `pause_mode`, on entry, resumed
        at the end), rolled back on any failure. On a clean exit the prefix cache is reset too."""
        with self._update():
            yield self
        self.reset_prefix_cache()

    def update_named_param(self, name, weights):
        """Legacy path: announce one tensor, then broadcast it. The first one opens a session of per-parameter
        updates that reset_prefix_cache() (or a batched update, or close_communicator()) commits."""
        self._check_group()
        if not self._in_update:
            self._open()
            self._session = True
        try:
            if self.weight_sync == "stock":
                return self._send_stock([(name, weights.detach())])
            self._announce("/update_named_param", {"name": name, "dtype": str(weights.dtype),
                                                   "shape": list(weights.shape), "version": self._version})
            with self._sending():
                self._broadcast(weights.detach())
        except BaseException:
            self._abandon()
            raise

    def _check_group(self):
        if self.communicator is None:
            raise VLLMClientError("No weight-sync group: call init_communicator() first (a failed update leaves "
                                  "the group, and the next init_communicator starts clean).")

    def _announce(self, path, body):
        """POST what comes next to every server of the group, each answering before the broadcast."""
        for result in self._outcomes("POST", path, {k: v for k, v in body.items() if v is not None}, False,
                                     self._members()):
            if isinstance(result, VLLMClientError):
                raise result

    def update_named_params(self, named_tensors, bucket_bytes=WEIGHT_BUCKET_BYTES):
        """Announce all tensors at once, then broadcast them packed in uint8 buckets of about `bucket_bytes`.

        Also TRL 1.16's form, `update_named_params(metadata, named_params)`: [(name, dtype, shape)] and an
        iterator of (name, tensor) (told apart by the second argument not being a size)."""
        import torch

        if not isinstance(bucket_bytes, int):  # TRL 1.16's (metadata, named_params)
            named_tensors, bucket_bytes = bucket_bytes, WEIGHT_BUCKET_BYTES
        named = [(name, tensor.detach()) for name, tensor in named_tensors]
        self._check_group()
        self._end_session()
        with self._update():
            if self.weight_sync == "stock":
                return self._send_stock(named)
            params = [{"name": name, "dtype": str(t.dtype), "shape": list(t.shape)} for name, t in named]
            announced = self._announced("/update_named_params", {
                "params": params, "bucket_bytes": bucket_bytes, "layout": WEIGHT_LAYOUT, "pause": self.pause_mode,
                "finish": False, **({"version": self._version} if self._version else {})})
            buckets = _buckets(named, bucket_bytes)
            with self._sending():
                if self._backend == "gloo":
                    _broadcast_buckets(self.communicator, self.rank, buckets, self._pack_buffers,
                                       lambda work: self._await(work, announced))
                    self.broadcasts += len(buckets)
                else:  # a bucket's tensors may sit on other devices (CPU-offloaded parameters)
                    for bucket in buckets:
                        self._broadcast(torch.cat(_packed([t.to(self._device) for t in bucket])))
            for future in announced:
                future.result()

    def update_model_params(self, model, *, batched=True):
        """Push every `model.named_parameters()` tensor: batched by default, one call per tensor otherwise."""
        named = ((name, param.data) for name, param in model.named_parameters())
        if batched:
            self.update_named_params(named)
        else:
            for name, tensor in named:
                self.update_named_param(name, tensor)

    def _send_stock(self, named):
        """Stock dialect: /update_weights announces the tensors and returns once the workers loaded them; the
        broadcasts run meanwhile."""
        update_info = {"names": [n for n, _ in named], "dtype_names": [str(t.dtype).removeprefix("torch.")
                                                                       for _, t in named],
                       "shapes": [list(t.shape) for _, t in named]}
        with self._update():
            loaded = self._announced("/update_weights", {"update_info": update_info})
            with self._sending():
                self._send_packed(named, loaded)
            for future in loaded:
                future.result()

    def _send_packed(self, named, announced):
        """Broadcast `named` packed as vLLM packs them: its NCCL engine's layout, ours on gloo."""
        if self._backend == "gloo":
            from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

            tensors = iter([(n, t.cpu().contiguous()) for n, t in named])
            while (chunk := pack_tensors(tensors, lambda item: item[1], self.packed_bytes)) is not None:
                self._await(self.communicator.broadcast(chunk.packed_tensor, root=0), announced)
                self.broadcasts += 1
            return
        self._produce(named)
        self.broadcasts += 1  # vLLM's producer sends its chunks itself: counted as one

    def _produce(self, named):
        """vLLM's NCCL producer, which packs on its own cached side streams: they first wait for this device's
        current stream (an optimizer step may still be writing the weights). It synchronizes those streams
        on the host, so it runs in a thread watched against `timeout`; past it the communicator is destroyed,
        which ends its broadcasts."""
        import torch
        from vllm.distributed.weight_transfer.packed_tensor import (DEFAULT_PACKED_NUM_BUFFERS, _get_streams,
                                                                    packed_nccl_broadcast_producer)

        for stream in _get_streams(self._device.index, DEFAULT_PACKED_NUM_BUFFERS):
            stream.wait_stream(torch.cuda.current_stream(self._device))
        outcome = {}

        def produce():
            try:
                with torch.cuda.device(self._device):
                    packed_nccl_broadcast_producer(iter(named), self.communicator, src=0,
                                                   post_iter_func=lambda item: item[1].to(self._device).contiguous(),
                                                   buffer_size_bytes=self.packed_bytes)
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=produce, daemon=True, name="weight-producer")
        thread.start()
        thread.join(self.timeout or DEFAULT_TIMEOUT_S)
        if thread.is_alive():
            self._leave_group()
            raise VLLMClientError(f"The weight broadcast did not complete within {self.timeout} s.")
        if "error" in outcome:
            raise outcome["error"]

    def _close_at_exit(self):
        self._exiting = True  # no new thread starts at interpreter exit: servers are called one by one
        self.close_communicator()

    def close_communicator(self):
        """Leave the weight-sync group, on every server of it; a server that is already gone is fine."""
        atexit.unregister(self._close_at_exit)
        path = "/shutdown_weight_transfer_engine" if self.weight_sync == "stock" else "/close_communicator"
        try:
            self._end_session()
            self._each("POST", path, servers=self._members())
        except VLLMClientError as exc:
            if exc.status_code not in (None, 409):  # gone, or its group replaced by a newer trainer's: closed
                raise
        finally:
            self._leave_group()
            self.group = []


# ------------------------------------------------------------------------------------------------------
# Helpers: request bodies, legacy result shape, weight buckets
# ------------------------------------------------------------------------------------------------------


def _server(url):
    """A base URL → Server, at the address its host name resolves to (where a weight-sync group reaches it)."""
    parsed = urlparse(url.strip())
    return Server(f"{parsed.scheme or 'http'}://{parsed.netloc}{parsed.path}".rstrip("/"),
                  socket.gethostbyname(parsed.hostname))


def _gone(exc):
    """Whether a failed call means its server is gone: no answer (refused, reset; a timeout is not: the server
    may only be slow) or a 503 (shutting down, a dead replica, paused past its timeout)."""
    cause = exc.__cause__
    return exc.status_code == 503 or (exc.status_code is None and isinstance(cause, requests.ConnectionError))


def _split(items, loads, weight):
    """`items` cut into one contiguous part per server, in order, sized so that each server's load (its
    `loads`, plus `weight` per item) ends as even as it can."""
    sizes = [0] * len(loads)
    for _ in items:
        j = min(range(len(loads)), key=lambda j: loads[j] + sizes[j] * weight)
        sizes[j] += 1
    ends = list(itertools.accumulate(sizes))
    return [items[end - size:end] for size, end in zip(sizes, ends)]


def _pick(values, part):
    """values[i] for i in part; `values` itself when part is all of it (one server: the request as before)."""
    return values if list(part) == list(range(len(values))) else [values[i] for i in part]


def _per_prompt(result, n, keys=LEGACY_KEYS):
    """A legacy result → one per prompt (its prompt ids, and its n completions' rows)."""
    return [{key: None if result.get(key) is None else
             result[key][k:k + 1] if key == "prompt_ids" else result[key][k * n:(k + 1) * n] for key in keys}
            for k in range(len(result["prompt_ids"]))]


def _joined(parts, keys):
    """Per-item results → one: each key's rows concatenated, None if any item has None there."""
    return {key: None if any(p[key] is None for p in parts) else [row for p in parts for row in p[key]]
            for key in keys}


def _never_sent(exc):
    """True when the connection itself failed (refused, unresolvable, connect timeout): safe to resend."""
    return isinstance(getattr(exc.args[0] if exc.args else None, "reason", None), ConnectTimeoutError)


def _error_message(response):
    """The server's `{"error": {"message"}}` text (OpenAI shape), else whatever the body says."""
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return error["message"]
    return (isinstance(body, dict) and (body.get("message") or body.get("detail"))) or response.text


def _sampling(n, repetition_penalty, temperature, top_p, top_k, min_p, max_tokens):
    return {"n": n, "repetition_penalty": repetition_penalty, "temperature": temperature, "top_p": top_p,
            "top_k": top_k if top_k > 0 else -1, "min_p": min_p, "max_tokens": max_tokens}


def _token_id_flags(structured_outputs_regex):
    body = {"return_token_ids": True, "return_tokens_as_token_ids": True}
    if structured_outputs_regex is not None:
        body["structured_outputs"] = {"regex": structured_outputs_regex}
    return body


def _chat_options(logprobs, tools, chat_template, chat_template_kwargs):
    options = {}
    if logprobs is not None:  # one more than asked: with the sampled token it covers the legacy top k
        options.update(logprobs=True, top_logprobs=logprobs + 1 if logprobs else 0)
    if tools:  # rendered into the prompt only, as TRL's /chat/ did: no tool-call parsing asked for
        options.update(tools=_tool_schemas(tools), tool_choice="none")
    if chat_template is not None:
        options["chat_template"] = chat_template
    if chat_template_kwargs:
        options["chat_template_kwargs"] = chat_template_kwargs
    return options


def _tool_schemas(tools):
    if not any(callable(tool) for tool in tools):
        return list(tools)
    from transformers.utils import get_json_schema

    return [get_json_schema(tool) if callable(tool) else tool for tool in tools]


def _png_base64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _openai_messages(conversation):
    """TRL messages → OpenAI ones: PIL images (`image_pil` or `image` parts) become data-URI `image_url` parts."""
    messages = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png_base64(part[kind])}"}}
                       if (kind := part.get("type")) in ("image_pil", "image") and hasattr(part.get(kind), "save")
                       else copy.deepcopy(part) for part in content]
            message = {**message, "content": content}
        messages.append(message)
    return messages


def _token_id(token):
    return int(token.removeprefix("token_id:"))


def _positions(choice_logprobs):
    """A choice's logprobs (completion or chat layout) → [(sampled (token, logprob), [(token, logprob)])]."""
    if choice_logprobs is None:
        return None
    if "content" in choice_logprobs:
        return [((e["token"], e["logprob"]), [(t["token"], t["logprob"]) for t in e["top_logprobs"] or ()])
                for e in choice_logprobs["content"]]
    return [((token, logprob), list((top or {}).items())) for token, logprob, top in
            zip(choice_logprobs["tokens"], choice_logprobs["token_logprobs"], choice_logprobs["top_logprobs"])]


def _logprob(value):
    """JSON logprob → float: null (NaN) stays None; vLLM's -9999.0 stand-in for -inf becomes -inf again."""
    return value if value is None or value > JSON_MIN_LOGPROB else -math.inf


def _entries(sampled, tops, k):
    """One position as TRL returns it: the top k plus the sampled token, by logprob descending (null last)."""
    by_id = {}
    for token, logprob in [sampled, *tops]:
        by_id.setdefault(_token_id(token), _logprob(logprob))
    ranked = sorted(by_id.items(), key=lambda e: -math.inf if e[1] is None else e[1], reverse=True)[:k]
    sampled_id = _token_id(sampled[0])
    return ranked if any(t == sampled_id for t, _ in ranked) else ranked + [(sampled_id, by_id[sampled_id])]


def _legacy_result(prompt_ids, choices, k):
    """TRL's result: prompt_ids per prompt; completion_ids, logprobs, logprob_token_ids per completion."""
    positions = [_positions(c["logprobs"]) for c in choices]
    rows = None if k is None or any(p is None for p in positions) else \
        [[_entries(sampled, tops, k) for sampled, tops in p] for p in positions]
    versions = [c.get("weight_versions") for c in choices]
    return {"prompt_ids": prompt_ids, "completion_ids": [c["token_ids"] for c in choices],
            "logprobs": None if rows is None else [[[lp for _, lp in e] for e in row] for row in rows],
            "logprob_token_ids": None if rows is None else [[[t for t, _ in e] for e in row] for row in rows],
            "weight_versions": None if None in versions else versions}


def _decode_binary_logprobs(response):
    """Binary /get_sequence_logprobs answer → nested lists, each sequence cut to its completion length."""
    import numpy as np

    shape, lengths = response["shape"], response["completion_lengths"]
    arrays = {"logprobs": ("logprobs_b64", np.float32, shape), "logprob_token_ids": ("token_ids_b64", np.int32, shape),
              "actual_logprobs": ("actual_logprobs_b64", np.float32, shape[:2] + [1]),
              "actual_token_ids": ("actual_token_ids_b64", np.int32, shape[:2] + [1])}
    out = {}
    for key, (field, dtype, dims) in arrays.items():
        array = np.frombuffer(base64.b64decode(response[field]), dtype=dtype).reshape(dims)
        out[key] = [array[i, :length].tolist() for i, length in enumerate(lengths)]
    return out


def _buckets(named, bucket_bytes):
    """Tensors in order, a new bucket whenever the next would overflow a non-empty one, each tensor taking
    its padded size (as the server's `weight_buckets` reads them)."""
    buckets, current, size = [], [], 0
    for _, tensor in named:
        nbytes = _padded(tensor.numel() * tensor.element_size())
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(tensor)
        size += nbytes
    return buckets + [current] if current else buckets


def _padded(nbytes):
    """Bytes a tensor of `nbytes` takes in a bucket (layout WEIGHT_LAYOUT)."""
    return -(-nbytes // WEIGHT_ALIGN_BYTES) * WEIGHT_ALIGN_BYTES


def _packed(bucket):
    """A bucket's uint8 pieces in wire order: each tensor's bytes, then zeros up to its padded size."""
    import torch

    pieces = []
    for tensor in bucket:
        raw = tensor.contiguous().view(-1).view(torch.uint8)
        pad = _padded(raw.numel()) - raw.numel()
        pieces += [raw, raw.new_zeros(pad)] if pad else [raw]
    return pieces


def _broadcast_buckets(group, root, buckets, buffers, wait):
    """gloo: send each bucket as one uint8 tensor, packing bucket k+1 while bucket k is on the wire.

    `buffers` (the caller's list, kept across syncs) holds the two packing buffers: a fresh 256 MiB
    tensor costs more in page faults than the copy into it (0.5 s on a first sync, measured). `wait(work)`
    returns once a send is complete.
    """
    import torch

    sizes = [sum(_padded(t.numel() * t.element_size()) for t in bucket) for bucket in buckets]
    need = max(sizes, default=0)
    for i in range(min(2, len(buckets))):
        if i == len(buffers):
            buffers.append(torch.empty(need, dtype=torch.uint8))
        elif buffers[i].numel() < need:
            buffers[i] = torch.empty(need, dtype=torch.uint8)
    sending = None
    for k, (bucket, size) in enumerate(zip(buckets, sizes)):
        packed = buffers[k % 2][:size]  # its last send (bucket k-2) was waited for before bucket k-1's
        torch.cat(_packed([t.cpu() for t in bucket]), out=packed)
        if sending is not None:
            wait(sending)
        sending = group.broadcast(packed, root=root)
    if sending is not None:
        wait(sending)


def _as_device(device):
    """0, "0", "cuda:0" or a torch.device → torch.device (bare indices mean CUDA devices, as in TRL)."""
    import torch

    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        return torch.device("cuda", int(device))
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # PyNccl asserts an indexed device
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _completed(query, timeout_s, poll_s=0.001):
    """Whether `query()` (a CUDA event's) turned true within `timeout_s`, polled: a broadcast that never ends
    must not block the caller."""
    deadline = time.monotonic() + timeout_s
    while not query():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _enabled(communicator):
    """vLLM's PyNcclCommunicator, refused if it came back disabled (world size 1, VLLM_DISABLE_PYNCCL, no NCCL
    library): its broadcasts would silently do nothing while the servers wait."""
    if communicator.disabled:
        raise VLLMClientError("vLLM's NCCL communicator came back disabled (VLLM_DISABLE_PYNCCL, or no NCCL "
                              "library in this process): it cannot send weights.")
    return communicator


def _device_uuid(torch, device):
    """What the server compares with its own GPUs, to refuse a trainer on the same device."""
    if device.type == "cuda" and torch.cuda.is_available():
        return str(torch.cuda.get_device_properties(device).uuid)
    return "cpu"


def _store_host(hosts):
    """Where every rank reaches the group's TCP store, which the first server's first worker hosts (`hosts`:
    the servers' addresses as this client reaches them). One server: its loopback address if it runs here,
    else all interfaces ("0.0.0.0", TRL's choice: only its own workers connect). Several: the first one's
    address as the others reach it (a server told "0.0.0.0" would connect to itself)."""
    first = hosts[0]
    if len(hosts) == 1:
        return first if _is_loopback(first) else "0.0.0.0"
    remote = [host for host in hosts if not _is_loopback(host)]
    if _is_loopback(first) and remote:  # the first server runs here: this machine's address, as they see it
        return _local_address_towards(remote[0])
    return first


def _local_address_towards(host):
    """This machine's address on the route to `host` (where the server's workers reach the group we host)."""
    if _is_loopback(host):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 1))  # UDP: chooses the route, sends nothing
            return probe.getsockname()[0]
    except OSError:  # no route known: the name this machine goes by
        return socket.gethostbyname(socket.gethostname())


def _is_loopback(host):
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False
