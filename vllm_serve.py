"""OpenAI-compatible rollout server for online RL, with live weight sync; a drop-in for `trl vllm-serve`.

What it does
    Spawns one worker process per data-parallel rank, each owning one `vllm.LLM` (seeded apart, see
    `replica_seed`), and talks to them over `multiprocessing` pipes. Every pipe exchange runs in a
    thread under one shared asyncio lock, so the event loop never blocks (`/health` answers while a
    batch generates). Concurrent requests from every generation route are batched continuously
    (below) across the DP ranks, each request keeping its own SamplingParams. Chat prompts are
    rendered to token ids here, so one batch mixes templates, tools and sampling settings freely.

Launch
    python vllm_serve.py --model Qwen/Qwen2.5-0.5B-Instruct
    python vllm_serve.py --model M --data_parallel_size 2 --enable-auto-tool-choice --tool-call-parser hermes
    python vllm_serve.py --config serve.yaml            # YAML of flags; its `env:` mapping is exported

Routes
    GET  /health /get_world_size /v1/models            (legacy spellings with a trailing slash too)
    POST /v1/completions /v1/chat/completions          OpenAI + vLLM extension fields, `stream: true`
    POST /generate/ /chat/ /get_sequence_logprobs/     legacy TRL shapes
    POST /init_communicator /update_named_param /update_named_params /reset_prefix_cache /close_communicator

Weight sync (TRL's protocol): the trainer is the last rank of a group of `tp*dp + 1`; NCCL when the
workers run on CUDA, gloo over a TCP store when they run on CPU. `/update_named_params` announces
many tensors at once; the client broadcasts them packed in buckets (one broadcast per bucket), each
tensor padded to WEIGHT_ALIGN_BYTES; the body names that layout (`"layout": 2`), else 400.

Batching
    Continuous: vLLM's engines step without pause; in rounds (one pipe exchange under the lock) the
    parent hands every rank the requests that arrived since the last round and collects what
    finished, so new requests reach the engine within ROUND_WAIT_MS. A weight update waits until the
    running requests finish; requests that arrive meanwhile run on the new weights.

Limits
    `stream: true` sends the finished result as OpenAI chunks (no token-by-token streaming), so a
    stream is only sent once generated; a client that disconnects before its answer has its prompts
    aborted in vLLM at the next round. Data-parallel ranks are independent replicas (dense models);
    no tensor parallelism across DP ranks beyond `--tensor_parallel_size`.
"""

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import gc
import hmac
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import pathlib
import signal
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

logger = logging.getLogger("vllm_serve")

# ------------------------------------------------------------------------------------------------
# Constants
# ------------------------------------------------------------------------------------------------

BATCH_WAIT_MS = 0.0  # when idle, how long the first request waits for company. 0: start at once; the rest
#                     of a burst joins at the next engine step anyway, and a lone request pays no delay
ROUND_WAIT_MS = 5.0  # a busy rank answers a round once a request finished or after this: the longest a new
#                      request waits to reach the engine (which keeps stepping in its own process meanwhile)
MAX_BATCH_REQUESTS = 1024  # requests admitted per round; vLLM's scheduler still caps running seqs (max_num_seqs)
WORKER_START_TIMEOUT_S = 1800.0  # model download + load + warmup of the slowest rank
WORKER_POLL_S = 1.0  # how often a waiting pipe read checks that the worker is still alive
WEIGHT_SYNC_TIMEOUT_S = 600.0  # a trainer that never joins a broadcast fails the sync after this
WEIGHT_BUCKET_BYTES = 256 << 20  # default bucket of the batched weight update (client may choose)
WEIGHT_ALIGN_BYTES = 16  # each tensor of a bucket starts at a multiple of this: a view as dtype needs an offset
#                          divisible by the element size, and a bucket may mix dtypes (say bf16, then fp32)
WEIGHT_LAYOUT = 2  # bucket layout /update_named_params reads. 1 (sent without `layout`): tensors back to back
LEGACY_LOGPROB_TOP_K = 100  # /get_sequence_logprobs/ default top_logprobs, as TRL
MAX_REQUEST_BODY_BYTES = 256 << 20  # 413 above this; generous enough for a few base64 images per request
MAX_JSON_DEPTH = 64  # nesting levels a body may have; real requests, tool schemas included, stay under 20
JSON_THREAD_BYTES = 1 << 20  # bodies above this are parsed in a thread (~10 ms of json.loads per MiB)
WORKER_DEATH_GRACE_S = 3.0  # after a worker dies: answer 503 this long, then exit non-zero for a supervisor
SHUTDOWN_TIMEOUT_S = 60.0  # on SIGTERM, how long in-flight requests may take to finish
ORPHAN_STOP_TIMEOUT_S = 5.0  # SIGTERM → SIGKILL for engine processes a dead worker left behind
WORKER_STOP_TIMEOUT_S = 10.0  # at shutdown, a worker still generating (for nobody) is terminated after this
CLIENT_CLOSED = 499  # status logged for a request whose client disconnected first (nginx's convention)
MODULE_NAME = pathlib.Path(__file__).stem  # vLLM workers import the extension class by this name

# ------------------------------------------------------------------------------------------------
# Config: one dataclass holds every flag; the parser is derived from it
# ------------------------------------------------------------------------------------------------


def arg(default, help, type=None):
    return field(default=default, metadata={"help": help, "type": type})


@dataclass
class ServeArgs:
    # --- flags of `trl vllm-serve`, same names and defaults
    model: str = arg(None, "Model id on the hub or a local path (required).", str)
    revision: str | None = arg(None, "Model revision (branch, tag or commit).", str)
    tensor_parallel_size: int = arg(1, "GPUs per data-parallel replica.")
    data_parallel_size: int = arg(1, "Number of worker processes, one `vllm.LLM` replica each.")
    host: str = arg("0.0.0.0", "Bind address. Beyond loopback, set --api-key.")
    port: int = arg(8000, "HTTP port.")
    gpu_memory_utilization: float = arg(0.9, "Fraction of GPU memory vLLM may use.")
    dtype: str = arg("auto", "Model dtype (auto, float32, bfloat16, float16).")
    max_model_len: int | None = arg(None, "Max prompt + completion tokens (default: the model's).", int)
    enable_prefix_caching: bool | None = arg(None, "Prefix caching (default: vLLM's).", "bool")
    enforce_eager: bool = arg(False, "Disable CUDA graphs / torch.compile.")
    kv_cache_dtype: str = arg("auto", "KV cache dtype.")
    trust_remote_code: bool = arg(False, "Allow custom model code from the hub.")
    log_level: str = arg("info", "Uvicorn log level (critical, error, warning, info, debug, trace).")
    vllm_model_impl: str = arg("vllm", "Model implementation: vllm or transformers.")
    distributed_executor_backend: str | None = arg(None, "vLLM executor backend, e.g. ray.", str)
    speculative_config: str | None = arg(None, "JSON speculative decoding config.", str)
    # --- ours
    served_model_name: str | None = arg(None, "Model id in the OpenAI routes (default: --model).", str)
    max_logprobs: int = arg(-1, "Max logprobs per token a request may ask for (-1: no cap).")
    logprobs_mode: str = arg("processed_logprobs", "raw_logprobs, raw_logits, processed_logprobs or "
                             "processed_logits; processed = after temperature/penalties (what GRPO needs).")
    enable_auto_tool_choice: bool = arg(False, "Parse tool calls for tool_choice=auto.")
    tool_call_parser: str | None = arg(None, "vLLM tool parser name (hermes, llama3_json, ...).", str)
    reasoning_parser: str | None = arg(None, "vLLM reasoning parser name.", str)
    chat_template: str | None = arg(None, "Chat template file or inline Jinja (default: tokenizer's).", str)
    max_num_seqs: int | None = arg(None, "Max sequences vLLM schedules at once (default: vLLM's).", int)
    seed: int = arg(0, "Engine seed of DP rank 0; the other ranks derive their own from it.")
    kv_cache_memory_bytes: int | None = arg(None, "KV cache size in bytes (CPU: instead of a GiB env var).", int)
    batch_wait_ms: float = arg(BATCH_WAIT_MS, "When idle, how long the first request waits for others, in ms.")
    max_batch_requests: int = arg(MAX_BATCH_REQUESTS, "Requests admitted per batching round.")
    round_wait_ms: float = arg(ROUND_WAIT_MS, "Longest a busy rank runs before taking new requests, in ms.")
    weight_sync_timeout: float = arg(WEIGHT_SYNC_TIMEOUT_S, "Seconds a weight-sync broadcast may wait.")
    worker_start_timeout: float = arg(WORKER_START_TIMEOUT_S, "Seconds to wait for the workers to load.")
    api_key: str | None = arg(None, "Require `Authorization: Bearer <key>` on every route but /health "
                              "(default: $VLLM_API_KEY).", str)
    max_request_body_bytes: int = arg(MAX_REQUEST_BODY_BYTES, "Larger request bodies get 413.")
    shutdown_timeout: float = arg(SHUTDOWN_TIMEOUT_S, "On SIGTERM, seconds in-flight requests may take.")

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required")
        if self.data_parallel_size < 1 or self.tensor_parallel_size < 1:
            raise ValueError("--data_parallel_size and --tensor_parallel_size must be >= 1")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        self.api_key = self.api_key or os.environ.get("VLLM_API_KEY")  # read after --config's `env:` is exported
        if self.chat_template and os.path.isfile(self.chat_template):
            self.chat_template = pathlib.Path(self.chat_template).read_text()


