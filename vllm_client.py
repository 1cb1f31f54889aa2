"""Client for `vllm_serve.py` (and stock `vllm serve`): TRL's `VLLMClient` API over the OpenAI routes.

    with VLLMClient(base_url="http://127.0.0.1:8000", connection_timeout=240) as client:
        out = client.generate(["Hello, AI!", "Tell me a joke"], n=2, max_tokens=32, logprobs=5)
        client.init_communicator(device=0)   # join the weight-sync group
        client.update_model_params(model)    # every named parameter, packed in 256 MiB broadcasts
        client.reset_prefix_cache()

Generation asks the OpenAI routes for token ids, so the same calls work against stock vLLM; prompts with
images and teacher logprobs use this server's side routes. `base_url` may list several servers: prompts are
spread by the load this client has in flight on each, those of a server that dies or answers 503 go once to
the others, and one weight-sync group spans them all. `base_url` may be vLLM's router (`vllm-router`):
generation goes through it, and the group spans the servers behind it, looked up again at every update.
Weight sync speaks TRL's legacy dialect (this server's) and stock vLLM's weight-transfer API (when a server
lacks the legacy routes, or with `weight_sync="stock"`).
Only the standard library and `requests` are imported here: torch, vLLM and transformers where needed.
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
from concurrent.futures import wait as wait_all
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
WEIGHT_ALIGN_BYTES = 16  # a bucket's tensors start at multiples of this (the server views each as its dtype)
WEIGHT_LAYOUT = 2  # the bucket layout sent to /update_named_params: tensors padded to WEIGHT_ALIGN_BYTES
DEFAULT_PACKED_BYTES = 1 << 30  # stock dialect's chunk size: vLLM's default (both sides must agree)
LEGACY_KEYS = ("prompt_ids", "completion_ids", "logprobs", "logprob_token_ids")  # TRL's generation result
VERSIONED_KEYS = (*LEGACY_KEYS, "weight_versions")  # with return_weight_versions=True
BINARY_KEYS = ("logprobs", "logprob_token_ids", "actual_logprobs", "actual_token_ids")  # binary logprobs
JSON_MIN_LOGPROB = -9999.0  # -inf logprobs (outside top_p/top_k) come as this: JSON has no infinity


class VLLMClientError(requests.RequestException):
    """Any failed call. `status_code`: the HTTP status (None: no answer); `message`: the server's text."""

    def __init__(self, message, status_code=None, response=None):
        super().__init__(f"{status_code}: {message}" if status_code else message, response=response)
        self.message, self.status_code = message, status_code


@dataclass(eq=False)
class Server:
    url: str
    host: str  # the address its weight-sync group reaches it at
    load: int = 0  # the completions this client has in flight there
    down: bool = False  # it failed: skipped while others answer