def parse_bool(text):
    if isinstance(text, bool):
        return text
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def make_parser():
    parser = argparse.ArgumentParser(prog="vllm_serve.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of flags (CLI wins); its `env:` mapping is exported.")
    for f in dataclasses.fields(ServeArgs):
        flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"}, key=len, reverse=True)
        kind = f.metadata["type"] or type(f.default)
        kwargs = dict(dest=f.name, default=f.default, help=f.metadata["help"])
        if kind is bool:  # `--enforce_eager` alone means true, as in TRL
            kwargs.update(type=parse_bool, nargs="?", const=True)
        elif kind == "bool":  # tri-state: needs an explicit value
            kwargs.update(type=parse_bool)
        else:
            kwargs.update(type=kind)
        parser.add_argument(*flags, **kwargs)
    return parser


def parse_args(argv=None):
    parser = make_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        import yaml

        config = yaml.safe_load(pathlib.Path(known.config).read_text()) or {}
        os.environ.update({k: str(v) for k, v in (config.pop("env", None) or {}).items()})
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in config.items()})
    values = vars(parser.parse_args(argv))
    values.pop("config")
    try:
        return ServeArgs(**values)
    except ValueError as exc:
        parser.error(str(exc))


# ------------------------------------------------------------------------------------------------
# Wire formats: OpenAI errors, request parsing, response shaping
# ------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 409: "ConflictError",
             413: "RequestTooLargeError", 499: "ClientClosedRequest", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, message, status=400, param=None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    def response(self):
        body = {"message": self.message, "type": self.TYPES.get(self.status, "APIError"),
                "param": self.param, "code": self.status}
        return JSONResponse({"error": body}, status_code=self.status)


def is_int(x):
    """A JSON integer; Python's bool is an int subclass, JSON's true is not."""
    return isinstance(x, int) and not isinstance(x, bool)


def finite(x):
    """Logprob for JSON: NaN → null; -inf → -9999.0 as stock vLLM (JSON has no infinities)."""
    if x is None or math.isnan(x):
        return None
    return max(x, -9999.0)


def token_text(token_id, decoded, as_token_id, tokenizer):
    if as_token_id:
        return f"token_id:{token_id}"
    return decoded if decoded is not None else tokenizer.decode([token_id])


async def read_json(request):
    """The body as a JSON object, else 400. Its size is capped by `Guard`, chunked bodies included."""
    from starlette.requests import ClientDisconnect

    try:
        raw = await request.body()
    except ClientDisconnect:  # nobody is left to read the answer; say why in the access log
        raise APIError("The client disconnected before sending the whole body.") from None
    if len(raw) > JSON_THREAD_BYTES:  # parsing a big body takes a while: keep the event loop free meanwhile
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


def parse_json(raw):
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(f"Malformed JSON body: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.")
    check_json(body)
    return body


def check_json(value):
    """400 for what `json.loads` accepts but nothing downstream should see: nesting deeper than
    MAX_JSON_DEPTH (recursion in pydantic, Jinja, or the pickling to the workers) and lone UTF-16
    surrogates such as "\\ud800" (no tokenizer encodes them)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise APIError("The body holds a string that is not valid Unicode (a lone surrogate).") from None
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(f"The body is nested deeper than {MAX_JSON_DEPTH} levels.")
        children = item if isinstance(item, list) else [*item.keys(), *item.values()]
        stack.extend([(c, depth + 1) for c in children if type(c) in JSON_TEXT_OR_NESTED])  # 25 ns per number


JSON_TEXT_OR_NESTED = {str, list, dict}  # what json.loads builds that check_json must look into


def validate(model_cls, body):
    """Stock vLLM's own request model: same fields, defaults and checks as `vllm serve`."""
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(f"{err['msg']} (field: {param})" if param else err["msg"], param=param) from None
    except Exception as exc:  # vLLM's own validators raise VLLMValidationError, not only ValueError
        raise APIError(str(exc), param=getattr(exc, "parameter", None)) from None


def decode_image(url):
    """data:image/...;base64,... → PIL image (the only kind of image URL this server fetches)."""
    from PIL import Image

    if not isinstance(url, str) or not url.startswith("data:"):
        raise APIError("Only data: URIs are supported for image_url (no remote fetching).", param="messages")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1], validate=True)))
        image.load()
        return image
    except Exception as exc:
        raise APIError(f"Invalid image data URI: {exc}", param="messages") from None


def normalize_messages(messages):
    """OpenAI messages → what HF chat templates read, plus the decoded images.

    Text parts are joined with newlines (vLLM's "string" content format); images become
    `{"type": "image"}` parts; assistant tool-call arguments become dicts, as vLLM passes them.
    """
    conversation, images = [], []
    for message in messages:
        if not isinstance(message, dict):
            raise APIError("Each message must be an object.", param="messages")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, list):
            parts, texts = [], []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and not isinstance(part.get("text"), str):
                    raise APIError("A text content part needs a string `text`.", param="messages")
                if kind == "text":
                    texts.append(part["text"])
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    url = part.get("image_url")
                    images.append(decode_image(url.get("url") if isinstance(url, dict) else url))
                    parts.append({"type": "image"})
                else:
                    raise APIError(f"Unsupported content part type: {kind!r}", param="messages")
            message["content"] = parts if len(parts) != len(texts) else "\n".join(texts)
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function", {}), dict)
                                                  for c in calls):
            raise APIError("`tool_calls` must be a list of {id, type, function: {name, arguments}}.", param="messages")
        for call in calls:
            function = call.get("function", {})
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    pass
        conversation.append(message)
    return conversation, images


def completion_logprobs(positions, token_ids, num_top, as_token_id, tokenizer, text_offset=0):
    """Legacy completions layout: tokens, token_logprobs, top_logprobs (sampled + num_top), text_offset."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entries in zip(token_ids, positions):
        if entries is None:
            token = token_text(token_id, None, as_token_id, tokenizer)
            tokens.append(token)
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            by_id = {tid: (lp, dec) for tid, lp, _, dec in entries}
            lp, dec = by_id[token_id]
            token = token_text(token_id, dec, as_token_id, tokenizer)
            tokens.append(token)
            token_logprobs.append(finite(lp))
            top_logprobs.append({token_text(tid, d, as_token_id, tokenizer): finite(v)
                                 for i, (tid, v, _, d) in enumerate(entries) if num_top == -1 or i <= num_top})
        offsets.append(text_offset)
        text_offset += len(token)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top_logprobs}


def chat_logprobs(positions, token_ids, num_top, as_token_id, tokenizer):
    """Chat layout: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    content = []
    for token_id, entries in zip(token_ids, positions):
        by_id = {tid: (lp, dec) for tid, lp, _, dec in entries or ()}
        lp, dec = by_id.get(token_id, (None, None))
        token = token_text(token_id, dec, as_token_id, tokenizer)
        top = [{"token": (t := token_text(tid, d, as_token_id, tokenizer)), "logprob": finite(v),
                "bytes": list(t.encode("utf-8", errors="replace"))}
               for i, (tid, v, _, d) in enumerate(entries or ()) if num_top == -1 or i < num_top]
        content.append({"token": token, "logprob": finite(lp), "bytes": list(token.encode("utf-8", errors="replace")),
                        "top_logprobs": top})
    return {"content": content, "refusal": None}


def prompt_logprobs_json(positions):
    """vLLM's `prompt_logprobs`: per position {token_id: {logprob, rank, decoded_token}}, first is null."""
    if positions is None:
        return None
    return [None if entries is None else
            {str(tid): {"logprob": finite(lp), "rank": rank, "decoded_token": dec} for tid, lp, rank, dec in entries}
            for entries in positions]


def sse(chunk):
    return f"data: {json.dumps(chunk)}\n\n"


# ------------------------------------------------------------------------------------------------
# Worker process: one vllm.LLM per DP rank, driven over a pipe
# ------------------------------------------------------------------------------------------------


class WeightSyncWorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`): receive broadcast weights from the trainer.

    The trainer is the last rank of a group of `world_size`; worker ranks are `rank_offset + tp_rank`.
    Transport: NCCL (PyNcclCommunicator over a StatelessProcessGroup) on CUDA, gloo on CPU.
    Loading goes through vLLM's layerwise reload, which re-packs CPU GEMM weights after the load.
    """

    def init_communicator(self, host, port, world_size, rank_offset, client_device_uuid, timeout_s):
        import datetime

        import torch
        from vllm.distributed.parallel_state import get_world_group

        self.close_communicator()  # a trainer that died without closing must not block a new one
        rank = rank_offset + get_world_group().rank
        if self.device.type == "cuda":
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            if client_device_uuid == str(torch.cuda.get_device_properties(self.device).uuid):
                raise RuntimeError(f"The trainer is on the same CUDA device as vLLM worker {rank} "
                                   f"({client_device_uuid}); NCCL cannot broadcast within one device.")
            group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                                store_timeout=int(timeout_s))
            self.weight_comm = PyNcclCommunicator(group, device=self.device)
        else:
            from vllm.distributed.utils import stateless_init_torch_distributed_process_group

            self.weight_comm = stateless_init_torch_distributed_process_group(
                host, port, rank, world_size, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.weight_client_rank = world_size - 1
        return rank

    def close_communicator(self):
        comm, self.weight_comm = getattr(self, "weight_comm", None), None
        if comm is not None and hasattr(comm, "shutdown"):  # gloo group
            try:
                comm.shutdown()
            except Exception as exc:
                logger.warning("closing the old weight-sync group: %s", exc)
        # The TCP store lives until its last reference dies; a live one on the same port would be reused
        # by the next group, whose trainer then hangs on the dead group's stale keys.
        del comm
        gc.collect()
        return True

    def _broadcast(self, tensor):
        """Receive the trainer's next broadcast into `tensor`."""
        if getattr(self, "weight_comm", None) is None:
            raise RuntimeError("No communicator: call /init_communicator first.")
        if self.device.type == "cuda":
            self.weight_comm.broadcast(tensor, src=self.weight_client_rank)
            self.weight_comm.group.barrier()
        else:
            self.weight_comm.broadcast(tensor, root=self.weight_client_rank).wait()

    def open_reload(self):
        """Open a reload: layers buffer the weights they receive and are re-processed (CPU: GEMM repacking,
        GPU: quantization) once all their shards arrived, e.g. q, k and v of a fused qkv_proj."""
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        if not getattr(self, "weight_update_open", False):
            initialize_layerwise_reload(self.model_runner.get_model())
            self.weight_update_open, self.weight_update_names = True, set()

    def close_reload(self):
        """Close the reload; True if one was open. Re-ties a tied lm_head to the new embedding."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        if not getattr(self, "weight_update_open", False):
            return False
        model = self.model_runner.get_model()
        finalize_layerwise_reload(model, self.model_runner.model_config)
        self.weight_update_open = False
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head") \
                and "model.embed_tokens.weight" in self.weight_update_names:
            model.lm_head.weight = model.model.embed_tokens.weight  # the reload left lm_head's packed copy stale
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
        return True

    def _load(self, named_tensors):
        self.open_reload()
        self.model_runner.get_model().load_weights(named_tensors)
        self.weight_update_names.update(name for name, _ in named_tensors)

    def update_named_param(self, name, dtype, shape):
        """Legacy path: one tensor per call; the reload stays open until `close_reload`."""
        import torch

        weight = torch.empty(shape, dtype=getattr(torch, dtype.split(".")[-1]), device=self.device)
        with self._closed_on_error():
            self._broadcast(weight)
        self._load([(name, weight)])
        return True

    def update_named_params(self, metas, bucket_bytes):
        """Batched path: tensors packed into uint8 buckets of about `bucket_bytes`, one broadcast each.
        A fresh buffer per bucket: the reload keeps views of a layer's shards until the layer is complete,
        and a layer may span two buckets."""
        import torch

        with self._closed_on_error():
            for size, tensors in weight_buckets(metas, bucket_bytes):
                buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
                self._broadcast(buffer)
                named = []
                for name, dtype, shape, offset, nbytes in tensors:
                    view = buffer[offset:offset + nbytes].view(getattr(torch, dtype.split(".")[-1])).view(shape)
                    named.append((name, view))
                self._load(named)
        return self.close_reload()

    @contextlib.contextmanager
    def _closed_on_error(self):
        """Close the group on any failure (a timed-out broadcast, a load that raised mid-sync): it is unusable,
        the trainer's next broadcasts then fail at once instead of waiting for a receiver, and a new
        /init_communicator starts clean."""
        try:
            yield
        except Exception:
            self.close_communicator()
            raise


def weight_buckets(metas, bucket_bytes):
    """[{name, dtype, shape}] → [(bucket size, [(name, dtype, shape, offset, nbytes)])], in order, a new bucket
    whenever the next tensor would overflow a non-empty one. Layout WEIGHT_LAYOUT: every tensor is padded
    to WEIGHT_ALIGN_BYTES. The client packs identically (vllm_client._buckets, _packed)."""
    import torch

    buckets, current, size = [], [], 0
    for meta in metas:
        dtype = getattr(torch, meta["dtype"].split(".")[-1])
        nbytes = math.prod(meta["shape"]) * torch.empty((), dtype=dtype).element_size()
        if current and size + padded(nbytes) > bucket_bytes:
            buckets.append((size, current))
            current, size = [], 0
        current.append((meta["name"], meta["dtype"], tuple(meta["shape"]), size, nbytes))
        size += padded(nbytes)
    if current:
        buckets.append((size, current))
    return buckets


def padded(nbytes):
    """Bytes a tensor of `nbytes` takes in a weight bucket."""
    return -(-nbytes // WEIGHT_ALIGN_BYTES) * WEIGHT_ALIGN_BYTES


def replica_seed(seed, dp_rank):
    """The engine seed of DP replica `dp_rank`, derived as vLLM derives one per DP rank (its
    `set_random_seed`): rank 0 keeps `seed`. Every replica is a DP-rank-0 engine of its own, so with one
    seed for all, the k-th unseeded request on each rank would draw the same random numbers. Requests
    with their own `seed` sample from a generator of that seed, on any rank."""
    import numpy as np

    if dp_rank == 0:
        return seed
    return int(np.random.SeedSequence((seed, dp_rank)).generate_state(1)[0])


def compact_logprobs(positions):
    """vLLM logprobs → [[(token_id, logprob, rank, decoded)] per position]: small to pickle, order kept."""
    if positions is None:
        return None
    return [None if pos is None else [(tid, lp.logprob, lp.rank, lp.decoded_token) for tid, lp in pos.items()]
            for pos in positions]


class WorkerEngine:
    """The object a worker process serves: each public method is one RPC.

    Generation is continuous: `add` enqueues requests into the running engine and `step` advances it
    by one engine step; finished results wait in `finished` until the parent collects them.
    """

    def __init__(self, args: ServeArgs, dp_rank: int):
        from vllm import LLM

        self.dp_rank, self.tp = dp_rank, args.tensor_parallel_size
        self.weights_pending = False  # a per-parameter sync received tensors not yet finalized
        self.running = {}  # vLLM request id → the parent's key
        self.finished = []  # [(key, result | {"error"})] not yet sent to the parent
        optional = dict(revision=args.revision, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        enable_prefix_caching=args.enable_prefix_caching,
                        distributed_executor_backend=args.distributed_executor_backend,
                        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                        speculative_config=json.loads(args.speculative_config) if args.speculative_config else None)
        self.llm = LLM(
            model=args.model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
            gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
            kv_cache_dtype=args.kv_cache_dtype, trust_remote_code=args.trust_remote_code,
            seed=replica_seed(args.seed, dp_rank),
            model_impl=args.vllm_model_impl, max_logprobs=args.max_logprobs, logprobs_mode=args.logprobs_mode,
            worker_extension_cls=f"{MODULE_NAME}.WeightSyncWorkerExtension",
            **{k: v for k, v in optional.items() if v is not None})

    def info(self):
        config = self.llm.llm_engine.model_config
        import torch

        return {"max_model_len": config.max_model_len, "vocab_size": config.get_vocab_size(),
                "device": "cuda" if torch.cuda.is_available() else "cpu", "pid": os.getpid(),
                "quantization": config.quantization}  # method name (e.g. "fp8", "compressed-tensors") or None

    def finish_weight_update(self):
        """Load what a per-parameter sync sent; runs before anything that reads the weights."""
        if self.weights_pending:
            self.weights_pending = False
            self.llm.collective_rpc("close_reload")
            self.llm.reset_prefix_cache()

    def add(self, requests):
        """[(key, engine prompt, SamplingParams)] → enqueued; a request vLLM refuses fails alone."""
        self.finish_weight_update()
        for key, prompt, sp in requests:
            request_id = str(self.llm.request_counter.counter)  # outputs carry this external id
            try:
                self.llm.enqueue([prompt], [sp], use_tqdm=False)
                self.running[request_id] = key
            except Exception as exc:
                self.finished.append((key, {"error": f"{type(exc).__name__}: {exc}"}))

    def abort(self, keys):
        """Stop the requests of clients that went away; vLLM frees their KV cache at its next step.
        Each one aborted while running is confirmed to the parent as {"aborted": True}."""
        if not keys:
            return
        keys = set(keys)
        running = {request_id: key for request_id, key in self.running.items() if key in keys}
        self.finished = [(key, result) for key, result in self.finished if key not in keys]
        for request_id in running:
            del self.running[request_id]
        if running:
            self.llm.llm_engine.abort_request(list(running))
            self.finished += [(key, {"aborted": True}) for key in running.values()]

    def step(self):
        """One engine step; an engine failure fails the requests it was running, not the worker."""
        try:
            for out in self.llm.llm_engine.step():  # FINAL_ONLY outputs: each is a finished request
                if out.request_id not in self.running:  # aborted after it finished in the engine
                    continue
                self.finished.append((self.running.pop(out.request_id), {
                    "prompt_token_ids": list(out.prompt_token_ids),
                    "prompt_logprobs": compact_logprobs(out.prompt_logprobs),
                    "outputs": [{"text": o.text, "token_ids": list(o.token_ids), "finish_reason": o.finish_reason,
                                 "stop_reason": o.stop_reason, "logprobs": compact_logprobs(o.logprobs)}
                                for o in out.outputs]}))
        except Exception as exc:
            logger.exception("worker %d: engine step failed", self.dp_rank)
            self.finished += [(key, {"error": f"{type(exc).__name__}: {exc}"}) for key in self.running.values()]
            with contextlib.suppress(Exception):
                self.llm.llm_engine.abort_request(list(self.running))
            self.running.clear()

    def output_ready(self, timeout):
        """Whether `step` would return at once, waiting up to `timeout` s for the engine's next output.
        vLLM's EngineCore process steps on its own; an in-process engine steps inside `step`."""
        outputs = getattr(self.llm.llm_engine.engine_core, "outputs_queue", None)  # queue.Queue (MP mode)
        if outputs is None:
            return True
        with outputs.not_empty:  # its own lock: peek at the deque, consume nothing
            return outputs.not_empty.wait_for(lambda: len(outputs.queue) > 0, max(timeout, 0))

    def take_finished(self):
        finished, self.finished = self.finished, []
        return finished

    def reset_prefix_cache(self):
        self.finish_weight_update()
        return self.llm.reset_prefix_cache()

    def init_communicator(self, host, port, world_size, client_device_uuid, timeout_s):
        return self.llm.collective_rpc("init_communicator", args=(host, port, world_size, self.dp_rank * self.tp,
                                                                   client_device_uuid, timeout_s))

    def update_named_param(self, name, dtype, shape):
        self.weights_pending = True
        return self.llm.collective_rpc("update_named_param", args=(name, dtype, tuple(shape)))

    def update_named_params(self, metas, bucket_bytes):
        self.finish_weight_update()
        self.llm.collective_rpc("update_named_params", args=(metas, bucket_bytes))
        return self.llm.reset_prefix_cache()

    def close_communicator(self):
        self.finish_weight_update()
        return self.llm.collective_rpc("close_communicator")

    def shutdown(self):
        """Stop vLLM's own processes (EngineCore, its workers) before this one exits."""
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as exc:
            logger.warning("worker %d: engine shutdown: %s", self.dp_rank, exc)


def worker_main(args: ServeArgs, dp_rank: int, conn):
    """Process body: load, say ready (or why not), then answer every message with a result or an error.

    `generate` (a batching round) adds requests to the running engine and is answered with what
    finished once something did or `wait_s` passed; vLLM's EngineCore keeps stepping in the meantime,
    so short rounds admit new requests at the next engine step without slowing the running ones.
    """
    try:
        engine = WorkerEngine(args, dp_rank)
        conn.send(("ready", engine.info()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    reply_by = None  # deadline of the owed `generate` reply
    while True:
        if reply_by is not None:
            if engine.running and engine.output_ready(reply_by - time.monotonic()):
                engine.step()
            if engine.finished or not engine.running or time.monotonic() >= reply_by:
                conn.send(("ok", engine.take_finished()))
                reply_by = None
            continue
        try:
            method, a, kw = conn.recv()
        except (EOFError, KeyboardInterrupt):  # parent gone
            break
        if method == "shutdown":
            engine.shutdown()
            break
        try:
            if method == "generate":
                requests, wait_s, aborts = a
                engine.abort(aborts)
                engine.add(requests)
                reply_by = time.monotonic() + wait_s
                continue
            reply = ("ok", getattr(engine, method)(*a, **kw))
        except Exception as exc:
            logger.exception("worker %d: %s failed", dp_rank, method)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


# ------------------------------------------------------------------------------------------------
# Parent side: pipes + one lock, and the batcher
# ------------------------------------------------------------------------------------------------


class WorkerError(Exception):
    pass


class Workers:
    """The DP worker processes. Every pipe exchange holds `lock` from first send to last receive."""

    def __init__(self, args: ServeArgs):
        self.args = args
        self.lock = asyncio.Lock()
        self.processes, self.conns, self.info = [], [], None
        self.sync_error = None  # why the last background (weight-sync) exchange failed, if it did
        self.background = set()

    def start(self):
        ctx = multiprocessing.get_context("spawn")
        # vLLM's worker processes import the extension class from this file by module name.
        here = str(pathlib.Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        # torch's CPU allocator asks for transparent huge pages for tensors of 2 MiB and up: a fresh
        # 256 MiB weight-sync bucket then costs 128 page faults instead of 65,536 (4x faster to fill).
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        for rank in range(self.args.data_parallel_size):
            parent_conn, child_conn = ctx.Pipe()
            with rank_env(rank, self.args):
                process = ctx.Process(target=worker_main, args=(self.args, rank, child_conn), daemon=False,
                                      name=f"vllm-worker-{rank}")
                process.start()
            child_conn.close()
            self.processes.append(process)
            self.conns.append(parent_conn)
        infos = [self._recv(rank, timeout=self.args.worker_start_timeout, what="start") for rank in range(len(self.conns))]
        self.info = infos[0]

    def _recv(self, rank, timeout=None, what="reply"):
        """Read one message; a dead worker or an expired timeout raises instead of hanging."""
        conn, process = self.conns[rank], self.processes[rank]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not conn.poll(WORKER_POLL_S):
            if not process.is_alive():
                raise WorkerError(f"vLLM worker {rank} died (exit code {process.exitcode}) before its {what}")
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerError(f"vLLM worker {rank} gave no {what} within {timeout:.0f} s")
        try:
            status, payload = conn.recv()
        except EOFError:
            raise WorkerError(f"vLLM worker {rank} closed its pipe") from None
        if status == "error":
            raise WorkerError(f"vLLM worker {rank}: {payload}")
        return payload

    def _exchange(self, messages):
        """{rank: (method, args, kwargs)} → {rank: result}; drains every rank even when one fails."""
        for rank, message in messages.items():
            self.conns[rank].send(message)
        results, first_error = {}, None
        for rank in messages:
            try:
                results[rank] = self._recv(rank)
            except WorkerError as exc:
                first_error = first_error or exc
        if first_error:
            raise first_error
        return results

    async def call(self, method, *args, ranks=None, **kwargs):
        """Same call on every rank (or `ranks`); returns the results in rank order."""
        ranks = range(len(self.conns)) if ranks is None else ranks
        async with self.lock:
            results = await asyncio.to_thread(self._exchange, {r: (method, args, kwargs) for r in ranks})
        return [results[r] for r in ranks]

    async def call_each(self, messages):
        """Different messages per rank: {rank: (method, args, kwargs)} → {rank: result}."""
        async with self.lock:
            return await asyncio.to_thread(self._exchange, messages)

    async def fire(self, method, *args, **kwargs):
        """Send now and return; the replies are read in the background while the lock stays held.

        For weight sync: the worker blocks in a broadcast that the trainer joins only after this HTTP
        call returns, and nothing else may reach the workers until that broadcast is done.
        """
        await self.lock.acquire()
        try:
            messages = {r: (method, args, kwargs) for r in range(len(self.conns))}
            await asyncio.to_thread(lambda: [self.conns[r].send(m) for r, m in messages.items()])
        except BaseException:
            self.lock.release()
            raise

        async def finish():
            try:
                await asyncio.to_thread(self._drain, list(messages))
            except Exception as exc:
                logger.error("%s failed: %s", method, exc)
                self.sync_error = f"{method} failed: {exc}"
            finally:
                self.lock.release()

        task = asyncio.create_task(finish())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _drain(self, ranks):
        errors = []
        for rank in ranks:
            try:
                self._recv(rank)
            except WorkerError as exc:
                errors.append(str(exc))
        if errors:
            raise WorkerError("; ".join(errors))

    def raise_sync_error(self):
        """A weight update after a failed one would load a partial model: say so, once."""
        if self.sync_error:
            error, self.sync_error = self.sync_error, None
            raise APIError(f"The previous weight-sync step failed: {error}. Call /init_communicator again.",
                           status=409)

    def alive(self):
        return all(p.is_alive() for p in self.processes)

    def stop(self, timeout):
        for conn in self.conns:
            try:
                conn.send(("shutdown", (), {}))
            except (OSError, BrokenPipeError):
                pass
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()


class rank_env:
    """Environment a worker is spawned with: its GPU slice on CUDA, its core on CPU."""

    def __init__(self, rank, args):
        self.rank, self.args, self.saved = rank, args, {}

    def __enter__(self):
        env = {}
        tp, dp = self.args.tensor_parallel_size, self.args.data_parallel_size
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if dp > 1:
            gpus = visible.split(",") if visible else [str(i) for i in range(gpu_count())]
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[self.rank * tp:(self.rank + 1) * tp])
            elif "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # replicas must not share cores
                env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.rank % os.cpu_count())
        for key, value in env.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def gpu_count():
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return len([line for line in out.stdout.splitlines() if line.startswith("GPU")])
    except (OSError, subprocess.SubprocessError):
        return 0


@dataclass
class Pending:
    """One HTTP request in the batcher: engine prompts, one SamplingParams each, and its future."""

    prompts: list
    params: list
    future: asyncio.Future
    results: list = field(default_factory=list)  # one slot per prompt, filled as the ranks finish them
    left: int = 0  # prompts not finished yet
    cancelled: bool = False  # its HTTP client went away: never admitted, or aborted in vLLM


class Batcher:
    """Continuous batching over the DP ranks.

    Each round is one exchange under the workers' lock: every rank with work gets the requests that
    queued since the last round (least-loaded rank first, each with its own SamplingParams) and
    answers with what finished. Ranks keep generating between rounds, so a request that arrives
    mid-generation joins the running batch instead of waiting for it to end. When idle, the first
    request opens a `wait_s` window to gather a burst into one prefill.
    """

    def __init__(self, workers: Workers, wait_s: float, max_requests: int, round_s: float):
        self.workers, self.wait_s, self.max_requests, self.round_s = workers, wait_s, max_requests, round_s
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.inflight = {}  # key → (Pending, prompt index, rank)
        self.load = {}  # rank → prompts running there
        self.aborts = {}  # rank → keys of running prompts whose client went away, sent with the next round
        self.aborted = 0  # prompts the workers confirmed aborted in vLLM
        self.finished = {}  # rank → prompts it completed, since start
        self.keys = itertools.count()
        self.open = asyncio.Event()  # cleared while a weight sync holds new requests back
        self.open.set()
        self.drained = asyncio.Event()  # set while no request runs on any rank
        self.reopen_timer = None

    async def generate(self, prompts, params):
        """→ one result per prompt: {"prompt_token_ids", "prompt_logprobs", "outputs"} or {"error"}."""
        item = Pending(prompts, params, asyncio.get_running_loop().create_future(), [None] * len(prompts),
                       len(prompts))
        await self.queue.put(item)
        try:
            return await item.future
        except asyncio.CancelledError:  # the client disconnected (or the server stops): free the engine
            self.cancel(item)
            raise

    def cancel(self, item):
        """Forget `item`: still queued → never admitted; running → aborted in vLLM at the next round."""
        item.cancelled = True
        for key, (other, _, rank) in list(self.inflight.items()):
            if other is item:
                del self.inflight[key]
                self.load[rank] -= 1
                self.aborts.setdefault(rank, []).append(key)

    async def hold(self, timeout_s=None):
        """Keep new requests queued and wait until the running ones finished: a weight update must not
        land in the middle of a generation. `timeout_s`: reopen by itself if the trainer never releases
        (TRL's per-parameter sync ends with /reset_prefix_cache)."""
        self.open.clear()
        if self.reopen_timer:
            self.reopen_timer.cancel()
            self.reopen_timer = None
        if timeout_s is not None:
            self.reopen_timer = asyncio.get_running_loop().call_later(timeout_s, self.release)
        await self.drained.wait()

    def release(self):
        if self.reopen_timer:
            self.reopen_timer.cancel()
            self.reopen_timer = None
        self.open.set()

    async def run(self):
        while True:
            items = await self.admit()
            try:
                await self.round(items)
            except Exception as exc:  # a dead worker or a broken pipe: fail what was in flight, keep serving
                logger.error("generation round failed: %s", exc)
                for item, *_ in self.inflight.values():
                    if not item.future.done():
                        item.future.set_exception(exc)
                self.inflight.clear()
                self.load = dict.fromkeys(self.load, 0)

    async def admit(self):
        """Requests for the next round: none while a sync holds them back; when idle, block for the first
        and gather for `wait_s`; when busy, whatever queued meanwhile."""
        items = []
        if not self.inflight and not self.aborts:
            self.drained.set()
            items.append(await self.queue.get())
            deadline = time.monotonic() + self.wait_s
            while len(items) < self.max_requests and (timeout := deadline - time.monotonic()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            await self.open.wait()
            self.drained.clear()  # no await after the check above: a sync cannot slip in between
        if self.open.is_set():
            while len(items) < self.max_requests and not self.queue.empty():
                items.append(self.queue.get_nowait())
        return items

    async def round(self, items):
        """Send new requests to the least-loaded ranks, collect what finished anywhere."""
        ranks = range(len(self.workers.conns))
        new = {rank: [] for rank in ranks}
        for item in items:
            if item.cancelled:
                continue
            for index, (prompt, sp) in enumerate(zip(item.prompts, item.params)):
                rank = min(ranks, key=lambda r: self.load.get(r, 0))
                key = next(self.keys)
                self.inflight[key] = (item, index, rank)
                self.load[rank] = self.load.get(rank, 0) + 1
                new[rank].append((key, prompt, sp))
        aborts, self.aborts = self.aborts, {}
        messages = {rank: ("generate", (new[rank], self.round_s, aborts.get(rank, [])), {}) for rank in ranks
                    if new[rank] or self.load.get(rank) or aborts.get(rank)}
        if not messages:
            return
        replies = await self.workers.call_each(messages)
        for rank, finished in replies.items():
            for key, result in finished:
                if key not in self.inflight:  # its client went away: aborted (confirmed) or finished meanwhile
                    self.aborted += bool(result.get("aborted"))
                    continue
                item, index, rank = self.inflight.pop(key)
                self.load[rank] -= 1
                self.finished[rank] = self.finished.get(rank, 0) + 1
                item.results[index] = result
                item.left -= 1
                if item.left == 0 and not item.future.done():
                    item.future.set_result(item.results)


# ------------------------------------------------------------------------------------------------
# Shared steps of the generation routes
# ------------------------------------------------------------------------------------------------


class Server:
    """State the handlers share: args, tokenizer, workers, batcher, tool/reasoning parser class."""

    def __init__(self, args: ServeArgs):
        from vllm.tokenizers import get_tokenizer

        self.args = args
        self.model_name = args.served_model_name or args.model
        self.created = int(time.time())
        self.tokenizer = get_tokenizer(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)
        self.parser_cls = None
        if args.tool_call_parser or args.reasoning_parser:
            from vllm.parser.parser_manager import ParserManager

            self.parser_cls = ParserManager.get_parser(
                tool_parser_name=args.tool_call_parser, reasoning_parser_name=args.reasoning_parser,
                enable_auto_tools=args.enable_auto_tool_choice, model_name=args.model, tokenizer=self.tokenizer)
        self.exit_code = 0  # 1 once a worker died
        self.engine_processes = []  # the processes under the workers, as last seen (see watch_workers)
        self.uvicorn_server = None  # set by serve(); its should_exit says a shutdown is under way
        self.communicator = False  # whether a trainer opened a weight-sync group (checked before updates)
        self.workers = Workers(args)
        self.batcher = Batcher(self.workers, args.batch_wait_ms / 1000, args.max_batch_requests,
                               args.round_wait_ms / 1000)

    @functools.cached_property
    def checkpoint_shapes(self):
        """{name: shape} from the checkpoint's safetensors headers (no tensor is read); None if unknown."""
        from safetensors import safe_open

        path = pathlib.Path(self.args.model)
        if not path.is_dir():
            try:
                from huggingface_hub import snapshot_download

                path = pathlib.Path(snapshot_download(self.args.model, revision=self.args.revision,
                                                      allow_patterns=["*.safetensors"], local_files_only=True))
            except Exception:
                return None
        shapes = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                shapes.update({name: list(f.get_slice(name).get_shape()) for name in f.keys()})
        if "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:  # tied embeddings
            shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
        return shapes or None

    @property
    def max_model_len(self):
        return self.workers.info["max_model_len"]

    def check_communicator(self):
        if not self.communicator:
            raise APIError("No weight-sync group: call /init_communicator first.", status=409)
        self.workers.raise_sync_error()

    def check_model(self, name):
        if name and name not in (self.model_name, self.args.model):
            raise APIError(f"The model `{name}` does not exist.", status=404, param="model")

    def check_logprobs(self, *counts):
        cap = self.args.max_logprobs
        for count in counts:
            if count is not None and cap != -1 and count > cap:
                raise APIError(f"Requested {count} logprobs; the server allows at most {cap} (--max-logprobs).",
                               param="logprobs")

    def check_prompt(self, token_ids, max_tokens, param="prompt"):
        """→ max_tokens to use (default: what fits). 400 for empty, too long, or out-of-vocab prompts."""
        if not isinstance(token_ids, list) or not token_ids:
            raise APIError("The prompt must be a non-empty list of token ids.", param=param)
        vocab = self.workers.info["vocab_size"]
        if any(not is_int(t) or t < 0 or t >= vocab for t in token_ids):
            raise APIError(f"Prompt token ids must be integers in [0, {vocab}).", param=param)
        room = self.max_model_len - len(token_ids)
        if max_tokens is None:
            max_tokens = room
        if room < 1 or max_tokens > room:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {len(token_ids) + max_tokens} tokens ({len(token_ids)} in the messages, "
                           f"{max_tokens} in the completion). Please reduce the length of the messages or "
                           "completion.", param=param)
        return max_tokens

    def sampling_params(self, request, max_tokens):
        """The request's own SamplingParams (stock vLLM's conversion), always returning final outputs."""
        from vllm.sampling_params import RequestOutputKind

        try:
            sp = request.to_sampling_params(max_tokens, {})
        except Exception as exc:  # SamplingParams validation: n < 1, temperature < 0, ...
            raise APIError(str(exc), param=getattr(exc, "parameter", None)) from None
        sp.output_kind = RequestOutputKind.FINAL_ONLY
        return sp

    def render_chat(self, messages, tools=None, chat_template=None, chat_template_kwargs=None,
                    add_generation_prompt=True, continue_final_message=False, documents=None,
                    add_special_tokens=False):
        """Conversation → (engine prompt, prompt token ids). Images go to vLLM as multi_modal_data."""
        conversation, images = normalize_messages(messages)
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, tools=tools, documents=documents, tokenize=False,
                chat_template=chat_template or self.args.chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}))
        except Exception as exc:
            raise APIError(f"Cannot apply the chat template: {type(exc).__name__}: {exc}", param="messages") from None
        token_ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if images:  # vLLM expands the image placeholders of the text itself
            return {"prompt": text, "multi_modal_data": {"image": images}}, token_ids
        return {"prompt_token_ids": token_ids}, token_ids

    async def generate(self, prompts, params, request):
        """Through the batcher; a worker-side error of this request alone becomes a 400, a dead worker a 503.
        A client that disconnects has its prompts aborted in vLLM: a trainer that timed out and resent must
        not leave the engine generating for nobody."""
        if not self.workers.alive():
            raise APIError("A vLLM worker process died; the server is exiting for its supervisor to restart it.",
                           status=503)
        try:
            results = await until_disconnected(request, self.batcher.generate(prompts, params))
        except (WorkerError, OSError) as exc:  # a dead worker's pipe breaks (OSError) or closes (WorkerError)
            deadline = time.monotonic() + WORKER_POLL_S  # the pipe closes a moment before the exit is seen
            while self.workers.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            raise APIError(str(exc) or type(exc).__name__, status=500 if self.workers.alive() else 503) from None
        except asyncio.CancelledError:  # uvicorn cancels what outlives --shutdown_timeout: say so, in JSON
            if self.uvicorn_server is None or not self.uvicorn_server.should_exit:
                raise
            raise APIError(f"The server shut down before this request finished (--shutdown_timeout "
                           f"{self.args.shutdown_timeout:g} s); send it again.", status=503) from None
        for result in results:
            if "error" in result:
                raise APIError(result["error"])
        return results


async def until_disconnected(request, work):
    """Await `work`, cancelling it if the HTTP client disconnects first (→ 499, which nobody reads)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # the batcher's `generate` aborts the request's prompts
    if task.done() and not task.cancelled():
        return task.result()
    raise APIError("The client disconnected before the answer was ready; its generation was aborted.",
                   status=CLIENT_CLOSED)


async def wait_for_disconnect(request):
    """Returns once the client is gone. Called after the body was read, so the only message left for
    `receive` is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage(results):
    prompt = sum(len(r["prompt_token_ids"]) for r in results)
    completion = sum(len(o["token_ids"]) for r in results for o in r["outputs"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ------------------------------------------------------------------------------------------------
# Route handlers: parse → validate (4xx) → delegate → respond
# ------------------------------------------------------------------------------------------------


def state(request) -> Server:
    return request.app.state.server


async def health(request):
    if not state(request).workers.alive():
        raise APIError("A vLLM worker process is not running.", status=503)
    batcher = state(request).batcher  # prompts now in vLLM, and those aborted because their client went away
    return JSONResponse({"status": "ok", "requests_running": len(batcher.inflight),
                         "requests_aborted": batcher.aborted, "requests_finished_per_rank": [
                             batcher.finished.get(rank, 0) for rank in range(state(request).args.data_parallel_size)]})


async def get_world_size(request):
    args, info = state(request).args, state(request).workers.info
    return JSONResponse({"world_size": args.tensor_parallel_size * args.data_parallel_size,
                         "weight_sync_backend": "nccl" if info["device"] == "cuda" else "gloo"})


async def models(request):
    server = state(request)
    card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "vllm",
            "root": server.args.model, "parent": None, "max_model_len": server.max_model_len}
    return JSONResponse({"object": "list", "data": [card]})


def completion_prompts(server, prompt):
    """prompt: str | [str] | [int] | [[int]] → list of token-id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError("prompt must be a non-empty string, list of strings, or (list of) token-id lists.",
                       param="prompt")
    if all(is_int(t) for t in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(server.tokenizer.encode(p))
        elif isinstance(p, list):
            out.append(p)
        else:
            raise APIError("prompt items must be strings or token-id lists.", param="prompt")
    return out


async def completions(request):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    server = state(request)
    body = await read_json(request)
    req = validate(CompletionRequest, body)
    server.check_model(req.model)
    server.check_logprobs(req.logprobs, req.prompt_logprobs)
    if req.prompt is None or req.use_beam_search or req.suffix is not None:
        raise APIError("This server needs `prompt` and supports neither prompt_embeds, suffix nor beam search.")
    prompt_ids = completion_prompts(server, req.prompt)
    params = [server.sampling_params(req, server.check_prompt(ids, req.max_tokens if req.max_tokens is not None
                                                              else 16)) for ids in prompt_ids]
    results = await server.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, request)
    return respond_completion(server, req, results, stream=req.stream)


def respond_completion(server, req, results, stream):
    rid, created, tok = f"cmpl-{uuid.uuid4().hex}", int(time.time()), server.tokenizer
    choices = []
    for result in results:
        prompt_ids = result["prompt_token_ids"]
        prompt_text = tok.decode(prompt_ids) if req.echo else ""
        for out in result["outputs"]:
            token_ids, positions = out["token_ids"], out["logprobs"]
            if req.echo:
                token_ids = prompt_ids + token_ids
                positions = None if positions is None else (result["prompt_logprobs"] or []) + positions
            choices.append({
                "index": len(choices), "text": prompt_text + out["text"],
                "logprobs": None if req.logprobs is None else completion_logprobs(
                    positions, token_ids, req.logprobs, req.return_tokens_as_token_ids, tok),
                "finish_reason": out["finish_reason"], "stop_reason": out["stop_reason"],
                "prompt_logprobs": prompt_logprobs_json(result["prompt_logprobs"]),
                "prompt_token_ids": prompt_ids if req.return_token_ids else None,
                "token_ids": out["token_ids"] if req.return_token_ids else None})
    body = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
            "choices": choices, "usage": usage(results)}
    if not stream:
        return JSONResponse(body)

    def events():
        for choice in choices:
            yield sse({**body, "choices": [choice], "usage": None})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**body, "choices": [], "usage": body["usage"]})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def chat_completions(request):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    server = state(request)
    body = await read_json(request)
    req = validate(ChatCompletionRequest, body)
    server.check_model(req.model)
    server.check_logprobs(req.top_logprobs if req.logprobs else None, req.prompt_logprobs)
    if req.use_beam_search:
        raise APIError("Beam search is not supported by this server.", param="use_beam_search")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    uses_tools = tools and req.tool_choice not in (None, "none")
    if uses_tools and server.parser_cls is None:
        raise APIError(f"tool_choice={req.tool_choice!r} needs the server started with --tool-call-parser "
                       "(and --enable-auto-tool-choice for 'auto').", param="tool_choice")
    if uses_tools and req.tool_choice == "auto" and not server.args.enable_auto_tool_choice:
        raise APIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                       param="tool_choice")
    prompt, prompt_ids = server.render_chat(
        req.messages, tools, req.chat_template, req.chat_template_kwargs, req.add_generation_prompt,
        req.continue_final_message, req.documents, req.add_special_tokens)
    parser = server.parser_cls(server.tokenizer, req.tools, chat_template_kwargs=req.chat_template_kwargs) \
        if server.parser_cls else None
    if uses_tools and req.tool_choice != "auto":
        constrain_to_tool_schema(req)
        parser.tool_parser.supports_required_and_named = True  # parse the output as vLLM's standard JSON
    elif parser is not None and (uses_tools or server.args.reasoning_parser):
        req = parser.adjust_request(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    sp = server.sampling_params(req, server.check_prompt(prompt_ids, max_tokens, param="messages"))
    (result,) = await server.generate([prompt], [sp], request)
    return respond_chat(server, req, result, parser)


def constrain_to_tool_schema(req):
    """Named or "required" tool_choice: the output is the tool's JSON arguments (for "required", a list
    of {name, parameters}), as vLLM does for parsers without a native format; compact (no free
    whitespace), so that even a weak model cannot loop in whitespace and emits parseable arguments."""
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    try:
        schema = get_json_schema_from_tools(req.tool_choice, req.tools, req.parallel_tool_calls)
    except ValueError as exc:
        raise APIError(str(exc), param="tool_choice") from None
    try:  # compact JSON as a regex: vLLM's `disable_any_whitespace` is engine-wide, not per request
        from outlines_core.json_schema import build_regex_from_schema

        req.structured_outputs = StructuredOutputsParams(regex=build_regex_from_schema(json.dumps(schema), ""))
    except Exception:  # a schema the regex builder cannot express: fall back to the JSON schema itself
        req.structured_outputs = StructuredOutputsParams(json=schema)
    req.response_format = None


def respond_chat(server, req, result, parser):
    rid, created, tok = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), server.tokenizer
    choices = []
    for index, out in enumerate(result["outputs"]):
        message, finish_reason = {"role": "assistant", "content": out["text"], "tool_calls": []}, out["finish_reason"]
        if parser is not None:
            if index:
                parser = server.parser_cls(tok, req.tools, chat_template_kwargs=req.chat_template_kwargs)
            reasoning, content, calls = parser.parse(out["text"], req, enable_auto_tools=server.args.enable_auto_tool_choice,
                                                     model_output_token_ids=out["token_ids"])
            message["content"] = content if content or not calls else None
            if reasoning is not None and req.include_reasoning:
                message["reasoning"] = reasoning
            if calls and req.tools and req.tool_choice != "none":
                message["tool_calls"] = [{"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
                                          "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
                if req.tool_choice in ("auto", "required", None) and finish_reason == "stop":
                    finish_reason = "tool_calls"
        choices.append({
            "index": index, "message": message,
            "logprobs": chat_logprobs(out["logprobs"], out["token_ids"], req.top_logprobs,
                                      req.return_tokens_as_token_ids, tok) if req.logprobs else None,
            "finish_reason": finish_reason or "stop", "stop_reason": out["stop_reason"],
            "token_ids": out["token_ids"] if req.return_token_ids else None})
    body = {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
            "choices": choices, "usage": usage([result]),
            "prompt_logprobs": prompt_logprobs_json(result["prompt_logprobs"]),
            "prompt_token_ids": result["prompt_token_ids"] if req.return_token_ids else None}
    if not req.stream:
        return JSONResponse(body)

    def events():
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}
        first = {**head, "choices": [{"index": c["index"], "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None} for c in choices]}
        if req.return_token_ids:
            first["prompt_token_ids"] = body["prompt_token_ids"]
        yield sse(first)
        for c in choices:
            delta = {k: v for k, v in c["message"].items() if k != "role" and v}
            for i, call in enumerate(delta.get("tool_calls", [])):
                call["index"] = i
            chunk = {"index": c["index"], "delta": delta, "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}
            if req.return_token_ids:
                chunk["token_ids"] = c["token_ids"]
            yield sse({**head, "choices": [chunk]})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": body["usage"]})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# --- legacy TRL routes -----------------------------------------------------------------------------


def legacy_sampling_params(server, body, max_tokens_room):
    """TRL's /generate/ and /chat/ fields → SamplingParams (generation_kwargs override the named fields)."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    kwargs = {"n": body.get("n", 1), "repetition_penalty": body.get("repetition_penalty", 1.0),
              "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
              "top_k": body.get("top_k", -1), "min_p": body.get("min_p", 0.0),
              "max_tokens": body.get("max_tokens", 16), "logprobs": body.get("logprobs", 0)}
    extra = body.get("generation_kwargs") or {}
    if not isinstance(extra, dict):
        raise APIError("generation_kwargs must be an object.", param="generation_kwargs")
    kwargs.update(extra)
    if kwargs["top_k"] == 0:
        kwargs["top_k"] = -1
    if isinstance(kwargs["max_tokens"], int) and kwargs["max_tokens"] > max_tokens_room:
        raise APIError(f"max_tokens={kwargs['max_tokens']} does not fit in max_model_len.", param="max_tokens")
    try:
        server.check_logprobs(kwargs.get("logprobs"))
        if isinstance(kwargs.get("structured_outputs"), dict):
            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        if body.get("structured_outputs_regex"):
            kwargs["structured_outputs"] = StructuredOutputsParams(regex=body["structured_outputs_regex"])
        return SamplingParams(**kwargs)
    except APIError:
        raise
    except Exception as exc:  # SamplingParams' own validation (VLLMValidationError, ValueError, TypeError)
        raise APIError(str(exc), param=getattr(exc, "parameter", None)) from None


def legacy_response(results):
    """TRL's shape: prompt_ids per prompt; completion_ids, logprobs, logprob_token_ids per completion."""
    outputs = [o for r in results for o in r["outputs"]]
    with_logprobs = all(o["logprobs"] is not None for o in outputs)
    ranked = [[sorted(pos, key=lambda e: e[2]) for pos in o["logprobs"]] for o in outputs] if with_logprobs else None
    return {"prompt_ids": [r["prompt_token_ids"] for r in results],
            "completion_ids": [o["token_ids"] for o in outputs],
            "logprobs": [[[finite(e[1]) for e in pos] for pos in o] for o in ranked] if ranked else None,
            "logprob_token_ids": [[[e[0] for e in pos] for pos in o] for o in ranked] if ranked else None}


def legacy_list(body, key, required=True):
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or (required and not value):
        raise APIError(f"`{key}` must be a non-empty list.", param=key)
    return value


async def legacy_generate(request):
    server = state(request)
    body = await read_json(request)
    prompts = legacy_list(body, "prompts")
    images = legacy_list(body, "images", required=False) or [None] * len(prompts)
    if len(images) != len(prompts) or not all(i is None or isinstance(i, list) for i in images):
        raise APIError("`images` must have one entry per prompt: null or a list of base64 strings.", param="images")
    engine_prompts, shortest_room = [], server.max_model_len
    for prompt, image_list in zip(prompts, images):
        if isinstance(prompt, str):
            ids = server.tokenizer.encode(prompt)
            engine_prompt = {"prompt": prompt}
        elif isinstance(prompt, list):
            ids = prompt
            engine_prompt = {"prompt_token_ids": prompt}
        else:
            raise APIError("Each prompt must be a string or a list of token ids.", param="prompts")
        server.check_prompt(ids, 1, param="prompts")
        shortest_room = min(shortest_room, server.max_model_len - len(ids))
        if image_list:
            engine_prompt["multi_modal_data"] = {"image": [decode_image(f"data:image/png;base64,{b}") for b in image_list]}
        engine_prompts.append(engine_prompt)
    sp = legacy_sampling_params(server, body, shortest_room)
    results = await server.generate(engine_prompts, [sp] * len(engine_prompts), request)
    return JSONResponse(legacy_response(results))


async def legacy_chat(request):
    server = state(request)
    body = await read_json(request)
    conversations = legacy_list(body, "messages")
    prompts, shortest_room = [], server.max_model_len
    for conversation in conversations:
        if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
            raise APIError("`messages` must be a list of conversations (lists of message objects).", param="messages")
        for message in conversation:  # TRL sends images as `image_pil` parts holding base64
            for part in message.get("content") if isinstance(message.get("content"), list) else ():
                if isinstance(part, dict) and part.get("type") == "image_pil":
                    part.update(type="image_url", image_url={"url": f"data:image/png;base64,{part.pop('image_pil')}"})
        prompt, ids = server.render_chat(conversation, body.get("tools"), body.get("chat_template"),
                                         body.get("chat_template_kwargs"))
        server.check_prompt(ids, 1, param="messages")
        shortest_room = min(shortest_room, server.max_model_len - len(ids))
        prompts.append(prompt)
    sp = legacy_sampling_params(server, body, shortest_room)
    results = await server.generate(prompts, [sp] * len(prompts), request)
    return JSONResponse(legacy_response(results))


async def legacy_sequence_logprobs(request):
    """Teacher scoring: top-k logprobs of every completion position of prompt+completion sequences."""
    import numpy as np
    from vllm.sampling_params import SamplingParams

    server = state(request)
    body = await read_json(request)
    sequences, prompt_lengths = legacy_list(body, "sequences"), legacy_list(body, "prompt_lengths")
    top_k, temperature = body.get("top_logprobs", LEGACY_LOGPROB_TOP_K), body.get("temperature", 1.0)
    fmt = body.get("response_format", "json")
    if len(sequences) != len(prompt_lengths):
        raise APIError("`sequences` and `prompt_lengths` must have the same length.", param="prompt_lengths")
    if not is_int(top_k) or top_k < 1 or not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or not temperature > 0:
        raise APIError("top_logprobs must be an int >= 1 and temperature > 0.", param="top_logprobs")
    if fmt not in ("json", "binary"):
        raise APIError("response_format must be 'json' or 'binary'.", param="response_format")
    for seq, plen in zip(sequences, prompt_lengths):
        server.check_prompt(seq, 1, param="sequences")
        if not is_int(plen) or not 0 <= plen <= len(seq):
            raise APIError("Each prompt_length must be in [0, len(sequence)].", param="prompt_lengths")
    server.check_logprobs(top_k)
    try:
        sp = SamplingParams(max_tokens=1, temperature=temperature, prompt_logprobs=top_k)
    except Exception as exc:  # e.g. an infinite temperature
        raise APIError(str(exc), param=getattr(exc, "parameter", None)) from None
    results = await server.generate([{"prompt_token_ids": s} for s in sequences], [sp] * len(sequences), request)
    logprobs, token_ids, actual_lp, actual_ids = [], [], [], []
    for seq, plen, result in zip(sequences, prompt_lengths, results):
        positions = result["prompt_logprobs"] or []
        rows = [sorted(positions[i] or [], key=lambda e: e[2]) if i < len(positions) else []
                for i in range(max(plen, 1), len(seq))]
        if plen == 0:  # the first token has no logprob (nothing precedes it)
            rows = [[]] + rows
        rows = [[e for e in row if e[2] <= top_k][:top_k] or row[:top_k] for row in rows]
        logprobs.append([[finite(e[1]) for e in row] for row in rows])
        token_ids.append([[e[0] for e in row] for row in rows])
        actual = [{e[0]: e[1] for e in (positions[i] or [])} if i < len(positions) else {}
                  for i in range(max(plen, 1), len(seq))]
        actual_lp.append([[finite(a.get(seq[i]))] for a, i in zip(actual, range(max(plen, 1), len(seq)))])
        actual_ids.append([[seq[i]] for i in range(max(plen, 1), len(seq))])
    if fmt == "json":
        return JSONResponse({"logprobs": logprobs, "logprob_token_ids": token_ids})
    lengths = [len(rows) for rows in logprobs]
    shape = [len(sequences), max(lengths, default=0), top_k]
    lp = np.full(shape, -np.inf, dtype=np.float32)
    ids = np.zeros(shape, dtype=np.int32)
    alp = np.full(shape[:2] + [1], -np.inf, dtype=np.float32)
    aid = np.zeros(shape[:2] + [1], dtype=np.int32)
    for b in range(len(sequences)):
        for t, (row_lp, row_id) in enumerate(zip(logprobs[b], token_ids[b])):
            lp[b, t, :len(row_lp)] = [x if x is not None else np.nan for x in row_lp]
            ids[b, t, :len(row_id)] = row_id
            alp[b, t, 0] = actual_lp[b][t][0] if actual_lp[b][t][0] is not None else np.nan
            aid[b, t, 0] = actual_ids[b][t][0]
    b64 = lambda a: base64.b64encode(a.tobytes()).decode()  # noqa: E731
    return JSONResponse({"logprobs_b64": b64(lp), "token_ids_b64": b64(ids), "actual_logprobs_b64": b64(alp),
                         "actual_token_ids_b64": b64(aid), "shape": shape, "completion_lengths": lengths})


# --- weight sync ------------------------------------------------------------------------------------


def param_meta(server, body):
    """{name, dtype, shape} checked against the checkpoint before any broadcast starts (a wrong one
    would leave the trainer and the workers waiting on broadcasts of different sizes)."""
    if not isinstance(body, dict):
        raise APIError("Each parameter must be an object {name, dtype, shape}.", param="params")
    name, dtype, shape = body.get("name"), body.get("dtype"), body.get("shape")
    if not isinstance(name, str) or not name:
        raise APIError("`name` must be a non-empty string.", param="name")
    if not isinstance(dtype, str) or dtype.split(".")[-1] not in TORCH_DTYPES:
        raise APIError(f"Unsupported dtype {dtype!r}; one of {sorted(TORCH_DTYPES)}.", param="dtype")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise APIError("`shape` must be a list of non-negative integers.", param="shape")
    known = server.checkpoint_shapes
    if known is not None:
        if name not in known:
            raise APIError(f"Unknown parameter {name!r}: not in the served checkpoint.", param="name")
        if shape != known[name]:
            raise APIError(f"Shape mismatch for {name!r}: got {shape}, the model has {known[name]}.", param="shape")
    return {"name": name, "dtype": dtype, "shape": shape}


TORCH_DTYPES = {"float32", "float16", "bfloat16", "float64"}  # what a trainer holds; vLLM casts on load


def check_weight_sync(info):
    """409 for every weight-sync call into a quantized model (`info`: the workers' `WorkerEngine.info()`):
    the trainer sends unquantized tensors, and loading them would leave the layers' scales as they were."""
    if info["quantization"]:
        raise APIError(f"Weight sync into a quantized model ({info['quantization']}) is not supported: the "
                       "trainer's tensors would be loaded without their quantization scales. Serve the "
                       "unquantized checkpoint to train against it.", status=409)


async def init_communicator(request):
    server = state(request)
    check_weight_sync(server.workers.info)
    body = await read_json(request)
    host, port = body.get("host"), body.get("port")
    if not isinstance(host, str) or not 0 < len(host) <= 253 or not host.isprintable() or " " in host:
        raise APIError("`host` must be a host name or an IP address.", param="host")
    if not is_int(port) or not 0 < port < 65536:
        raise APIError("`port` must be an integer in 1-65535.", param="port")
    world_size = server.args.tensor_parallel_size * server.args.data_parallel_size + 1
    # Close a stale group (a trainer that died without closing, TRL #3408) before answering: its TCP store
    # still listens on the port, and a trainer joining it would lose the connection when it closes.
    await server.workers.call("close_communicator")
    server.workers.sync_error, server.communicator = None, True
    await server.workers.fire("init_communicator", host, port, world_size, str(body.get("client_device_uuid")),
                              server.args.weight_sync_timeout)
    return JSONResponse({"message": "Request received, initializing communicator", "world_size": world_size,
                         "weight_sync_backend": "nccl" if server.workers.info["device"] == "cuda" else "gloo"})


async def update_named_param(request):
    server = state(request)
    check_weight_sync(server.workers.info)
    meta = param_meta(server, await read_json(request))
    server.check_communicator()
    await server.batcher.hold(server.args.weight_sync_timeout)  # released by /reset_prefix_cache
    await server.workers.fire("update_named_param", meta["name"], meta["dtype"], meta["shape"])
    return JSONResponse({"message": "Request received, updating named parameter"})


async def update_named_params(request):
    server = state(request)
    check_weight_sync(server.workers.info)
    body = await read_json(request)
    metas = [param_meta(server, p) for p in legacy_list(body, "params")]
    bucket_bytes = body.get("bucket_bytes", WEIGHT_BUCKET_BYTES)
    if not is_int(bucket_bytes) or bucket_bytes < 1:
        raise APIError("`bucket_bytes` must be a positive integer.", param="bucket_bytes")
    layout = body.get("layout")
    if not is_int(layout) or layout != WEIGHT_LAYOUT:  # a client without `layout` packs back to back (layout 1)
        raise APIError(f"`layout` must be {WEIGHT_LAYOUT} (each tensor padded to {WEIGHT_ALIGN_BYTES} bytes in its "
                       f"bucket), got {json.dumps(layout)}: a client that sends none packs tensors back to back. "
                       "Use the vllm_client.py that ships with this server.", param="layout")
    server.check_communicator()
    await server.batcher.hold()
    try:  # requests queued meanwhile run after the update: the lock keeps them out until it is done
        await server.workers.fire("update_named_params", metas, bucket_bytes)
    finally:
        server.batcher.release()
    return JSONResponse({"message": "Request received, updating named parameters",
                         "num_buckets": len(weight_buckets(metas, bucket_bytes))})


async def reset_prefix_cache(request):
    state(request).batcher.release()  # the end of a per-parameter sync
    results = await state(request).workers.call("reset_prefix_cache")
    return JSONResponse({"message": f"Request received, resetting prefix cache status: {all(results)}"})


async def close_communicator(request):
    state(request).communicator = False
    state(request).batcher.release()
    await state(request).workers.fire("close_communicator")
    return JSONResponse({"message": "Request received, closing communicator"})


# ------------------------------------------------------------------------------------------------
# App: routes table, error handling, lifespan
# ------------------------------------------------------------------------------------------------


def both(path, endpoint, methods):
    """A route under its legacy trailing-slash spelling and without it."""
    return [Route(path, endpoint, methods=methods), Route(path + "/", endpoint, methods=methods)]


routes = [
    *both("/health", health, ["GET"]),
    *both("/get_world_size", get_world_size, ["GET"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    *both("/generate", legacy_generate, ["POST"]),
    *both("/chat", legacy_chat, ["POST"]),
    *both("/get_sequence_logprobs", legacy_sequence_logprobs, ["POST"]),
    *both("/init_communicator", init_communicator, ["POST"]),
    *both("/update_named_param", update_named_param, ["POST"]),
    *both("/update_named_params", update_named_params, ["POST"]),
    *both("/reset_prefix_cache", reset_prefix_cache, ["POST"]),
    *both("/close_communicator", close_communicator, ["POST"]),
]


async def api_error(request, exc: APIError):
    return exc.response()


async def http_error(request, exc):
    return APIError(str(exc.detail), status=exc.status_code).response()


async def internal_error(request, exc):
    logger.exception("unhandled error on %s", request.url.path)
    return APIError(f"{type(exc).__name__}: {exc}", status=500).response()


class Guard:
    """ASGI middleware: bearer-token auth (every route but /health), then the body-size cap, checked on
    the declared Content-Length before anything is read and on the bytes as they arrive (a chunked
    body declares none): reading past the cap raises a 413 in the handler that reads."""

    def __init__(self, app, api_key, max_body):
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        too_large = APIError(f"Request body larger than {self.max_body} bytes (--max-request-body-bytes).", status=413)
        if self.expected and scope["path"].rstrip("/") != "/health" and \
                not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            error = APIError("Invalid or missing API key (Authorization: Bearer <key>).", status=401)
            return await error.response()(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await too_large.response()(scope, receive, send)
        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise too_large
            return message

        await self.app(scope, capped_receive, send)


def engine_processes(workers):
    """The processes under the workers: in vLLM's multiprocess layout, each worker's engine core and its
    model workers. They are reparented, not stopped, when a worker is killed."""
    import psutil

    found = []
    for process in workers.processes:
        with contextlib.suppress(psutil.Error):
            found += psutil.Process(process.pid).children(recursive=True)
    return found


def stop_processes(processes, timeout=ORPHAN_STOP_TIMEOUT_S):
    """SIGTERM, wait, SIGKILL what is left; processes already gone are skipped (psutil checks PID reuse)."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def stop_workers(server: Server):
    """Ask every worker to shut its engine down and exit, then stop whatever a killed or hung worker
    left behind (vLLM's EngineCore and model workers are reparented, not stopped, when it dies)."""
    server.workers.stop(WORKER_STOP_TIMEOUT_S)
    stop_processes(server.engine_processes)


async def watch_workers(server: Server, uvicorn_server):
    """A dead worker: its requests error out at once (503), /health answers 503, the engine processes it
    left behind are stopped (they would hold the accelerator's memory), then exit non-zero."""
    while True:
        found = await asyncio.to_thread(engine_processes, server.workers)
        if not server.workers.alive():  # a worker that died while we looked may have lost its children already
            break
        server.engine_processes = found
        await asyncio.sleep(WORKER_POLL_S)
    logger.error("a vLLM worker died; exiting with status 1 in %.0f s so a supervisor restarts the server",
                 WORKER_DEATH_GRACE_S)
    server.exit_code = 1
    await asyncio.to_thread(stop_processes, server.engine_processes)
    await asyncio.sleep(WORKER_DEATH_GRACE_S)
    uvicorn_server.should_exit = True


def build_app(server: Server):
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware

    async def lifespan(app):
        app.state.server = server
        tasks = [asyncio.create_task(server.batcher.run())]
        if getattr(app.state, "uvicorn_server", None) is not None:
            tasks.append(asyncio.create_task(watch_workers(server, app.state.uvicorn_server)))
        yield
        for task in tasks:
            task.cancel()
        # Stop the workers now, not after uvicorn returns: asyncio.run() then waits for every pipe thread,
        # and one may be waiting on a worker still generating for requests cut off at --shutdown_timeout.
        await asyncio.to_thread(stop_workers, server)

    return Starlette(routes=routes, lifespan=contextlib.asynccontextmanager(lifespan),
                     middleware=[Middleware(Guard, api_key=server.args.api_key,
                                            max_body=server.args.max_request_body_bytes)],
                     exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error})


def exposed_without_key(host, api_key):
    """Whether anyone beyond this machine could generate and overwrite the weights."""
    import ipaddress

    if api_key or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every interface): assume it is reachable
        return True


def serve(server: Server):
    """uvicorn with a graceful-shutdown bound; → the process exit code."""
    args = server.args
    if exposed_without_key(args.host, args.api_key):
        logger.warning("Listening on %s without --api-key: anyone who can reach port %d can generate and "
                       "overwrite the model weights.", args.host, args.port)
    app = build_app(server)
    server.uvicorn_server = app.state.uvicorn_server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout))
    server.uvicorn_server.run()
    return server.exit_code


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper() if args.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds main() so the workers are always stopped; uvicorn re-raises it after its own
    # graceful shutdown, which then ends here as a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = Server(args)
    try:
        server.workers.start()
        server.engine_processes = engine_processes(server.workers)
        logger.info("%d vLLM worker(s) ready: %s", args.data_parallel_size, server.workers.info)
        exit_code = serve(server)
    except WorkerError as exc:
        logger.error("%s", exc)
        sys.exit(1)
    finally:
        stop_workers(server)  # a no-op after the lifespan stopped them
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