class VLLMClient:
    """TRL's `VLLMClient`: same constructor, methods, defaults and return shapes. `base_url` (one URL, or
    several as a list or comma-separated) wins over `host`/`server_port`. `timeout` bounds every HTTP call and
    weight broadcast; `api_key` (default: env VLLM_API_KEY) is sent as a bearer token."""

    def __init__(self, base_url=None, host="0.0.0.0", server_port=8000, group_port=51216,
                 connection_timeout=0.0, *, timeout=DEFAULT_TIMEOUT_S, api_key=None, max_concurrent_chats=64,
                 weight_sync=None, pause_mode="wait"):
        self.session = requests.Session()
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, HTTPAdapter(pool_maxsize=max(10, max_concurrent_chats)))
        if api_key := api_key or os.environ.get("VLLM_API_KEY"):
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        if base_url is None:
            self.server_port, self.servers = server_port, [Server(f"http://{host}:{server_port}", host)]
        else:
            urls = base_url.split(",") if isinstance(base_url, str) else base_url
            self.servers = [_server(url) for url in urls]
        self.base_url, self.host = self.servers[0].url, self.servers[0].host
        self.router = None  # vLLM's router, when base_url is one (it answers /list_workers)
        self.workers = []  # the servers behind the router, as last looked up
        self.group_port, self.timeout, self.max_concurrent_chats = group_port, timeout, max_concurrent_chats
        # "legacy" (TRL's), "stock" (vLLM's weight-transfer API) or None: stock's if a server lacks TRL's
        self.weight_sync, self.pause_mode = weight_sync, pause_mode
        self.group, self.rank = [], None  # the open weight-sync group's servers, and this client's rank in it
        self.communicator = None  # gloo ProcessGroup or PyNcclCommunicator, after init_communicator
        self.broadcasts = 0  # weight broadcasts sent (one per bucket, whatever the number of servers)
        self.model = None  # served model id, read from /v1/models on first use
        self.packed_bytes = DEFAULT_PACKED_BYTES  # stock dialect: bytes per packed broadcast (sent at init)
        self._lock = threading.Lock()  # guards each server's `load`
        self._pack_buffers = []  # gloo: update_named_params' two bucket buffers, freed with the group
        self._device = self._backend = self._version = None  # _version: the open update's, it commits as
        self._in_update = self._exiting = False
        self._session = False  # an update that per-parameter updates opened (reset_prefix_cache commits it)
        self.check_server(connection_timeout)
        self._find_router()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.communicator is not None:
            self.close_communicator()
        self.session.close()

    def _request(self, method, path, json=None, idempotent=False, server=None):
        """One call to `server` (default: the first) → its JSON body. Resends only what never reached the
        server, or idempotent calls: a resent weight update would desynchronize the broadcasts after it."""
        url = (server.url if server else self.base_url) + path
        for attempt in range(MAX_RETRIES + 1):
            try:
                response = self.session.request(method, url, json=json, timeout=self.timeout)
                break
            except requests.RequestException as exc:
                reason = getattr(exc.args[0] if exc.args else None, "reason", None)  # urllib3's
                never_sent = isinstance(reason, ConnectTimeoutError)  # refused, unresolvable, connect timeout
                retry = isinstance(exc, requests.ConnectionError) and (idempotent or never_sent)
                if not retry or attempt == MAX_RETRIES:
                    timed_out = isinstance(exc, requests.ReadTimeout)
                    what = f"no answer within {self.timeout} s" if timed_out else exc
                    raise VLLMClientError(f"{method} {url}: {what}") from exc
                time.sleep(RETRY_BACKOFF_S * 2**attempt)
        if response.status_code >= 400:
            message = _error_message(response)
            several = len(self.servers) > 1 or self.router is not None
            raise VLLMClientError(f"{url}: {message}" if several else message, response.status_code, response)
        return response.json() if response.content else {}

    def _live(self):
        """The servers to use: those that did not fail, or all of them if every one did (they may be back)."""
        return [s for s in self.servers if not s.down] or list(self.servers)

    def _find_router(self):
        """One URL that answers GET /list_workers is vLLM's router. Generation goes through it, so its policy
        (prefix-cache affinity, load) weighs our requests with every other client's; everything that must
        reach each server (weight sync, world size, prefix-cache resets) goes to the servers behind it."""
        if len(self.servers) == 1:
            with contextlib.suppress(VLLMClientError, ValueError):  # a server: 404
                urls = self._request("GET", "/list_workers", idempotent=True).get("urls")
                self.router = self.servers[0] if isinstance(urls, list) else None

    def _fleet(self, refresh=False):
        """The servers weight sync spans: those behind the router (asked again with `refresh`), else the live
        ones."""
        if self.router is None:
            return self._live()
        if refresh or not self.workers:
            urls = self._request("GET", "/list_workers", idempotent=True, server=self.router)["urls"]
            known = {server.url: server for server in self.workers}
            self.workers = [known.get(url.rstrip("/")) or _server(url) for url in urls]
        if not self.workers:
            raise VLLMClientError(f"The router at {self.router.url} has no servers (GET /list_workers).")
        return self.workers

    def _each(self, method, path, json=None, idempotent=False, servers=None, best_effort=False):
        """The same call to every server (default: the live ones) at once → their bodies, in order; one that
        does not answer is marked down. The first failure is raised once all ended (`best_effort`: kept)."""
        def call(server):
            try:
                return self._request(method, path, json, idempotent=idempotent, server=server)
            except VLLMClientError as exc:
                server.down = server.down or _gone(exc)
                return exc

        servers = self._live() if servers is None else servers
        if len(servers) == 1 or self._exiting:  # no new thread starts at interpreter exit
            outcomes = [call(server) for server in servers]
        else:
            with ThreadPoolExecutor(len(servers)) as pool:
                outcomes = list(pool.map(call, servers))
        for result in outcomes:
            if isinstance(result, VLLMClientError) and not best_effort:
                raise result
        return outcomes

    def _spread(self, count, run, weight=1):
        """Items 0..count-1 over the live servers by load, one contiguous part each: `run(server, part, done)`
        puts item i's result in `done[i]`. The unfinished items of a server that died or answered 503 go once
        to the others. → results in input order."""
        done, pending, failed, errors = {}, list(range(count)), set(), []

        def run_on(server, part):
            with self._lock:
                server.load += len(part) * weight
            try:
                run(server, part, done)
            finally:
                with self._lock:
                    server.load -= len(part) * weight

        for _ in range(2):  # the first try, then the one resend
            servers, lost = [s for s in self._live() if s not in failed], []
            if not servers:
                break
            with ThreadPoolExecutor(len(servers)) as pool:
                parts = _split(pending, [s.load for s in servers], weight)
                futures = [(s, part, pool.submit(run_on, s, part)) for s, part in zip(servers, parts) if part]
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
                raise VLLMClientError(f"The vLLM server at {url} is not up after {total_timeout} s: "
                                      f"{problem}")
            time.sleep(retry_interval)

    def get_world_size(self):
        """Number of vLLM workers (tensor_parallel_size * data_parallel_size), summed over the servers."""
        infos = self._each("GET", "/get_world_size", idempotent=True, servers=self._fleet(refresh=True))
        return sum(info["world_size"] for info in infos)

    def generate(self, prompts, images=None, n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0,
                 min_p=0.0, max_tokens=16, logprobs=0, structured_outputs_regex=None, generation_kwargs=None,
                 return_weight_versions=False):
        """Completions → {prompt_ids, completion_ids, logprobs, logprob_token_ids}. `logprobs=k`: per position
        the sampled token plus the top k, by logprob descending (None: none). `images`: a list of PIL images
        (or None) per prompt, sent through the legacy /generate/ route. `return_weight_versions`: also
        `weight_versions`, per completion the weights that sampled its tokens, [{version, start, end}] over
        its token indexes (None from a server that does not report them)."""
        keys = VERSIONED_KEYS if return_weight_versions else LEGACY_KEYS
        versions = {"return_weight_versions": True} if return_weight_versions else {}
        sampling = {**_sampling(n, repetition_penalty, temperature, top_p, top_k, min_p, max_tokens),
                    "logprobs": logprobs, **versions}
        if images is not None:
            images = [[_png_base64(image) for image in row] if row else None for row in images]
            body = {**sampling, "structured_outputs_regex": structured_outputs_regex,
                    "generation_kwargs": generation_kwargs or {}}

            def run(server, part, done):
                result = self._request("POST", "/generate/", {
                    **body, "prompts": _pick(prompts, part), "images": _pick(images, part)}, server=server)
                done.update(zip(part, _per_prompt(result, n, keys)))
        else:
            body = {"model": self._model_id(), **sampling, **_token_ids(structured_outputs_regex),
                    **(generation_kwargs or {})}

            def run(server, part, done):
                response = self._request("POST", "/v1/completions", {**body, "prompt": _pick(prompts, part)},
                                         server=server)
                result = _legacy_result(response, body["logprobs"], body["n"])
                done.update(zip(part, _per_prompt(result, body["n"], keys)))
        return _joined(self._spread(len(prompts), run, weight=n), keys)

    def chat(self, messages, n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
             max_tokens=16, logprobs=0, structured_outputs_regex=None, generation_kwargs=None,
             chat_template_kwargs=None, tools=None, chat_template=None, return_weight_versions=False):
        """Completions for a batch of conversations, same result shape as `generate`. Callable `tools` become
        JSON schemas (rendered into the prompt, never called). At most `max_concurrent_chats` per server."""
        versions = {"return_weight_versions": True} if return_weight_versions else {}
        body = {"model": self._model_id(),
                **_sampling(n, repetition_penalty, temperature, top_p, top_k, min_p, max_tokens),
                **_token_ids(structured_outputs_regex),
                **_chat_options(logprobs, tools, chat_template, chat_template_kwargs),
                **(generation_kwargs or {}), **versions}

        def run(server, part, done):
            def send(i):
                done[i] = _legacy_result(self._request("POST", "/v1/chat/completions", {
                    **body, "messages": _openai_messages(messages[i])}, server=server), logprobs)

            _map(send, part, self.max_concurrent_chats)
        return _joined(self._spread(len(messages), run, weight=n),
                       VERSIONED_KEYS if return_weight_versions else LEGACY_KEYS)

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100, temperature=1.0,
                              use_binary=True, chunk_size=0, max_concurrent_requests=4):
        """Teacher top-k logprobs of every completion position of prompt+completion `sequences` →
        {logprobs, logprob_token_ids} ([seq][position][k]); binary mode adds actual_logprobs and
        actual_token_ids ([seq][position][1]) and pads each position to k with -inf / id 0."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        body = {"top_logprobs": top_logprobs, "temperature": temperature,
                "response_format": "binary" if use_binary else "json"}

        def run(server, part, done):
            size = chunk_size if chunk_size > 0 else max(1, len(part))

            def send(chunk):
                response = self._request("POST", "/get_sequence_logprobs", {
                    **body, "sequences": _pick(sequences, chunk),
                    "prompt_lengths": _pick(prompt_lengths, chunk)}, idempotent=True, server=server)
                rows = _decode_binary_logprobs(response) if use_binary else response
                done.update((i, {key: [rows[key][j]] for key in rows}) for j, i in enumerate(chunk))

            _map(send, [part[i:i + size] for i in range(0, len(part), size)], max_concurrent_requests)
        return _joined(self._spread(len(sequences), run), BINARY_KEYS if use_binary else LEGACY_KEYS[2:])

    def image_features(self, images, max_concurrent_requests=64):
        """TRL 1.16's: per prompt, its PIL images rendered into vLLM's multimodal features by
        /v1/chat/completions/render (a server started with --enable-scale-out); None for a prompt without."""
        def render(row):
            if not row:
                return None
            content = [_image_part(image) for image in row]
            return self._request("POST", "/v1/chat/completions/render", {
                "model": self._model_id(), "messages": [{"role": "user", "content": content}],
                "max_tokens": 1}, idempotent=True)["features"]

        return _map(render, images, max_concurrent_requests)

    def reset_prefix_cache(self):
        """Also commits an open session of per-parameter updates (TRL's per-parameter sync ends here)."""
        self._end_session()
        self._each("POST", "/reset_prefix_cache", idempotent=True, servers=self._fleet())

    def init_communicator(self, device=0):
        """Join the weight-sync group of every live server's workers: as its last rank in TRL's dialect, as
        rank 0 (the group's host) in stock vLLM's; gloo on CPU servers, else NCCL on `device`."""
        import torch

        self._leave_group()  # a group of an earlier init: its NCCL communicator is not reused
        self.group, self._in_update, self._session = self._fleet(refresh=True), False, False
        # names the group in every call: once a newer trainer's group replaced it, servers refuse ours (409)
        self.session.headers["X-Weight-Sync-Group"] = uuid.uuid4().hex
        infos = self._each("GET", "/get_world_size", idempotent=True, servers=self.group)
        legacy = ["weight_sync_backend" in info for info in infos]
        self.weight_sync = self.weight_sync or ("legacy" if all(legacy) else "stock")
        self._device, sizes = _as_device(device), [info["world_size"] for info in infos]
        if self.weight_sync == "stock":
            return self._init_stock(sizes)
        if not all(legacy):
            raise VLLMClientError(f"{self.group[legacy.index(False)].url} does not speak TRL's weight-sync "
                                  "protocol: one group uses one dialect (weight_sync='stock' for all).")
        self._backend = self._transport({info["weight_sync_backend"] for info in infos})
        self.rank = sum(sizes)  # the last: the servers' workers come first
        store_host = _store_host([s.host for s in self.group])  # where every rank reaches the group's store
        body = {"host": store_host, "port": self.group_port, "world_size": self.rank + 1,
                "client_device_uuid": "cpu"}  # or this GPU's: the servers refuse a trainer on one of theirs
        if self._device.type == "cuda" and torch.cuda.is_available():
            body["client_device_uuid"] = str(torch.cuda.get_device_properties(self._device).uuid)
        for server, offset in zip(self.group, itertools.accumulate(sizes[:-1], initial=0)):
            self._request("POST", "/init_communicator", {**body, "rank_offset": offset} if len(self.group) > 1
                          else body, server=server)
        store_host = self.group[0].host if store_host == "0.0.0.0" else store_host
        if self._backend == "gloo":
            self.communicator = self._gloo_group(store_host, self.rank + 1)
        else:
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup
            from vllm.utils.nccl import unpinned_nccl_env

            group = StatelessProcessGroup.create(host=store_host, port=self.group_port, rank=self.rank,
                                                 world_size=self.rank + 1,
                                                 store_timeout=int(self.timeout or DEFAULT_TIMEOUT_S))
            with torch.cuda.device(self._device), unpinned_nccl_env():
                self.communicator = _enabled(PyNcclCommunicator(group, device=self._device))
        atexit.register(self._close_at_exit)

    def _transport(self, backends):
        """The servers' one transport, if `self._device` can use it: refused before any group forms."""
        backend = backends.pop() if len(backends) == 1 else None
        if backend not in ("gloo", "nccl"):
            raise VLLMClientError(f"The servers' weight transfer is {backend or 'mixed'!r}: this client "
                                  "speaks gloo or NCCL, one for the whole group (--weight-transfer-config "
                                  "'{\"backend\": \"nccl\"}', or gloo on CPU servers).")
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
        self._backend = self._transport({(config.get("weight_transfer_config") or {}).get("backend")
                                         for config in configs})
        remote = [s.host for s in self.group if not _is_loopback(s.host)]
        self.rank, address = 0, _local_address_towards(remote[0] if remote else self.group[0].host)
        init_info = {"master_address": address, "master_port": self.group_port, "world_size": sum(sizes) + 1,
                     "packed": True, "packed_buffer_size_bytes": self.packed_bytes}
        with ThreadPoolExecutor(len(self.group)) as pool:
            joined = [pool.submit(self._request, "POST", "/init_weight_transfer_engine",
                                  {"init_info": {**init_info, "rank_offset": offset}}, server=server)
                      for server, offset in zip(self.group, itertools.accumulate(sizes[:-1], initial=1))]
            if self._backend == "gloo":
                self.communicator = self._gloo_group(address, init_info["world_size"])
            else:
                import torch
                from vllm.distributed.weight_transfer.nccl_common import trainer_init

                with torch.cuda.device(self._device):
                    self.communicator = _enabled(trainer_init(init_info))
            for future in joined:
                future.result()
        atexit.register(self._close_at_exit)

    def _gloo_group(self, host, world_size):  # vLLM's, on the TCP store at `host`
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        return stateless_init_torch_distributed_process_group(
            host, self.group_port, self.rank, world_size, backend="gloo",
            timeout=datetime.timedelta(seconds=self.timeout or DEFAULT_TIMEOUT_S))

    def _members(self):
        """The open group's servers (before any init: the live ones, which then answer that none is open)."""
        return self.group or self._fleet()

    def _regroup(self):
        """Behind a router, before an update sends anything: if the servers behind it changed since the group
        formed, the group forms again over them, so one added since takes this update (a trainer sends every
        weight at every sync), and one removed, alive, leaves the group."""
        if self.router and [s.url for s in self._fleet(refresh=True)] != [s.url for s in self.group]:
            self.close_communicator()
            self.init_communicator(self._device)

    @contextlib.contextmanager
    def _update(self):
        """One weight update on every server of the group: _open, the tensors (announced to every server, then
        broadcast once), _commit; any failure anywhere ends in _abandon, where every server rolls back to the
        weights it had. Inside an open update (nested, or a per-parameter session), that one's."""
        if self._in_update:
            yield
            return
        self._open()
        with self._abandoning():
            yield
        self._commit()

    @contextlib.contextmanager
    def _abandoning(self):
        try:
            yield
        except BaseException:
            self._abandon()
            raise

    def _open(self):
        """Name the update's version (one past the highest the servers report; None where one reports none:
        TRL's own) and, in stock's dialect, pause generation (`pause_mode`) and start the update."""
        self._regroup()
        servers = self._members()
        try:
            infos = self._each("GET", "/weight_info", idempotent=True, servers=servers)
            self._version = str(1 + max(int(v) if str(v).isdigit() else 0 for v in
                                        (info["weight_version"] for info in infos)))
        except VLLMClientError as exc:
            if exc.status_code != 404:
                raise
            self._version = None
        self._in_update = True
        if self.weight_sync == "stock":
            with self._abandoning():
                self._each("POST", f"/pause?mode={self.pause_mode}", servers=servers)
                self._each("POST", "/start_weight_update", {}, servers=servers)

    def _commit(self):
        """Every server took the whole update: each commits it under its version, then resumes (stock); all
        of them must then report that version."""
        servers, version = self._members(), self._version
        with self._abandoning():
            self._each("POST", "/finish_weight_update", {"weight_version": version} if version else {},
                       servers=servers)
            if self.weight_sync == "stock":
                self._each("POST", "/resume", servers=servers)
        self._in_update = self._session = False
        if version is not None:
            reported = self._each("GET", "/weight_info", idempotent=True, servers=servers)
            stale = [s.url for s, info in zip(servers, reported) if info["weight_version"] != version]
            if stale:
                raise VLLMClientError(f"After the weight update to version {version}, these servers report "
                                      f"another version: {stale}.")

    def _abandon(self):
        """Leave the group (a server waiting for a broadcast stops now); every server rolls back and closes
        its side (one that took everything would wait for a commit). Best effort: one gone rolled back."""
        self._in_update = self._session = False
        self._leave_group()
        stock = self.weight_sync == "stock"
        for path in ["/abort_weight_update", self._close_route(), *(["/resume"] if stock else [])]:
            self._each("POST", path, {}, servers=self._members(), best_effort=True)
        self.group = []

    def _close_route(self):
        return "/shutdown_weight_transfer_engine" if self.weight_sync == "stock" else "/close_communicator"

    def _end_session(self):
        """Commit the session that per-parameter updates opened, if one is open: vLLM rebuilds each layer from
        the tensors of one session, so a layer's tensors (q, k and v of a fused projection) must share one."""
        if self._session:
            self._commit()

    @contextlib.contextmanager
    def _announcing(self, path, body):
        """POST `body` to every server of the group from threads while the block broadcasts → the futures of
        their answers, which come once a server took everything; awaited on a clean exit."""
        servers = self._members()
        pool = ThreadPoolExecutor(len(servers))
        announced = [pool.submit(self._request, "POST", path, body, server=server) for server in servers]
        pool.shutdown(wait=False)
        with self._sending():
            yield announced
        wait_all(announced)
        if failed := _failure(announced):
            raise failed

    def _broadcast(self, tensor):
        self.broadcasts += 1
        if self._backend == "gloo":
            self._await(self.communicator.broadcast(tensor.cpu().contiguous(), root=self.rank))
        else:  # raw memory goes on the wire: one contiguous tensor on the group's device
            self.communicator.broadcast(tensor.to(self._device).contiguous(), src=self.rank)
            if self.weight_sync != "stock":
                self.communicator.group.barrier()  # TRL's protocol: both sides barrier on the store

    def _await(self, work, announced=()):
        """A gloo broadcast's completion, within `timeout`; an announce that failed meanwhile is raised (its
        server would never receive). A broadcast that failed (a member left: gloo saw the reset first) is
        raised as the announces' failure once they ended, which names the server that went away."""
        timeout = self.timeout or DEFAULT_TIMEOUT_S
        deadline, pause = time.monotonic() + timeout, 0.0001
        while not work.is_completed():
            if failed := _failure(announced):
                raise failed
            if time.monotonic() > deadline:
                raise VLLMClientError(f"A weight broadcast did not complete within {self.timeout} s.")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        try:
            work.wait()
        except RuntimeError as exc:
            wait_all(announced, timeout)
            if failed := _failure(announced):
                raise failed  # its own cause kept: whether its server is gone
            raise VLLMClientError(f"A weight broadcast failed: {exc}") from exc

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
        """Drop our side of the group (NCCL's destroyed: a broadcast still posted ends, not spinning)."""
        comm, self.communicator, self._pack_buffers = self.communicator, None, []
        if comm is not None:
            with contextlib.suppress(Exception):
                (comm.destroy if hasattr(comm, "destroy") else comm.shutdown)()

    @contextlib.contextmanager
    def weight_update(self):
        """Newer TRL's sync step: the weights pushed inside the block are one update on every server,
        committed on a clean exit (stock dialect: generation paused, `pause_mode`, from entry to the end) and
        the prefix cache reset; rolled back on any failure."""
        with self._update():
            yield self
        self.reset_prefix_cache()

    def update_named_param(self, name, weights):
        """Announce one tensor, then broadcast it. The first one opens a session of per-parameter updates that
        reset_prefix_cache() (or a batched update, or close_communicator()) commits."""
        self._check_group()
        if not self._in_update:
            self._open()
            self._session = True
        with self._abandoning():
            if self.weight_sync == "stock":
                return self._send_stock([(name, weights.detach())])
            self._each("POST", "/update_named_param", {
                "name": name, "dtype": str(weights.dtype), "shape": list(weights.shape),
                **({"version": self._version} if self._version else {})}, servers=self._members())
            with self._sending():
                self._broadcast(weights.detach())

    def _check_group(self):
        if self.communicator is None:
            raise VLLMClientError("No weight-sync group: call init_communicator() first (a failed update "
                                  "leaves the group, and the next init_communicator starts clean).")

    def update_named_params(self, named_tensors, bucket_bytes=WEIGHT_BUCKET_BYTES):
        """Announce all tensors at once, then broadcast them packed in uint8 buckets of about `bucket_bytes`.
        Also TRL 1.16's form, `update_named_params(metadata, named_params)`: [(name, dtype, shape)] and an
        iterator of (name, tensor), told apart by the second argument not being a size."""
        import torch

        if not isinstance(bucket_bytes, int):
            named_tensors, bucket_bytes = bucket_bytes, WEIGHT_BUCKET_BYTES
        named = [(name, tensor.detach()) for name, tensor in named_tensors]
        self._check_group()
        self._end_session()
        with self._update():
            if self.weight_sync == "stock":
                return self._send_stock(named)
            buckets = _buckets(named, bucket_bytes)
            params = [{"name": name, "dtype": str(t.dtype), "shape": list(t.shape)} for name, t in named]
            body = {"params": params, "bucket_bytes": bucket_bytes, "layout": WEIGHT_LAYOUT, "finish": False,
                    "pause": self.pause_mode, **({"version": self._version} if self._version else {})}
            with self._announcing("/update_named_params", body) as sent:
                if self._backend == "gloo":
                    _broadcast_buckets(self.communicator, self.rank, buckets, self._pack_buffers,
                                       lambda work: self._await(work, sent))
                    self.broadcasts += len(buckets)
                else:  # a bucket's tensors may sit on other devices (CPU-offloaded parameters)
                    for bucket in buckets:
                        self._broadcast(torch.cat(_packed([t.to(self._device) for t in bucket])))

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
        broadcasts run meanwhile, packed as vLLM packs them: its NCCL engine's layout, ours on gloo."""
        update_info = {"names": [n for n, _ in named], "shapes": [list(t.shape) for _, t in named],
                       "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in named]}
        with self._update(), self._announcing("/update_weights", {"update_info": update_info}) as loaded:
            if self._backend != "gloo":
                self._produce(named)
                self.broadcasts += 1  # vLLM's producer sends its chunks itself: counted as one
                return
            from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

            tensors = iter([(n, t.cpu().contiguous()) for n, t in named])
            while (chunk := pack_tensors(tensors, lambda item: item[1], self.packed_bytes)) is not None:
                self._await(self.communicator.broadcast(chunk.packed_tensor, root=0), loaded)
                self.broadcasts += 1

    def _produce(self, named):
        """vLLM's NCCL producer. It packs on its own side streams, which first wait for this device's current
        stream (an optimizer step may still be writing the weights), and synchronizes them on the host: so it
        runs in a thread watched against `timeout`, past which the communicator is destroyed (ending it)."""
        import torch
        from vllm.distributed.weight_transfer.packed_tensor import (DEFAULT_PACKED_NUM_BUFFERS, _get_streams,
                                                                    packed_nccl_broadcast_producer)

        for stream in _get_streams(self._device.index, DEFAULT_PACKED_NUM_BUFFERS):
            stream.wait_stream(torch.cuda.current_stream(self._device))
        outcome = {}

        def produce():
            try:
                with torch.cuda.device(self._device):
                    packed_nccl_broadcast_producer(
                        iter(named), self.communicator, src=0, buffer_size_bytes=self.packed_bytes,
                        post_iter_func=lambda item: item[1].to(self._device).contiguous())
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
        self._exiting = True
        self.close_communicator()

    def close_communicator(self):
        """Leave the weight-sync group, on every server of it; a server that is already gone is fine."""
        atexit.unregister(self._close_at_exit)
        try:
            self._end_session()
            self._each("POST", self._close_route(), servers=self._members())
        except VLLMClientError as exc:
            if exc.status_code not in (None, 409):  # gone, or its group replaced by a newer trainer's: closed
                raise
        finally:
            self._leave_group()
            self.group = []


def _server(url):
    """A base URL → Server, at the address its host resolves to (where the weight-sync group reaches it)."""
    parsed = urlparse(url.strip())
    return Server(f"{parsed.scheme or 'http'}://{parsed.netloc}{parsed.path}".rstrip("/"),
                  socket.gethostbyname(parsed.hostname))


def _gone(exc):
    """Whether a failed call means its server is gone: no answer (refused, reset; a timeout is not: the server
    may only be slow) or a 503 (shutting down, a dead replica, paused past its timeout)."""
    cause = exc.__cause__
    return exc.status_code == 503 or (exc.status_code is None and isinstance(cause, requests.ConnectionError))


def _failure(announced):
    """The error of the announces that failed so far (those done), one whose server is gone first: it names
    the cause the others only follow (a survivor answers that it rolled back). → None if none failed."""
    errors = [f.exception() for f in announced if f.done() and f.exception() is not None]
    return next((e for e in errors if _gone(e)), errors[0] if errors else None)


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


def _split(items, loads, weight):
    """`items` cut into one contiguous part per server, in order, sized so that each server's load (its
    `loads`, plus `weight` per item) ends as even as it can."""
    sizes = [0] * len(loads)
    for _ in items:
        sizes[min(range(len(loads)), key=lambda j: loads[j] + sizes[j] * weight)] += 1
    return [items[end - size:end] for size, end in zip(sizes, itertools.accumulate(sizes))]


def _pick(values, part):
    """values[i] for i in part; `values` itself when part is all of it (one server: the request as before)."""
    return values if list(part) == list(range(len(values))) else [values[i] for i in part]


def _map(function, items, workers):
    with ThreadPoolExecutor(max(1, min(workers, len(items)))) as pool:
        return list(pool.map(function, items))


def _per_prompt(result, n, keys=LEGACY_KEYS):
    """A legacy result → one per prompt (its prompt ids, and its n completions' rows)."""
    return [{key: None if result.get(key) is None else
             result[key][k:k + 1] if key == "prompt_ids" else result[key][k * n:(k + 1) * n] for key in keys}
            for k in range(len(result["prompt_ids"]))]


def _joined(parts, keys):
    """Per-item results → one: each key's rows concatenated, None if any item has None there."""
    return {key: None if any(p[key] is None for p in parts) else [row for p in parts for row in p[key]]
            for key in keys}


def _sampling(n, repetition_penalty, temperature, top_p, top_k, min_p, max_tokens):
    return {"n": n, "repetition_penalty": repetition_penalty, "temperature": temperature, "top_p": top_p,
            "top_k": top_k if top_k > 0 else -1, "min_p": min_p, "max_tokens": max_tokens}


def _token_ids(regex):
    """Token ids asked for (what makes stock vLLM's answers usable), and the regex completions must match."""
    return {"return_token_ids": True, "return_tokens_as_token_ids": True,
            **({} if regex is None else {"structured_outputs": {"regex": regex}})}


def _chat_options(logprobs, tools, chat_template, chat_template_kwargs):
    options = {}
    if logprobs is not None:  # one more than asked: with the sampled token it covers the legacy top k
        options.update(logprobs=True, top_logprobs=logprobs + 1 if logprobs else 0)
    if tools:  # rendered into the prompt only, as TRL's /chat/ did: no tool-call parsing asked for
        if any(callable(tool) for tool in tools):  # transformers is imported only then
            from transformers.utils import get_json_schema

            tools = [get_json_schema(tool) if callable(tool) else tool for tool in tools]
        options.update(tools=list(tools), tool_choice="none")
    if chat_template is not None:
        options["chat_template"] = chat_template
    if chat_template_kwargs:
        options["chat_template_kwargs"] = chat_template_kwargs
    return options


def _png_base64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image_part(image):
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png_base64(image)}"}}


def _openai_messages(conversation):
    """TRL messages → OpenAI ones: PIL images (`image_pil` or `image` parts) become data-URI `image_url`s."""
    def part(p):
        image = p.get(p["type"]) if p.get("type") in ("image_pil", "image") else None
        return _image_part(image) if hasattr(image, "save") else copy.deepcopy(p)

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in conversation]


def _positions(logprobs):
    """A choice's logprobs (completion or chat layout) → [(sampled (token, logprob), [(token, logprob)])]."""
    if logprobs is None:
        return None
    if "content" in logprobs:
        return [((e["token"], e["logprob"]), [(t["token"], t["logprob"]) for t in e["top_logprobs"] or ()])
                for e in logprobs["content"]]
    return [((token, logprob), list((top or {}).items())) for token, logprob, top in
            zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"])]


def _entries(sampled, tops, k):
    """One position as TRL returns it: the top k plus the sampled token, by logprob descending (null last)."""
    by_id = {}  # the sampled token's first; null (NaN) logprobs stay None, -inf is back from JSON's stand-in
    for token, logprob in [sampled, *tops]:
        by_id.setdefault(int(token.removeprefix("token_id:")),
                         logprob if logprob is None or logprob > JSON_MIN_LOGPROB else -math.inf)
    ranked = sorted(by_id.items(), key=lambda e: -math.inf if e[1] is None else e[1], reverse=True)[:k]
    sampled_id = next(iter(by_id))
    return ranked if any(t == sampled_id for t, _ in ranked) else ranked + [(sampled_id, by_id[sampled_id])]


def _legacy_result(response, k, n=None):
    """An OpenAI answer → TRL's result: prompt_ids per prompt (completions: n choices each, prompt-major;
    chat: one prompt); completion_ids, logprobs, logprob_token_ids and weight_versions per completion."""
    choices = sorted(response["choices"], key=lambda c: c["index"])
    positions = [_positions(c["logprobs"]) for c in choices]
    rows = None if k is None or any(p is None for p in positions) else \
        [[_entries(sampled, tops, k) for sampled, tops in p] for p in positions]
    versions = [c.get("weight_versions") for c in choices]
    prompt_ids = [c["prompt_token_ids"] for c in choices[::n]] if n else [response["prompt_token_ids"]]
    return {"prompt_ids": prompt_ids, "completion_ids": [c["token_ids"] for c in choices],
            "logprobs": None if rows is None else [[[lp for _, lp in e] for e in row] for row in rows],
            "logprob_token_ids": None if rows is None else [[[t for t, _ in e] for e in row] for row in rows],
            "weight_versions": None if None in versions else versions}


def _decode_binary_logprobs(response):
    """Binary /get_sequence_logprobs answer → nested lists, each sequence cut to its completion length."""
    import numpy as np

    top, actual = response["shape"], response["shape"][:2] + [1]
    arrays = {"logprobs": ("logprobs_b64", np.float32, top),
              "logprob_token_ids": ("token_ids_b64", np.int32, top),
              "actual_logprobs": ("actual_logprobs_b64", np.float32, actual),
              "actual_token_ids": ("actual_token_ids_b64", np.int32, actual)}
    out = {}
    for key, (field, dtype, dims) in arrays.items():
        array = np.frombuffer(base64.b64decode(response[field]), dtype=dtype).reshape(dims)
        out[key] = [array[i, :length].tolist() for i, length in enumerate(response["completion_lengths"])]
    return out


def _buckets(named, bucket_bytes):
    """Tensors in order, a new bucket whenever the next would overflow a non-empty one, each tensor taking
    its padded size (as the server's `weight_buckets` reads them)."""
    buckets, current, size = [], [], 0
    for _, tensor in named:
        if current and size + _padded(tensor) > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(tensor)
        size += _padded(tensor)
    return buckets + [current] if current else buckets


def _padded(tensor):
    """Bytes `tensor` takes in a bucket (layout WEIGHT_LAYOUT)."""
    return -(-tensor.numel() * tensor.element_size() // WEIGHT_ALIGN_BYTES) * WEIGHT_ALIGN_BYTES


def _packed(bucket):
    """A bucket's uint8 pieces in wire order: each tensor's bytes, then zeros up to its padded size."""
    import torch

    pieces = []
    for tensor in bucket:
        raw = tensor.contiguous().view(-1).view(torch.uint8)
        pad = _padded(raw) - raw.numel()
        pieces += [raw, raw.new_zeros(pad)] if pad else [raw]
    return pieces


def _broadcast_buckets(group, root, buckets, buffers, wait):
    """gloo: each bucket as one uint8 tensor, packing bucket k+1 while bucket k is on the wire; `wait(work)`
    returns once a send is complete. `buffers` (the caller's, kept across syncs) holds the two packing
    buffers: a fresh 256 MiB tensor costs more in page faults than the copy into it (0.5 s a first sync)."""
    import torch

    sizes = [sum(_padded(t) for t in bucket) for bucket in buckets]
    for i in range(min(2, len(buckets))):
        if i == len(buffers) or buffers[i].numel() < max(sizes):
            buffers[i:i + 1] = [torch.empty(max(sizes), dtype=torch.uint8)]  # appended, or replaced
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


def _store_host(hosts):
    """Where every rank reaches the group's TCP store, hosted by the first server's first worker (`hosts`: the
    servers' addresses, as this client reaches them). One server: its loopback address if it runs here, else
    all interfaces (TRL's choice: only its own workers connect). Several: the first one's address as the
    others reach it (a server told "0.0.0.0" would connect to itself)."""
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
