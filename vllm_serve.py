"""OpenAI-compatible rollout server for online RL on vLLM, with live weight sync; drop-in for trl vllm-serve.

What it does
    Serves vLLM's own OpenAI app (the one `vllm serve` builds, so every route, field, stream and error is
    stock's) over a pool of data-parallel replicas: one process per replica, each owning one vLLM engine,
    driven over `multiprocessing` pipes. The app talks to the pool through an `EngineClient` of ours;
    every pipe exchange runs in a thread under one shared asyncio lock, so the event loop never blocks.
    Requests are batched continuously: in rounds, each replica gets the requests that arrived since the
    last round and answers with the outputs its engine produced (one per token for streams).
    TRL's legacy routes and weight-sync protocol are served beside it, rendering through the same vLLM code.

Launch
    python vllm_serve.py --model Qwen/Qwen2.5-0.5B-Instruct        # every `vllm serve` flag, and TRL's
    python vllm_serve.py --model M --data_parallel_size 2 --enable-auto-tool-choice --tool-call-parser hermes
    python vllm_serve.py --config serve.yaml                        # YAML of flags; its `env:` is exported

Routes
    vLLM's (VLLM_ROUTES below): /v1/completions, /v1/chat/completions, /v1/responses, /v1/messages,
        /tokenize, /detokenize, /v1/models, /version, /metrics, /ping, ... as `vllm serve` answers them; and
        stock's RL routes (/pause /resume /init_weight_transfer_engine /start_weight_update /update_weights
        /finish_weight_update /shutdown_weight_transfer_engine /update_weight_version /weight_info ...).
    Ours (ROUTES below): /health (with counters and the weights' state), /get_world_size, TRL's /generate/
        /chat/ /get_sequence_logprobs/, and its weight sync: /init_communicator /update_named_param
        /update_named_params /reset_prefix_cache /close_communicator; /abort_weight_update in both dialects.
    The API key (`--api-key`) guards every route but /health, /ping, /metrics and CORS preflight.

Weight sync, in TRL's dialect (the trainer is the last rank of the group, the server's ranks from its
`rank_offset`) and in stock vLLM's (the trainer is rank 0), over NCCL on CUDA or gloo through host memory.
Both are adapters onto one transaction (WeightSync, and WeightEngine in each vLLM worker): from its first
step new requests wait and running ones freeze; it commits on every replica at once, with a new version,
or any failure (a trainer gone, a timeout, a load that raised) rolls every replica back to the weights it
had, exactly. A request that asks gets the versions that produced its tokens (`return_weight_versions`).

Limits
    Replicas are independent copies (dense models); `--tensor-parallel-size` splits each one. vLLM's
    multi-node and multi-front-end layout flags are refused (REFUSED_FLAGS). Development routes
    (collective_rpc, sleep, ...) are never served, whatever VLLM_SERVER_DEV_MODE says; nor are LoRA
    adapters, pooling models or profiling. `/v1` clamps a `max_tokens` that does not fit, as stock;
    the legacy routes answer it with 400, as TRL's server did. Weight sync into a quantized model is refused.

Contents (one banner section each, in this order; each uses only names defined above it)
    Constants (and vLLM's exceptions for our errors) · Configuration · Worker side: 1 transfer plans, backups,
    the reload; 2 WeightEngine, a worker's half of every update; 3 stock's transfer engine over gloo ·
    Replica process · Replica pool (every process's lifecycle) · Batcher (rounds, the admission gate) ·
    Weight sync: 1 what a trainer may send; 2 Update, the transaction; 3 WeightSync, the trainer's group and
    the update's steps · The engine client · Routes of ours (parsing, health, TRL's weight sync) · TRL's
    legacy generation routes · Middleware (StreamErrors, Bodies: checks vLLM misses and weight versions,
    Guard: auth, body cap) · App, launcher, main()
"""

import os

os.environ["VLLM_SERVER_DEV_MODE"] = "0"  # before vLLM reads it: its dev routes run arbitrary worker methods
if __name__ == "__main__" and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    # before vLLM imports prometheus_client: the metrics of every process (replicas' engines included) are
    # written there and /metrics reads them all
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR = tempfile.mkdtemp(prefix="vllm-serve-metrics-")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import contextvars  # noqa: E402
import copy  # noqa: E402
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import hmac  # noqa: E402
from http import HTTPStatus  # noqa: E402
import io  # noqa: E402
import ipaddress  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import mmap  # noqa: E402
from multiprocessing import shared_memory  # noqa: E402
import multiprocessing  # noqa: E402
import multiprocessing.util  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402

from PIL import Image  # noqa: E402
from huggingface_hub import snapshot_download  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from safetensors import safe_open  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.config.weight_transfer import WeightTransferConfig  # noqa: E402
from vllm.distributed.device_communicators import shm_broadcast  # noqa: E402
from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator  # noqa: E402
from vllm.distributed.utils import (StatelessProcessGroup,  # noqa: E402
                                    stateless_init_torch_distributed_process_group)
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,  # noqa: E402
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory  # noqa: E402
from vllm.distributed.weight_transfer.packed_tensor import DEFAULT_PACKED_BUFFER_SIZE_BYTES  # noqa: E402
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: E402
from vllm.engine.protocol import EngineClient  # noqa: E402
from vllm.entrypoints.launchers.api_server.app_state import init_app_state  # noqa: E402
from vllm.entrypoints.launchers.app import build_app  # noqa: E402
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args  # noqa: E402
from vllm.entrypoints.launchers.launcher import serve_http, setup_server  # noqa: E402
from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config  # noqa: E402
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.entrypoints.openai.completion.protocol import CompletionRequest  # noqa: E402
from vllm.entrypoints.rl.online import api_router as rl_router  # noqa: E402
from vllm.entrypoints.serve.dev.server_info import api_router as server_info_router  # noqa: E402
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response  # noqa: E402
from vllm.entrypoints.serve.exception_handling.handlers.http import http_exception_handler  # noqa: E402
import vllm.envs  # noqa: E402
from vllm.exceptions import (GenerationError, GracefulHTTPError, RetryableRequestError,  # noqa: E402
                             VLLMClientError, VLLMNotFoundError, VLLMValidationError)
from vllm.model_executor.layers.attention import is_deferred_attention_layer  # noqa: E402
from vllm.model_executor.model_loader.reload.layerwise import (LOADING_LAYERS,  # noqa: E402
                                                               _get_original_loader,
                                                               _layerwise_process,
                                                               _place_kernel_tensors,
                                                               finalize_layerwise_reload,
                                                               get_layerwise_info,
                                                               initialize_layerwise_reload)
from vllm.model_executor.model_loader.reload.meta import (SKIP_TENSORS, get_numel_loaded,  # noqa: E402
                                                          materialize_meta_tensor)
from vllm.model_executor.model_loader.reload.utils import (get_layer_tensors,  # noqa: E402
                                                           get_tensor_load_numel)
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.renderers import renderer_from_config  # noqa: E402
from vllm.renderers.inputs.preprocess import extract_prompt_components  # noqa: E402
from vllm.usage.usage_lib import UsageContext  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402
from vllm.utils.nccl import unpinned_nccl_env  # noqa: E402
from vllm.v1.engine.exceptions import EngineDeadError  # noqa: E402
from vllm.v1.structured_output.backend_guidance import validate_guidance_grammar  # noqa: E402
from vllm.v1.structured_output.backend_outlines import (  # noqa: E402
    validate_structured_output_request_outlines)
from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar  # noqa: E402
from vllm.v1.engine.input_processor import InputProcessor  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402
from vllm.v1.engine.output_processor import RequestOutputCollector  # noqa: E402

logger = logging.getLogger("vllm_serve")

# ------------------------------------------------------------------------------------------------
# Constants
# ------------------------------------------------------------------------------------------------


BATCH_WAIT_MS = 0.0  # when idle, how long the first request waits for company. 0: start at once; the rest
#                     of a burst joins at the next engine step anyway, and a lone request pays no delay
ROUND_WAIT_MS = 100.0  # a busy replica answers a round at its first output, at the bell (a new request, an
#                        abort, any other call) or after this. Rounds without an output only cost: at 5 ms
#                        they were 200 a second, 0.9 core-seconds in 14 (2 cores, a 290 ms engine step)
# how often a replica waiting for its engine's output looks at the bell: the longest a new request waits to
# reach the engine (which keeps stepping in its own process meanwhile)
BELL_POLL_S = 0.002
ROUND_MAX_STEPS = 64  # engine steps one round collects once it has an output; more are left for the next
REPLICA_START_TIMEOUT_S = 1800.0  # model download + load + warmup of the slowest replica
REPLICA_POLL_S = 1.0  # how often a waiting pipe read checks that the replica is still alive
QUEUE_SPIN_S = 0.1  # on CPU, how long a reader of vLLM's shared-memory queues busy-waits after a read (vLLM:
#                     1 s). Engine steps come closer together than this, so generation keeps vLLM's latency
QUEUE_RECHECK_MS = 50  # how often a waiting reader looks again for a message whose wake-up was lost
#                        (vLLM: 5000; a look costs microseconds)
WEIGHT_SYNC_TIMEOUT_S = 600.0  # a trainer that never joins a broadcast fails the sync after this
WEIGHT_BUCKET_BYTES = 256 << 20  # default bucket of the batched weight update (client may choose)
# each tensor of a bucket starts at a multiple of this: a view as dtype needs an offset divisible by the
# element size, and a bucket may mix dtypes (say bf16, then fp32)
WEIGHT_ALIGN_BYTES = 16
WEIGHT_LAYOUT = 2  # bucket layout /update_named_params reads. 1 (sent without `layout`): tensors back to back
TORCH_DTYPES = {"float32", "float16", "bfloat16", "float64"}  # what a trainer holds; vLLM casts on load
LEGACY_LOGPROB_TOP_K = 100  # /get_sequence_logprobs/ default top_logprobs, as TRL
MAX_REQUEST_BODY_BYTES = 256 << 20  # 413 above this; generous enough for a few base64 images per request
# nesting levels a body of ours may have; real requests, tool schemas included, stay under 20
MAX_JSON_DEPTH = 64
JSON_THREAD_BYTES = 1 << 20  # bodies above this are parsed in a thread (~10 ms of json.loads per MiB)
REPLICA_DEATH_GRACE_S = 3.0  # after a replica dies: answer 503 this long, then exit non-zero for a supervisor
SHUTDOWN_TIMEOUT_S = 60.0  # on SIGTERM, how long in-flight requests may take to finish
SHUTDOWN_ANSWER_S = 2.0  # after --shutdown-timeout, how long the requests cut get to send their 503
ORPHAN_STOP_TIMEOUT_S = 5.0  # SIGTERM → SIGKILL for engine processes a dead replica left behind
REPLICA_STOP_TIMEOUT_S = 10.0  # at shutdown, a replica still generating (for nobody) is terminated after this
ORPHAN_ROUNDS = 5  # at a stop, how many times processes spawned meanwhile are looked for again
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
# after an NCCL group is destroyed, how long its worker's CUDA stream may take to drain
NCCL_ABORT_GRACE_S = 10.0
MODULE_NAME = pathlib.Path(__file__).stem  # vLLM's workers import the extension class by this name
OPEN_PATHS = {"/health", "/ping", "/metrics"}  # answered without the API key: probes and scrapers
# {(request id, completion index): [{version, start, end}]} of the HTTP request that asked for weight versions
VERSION_SPANS = contextvars.ContextVar("version_spans", default=None)
TRAINER_HEADER = b"x-weight-sync-group"  # our client names its group in every call; TRL's clients send none
TRAINER = contextvars.ContextVar("trainer", default=None)  # that name, for the request being served


def quiet_queues():
    """vLLM's shared-memory message queues (engine <-> workers) busy-wait less on CPU. Each reader spins for
    1 s after every read, and on CPU the core it spins on is the model's compute: on 2 cores, a DP-2 server's
    spinning held its workers and a local trainer back ~1 s at every weight-sync step (27 per-parameter steps
    of stock's dialect: 13 s; 1.2 s with QUEUE_SPIN_S). A reader past its spin waits for the writer's wake-up,
    which vLLM can lose (a zmq PUB with SNDHWM=1; it looks again every 5 s), so it looks every
    QUEUE_RECHECK_MS, on every device. (Without any spin, a wake-up was lost at almost every engine step.) Run
    before the engine's queues exist: every process of a replica (vLLM spawns its EngineCore and workers)
    imports this file first, as the main module of a spawn, and workers again for the extension class."""
    shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = QUEUE_RECHECK_MS
    if current_platform.is_cpu():  # on GPU the spin is vLLM's latency choice, and costs no compute
        shm_broadcast.SpinCondition.__init__.__defaults__ = (QUEUE_SPIN_S,)  # busy_loop_s


quiet_queues()


def http_error(message, status=400, param=None):
    """The vLLM exception that vLLM's handlers answer with `status` in OpenAI's shape, with vLLM's type."""
    if status == 400:
        return VLLMValidationError(message, parameter=param)
    kinds = {404: VLLMNotFoundError, 500: GenerationError, 503: RetryableRequestError}
    return kinds[status](message) if status in kinds else GracefulHTTPError(message, HTTPStatus(status))


def rendering_error(error):
    """vLLM's ErrorResponse (a render call's answer to bad input) → the exception that answers it again."""
    return http_error(error.error.message, error.error.code, error.error.param)


def error_response(exc):
    """An exception answered outside vLLM's app (our outermost middleware), as vLLM's handlers answer it."""
    error = create_error_response(exc)
    return JSONResponse(error.model_dump(), status_code=error.error.code)


def is_int(x):
    """A JSON integer; Python's bool is an int subclass, JSON's true is not."""
    return isinstance(x, int) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------------------
# Configuration: vLLM's own parser, TRL's spellings, this server's flags
# ------------------------------------------------------------------------------------------------


# trl vllm-serve 1.9
TRL_RENAMED = {"--log-level": "--uvicorn-log-level", "--vllm-model-impl": "--model-impl"}
TRUTHY, FALSY = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
# vLLM's multi-node / multi-front-end layout: cannot mean the same over one pool and one lock
REFUSED_FLAGS = {
    "data_parallel_rank": None, "data_parallel_address": None, "data_parallel_size_local": None,
    "data_parallel_hybrid_lb": False, "data_parallel_external_lb": False, "headless": False}
DEFAULTS = dict(  # where stock's default differs, TRL's server wins: RL needs it
    host="0.0.0.0",  # trl vllm-serve binds every interface (a warning says so when no key is set)
    max_logprobs=-1,  # any number of logprobs (stock: 20)
    # after temperature and penalties, what GRPO's ratios need (stock: raw)
    logprobs_mode="processed_logprobs",
    shutdown_timeout=SHUTDOWN_TIMEOUT_S,  # drain in-flight requests for this long on SIGTERM (stock: 0)
)


def make_parser():
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm_serve.py",
                                                    description=__doc__.split("\n\n")[0]))
    ours = parser.add_argument_group("rollout server", "This server's own flags (the rest are vLLM's).")
    ours.add_argument("--batch-wait-ms", type=float, default=BATCH_WAIT_MS,
                      help="When idle, how long the first request waits for others, in ms.")
    ours.add_argument("--round-wait-ms", type=float, default=ROUND_WAIT_MS,
                      help="Longest a busy replica waits for an output before answering a round, in ms "
                           "(new requests, aborts and other calls end the wait at once).")
    ours.add_argument("--weight-sync-timeout", type=float, default=WEIGHT_SYNC_TIMEOUT_S,
                      help="Seconds a weight-sync broadcast may wait for the trainer.")
    ours.add_argument("--replica-start-timeout", type=float, default=REPLICA_START_TIMEOUT_S,
                      help="Seconds to wait for the replicas to load.")
    ours.add_argument("--max-request-body-bytes", type=int, default=MAX_REQUEST_BODY_BYTES,
                      help="Larger request bodies get 413.")
    parser.set_defaults(**DEFAULTS)
    for action in parser._actions:  # our meaning of a flag both define: drain for N s, then 503
        if action.dest == "shutdown_timeout":
            action.type = float
            action.help = "On SIGTERM, seconds in-flight requests may take to finish (then 503)."
    return parser


def trl_argv(argv, parser):
    """TRL's spellings → vLLM's: renamed flags, and `--flag true|false` for vLLM's boolean flags (TRL's
    `bool | None` fields need a value; vLLM's take none, or a `--no-` form)."""
    booleans = {opt for action in parser._actions if action.nargs == 0 for opt in action.option_strings}
    out, i = [], 0
    while i < len(argv):
        flag = argv[i].replace("_", "-") if argv[i].startswith("--") and "=" not in argv[i] else argv[i]
        flag = TRL_RENAMED.get(flag, flag)
        value = argv[i + 1].lower() if i + 1 < len(argv) else None
        if flag in booleans and value in TRUTHY | FALSY:
            negated = "--no-" + flag[2:]
            if value in TRUTHY:
                out.append(flag)
            elif negated in booleans:
                out.append(negated)
            i += 2
            continue
        out.append(flag)
        i += 1
    return out


def export_config_env(argv):
    """A `--config` YAML may hold an `env:` mapping (as trl vllm-serve's): export it, and hand vLLM's parser
    the rest of the file. → argv with the config path replaced (or dropped when nothing else is in it)."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return argv
    at = argv.index("--config")
    config = yaml.safe_load(pathlib.Path(argv[at + 1]).read_text()) or {}
    os.environ.update({k: str(v) for k, v in (config.pop("env", None) or {}).items()})
    if not config:
        return argv[:at] + argv[at + 2:]
    rest = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    yaml.safe_dump(config, rest)
    rest.close()
    return argv[:at] + ["--config", rest.name] + argv[at + 2:]


def parse_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(trl_argv(export_config_env(sys.argv[1:] if argv is None else list(argv)),
                                      parser))
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    refused = [name for name, default in REFUSED_FLAGS.items() if getattr(args, name, default) != default]
    if (args.api_server_count or 1) > 1:
        refused.append("api_server_count")
    if refused:
        parser.error(f"{', '.join('--' + n.replace('_', '-') for n in refused)}: this server runs "
                     "--data-parallel-size replicas behind one front end; start one server per node "
                     "instead.")
    if getattr(args, "device_ids", None) and (args.data_parallel_size or 1) > 1:
        # each replica's workers would map their local ranks through the whole list, outside their own GPUs
        parser.error("--device-ids with --data-parallel-size > 1: choose the GPUs with CUDA_VISIBLE_DEVICES "
                     "instead (replica r takes the r-th tensor x pipeline parallel group of them).")
    if not args.model:
        parser.error("--model is required")
    # vLLM's --api-key takes several keys; VLLM_API_KEY is read after --config's `env:` was exported
    args.api_key = args.api_key or ([os.environ["VLLM_API_KEY"]] if os.environ.get("VLLM_API_KEY") else None)
    validate_parsed_serve_args(args)
    return args


def make_configs(args):
    """→ (the parent's VllmConfig with data-parallel size N, one per replica with size 1). No model loads."""
    engine_args = AsyncEngineArgs.from_cli_args(args)
    engine_args.shutdown_timeout = 0  # the parent drains (--shutdown-timeout); an engine told to stop stops
    parent = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    # what vLLM's launcher gives our engine client's shutdown()
    parent.shutdown_timeout = args.shutdown_timeout
    on_cuda = current_platform.is_cuda_alike()  # NVML, not a CUDA context
    # NCCL on CUDA, gloo elsewhere. NCCL asked for on CPU (TRL's documented command line) starts, and its
    # transfers are refused with a 400 naming gloo.
    backend = (parent.weight_transfer_config.backend if parent.weight_transfer_config
               else "nccl" if on_cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        sys.exit(f"vllm_serve.py: error: --weight-transfer-config backend {backend!r}: this server's weight "
                 "sync runs over gloo or nccl.")
    parent.weight_transfer_config = WeightTransferConfig(backend=backend)
    replicas, server = [], f"{socket.gethostname()}:{args.port}"
    for rank in range(parent.parallel_config.data_parallel_size):
        config = copy.deepcopy(parent)
        config.shutdown_timeout = 0
        config.parallel_config.reconfigure_for_independent_dp_rank()  # what stock does per DP engine process
        config.parallel_config.worker_extension_cls = f"{MODULE_NAME}.WeightSyncWorkerExtension"
        config.model_config.seed = replica_seed(parent.model_config.seed, rank, server)
        config.weight_transfer_config = None  # weights arrive through our WeightEngine, not vLLM's engine
        replicas.append(config)
    return parent, replicas


def replica_seed(seed, rank, server):
    """The engine seed of replica `rank` of the server at `server` ("host:port"): --seed mixed with both, as
    vLLM mixes a DP rank into its seed. With one seed for all, the k-th unseeded request on each replica (and
    on each server of a fleet: vLLM's default seed is 0 everywhere) would draw the same random numbers, and
    a GRPO group spread over them would hold duplicates. A request's own `seed` samples alike everywhere."""
    if seed is None:
        return None
    return int(np.random.SeedSequence((seed, rank, zlib.crc32(server.encode()))).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------
# Worker side, 1: transfer plans, backups, the reload (helpers of a worker's update)
# ------------------------------------------------------------------------------------------------


class Aborted(Exception):
    """A weight-update wait ended because the parent raised the abort counter (a new trainer, an expiry)."""


def completed(query, timeout_s, stop=lambda: False):
    """Whether `query()` turned true within `timeout_s`; Aborted once `stop()` is true. Polled with a short,
    growing interval: a broadcast whose sender died must not block the thread that checks it."""
    deadline, pause = time.monotonic() + timeout_s, 0.0001
    while not query():
        if stop():
            raise Aborted("the weight update was aborted")
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.005)
    return True


def torch_dtype(name):
    """"torch.bfloat16" or "bfloat16" → torch.bfloat16."""
    return getattr(torch, name.removeprefix("torch."))


def padded(nbytes):
    """Bytes a tensor of `nbytes` takes in a TRL-protocol bucket (layout WEIGHT_LAYOUT)."""
    return -(-nbytes // WEIGHT_ALIGN_BYTES) * WEIGHT_ALIGN_BYTES


def transfer_plan(metas, layout, bucket_bytes=WEIGHT_BUCKET_BYTES):
    """How a trainer's tensors ([{name, dtype, shape}], in order) arrive: one (bytes, typed, [(name, dtype,
    shape, offset, nbytes)]) per broadcast.
    - "buckets", TRL's batched protocol (the client's vllm_client._buckets): each tensor padded to
      WEIGHT_ALIGN_BYTES, a new bucket whenever the next tensor would overflow a non-empty one;
    - "packed", vLLM's `pack_tensors`: back to back, a broadcast closes right after the tensor that takes its
      total past `bucket_bytes`;
    - "tensors": one broadcast per tensor, in its own dtype (`typed`), as TRL's per-parameter protocol and
      vLLM's unpacked one send them."""
    plan, current, size = [], [], 0
    for meta in metas:
        dtype, shape = meta["dtype"], tuple(meta["shape"])
        nbytes = math.prod(shape) * torch_dtype(dtype).itemsize
        if layout == "tensors":
            plan.append((nbytes, True, [(meta["name"], dtype, shape, 0, nbytes)]))
            continue
        step = padded(nbytes) if layout == "buckets" else nbytes
        if layout == "buckets" and current and size + step > bucket_bytes:
            plan.append((size, False, current))
            current, size = [], 0
        current.append((meta["name"], dtype, shape, size, nbytes))
        size += step
        if layout == "packed" and size > bucket_bytes:
            plan.append((size, False, current))
            current, size = [], 0
    return plan + [(size, False, current)] if current else plan


class Backup:
    """A model's state before an update, to restore it exactly: per module its attributes (the registered
    tensors themselves, which CUDA graphs point at, and handles such as the CPU GEMM's `cpu_linear`, which
    processing replaces rather than writes into) and a host copy of every parameter and persistent buffer
    (the values a reload copies new weights over). Host memory: about the worker's shard of the model."""

    STATE = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")

    def __init__(self, model):
        self.modules, self.values = [], {}
        for module in model.modules():
            state = dict(vars(module))
            state.update({key: copy.copy(state[key]) for key in self.STATE})
            self.modules.append((module, state))
            persistent = [b for n, b in module._buffers.items()
                          if n not in module._non_persistent_buffers_set]
            for tensor in [*module._parameters.values(), *persistent]:
                if tensor is not None and id(tensor) not in self.values and not tensor.is_meta:
                    self.values[id(tensor)] = (tensor, tensor.detach().to("cpu", copy=True))

    @property
    def nbytes(self):
        return sum(saved.nbytes for _, saved in self.values.values())

    def restore(self):
        """Every module as it was, its tensors' storage holding the old values again; vLLM's reload state
        cleared."""
        for module, state in self.modules:
            get_layerwise_info(module).reset()
            vars(module).clear()
            vars(module).update(state)
        for tensor, saved in self.values.values():
            tensor.data.copy_(saved)
        LOADING_LAYERS.clear()


def finalize_reload(model, model_config):
    """vLLM's `finalize_layerwise_reload`, except for a layer that received only part of its tensors: vLLM
    would build it on uninitialized memory. Here the parts not sent keep their old values where the layer's
    kernel tensors hold them in checkpoint format (same shape and dtype: CUDA's unquantized layers); otherwise
    (CPU's repacked GEMM weights) the layer keeps its old weights whole. → names of the layers left unchanged.
    """
    unchanged = []
    for name, layer in model.named_modules():
        info = get_layerwise_info(layer)
        if (not info.can_load() or is_deferred_attention_layer(layer)
                or not 0 < info.load_numel < info.load_numel_total):
            continue
        tensors = {key: t for key, t in get_layer_tensors(layer).items()
                   if key not in SKIP_TENSORS and t.is_meta}
        loaded = dict.fromkeys(tensors, 0)
        for key, args in info.loaded_weights:
            if key in loaded:
                loaded[key] += get_numel_loaded(_get_original_loader(tensors[key]), args)[0]
        old = {**info.kernel_tensors[0], **info.kernel_tensors[1]} if info.kernel_tensors else {}
        missing = [key for key, t in tensors.items() if loaded[key] < get_tensor_load_numel(t)]
        if all(key in old and (old[key].shape, old[key].dtype) == (tensors[key].shape, tensors[key].dtype)
               for key in missing):
            with info.restore_device:
                for key in missing:
                    fresh = materialize_meta_tensor(tensors[key])
                    fresh.copy_(old[key])
                    setattr(layer, key, fresh)
            _layerwise_process(layer, info)  # the loads go over the old values, then processing as usual
        else:
            _place_kernel_tensors(layer, info)
            info.reset()
            unchanged.append(name)
    finalize_layerwise_reload(model, model_config)
    return unchanged


def retie_lm_head(model, loaded_names):
    """A tied lm_head gets no tensor of its own, and vLLM's reload puts its CPU-packed GEMM copy of the old
    embedding back: point it at the new embedding and re-pack it."""
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head") \
            and any(name.endswith("embed_tokens.weight") for name in loaded_names):
        model.lm_head.weight = model.model.embed_tokens.weight
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


# ------------------------------------------------------------------------------------------------
# Worker side, 2: WeightEngine, a worker's half of every weight update, and vLLM's hook for it
# ------------------------------------------------------------------------------------------------


class WeightEngine:
    """One vLLM worker's side of weight updates, for both dialects and both transports.

    The group: gloo into host memory (the load copies to the worker's device, so a CPU trainer can sync CUDA
    workers) or NCCL on the worker's GPU. An update: `begin` saves the model (Backup) and opens vLLM's
    layerwise reload; `receive` takes broadcasts and loads them (a layer is rebuilt once all its tensors
    arrived); `load` finalizes the rest; then `commit` drops the backup, or `rollback` restores it, at any
    point. Every wait ends at the group's deadline, or at once when the parent raises the abort counter past
    the value it sent with the step."""

    ACTIONS = {"join", "leave", "begin", "receive", "load", "commit", "rollback"}

    def __init__(self, model, vllm_config, device, runner=None):
        self.model, self.vllm_config, self.device, self.runner = model, vllm_config, device, runner
        self.group = self.spec = self.backup = self.pending = None
        self.loaded = set()  # names loaded in the open update
        self.parked = []  # gloo groups left with a broadcast pending: destroying one blocks until it ends
        self.counter = None  # the parent's abort counter (shared memory), attached at the first join

    def _configured(self):
        """vLLM's config as the current one: fp8, MoE and attention-scale processing read it (gpu_worker.py
        wraps its own weight updates the same way)."""
        return set_current_vllm_config(self.vllm_config)

    def _aborted(self, epoch):
        return self.counter is not None and int.from_bytes(self.counter[:8], "little") != epoch

    def join(self, spec, epoch=0):
        """Join the trainer's group: spec {backend, host, port, world_size, rank (this replica's first),
        source (the trainer's rank), timeout_s, barrier (TRL's NCCL clients barrier after each broadcast),
        nccl_unique_id_b64 (vLLM's store-less rendezvous), abort (the counter's name)}. → this worker's rank.
        """
        self.leave()
        self.spec = spec = {**spec, "rank": spec["rank"] + self.vllm_config.parallel_config.rank}
        if spec.get("abort") and self.counter is None:  # mapped, not attached: the parent alone owns it
            fd = os.open(f"/dev/shm/{spec['abort'].lstrip('/')}", os.O_RDONLY)
            self.counter = mmap.mmap(fd, 8, access=mmap.ACCESS_READ)
            os.close(fd)
        if spec["backend"] == "nccl":
            self.group = self._nccl_group(spec, epoch)
        else:
            self.group = stateless_init_torch_distributed_process_group(
                spec["host"], spec["port"], spec["rank"], spec["world_size"], backend="gloo",
                timeout=datetime.timedelta(seconds=spec["timeout_s"]))
        self.buffer_device = self.device if spec["backend"] == "nccl" else torch.device("cpu")
        return spec["rank"]

    def _nccl_group(self, spec, epoch):
        """NCCL's set-up has no deadline of its own (ncclCommInitRank, a warm-up all-reduce): it runs in a
        thread, and a worker still inside it past the deadline exits (its server then exits for its
        supervisor)."""
        formed = {}

        def form():
            try:
                with torch.cuda.device(self.device), unpinned_nccl_env():
                    if spec.get("nccl_unique_id_b64"):
                        formed["group"] = PyNcclCommunicator.from_unique_id_bytes(
                            base64.b64decode(spec["nccl_unique_id_b64"]), spec["rank"], spec["world_size"],
                            self.device)
                    else:
                        store = StatelessProcessGroup.create(
                            host=spec["host"], port=spec["port"], rank=spec["rank"],
                            world_size=spec["world_size"], store_timeout=int(spec["timeout_s"]))
                        formed["group"] = PyNcclCommunicator(store, device=self.device)
            except BaseException as exc:
                formed["error"] = exc

        thread = threading.Thread(target=form, daemon=True, name="nccl-group")
        thread.start()
        if not completed(lambda: not thread.is_alive(), spec["timeout_s"], lambda: self._aborted(epoch)):
            logger.critical("vLLM worker: NCCL group set-up with the trainer did not end within %g s; "
                            "exiting", spec["timeout_s"])
            os._exit(1)
        if "error" in formed:
            raise formed["error"]
        if formed["group"].disabled:
            raise RuntimeError("vLLM's NCCL communicator came back disabled (world size 1, "
                               "VLLM_DISABLE_PYNCCL or no NCCL library): it cannot receive weights.")
        return formed["group"]

    def leave(self):
        """Close the group: on a new join, on close, and on any failed step (the group is then unusable, and
        the trainer's next broadcast fails at once instead of waiting for a receiver). NCCL's is aborted,
        which ends a broadcast still posted; if this worker's CUDA stream is still blocked after that, the
        worker exits: its engine then dies, and the server with it (status 1, for a supervisor), rather than
        hang every later request behind a kernel that never ends. A gloo group whose broadcast is still
        pending (its sender alive but stuck) is parked: its destructor would wait for that broadcast."""
        group, self.group = self.group, None
        if group is None:
            return False
        if hasattr(group, "destroy"):  # PyNcclCommunicator
            group.destroy()
            if not self._stream_drained(NCCL_ABORT_GRACE_S, 0):
                logger.critical("vLLM worker: an aborted weight broadcast still blocks CUDA stream of %s; "
                                "exiting", self.device)
                os._exit(1)
        elif self.pending is not None:
            self.parked = [(g, w) for g, w in self.parked if not w.is_completed()] + [(group, self.pending)]
        else:
            with contextlib.suppress(Exception):
                group.shutdown()
        self.pending = None
        # A TCP store lives until its last reference dies; a live one on the same port would be reused by the
        # next group, whose trainer then hangs on the dead group's stale keys.
        del group
        gc.collect()
        return True

    def _stream_drained(self, timeout_s, epoch):
        """Whether this worker's CUDA stream finished its queued work within `timeout_s`."""
        event = torch.cuda.Event()
        event.record()
        try:
            return completed(event.query, timeout_s, lambda: self._aborted(epoch))
        except RuntimeError:  # a CUDA error: the stream is unusable
            return False

    def _broadcast(self, tensor, epoch):
        """Receive the trainer's next broadcast into `tensor`, within the deadline."""
        timeout_s = self.spec["timeout_s"]
        if hasattr(self.group, "destroy"):  # NCCL: enqueued on the current stream, which we then watch
            self.group.broadcast(tensor, src=self.spec["source"])
            if self.spec.get("barrier"):
                self.group.group.barrier()  # the store's timeout bounds it
            if not self._stream_drained(timeout_s, epoch):
                raise TimeoutError(f"the trainer's broadcast did not complete within {timeout_s:g} s")
            return
        self.pending = self.group.broadcast(tensor, root=self.spec["source"])
        if not completed(self.pending.is_completed, timeout_s, lambda: self._aborted(epoch)):
            raise TimeoutError(f"the trainer's broadcast did not complete within {timeout_s:g} s")
        work, self.pending = self.pending, None
        work.wait()  # raises the transport's error, if any

    def begin(self):
        """Save the model, then open vLLM's layerwise reload (its layers move to the meta device until
        rebuilt)."""
        if self.backup is None:
            self.backup, self.loaded = Backup(self.model), set()
            with self._configured():
                initialize_layerwise_reload(self.model)
        return self.backup.nbytes

    def receive(self, plan, epoch):
        """Take the broadcasts of `plan` (transfer_plan) and load them. A fresh buffer per broadcast: the
        reload keeps views of a layer's tensors until the layer is complete, and a layer may span two
        broadcasts."""
        if self.group is None:
            raise RuntimeError("No weight-sync group: the trainer must join one first.")
        self.begin()
        try:
            for size, typed, tensors in plan:
                if typed:
                    (name, dtype, shape, _, _), = tensors
                    buffer = torch.empty(shape, dtype=torch_dtype(dtype), device=self.buffer_device)
                    named = [(name, buffer)]
                else:
                    buffer = torch.empty(size, dtype=torch.uint8, device=self.buffer_device)
                    named = None
                self._broadcast(buffer, epoch)
                if named is None:
                    named = []
                    for name, dtype, shape, offset, nbytes in tensors:
                        piece, dtype = buffer[offset:offset + nbytes], torch_dtype(dtype)
                        # vLLM's packed layout has no padding; a view needs alignment
                        if offset % dtype.itemsize:
                            piece = piece.clone()
                        named.append((name, piece.view(dtype).view(shape)))
                with self._configured():
                    self.model.load_weights(named)
                self.loaded.update(name for name, _ in named)
        except BaseException:
            self.leave()
            raise
        return len(plan)

    def load(self):
        """Rebuild what the broadcasts left (attention layers, layers that got only part of their tensors),
        re-tie a tied head, and drop what the old weights computed, as vLLM's own reload does (LoRA state,
        encoder and multimodal caches). The backup stays until commit. → names of the layers left unchanged.
        """
        if self.backup is None:
            return []
        with self._configured():
            unchanged = finalize_reload(self.model, self.vllm_config.model_config)
        retie_lm_head(self.model, self.loaded)
        if self.runner is not None:
            self.runner.reset_lora_state()
            self.runner.reset_encoder_cache()
            self.runner.reset_mm_cache()
        if unchanged:
            logger.warning("weight update: these layers got only part of their tensors and keep their old "
                           "weights whole: %s", ", ".join(unchanged))
        return unchanged

    def commit(self):
        opened, self.backup, self.loaded = self.backup is not None, None, set()
        return opened

    def rollback(self):
        """The model exactly as before `begin`, wherever the update got to. → whether one was open."""
        backup, self.backup, self.loaded = self.backup, None, set()
        if backup is None:
            return False
        backup.restore()
        if self.runner is not None:
            self.runner.reset_encoder_cache()
            self.runner.reset_mm_cache()
        return True


class WeightSyncWorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`), for the replica's `collective_rpc`: the start-up
    warm-up, the GPU's identity, and `weights`, this worker's WeightEngine."""

    def warm_up(self):
        """One forward pass over one token, on CPU, where vLLM runs none before serving (eager mode with an
        explicit KV cache size): a kernel that cannot take the served dtype on this CPU (AMX's int8 GEMM takes
        only bf16 or half activations) then fails at start-up rather than in every request. CUDA workers have
        run vLLM's own profiling pass by now."""
        if self.device.type == "cpu":
            with torch.inference_mode():
                self.model_runner._dummy_run(1)

    def device_uuid(self):
        """This worker's GPU, as the trainer's client names its own (`client_device_uuid`); None on CPU."""
        return str(torch.cuda.get_device_properties(self.device).uuid) if self.device.type == "cuda" else None

    def weights(self, action, *args):
        if action not in WeightEngine.ACTIONS:
            raise ValueError(f"unknown weight-update action {action!r}")
        if getattr(self, "weight_engine", None) is None:
            self.weight_engine = WeightEngine(self.model_runner.get_model(), self.vllm_config, self.device,
                                              self.model_runner)
        return getattr(self.weight_engine, action)(*args)


# ------------------------------------------------------------------------------------------------
# Worker side, 3: stock vLLM's weight-transfer engine over gloo (for `vllm serve` and for us)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class GlooInitInfo(WeightTransferInitInfo):
    """vLLM NCCL engine's init info, and a deadline (NCCL has none, and hangs)."""
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    packed: bool = False
    packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES
    packed_num_buffers: int = 2  # NCCL's double buffering; gloo's broadcasts are synchronous
    timeout_s: float = WEIGHT_SYNC_TIMEOUT_S


@dataclasses.dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list
    dtype_names: list
    shapes: list
    packed: bool | None = None  # per update, as clients of vLLM < 0.28 sent it

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError("names, dtype_names and shapes must have the same length")


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """vLLM's weight-transfer engine interface (`--weight-transfer-config '{"backend": "gloo"}'`, the RL
    routes) over WeightEngine, for stock `vllm serve` on CPU, where vLLM's own engines all need CUDA (this
    server drives WeightEngine itself). The NCCL engine's init and update infos, ranks and packed layout, the
    trainer at rank 0. Registered as "gloo" wherever this module is imported: in vLLM's workers, through
    `--worker-extension-cls vllm_serve.WeightSyncWorkerExtension`, before they create their engine."""

    init_info_cls, update_info_cls = GlooInitInfo, GlooUpdateInfo

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights = WeightEngine(self.model, self.vllm_config, self.device)
        self.packed, self.buffer_bytes = False, DEFAULT_PACKED_BUFFER_SIZE_BYTES

    def init_transfer_engine(self, init_info):
        self.packed, self.buffer_bytes = init_info.packed, init_info.packed_buffer_size_bytes
        parallel = self.parallel_config
        first = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size
        self.weights.join({"backend": "gloo", "host": init_info.master_address, "port": init_info.master_port,
                           "world_size": init_info.world_size, "rank": first, "source": 0,
                           "timeout_s": init_info.timeout_s})

    def start_weight_update(self):
        self.weights.begin()

    def update_weights(self, update_info):  # the base's ends with torch.accelerator.synchronize(): not on CPU
        try:
            self.receive_weights(self.parse_update_info(update_info))
        except BaseException:
            self.weights.rollback()  # vLLM's worker then refuses /finish_weight_update: the old weights serve
            raise

    def receive_weights(self, update_info):
        packed = self.packed if update_info.packed is None else update_info.packed
        metas = [{"name": n, "dtype": d, "shape": s}
                 for n, d, s in zip(update_info.names, update_info.dtype_names, update_info.shapes)]
        self.weights.receive(transfer_plan(metas, "packed" if packed else "tensors", self.buffer_bytes), 0)

    def finish_weight_update(self):
        try:
            self.weights.load()
        except BaseException:
            self.weights.rollback()
            raise
        self.weights.commit()

    def shutdown(self):
        self.weights.rollback()
        self.weights.leave()


if "gloo" not in WeightTransferEngineFactory._registry:  # this module may be imported twice (as __main__)
    WeightTransferEngineFactory.register_engine("gloo", GlooWeightTransferEngine)


# ------------------------------------------------------------------------------------------------
# Replica process: one vLLM engine, driven over a pipe
# ------------------------------------------------------------------------------------------------


class StartupRefused(Exception):
    """A replica that would report healthy and then fail every request: its message says what to change."""


def warm_up_refusal(dtype, error):
    """Why a replica whose warm-up forward pass failed refuses to start, naming the dtype to serve in when the
    error names one (AMX's int8 kernel: "expect A to be bfloat16 or half")."""
    text, served = f"{type(error).__name__}: {error}", str(dtype).removeprefix("torch.")
    named = [name for name, words in (("bfloat16", ("bfloat16", "bf16")),
                                      ("float16", ("half", "float16", "fp16")))
             if name != served and any(word in text for word in words)]
    advice = f"serve it with --dtype {named[0]}" if named else \
        "try another --dtype (bfloat16, float16, float32)"
    return (f"the model cannot run on this machine in {served}: a warm-up forward pass failed ({text}); "
            f"{advice}.")


class Replica:
    """What a replica process serves: one vLLM engine (`LLMEngine`, built from the parent's config with
    data-parallel size 1). Each public method is one message of the pipe protocol.

    Generation is continuous: vLLM's EngineCore steps in its own process; a `round` adds the requests the
    parent built (`EngineCoreRequest`s), aborts those whose client left, and returns the `RequestOutput`s
    produced since the last round: one per token for streams (DELTA), one at the end otherwise. `bell` is
    a counter in shared memory that the parent bumps when it has something new: a round waiting for
    outputs ends when it moved.
    """

    def __init__(self, config, rank, log_stats, bell):
        self.rank, self.bell = rank, bell
        self.engine = LLMEngine.from_vllm_config(config, usage_context=UsageContext.OPENAI_API_SERVER,
                                                 disable_log_stats=not log_stats)
        try:
            self.engine.collective_rpc("warm_up")
        except Exception as exc:
            self.shutdown()
            raise StartupRefused(warm_up_refusal(config.model_config.dtype, exc)) from None
        self.unfinished = set()  # keys of our requests still in the engine

    def info(self):
        config = self.engine.model_config
        return {"pid": os.getpid(), "device": "cuda" if torch.cuda.is_available() else "cpu",
                "supported_tasks": tuple(self.engine.get_supported_tasks()),
                "quantization": config.quantization,  # method name (e.g. "fp8", "compressed-tensors") or None
                "workers": self.engine.vllm_config.parallel_config.world_size,  # tp x pp
                "gpu_uuids": self.engine.collective_rpc("device_uuid")}

    def round(self, requests, aborts, wait_s, rung):
        """→ (outputs, errors, aborted): RequestOutputs since the last round, [(key, status, message)] for
        requests the engine refused (400) or that were in a step that failed (500), and the keys it aborted
        while they ran. Returns at the first output, when the
        bell moves past `rung` (its value when the parent built this round), or after `wait_s`; outputs
        already queued by then are collected without waiting."""
        aborted = [key for key in aborts if key in self.unfinished]
        if aborted:
            self.engine.abort_request(aborted, internal=False)
            self.unfinished.difference_update(aborted)
        errors = []
        for request, prompt_text in requests:
            key = request.request_id  # add_request appends its own suffix to it; outputs carry `key`
            try:
                self.engine.add_request(key, request, request.params, prompt_text=prompt_text)
                self.unfinished.add(key)
            except EngineDeadError:  # not a refusal: the replica exits with its engine (replica_main)
                raise
            except Exception as exc:  # refused alone: the others in this round go on
                errors.append((key, 400, f"{type(exc).__name__}: {exc}"))
        outputs, deadline, collected = [], time.monotonic() + wait_s, 0
        while self.unfinished and collected < ROUND_MAX_STEPS:
            if not self.output_ready(0 if outputs else deadline - time.monotonic(), rung):
                break
            outputs += self.step(errors)
            collected += bool(outputs)
        return outputs, errors, aborted

    def step(self, errors):
        """One engine step; an engine failure fails the requests it was running (500: the server's fault, not
        theirs), not the replica. (In vLLM's multiprocess layout the EngineCore dies with it:
        EngineDeadError.)"""
        try:
            outputs = self.engine.step()
        except EngineDeadError:  # the replica exits with its engine (replica_main)
            raise
        except Exception as exc:
            logger.exception("replica %d: engine step failed", self.rank)
            errors += [(key, 500, f"The engine step running this request failed: {type(exc).__name__}: {exc}")
                       for key in self.unfinished]
            with contextlib.suppress(Exception):
                self.engine.abort_request(list(self.unfinished), internal=False)
            self.unfinished.clear()
            return []
        self.unfinished.difference_update(o.request_id for o in outputs if o.finished)
        return outputs

    def output_ready(self, timeout, rung=None):
        """Whether `step` would return at once, waiting up to `timeout` s for the engine's next output, or
        until the bell moves past `rung`. In vLLM's multiprocess layout the EngineCore steps on its own;
        in-process, `step` runs the step."""
        rang = lambda: rung is not None and self.bell.value != rung  # noqa: E731
        outputs = getattr(self.engine.engine_core, "outputs_queue", None)  # queue.Queue (multiprocess)
        if outputs is None:
            return timeout > 0 and not rang()
        deadline = time.monotonic() + timeout
        with outputs.not_empty:  # its own lock: peek at the deque, consume nothing
            while not outputs.queue:
                left = deadline - time.monotonic()
                if left <= 0 or rang():
                    return False
                outputs.not_empty.wait(min(left, BELL_POLL_S))
            return True

    def pause(self, mode, clear_cache):
        """vLLM's scheduler pause: "keep" freezes the running requests (with `clear_cache`, vLLM 0.32 preempts
        them: they are recomputed when they resume), "abort" ends them. → the outputs that ended them."""
        self.utility("pause_scheduler", mode, clear_cache)
        outputs, errors = [], []
        while self.unfinished and self.output_ready(0):  # "abort": the final outputs it queued
            outputs += self.step(errors)
        return outputs

    def resume(self):
        self.utility("resume_scheduler")

    def utility(self, method, *args):
        """An EngineCore utility call, in vLLM's multiprocess layout or in-process."""
        core = self.engine.engine_core
        if hasattr(core, "call_utility"):
            return core.call_utility(method, *args)
        return getattr(core.engine_core, method)(*args)

    def weights(self, action, *args):
        """One step of a weight update on every worker of this replica (WeightEngine) → their results. `load`
        also empties the prefix cache, so that no block the old weights computed is reused (a reset that fails
        raises: the update then rolls back); `commit` (args: the version) sets the version every later
        output carries."""
        if action == "commit":
            (version,) = args
            results = self.engine.collective_rpc("weights", args=("commit",))
            self.engine.set_weight_version(version)
            return results
        if action == "rollback":
            try:
                return self.engine.collective_rpc("weights", args=("rollback",))
            except Exception:  # its weights are now unknown: it must not serve them (the server exits 1)
                logger.critical("replica %d could not restore its weights after a failed update; exiting",
                                self.rank, exc_info=True)
                self.shutdown()
                os._exit(1)
        results = self.engine.collective_rpc("weights", args=(action, *args))
        if action == "load" and not self.engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("the prefix cache could not be emptied after loading the new weights")
        return results

    def version(self, new=None):
        if new is not None:
            self.engine.set_weight_version(new)
        return self.engine.get_weight_version()

    def reset_prefix_cache(self):
        return self.engine.reset_prefix_cache()

    def shutdown(self):
        """Stop vLLM's own processes (EngineCore, its workers) before this one exits, as `vllm serve` stops
        them (the config's shutdown_timeout, 0: SIGTERM, then SIGKILL for what has not exited)."""
        try:
            self.engine.engine_core.shutdown(timeout=self.engine.vllm_config.shutdown_timeout)
        except Exception as exc:
            logger.warning("replica %d: engine shutdown: %s", self.rank, exc)


# what the parent may call on a replica
REPLICA_METHODS = {"info", "round", "pause", "resume", "reset_prefix_cache", "weights", "version"}


def replica_main(config, rank, log_stats, bell, conn):
    """Process body: load, say ready (or why not), then answer each message with a result or an error."""
    os.setpgrp()  # a Ctrl-C in the terminal reaches the parent alone, which drains, then stops this replica
    try:
        replica = Replica(config, rank, log_stats, bell)
        conn.send(("ok", replica.info()))
    except StartupRefused as exc:
        conn.send(("error", str(exc)))
        return
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, KeyboardInterrupt):  # parent gone
            break
        if method == "shutdown":
            break
        try:
            if method not in REPLICA_METHODS:
                raise ValueError(f"unknown method {method!r}")
            reply = ("ok", getattr(replica, method)(*args))
        except EngineDeadError:  # its EngineCore or a model worker died: the parent sees this process die
            logger.exception("replica %d: its vLLM engine died", rank)
            replica.shutdown()
            sys.exit(1)
        except Exception as exc:
            logger.exception("replica %d: %s failed", rank, method)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except OSError:  # parent gone
            break
    replica.shutdown()
    # Skip the interpreter's teardown, seconds of garbage collection with torch and vLLM loaded that every
    # stop of the server would wait for. multiprocessing's own exit step still runs: its finalizers release
    # the semaphores this process made (tqdm's lock, for one), which its resource tracker would report as
    # leaked.
    multiprocessing.util._exit_function()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------
# Replica pool: spawn, pipes and their lock, watch, stop (every process's lifecycle)
# ------------------------------------------------------------------------------------------------


class ReplicaError(Exception):
    pass


def replica_envs(dp, world, on_cuda, visible, gpus, cores):
    """The environment each of `dp` replicas of `world` (tp x pp) workers is spawned with: its own GPUs on
    CUDA (a slice of CUDA_VISIBLE_DEVICES `visible`, else of the `gpus` the driver counts), its own core on
    CPU. → [{name: value}]; ValueError when the GPUs are too few (vLLM would otherwise stack every replica
    on the same devices)."""
    if on_cuda:
        ids = visible.split(",")[:gpus] if visible else [str(i) for i in range(gpus)]
        if dp * world > len(ids):
            raise ValueError(f"{dp} data-parallel replica(s) x {world} GPU(s) each need {dp * world} GPUs; "
                             f"{len(ids)} visible (CUDA_VISIBLE_DEVICES={visible!r}). Lower "
                             f"--data-parallel-size or --tensor-parallel-size.")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[r * world:(r + 1) * world])} if dp > 1 else {}
                for r in range(dp)]
    if dp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # replicas must not share cores
        return [{"VLLM_CPU_OMP_THREADS_BIND": str(r % cores)} for r in range(dp)]
    return [{} for _ in range(dp)]


@contextlib.contextmanager
def environment(env):
    """`os.environ` with `env` on top, for a spawn that copies it."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def running(process, name=""):
    """Whether a psutil process still runs (neither gone, PID reuse checked, nor a zombie nobody reaped) and
    its name starts with `name`."""
    try:
        return (process.is_running() and process.status() != psutil.STATUS_ZOMBIE
                and process.name().startswith(name))
    except psutil.Error:
        return False


def spawned_by_us():
    """This process's descendants, but its multiprocessing resource tracker (it exits with us)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(process.cmdline()):
                found.append(process)
    return found


class Replicas:
    """The replica processes, from spawn to stop, the engine processes under them included. Every pipe
    exchange holds `lock` from its first send to its last receive."""

    def __init__(self, configs, envs, log_stats):
        self.configs, self.envs, self.log_stats = configs, envs, log_stats
        self.lock = asyncio.Lock()
        self.processes, self.conns, self.infos = [], [], []
        self.engine_processes = []  # the processes under the replicas, as last seen (watch)
        self.vllm_processes = []  # vLLM's own among them (start)
        self.stopping = False  # stop() began: a replica's exit is no death
        self.bell = multiprocessing.get_context("spawn").Value("Q", 0, lock=False)  # we alone write

    def __len__(self):
        return len(self.configs)

    def start(self, timeout):
        ctx = multiprocessing.get_context("spawn")
        # vLLM's worker processes import the extension class from this file by module name.
        here = str(pathlib.Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        # torch's CPU allocator asks for transparent huge pages for tensors of 2 MiB and up: a fresh
        # 256 MiB weight-sync bucket then costs 128 page faults instead of 65,536 (4x faster to fill).
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        for rank, config in enumerate(self.configs):
            parent_conn, child_conn = ctx.Pipe()
            with environment(self.envs[rank]):
                process = ctx.Process(target=replica_main, name=f"replica-{rank}",
                                      args=(config, rank, self.log_stats, self.bell, child_conn))
                process.start()
            child_conn.close()
            self.processes.append(process)
            self.conns.append(parent_conn)
        self.infos = [self._recv(rank, timeout=timeout, what="start") for rank in range(len(self))]
        self.engine_processes = self.find_engine_processes()
        # vLLM's own processes (EngineCore, model workers; named by setproctitle) live as long as their engine
        self.vllm_processes = [p for p in self.engine_processes if running(p, "VLLM::")]

    def _recv(self, rank, timeout=None, what="reply"):
        """Read one message; a dead replica or an expired timeout raises instead of hanging."""
        conn, process = self.conns[rank], self.processes[rank]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not conn.poll(REPLICA_POLL_S):
            if not process.is_alive():
                raise ReplicaError(f"vLLM replica {rank} died (exit {process.exitcode}) before its {what}")
            if deadline is not None and time.monotonic() > deadline:
                raise ReplicaError(f"vLLM replica {rank} gave no {what} within {timeout:.0f} s")
        try:
            status, payload = conn.recv()
        except EOFError:
            raise ReplicaError(f"vLLM replica {rank} closed its pipe") from None
        if status == "error":
            raise ReplicaError(f"vLLM replica {rank}: {payload}")
        return payload

    def _exchange(self, messages):
        """{rank: (method, args)} → {rank: result}; drains every rank even when one fails."""
        for rank, message in messages.items():
            self.conns[rank].send(message)
        return self._replies(messages)

    def _replies(self, ranks):
        results, first_error = {}, None
        for rank in ranks:
            try:
                results[rank] = self._recv(rank)
            except ReplicaError as exc:
                first_error = first_error or exc
        if first_error:
            raise first_error
        return results

    def ring(self):
        """A round in flight ends now (without waiting for outputs): there is something for the next one."""
        self.bell.value += 1

    async def call(self, method, *args):
        """The same call on every replica → results in rank order."""
        self.ring()
        async with self.lock:
            results = await asyncio.to_thread(self._exchange, {r: (method, args) for r in range(len(self))})
        return [results[r] for r in range(len(self))]

    async def call_each(self, messages, ring=True):
        """A message per replica: {rank: (method, args)} → {rank: result}. `ring`: end a round in flight
        first (not for the rounds themselves)."""
        if ring:
            self.ring()
        async with self.lock:
            return await asyncio.to_thread(self._exchange, messages)

    async def fire(self, messages):
        """Send now; → a task that reads the replies ({rank: result}, or the first error), the lock held until
        it has. For weight sync: a replica blocks in a broadcast that the trainer joins only after this HTTP
        call returns, and nothing else may reach it until then."""
        self.ring()
        await self.lock.acquire()
        try:
            await asyncio.to_thread(lambda: [self.conns[r].send(m) for r, m in messages.items()])
        except BaseException:
            self.lock.release()
            raise

        async def replies():
            try:
                return await asyncio.to_thread(self._replies, messages)
            finally:
                self.lock.release()

        return asyncio.create_task(replies())

    def alive(self):
        """Every replica and every vLLM process under them (an engine whose worker died is dead too)."""
        return all(p.is_alive() for p in self.processes) and all(running(p) for p in self.vllm_processes)

    def find_engine_processes(self):
        """The processes under the replicas: in vLLM's multiprocess layout, each one's EngineCore and model
        workers. They are reparented, not stopped, when a replica is killed."""
        found = []
        for process in self.processes:
            with contextlib.suppress(psutil.Error):
                found += psutil.Process(process.pid).children(recursive=True)
        return found

    async def watch(self):
        """→ True once a replica died, False once the pool is being stopped; until then keeps
        `engine_processes` current, so that those a dead replica leaves behind can be stopped."""
        while not self.stopping:
            found = await asyncio.to_thread(self.find_engine_processes)
            if not self.alive():  # one that died while we looked may have lost its children already
                return not self.stopping
            self.engine_processes = found
            await asyncio.sleep(REPLICA_POLL_S)
        return False

    async def died(self):
        """After a failed exchange: whether a replica died (its pipe breaks just before its exit shows)."""
        for _ in range(int(REPLICA_POLL_S / 0.05)):
            if not self.alive():
                return True
            await asyncio.sleep(0.05)
        return False

    def stop(self, timeout=REPLICA_STOP_TIMEOUT_S):
        """Ask every replica to shut its engine down and exit; then stop whatever a killed, hung or still
        loading one left behind. A stop may come at any moment of start-up: engine processes are looked for
        while their replica still is their parent, and a replica that is not ready yet is not waited for."""
        self.stopping = True
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("shutdown", ()))
        for process in self.processes:
            process.join(timeout if self.infos else 0)
        left = self.engine_processes + self.find_engine_processes()
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()  # reaped: a zombie left to init outlives us
        stop_processes(left)
        for _ in range(ORPHAN_ROUNDS):  # spawned while their parent was being stopped: adopted by us
            orphans = spawned_by_us()
            if not orphans:
                break
            stop_processes(orphans)


def adopt_orphans():
    """Become the subreaper of this process tree (Linux): an engine process whose parent is stopped mid
    start-up is then re-parented here, not to init, and a stop still finds it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def stop_processes(processes, timeout=ORPHAN_STOP_TIMEOUT_S):
    """SIGTERM, wait, SIGKILL what is left; processes already gone are skipped (psutil checks PID reuse)."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


# ------------------------------------------------------------------------------------------------
# Batcher: continuous batching in rounds, and the admission gate
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pending:
    """One generate() call in flight: where its outputs go, and where it runs."""

    collector: object  # vLLM's RequestOutputCollector: merges deltas when the consumer lags
    rank: int
    sent: bool = False  # admitted to its replica's engine (else still in the batcher's queue)


class Batcher:
    """Continuous batching over the replicas.

    Each round is one exchange under the pipes' lock: every replica with work gets the requests that
    queued since the last round and the aborts of requests whose client left, and answers with the
    outputs its engine produced. Replicas keep generating between rounds, so a request that arrives
    mid-generation joins the running batch. When idle, the first request opens a `wait_s` window to
    gather a burst into one prefill. New requests pass one gate, closed while anything holds it: /pause
    ("pause") or a weight update ("update"); the holder may freeze the replicas' schedulers meanwhile.
    """

    def __init__(self, replicas: Replicas, wait_s: float, round_s: float):
        self.replicas, self.wait_s, self.round_s = replicas, wait_s, round_s
        self.pending = {}  # key → Pending
        self.queued = {}  # rank → [(EngineCoreRequest, prompt text)] not yet sent
        self.aborts = {}  # rank → keys to abort in its engine at the next round
        self.wake = asyncio.Event()  # a request or an abort arrived
        self.gate = asyncio.Event()  # set while new requests are admitted: nothing holds it
        self.gate.set()
        self.holds = set()  # who holds the gate: "pause", "update"
        self.drained = asyncio.Event()  # set while no admitted request runs
        self.drained.set()
        self.frozen = False  # the replicas' schedulers are paused: admitted requests wait in their engines
        self.waiting = 0  # requests waiting at the gate
        self.failure = None  # why every request now fails (a dead replica, shutdown)
        self.closing = None  # why new requests are refused while running ones drain (shutdown)
        self.aborted = 0  # requests the replicas confirmed aborted in vLLM
        self.finished = [0] * len(replicas)  # requests each replica completed, since start

    def nudge(self):
        """Something for the next round: start it, and end the one in flight."""
        self.wake.set()
        self.replicas.ring()

    def load(self, rank):
        return sum(p.rank == rank for p in self.pending.values())

    def submit(self, key, request, prompt_text, rank, collector):
        """Queue `request` for `rank` (None: the least loaded replica); its outputs go to `collector`."""
        if self.failure or self.closing:
            raise self.failure or self.closing
        rank = min(range(len(self.replicas)), key=self.load) if rank is None else rank
        self.pending[key] = Pending(collector, rank)
        self.queued.setdefault(rank, []).append((request, prompt_text))
        self.nudge()

    def cancel(self, key):
        """Forget `key`: still queued → never sent; sent → aborted in its engine at the next round."""
        pending = self.pending.pop(key, None)
        if pending is None:
            return
        if pending.sent:
            self.aborts.setdefault(pending.rank, []).append(key)
            self.nudge()
        else:
            queue = self.queued.get(pending.rank, [])
            queue[:] = [(r, t) for r, t in queue if r.request_id != key]

    def fail_all(self, error):
        """Every request in flight, and every later one, ends with `error`."""
        self.failure = error
        for pending in self.pending.values():
            pending.collector.put(error)
        self.pending.clear()
        self.queued.clear()
        self.aborts.clear()
        self.gate.set()  # requests waiting for a weight update to end meet the error at submit()

    async def drain(self, timeout_s):
        """At shutdown: new requests get a 503 at once, the ones in flight get `timeout_s` to finish, then a
        503."""
        self.closing = RetryableRequestError("The server is shutting down; send the request again.")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.idle(), timeout_s)
        self.fail_all(RetryableRequestError("The server shut down before this request finished "
                                            f"(--shutdown-timeout {timeout_s:g} s); send it again."))

    async def idle(self):
        while self.pending:
            await asyncio.sleep(REPLICA_POLL_S / 20)

    async def freeze(self, mode="keep", clear_cache=True):
        """The replicas' schedulers pause: "keep" freezes the admitted requests in their engines (with
        `clear_cache`, vLLM 0.32 preempts them: they are recomputed when thawed), "abort" ends them. Outputs
        the engines produced meanwhile (the final ones of aborted requests, say) still reach their requests.
        """
        self.frozen = True
        for rank, outputs in enumerate(await self.replicas.call("pause", mode, clear_cache)):
            self.deliver(rank, outputs)

    async def thaw(self):
        if self.frozen:
            self.frozen = False
            await self.replicas.call("resume")
        self.nudge()

    def end_running(self, finish_reason):
        """Every admitted request ends now with an empty final output (vLLM's in-process engine sends none
        when its scheduler aborts them)."""
        for key, pending in list(self.pending.items()):
            if pending.sent:
                del self.pending[key]
                pending.collector.put(RequestOutput(
                    request_id=key, prompt=None, prompt_token_ids=None, prompt_logprobs=None,
                    finished=True, outputs=[CompletionOutput(index=0, text="", token_ids=[],
                                                             cumulative_logprob=None, logprobs=None,
                                                             finish_reason=finish_reason)]))

    def hold(self, by):
        """New requests wait at the gate until `by` releases it (admitted ones go on unless frozen)."""
        self.holds.add(by)
        self.gate.clear()

    async def release(self, by):
        """The gate opens once nothing holds it; frozen requests go on."""
        self.holds.discard(by)
        if not self.holds:
            await self.thaw()
            self.gate.set()
            self.nudge()

    async def pause(self, mode, clear_cache):
        """Stock's /pause: new requests wait. Running ones: "wait" lets them finish, "keep" freezes them in
        the engine until /resume, "abort" ends them."""
        if mode not in ("abort", "wait", "keep"):
            raise ValueError(f"Invalid pause mode: {mode!r}; one of abort, wait, keep.")
        self.hold("pause")
        if mode == "wait":  # in the parent: a replica that waited inside its engine would stop answering
            await self.drained.wait()
            if clear_cache:
                await self.replicas.call("reset_prefix_cache")
            return
        await self.freeze(mode, clear_cache)
        if mode == "abort":
            self.end_running("abort")

    async def admission(self, timeout_s):
        """Returns once the gate is open; a 503 after waiting `timeout_s` at it."""
        if self.gate.is_set():
            return
        self.waiting += 1
        try:
            await asyncio.wait_for(self.gate.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise RetryableRequestError("Generation is paused for a weight update and was not resumed within "
                                        f"{timeout_s:g} s; send the request again.") from None
        finally:
            self.waiting -= 1

    async def run(self):
        while True:
            await self.next_round()
            try:
                await self.round()
            except Exception as exc:
                if await self.replicas.died():  # the server's supervise() answers it
                    return
                logger.error("generation round failed: %s", exc)
                for key, pending in list(self.pending.items()):  # fail what was in flight, keep serving
                    if pending.sent:
                        pending.collector.put(RetryableRequestError(str(exc)))
                        del self.pending[key]

    async def next_round(self):
        """Wait until a round has something to do; when idle, gather a burst for `wait_s`."""
        while not (self.aborts or any(p.sent for p in self.pending.values())
                   or (self.gate.is_set() and any(self.queued.values()))):
            self.drained.set()
            self.wake.clear()
            await self.wake.wait()
            if self.wait_s and self.gate.is_set():
                await asyncio.sleep(self.wait_s)

    async def round(self):
        """Send each replica its new requests and aborts, collect what its engine produced."""
        admit = self.gate.is_set()
        messages = {}
        for rank in range(len(self.replicas)):
            requests = self.queued.pop(rank, []) if admit else []
            aborts = self.aborts.pop(rank, [])
            for request, _ in requests:
                self.pending[request.request_id].sent = True
            if requests or aborts or any(p.sent and p.rank == rank for p in self.pending.values()):
                messages[rank] = ("round", (requests, aborts, self.round_s, self.replicas.bell.value))
        if not messages:
            return
        self.drained.clear()
        replies = await self.replicas.call_each(messages, ring=False)
        for rank, (outputs, errors, aborted) in replies.items():
            self.aborted += len(aborted)
            for key, status, message in errors:
                if (pending := self.pending.pop(key, None)) is not None:
                    pending.collector.put(ValueError(message) if status == 400 else GenerationError(message))
            self.deliver(rank, outputs)

    def deliver(self, rank, outputs):
        """Each RequestOutput to its request's collector (none if its client left meanwhile)."""
        for output in outputs:
            if (pending := self.pending.get(output.request_id)) is None:
                continue
            pending.collector.put(output)
            if output.finished:
                del self.pending[output.request_id]
                self.finished[rank] += 1

    @property
    def running(self):
        """Requests admitted to an engine and not finished."""
        return sum(p.sent for p in self.pending.values())


# ------------------------------------------------------------------------------------------------
# Weight sync, 1: what a trainer may send (the checkpoint's tensors; stock's payloads, checked)
# ------------------------------------------------------------------------------------------------


JOINS = {"legacy": "/init_communicator", "stock": "/init_weight_transfer_engine"}  # where a group forms


@functools.cache
def checkpoint_shapes(model, revision):
    """{name: shape} from the checkpoint's safetensors headers (no tensor is read); None if unknown."""
    path = pathlib.Path(model)
    if not path.is_dir():
        try:
            path = pathlib.Path(snapshot_download(model, revision=revision, allow_patterns=["*.safetensors"],
                                                  local_files_only=True))
        except Exception:
            return None
    shapes = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            shapes.update({name: list(f.get_slice(name).get_shape()) for name in f.keys()})
    if "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:  # tied embeddings
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes or None


def whole_update(shapes):
    """The tensors a whole per-parameter update sends (a tied head is not among them); None if unknown."""
    if shapes is None:
        return None
    tied = shapes["lm_head.weight"] is shapes.get("model.embed_tokens.weight")
    return set(shapes) - ({"lm_head.weight"} if tied else set())


def shared_gpu(client_uuid, worker_uuids):
    """The trainer's GPU if one of the workers uses it too (NCCL cannot broadcast within one device), else
    None. UUIDs as torch names them (`get_device_properties(d).uuid`); CPU workers have None."""
    return client_uuid if client_uuid in set(worker_uuids) - {None} else None


def stock_group(init_info, ours):
    """Stock's /init_weight_transfer_engine `init_info` → (the workers' part of the group, what the group
    keeps), or a 400. The trainer is rank 0 and hosts the group; this server's `ours` workers take the ranks
    from `rank_offset` up, replica i's after replica i-1's (each replica's engine counts from data-parallel
    index 0)."""
    info = init_info if isinstance(init_info, dict) else {}
    offset, world_size = info.get("rank_offset", 1), info.get("world_size")
    host, port, uid = info.get("master_address"), info.get("master_port"), info.get("nccl_unique_id_b64")
    buffer_bytes = info.get("packed_buffer_size_bytes", DEFAULT_PACKED_BUFFER_SIZE_BYTES)
    if not (is_int(offset) and is_int(world_size) and offset >= 1 and offset + ours <= world_size):
        raise http_error(f"`init_info` needs integers `rank_offset` >= 1 and `world_size` >= rank_offset + "
                         f"{ours} (this server's workers), the trainer at rank 0.", param="init_info")
    if not (isinstance(uid, str) or (isinstance(host, str) and is_int(port))) or not is_int(buffer_bytes):
        raise http_error("`init_info` needs `master_address` and an integer `master_port` (or "
                         "`nccl_unique_id_b64`), and an integer `packed_buffer_size_bytes`.",
                         param="init_info")
    return ({"rank": offset, "host": host, "port": port, "world_size": world_size, "source": 0,
             "nccl_unique_id_b64": uid}, {"packed": bool(info.get("packed", False)),
                                          "buffer_bytes": buffer_bytes})


def stock_metas(info, known):
    """One `update_info` of stock's dialect → [{name, dtype, shape}], or a 400 saying what is wrong. Each name
    must be in the checkpoint (`known`, when known) with as many elements: the broadcasts' sizes follow from
    them, and a wrong one would leave the trainer and the workers waiting on different sizes."""
    names, dtypes, shapes = (info.get(key) if isinstance(info, dict) else None
                             for key in ("names", "dtype_names", "shapes"))
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
            and len(names) == len(dtypes) == len(shapes)):
        raise http_error("`update_info` needs lists `names`, `dtype_names` and `shapes` of one length.",
                         param="update_info")
    metas = []
    for name, dtype, shape in zip(names, dtypes, shapes):
        if not (isinstance(name, str) and isinstance(dtype, str)
                and dtype.removeprefix("torch.") in TORCH_DTYPES):
            raise http_error(f"Each name must be a string and each dtype one of {sorted(TORCH_DTYPES)}: got "
                             f"{json.dumps(name)}, {json.dumps(dtype)}.", param="update_info")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise http_error(f"The shape of {name!r} must be a list of non-negative integers.",
                             param="update_info")
        if known is not None and (name not in known or math.prod(shape) != math.prod(known[name])):
            raise http_error(f"{name!r} with shape {shape} is not a tensor of the served checkpoint"
                             + (f" (it has {known[name]})." if name in known else "."), param="update_info")
        metas.append({"name": name, "dtype": dtype, "shape": shape})
    return metas


def stock_plans(update_info, replicas, workers, known, group):
    """Stock's /update_weights `update_info`: {names, dtype_names, shapes[, packed]}, or a list of them
    indexed by worker (vLLM's `data_parallel_index * world_size + rank`), replica i taking its workers' entry
    → ({replica: transfer plan}, names), or a 400. Names and sizes are checked against the checkpoint
    (`known`) before anything is broadcast; shapes are the load's to check."""
    total = replicas * workers
    infos = update_info if isinstance(update_info, list) else [update_info] * total
    if len(infos) != total:
        raise http_error(f"`update_info` lists {len(infos)} entries; this server has {total} workers "
                         f"({replicas} replicas x {workers}).", param="update_info")
    chosen = [infos[rank * workers] for rank in range(replicas)]
    if any(infos[rank * workers:(rank + 1) * workers] != [info] * workers
           for rank, info in enumerate(chosen)):
        raise http_error("The workers of one replica must get the same `update_info`.", param="update_info")
    plans, names = {}, set()
    for rank, info in enumerate(chosen):
        metas = stock_metas(info, known)
        packed = group["packed"] if info.get("packed") is None else info["packed"]
        plans[rank] = transfer_plan(metas, "packed" if packed else "tensors", group["buffer_bytes"])
        names |= {meta["name"] for meta in metas}
    return plans, names


# ------------------------------------------------------------------------------------------------
# Weight sync, 2: Update, one weight update over every replica, a transaction
# ------------------------------------------------------------------------------------------------


class Update:
    """The weight update over every replica, a transaction: idle → open (new requests wait at the batcher's
    gate, running ones freeze, to be recomputed on the weights that come out) → receiving (each replica saves
    its weights, then loads what arrives) → loading (every replica rebuilds the rest and empties its prefix
    cache) → committed (backups dropped and the version advanced, on every replica at once) → idle. A
    rollback puts every replica back to what it saved, and the previous version keeps serving. Either way
    the gate reopens. WeightSync runs its steps, one at a time."""

    def __init__(self, replicas: Replicas, batcher: Batcher):
        self.replicas, self.batcher = replicas, batcher
        self.state = "idle"  # idle, open, receiving, loading
        self.per_parameter = False  # it came from /update_named_param (no end marker)
        self.arrived = set()  # names received
        self.named = None  # the version the trainer named for it
        # "default": vLLM's, for weights never updated
        self.version, self.commits, self.rollbacks = "default", 0, 0
        self.last = None  # the last update's outcome

    def report(self):
        return {"state": self.state, "version": self.version, "commits": self.commits,
                "rollbacks": self.rollbacks, "last": self.last}

    async def open(self, freeze=True):
        """The first step of an update (none if one is open): the gate closes, running requests freeze."""
        if self.state == "idle":
            self.state, self.per_parameter, self.arrived, self.named = "open", False, set(), None
            self.batcher.hold("update")
            if freeze and not self.batcher.frozen:
                await self.batcher.freeze("keep", True)

    def receiving(self, per_parameter, version):
        """Tensors are on their way (each replica saves its weights before it loads the first)."""
        self.state, self.per_parameter = "receiving", self.per_parameter or per_parameter
        self.named = version if version is not None else self.named

    async def finish(self, version):
        """Commit (a `version` named now or earlier, else the next number); an update that received nothing
        leaves the weights as they were, and only a named version is set, as stock does. → the outcome."""
        if self.state in ("idle", "open"):
            if self.state == "open":
                self.state = "idle"
                await self.batcher.release("update")
            if version is not None:
                await self.set_version(version)
            return {"outcome": "nothing to commit", "version": self.version}
        self.state = "loading"
        try:
            loaded = await self.replicas.call("weights", "load")
        except ReplicaError as exc:
            if not self.replicas.alive():
                raise
            await self.rollback(f"loading the new weights failed: {exc}")
            raise http_error("Loading the new weights failed, and the update was rolled back (the previous "
                             f"weights serve): {exc}", status=409) from None
        number = int(self.version) + 1 if self.version.isdigit() else self.commits + 1
        version = version or self.named or str(number)
        await self.replicas.call("weights", "commit", version)
        unchanged = sorted({name for replica in loaded for worker in replica for name in worker})
        self.version, self.commits, self.state = version, self.commits + 1, "idle"
        self.last = {"outcome": "committed", "version": version, "unchanged_layers": unchanged}
        note = f"; layers left unchanged (only part of their tensors came): {unchanged}" if unchanged else ""
        logger.info("weight update committed: version %s%s", version, note)
        await self.batcher.release("update")
        return self.last

    async def rollback(self, reason):
        await self.replicas.call("weights", "rollback")
        self.state, self.arrived, self.rollbacks = "idle", set(), self.rollbacks + 1
        self.last = {"outcome": "rolled back", "version": self.version, "reason": reason}
        logger.warning("weight update rolled back, version %s serves: %s", self.version, reason)
        await self.batcher.release("update")

    async def set_version(self, version):
        await self.replicas.call("version", version)
        self.version = version


# ------------------------------------------------------------------------------------------------
# Weight sync, 3: WeightSync, the trainer's group and the update's steps (both dialects step it)
# ------------------------------------------------------------------------------------------------


class WeightSync:
    """The one owner of weight-sync state, for both dialects: TRL's (the trainer is the last rank of the
    group, /init_communicator) and stock vLLM's (the trainer is rank 0, /init_weight_transfer_engine). It
    holds the trainer's group and the Update, and runs the update's steps one at a time (`steps`). Any
    failure of a step on any replica rolls the update back on every replica. The deadline,
    --weight-sync-timeout after the trainer's last step, rolls back an update nobody finishes and ends a
    /pause nobody ends."""

    def __init__(self, args, replicas: Replicas, batcher: Batcher, backend, on_cuda):
        self.args, self.replicas, self.batcher = args, replicas, batcher
        self.backend, self.on_cuda = backend, on_cuda  # the transfer engine's backend; the replicas' device
        self.steps = asyncio.Lock()
        self.group = None  # the trainer's: {"dialect", "owner" (its client's name), "packed", ...}
        self.broken = None  # why the group's last step failed: its next step gets a 409 saying so
        self.update = Update(replicas, batcher)
        self.timer, self.tasks = None, set()  # the deadline; steps that run on after their HTTP call answered
        self.counter = shared_memory.SharedMemory(create=True, size=8)  # raised to end the workers' waits now
        self.epoch = 0

    def close(self):
        self.counter.close()
        self.counter.unlink()

    @property
    def workers(self):
        """Workers per replica (tensor x pipeline parallel): each takes one rank of the trainer's group."""
        return self.replicas.infos[0]["workers"]

    @property
    def world_size(self):
        return self.workers * len(self.replicas)

    def report(self):  # /health's "weights"
        return {**self.update.report(), "group": (self.group or {}).get("dialect")}

    # --- checks: 4xx before anything reaches a replica ------------------------------------------------

    def check_allowed(self):
        """409 for every weight-sync call into a quantized model: the trainer sends unquantized tensors, and
        loading them would leave the layers' scales as they were."""
        quantization = self.replicas.infos[0]["quantization"]
        if quantization:
            raise http_error(f"Weight sync into a quantized model ({quantization}) is not supported: the "
                             "trainer's tensors carry no quantization scales. Serve the unquantized "
                             "checkpoint to train against it.", status=409)

    def check_owner(self):
        """409 for a step from a trainer whose group a newer one replaced (a restarted trainer's old self).
        Only clients that name their group (X-Weight-Sync-Group) can be told apart."""
        sender, owner = TRAINER.get(), (self.group or {}).get("owner")
        if sender and owner and sender != owner:
            raise http_error("This trainer's weight-sync group was replaced by a newer trainer's (a "
                             "restarted trainer): call init again to take over.", status=409)

    def check_group(self, dialect):
        """409 unless the trainer's group of `dialect` is open and its last step did not fail."""
        self.check_owner()
        join = JOINS[dialect]
        if self.broken:
            raise http_error("The previous weight-sync step failed, and the update was rolled back: "
                             f"{self.broken}. Call {join} again.", status=409)
        if (self.group or {}).get("dialect") != dialect:
            raise http_error(f"No weight-sync group: call {join} first.", status=409)

    def spec(self, replica, **fields):
        """A replica's part of the group (WeightEngine.join): `rank` is the group's first rank of this
        server's workers; the replica's first comes `replica` replicas later."""
        common = {"backend": self.backend, "timeout_s": self.args.weight_sync_timeout,
                  "abort": self.counter.name}
        return {**common, **fields, "rank": fields["rank"] + replica * self.workers}

    # --- the deadline, and ending waits at once ---------------------------------------------------------

    def arm(self):
        """The trainer just acted: the deadline moves to --weight-sync-timeout from now."""
        if self.timer:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.args.weight_sync_timeout,
                                                           lambda: self.background(self.expire()))

    def background(self, coroutine):
        """A step that runs on after its HTTP call answered; its 409 reaches the trainer's next step."""
        def done(task):
            self.tasks.discard(task)
            error = None if task.cancelled() else task.exception()
            if error and not isinstance(error, (VLLMClientError, GracefulHTTPError)):
                logger.error("weight sync: %r", error)

        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(done)

    def abort_waits(self):
        """Every worker's broadcast wait of a step already sent ends now (it raises Aborted)."""
        self.epoch += 1
        self.counter.buf[:8] = self.epoch.to_bytes(8, "little")

    async def expire(self):
        if self.steps.locked():  # a receive in progress: its own broadcasts have this deadline
            return self.arm()
        async with self.steps:
            if self.update.state != "idle":
                await self.update.rollback("no step came from the trainer for "
                                           f"{self.args.weight_sync_timeout:g} s (--weight-sync-timeout)")
            if "pause" in self.batcher.holds:
                logger.warning("generation was paused (/pause) for %g s without a /resume: resuming",
                               self.args.weight_sync_timeout)
                await self.batcher.release("pause")

    # --- the group ----------------------------------------------------------------------------------

    async def join(self, dialect, fields, **group):
        """A trainer's group (`fields`: this server's part, see spec): an open update rolls back at once (its
        waits end now: the trainer that fed it is being replaced), the old group closes, the new one forms.
        Legacy: in the background, since the trainer joins after this call returns; stock: the trainer joins
        meanwhile, and this returns once it did."""
        self.check_allowed()
        if self.backend == "nccl" and not self.on_cuda:  # TRL's documented command line, on a CPU box
            raise http_error("The replicas run on CPU, where NCCL cannot transfer weights: start the server "
                             "with --weight-transfer-config '{\"backend\": \"gloo\"}' (the default on CPU).")
        self.arm()
        self.abort_waits()
        await self.steps.acquire()
        try:
            if self.update.state != "idle":
                await self.update.rollback("a new trainer group replaced the one feeding the update")
            await self.replicas.call("weights", "leave")
            self.group, self.broken = {"dialect": dialect, "owner": TRAINER.get(), **group}, None
            messages = {rank: ("weights", ("join", self.spec(rank, **fields), self.epoch))
                        for rank in range(len(self.replicas))}
            what = "joining the trainer's group"
            if dialect == "legacy":
                self.background(self._settle(await self.replicas.fire(messages), what))
                return
            await self._settle(self.replicas.call_each(messages), what, release=False)
        except BaseException:
            self.steps.release()
            raise
        self.steps.release()

    async def leave(self, commit=False):
        """The trainer closes its group. An open per-parameter update commits with `commit` (TRL's
        per-parameter protocol has no end marker); any other open update rolls back."""
        self.check_owner()
        if not commit:
            self.abort_waits()
        async with self.steps:
            if self.update.state != "idle":
                if commit and self.update.per_parameter:
                    await self.update.finish(None)
                else:
                    await self.update.rollback("the trainer closed its group before finishing the update")
            self.group, self.broken = None, None
            await self.replicas.call("weights", "leave")

    # --- the update ---------------------------------------------------------------------------------

    async def start(self, freeze=True):
        """/start_weight_update, and the first step of an update in either dialect."""
        self.check_owner()
        self.arm()
        async with self.steps:
            await self.update.open(freeze)

    async def receive(self, dialect, plans, names, *, per_parameter=False, drain=False, finish=False,
                      version=None):
        """Tensors the trainer broadcasts next: `plans` {rank: transfer_plan}. TRL's routes answer at once
        (its trainer broadcasts after that) and read the replies in the background: a batched update commits
        once received (`finish`), a `per_parameter` one once the whole checkpoint arrived (or at
        /reset_prefix_cache, /close_communicator). The others (stock's, and TRL's batched without `finish`:
        a client committing several servers at once) answer once loaded. `drain`: running ones end first."""
        self.arm()
        await self.steps.acquire()
        try:
            self.check_group(dialect)
            if drain and self.update.state == "idle":
                await self.update.open(freeze=False)
                await self.batcher.drained.wait()
            await self.update.open()
            self.update.receiving(per_parameter, version)
            messages = {rank: ("weights", ("receive", plan, self.epoch)) for rank, plan in plans.items()}
            if dialect == "legacy" and (finish or per_parameter):
                self.background(self._received(await self.replicas.fire(messages), names, finish))
                return
            await self._settle(self.replicas.call_each(messages), "receiving weights", release=False)
            self.update.arrived |= names
        except BaseException:
            self.steps.release()
            raise
        self.steps.release()

    async def _settle(self, replies, what, release=True):
        """Await a step's replies (a coroutine or task); a failure closes the group, rolls back the open
        update, and answers 409 saying what to do. `release`: this task was handed the steps lock."""
        try:
            try:
                return await replies
            except ReplicaError as exc:
                if not self.replicas.alive():
                    raise
                self.broken = f"{what} failed: {exc}"
                logger.error("weight sync: %s", self.broken)
                await self.replicas.call("weights", "leave")
                if self.update.state != "idle":
                    await self.update.rollback(self.broken)
                raise http_error(f"{self.broken}. The update was rolled back (the previous weights serve) "
                                 f"and the group is closed; call {JOINS[self.group['dialect']]} again.",
                                 status=409) from None
        finally:
            if release:
                self.steps.release()

    async def _received(self, replies, names, finish):
        try:
            await self._settle(replies, "receiving weights", release=False)
            self.update.arrived |= names
            whole = whole_update(checkpoint_shapes(self.args.model, self.args.revision))
            if finish or (self.update.per_parameter and whole and whole <= self.update.arrived):
                await self.update.finish(None)
        finally:
            self.steps.release()

    async def abort(self):
        """/abort_weight_update: the open update rolls back now (its waits end at once)."""
        self.check_owner()
        self.abort_waits()
        async with self.steps:
            if self.update.state != "idle":
                await self.update.rollback("the trainer aborted the update")
        return self.report()

    async def finish(self, version=None):
        """/finish_weight_update; /reset_prefix_cache after TRL's per-parameter updates (Update.finish)."""
        self.check_owner()
        self.arm()
        async with self.steps:
            return await self.update.finish(version)

    async def set_version(self, version):
        """Stock's /update_weight_version."""
        async with self.steps:
            await self.update.set_version(version)



# ------------------------------------------------------------------------------------------------
# The engine client: vLLM's serving layer over the replicas
# ------------------------------------------------------------------------------------------------


class ReplicaEngineClient(EngineClient):
    """vLLM's `EngineClient` (what `vllm serve`'s AsyncLLM is) over our replicas: the app renders prompts
    here (tokenizer-only renderer, no model), `generate` builds the engine request and hands it to the
    batcher, and yields the outputs that come back, as AsyncLLM does."""

    def __init__(self, vllm_config, batcher: Batcher, weight_sync: WeightSync, supported_tasks,
                 pause_timeout_s):
        self.vllm_config, self.model_config = vllm_config, vllm_config.model_config
        self.renderer = renderer_from_config(vllm_config)
        self.input_processor = InputProcessor(vllm_config, self.renderer)
        self.batcher, self.weight_sync, self.supported_tasks = batcher, weight_sync, tuple(supported_tasks)
        self.pause_timeout_s = pause_timeout_s  # a request waits this long at a closed gate, then gets a 503
        self.keys = itertools.count()
        self.loop = asyncio.get_running_loop()  # shutdown() comes from another thread
        self.grammar = None  # the structured-output backend of every replica's engine (pin_grammar)
        self.by_request_id = {}  # the serving layer's request id → our keys (its ids may repeat)

    # --- state -----------------------------------------------------------------------------------

    @property
    def is_running(self):
        return self.batcher.failure is None

    @property
    def is_stopped(self):
        return self.errored

    @property
    def errored(self):
        return self.batcher.failure is not None

    @property
    def dead_error(self):
        return self.batcher.failure

    async def check_health(self):
        if self.errored:
            raise self.dead_error

    async def get_supported_tasks(self):
        return self.supported_tasks

    # --- generation ------------------------------------------------------------------------------

    async def generate(self, prompt, sampling_params, request_id, *, prompt_text=None, lora_request=None,
                       tokenization_kwargs=None, trace_headers=None, priority=0, data_parallel_rank=None,
                       session_id=None, kv_hints=None, reasoning_ended=None, reasoning_parser_kwargs=None):
        """Yields the request's RequestOutputs, the last one finished; closing the generator (a client that
        disconnected) aborts the request in its engine."""
        if self.errored:
            raise self.dead_error
        await self.batcher.admission(self.pause_timeout_s)
        process = (self.input_processor.process_inputs if isinstance(prompt, dict) and "type" in prompt
                   else self.input_processor.process_inputs_async)  # a raw prompt is tokenized off the loop
        request = process(request_id, prompt, sampling_params, supported_tasks=self.supported_tasks,
                          lora_request=lora_request, tokenization_kwargs=tokenization_kwargs,
                          trace_headers=trace_headers, priority=priority,
                          data_parallel_rank=data_parallel_rank,  # validated against our N
                          session_id=session_id, kv_hints=kv_hints)
        if asyncio.iscoroutine(request):
            request = await request
        self.pin_grammar(request.sampling_params)
        if prompt_text is None:
            prompt_text = extract_prompt_components(self.model_config, prompt).text
        if reasoning_ended is not None:
            request.reasoning_ended = reasoning_ended
        if reasoning_parser_kwargs is not None:
            request.reasoning_parser_kwargs = reasoning_parser_kwargs
        # the replica's engine appends its own suffix
        key = request.request_id = f"{request_id}#{next(self.keys)}"
        request.data_parallel_rank = None  # each replica's engine has data-parallel size 1
        collector = RequestOutputCollector(sampling_params.output_kind, key)
        self.by_request_id.setdefault(request_id, set()).add(key)
        self.batcher.submit(key, request, prompt_text, data_parallel_rank, collector)
        finished, spans = False, VERSION_SPANS.get()
        try:
            while not finished:
                output = collector.get_nowait() or await collector.get()
                finished = output.finished
                output.request_id = request_id  # what AsyncLLM yields: the caller's id
                if spans is not None:  # the HTTP request asked for them (Bodies)
                    spans.update({(request_id, c.index): [dataclasses.asdict(span)
                                                          for span in c.weight_versions]
                                  for c in output.outputs if c.weight_versions is not None})
                yield output
        finally:
            if not finished:
                self.batcher.cancel(key)
            keys = self.by_request_id.get(request_id, set())
            keys.discard(key)
            if not keys:
                self.by_request_id.pop(request_id, None)

    def pin_grammar(self, params):
        """vLLM fixes one structured-output backend per engine, at its first structured request, while `auto`
        picks one per request: a later request that only another backend takes fails in the engine step (a
        500; stock too, upstream). The first backend picked here is every replica's, and a request picked for
        another is checked again for it: a 400 if it does not take it, as that backend's own check answers."""
        outputs = params.structured_outputs if params is not None else None
        if outputs is None or not outputs._backend_was_auto:
            return
        self.grammar = self.grammar or outputs._backend
        if outputs._backend != self.grammar:
            checks = {"xgrammar": validate_xgrammar_grammar, "guidance": validate_guidance_grammar,
                      "outlines": validate_structured_output_request_outlines}
            checks[self.grammar](params)
            outputs._backend = self.grammar

    async def abort(self, request_id, internal=False):
        """Abort by the serving layer's ids; each request ends with a final "abort" output, as in AsyncLLM."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            for key in list(self.by_request_id.get(rid, ())):
                pending = self.batcher.pending.get(key)
                self.batcher.cancel(key)
                if pending is not None:
                    pending.collector.put(RequestOutput(
                        request_id=key, prompt=None, prompt_token_ids=None, prompt_logprobs=None,
                        finished=True,
                        outputs=[CompletionOutput(index=0, text="", token_ids=[], cumulative_logprob=None,
                                                  logprobs=None, finish_reason="abort")]))

    def encode(self, *args, **kwargs):
        raise NotImplementedError("This server serves generative models only.")

    async def notify_kv_transfer_request_rejected(self, request_id, kv_transfer_params, *,
                                                  data_parallel_rank=None):
        return None  # no KV connector

    # --- caches, observability -------------------------------------------------------------------

    async def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        return all(await self.batcher.replicas.call("reset_prefix_cache"))

    async def reset_mm_cache(self):
        self.renderer.clear_mm_cache()

    async def reset_encoder_cache(self):
        return None

    async def is_tracing_enabled(self):
        return self.vllm_config.observability_config.otlp_traces_endpoint is not None

    async def do_log_stats(self):
        return None  # each replica's engine logs its own

    async def start_profile(self, *args, **kwargs):
        raise NotImplementedError("Profiling is not served.")

    async def stop_profile(self):
        raise NotImplementedError("Profiling is not served.")

    # --- not served (dev-mode routes only) ---------------------------------------------------------

    async def sleep(self, level=1, mode="abort"):
        raise NotImplementedError("Sleep mode is not served.")

    async def release_kv_cache_memory(self):
        raise NotImplementedError("Sleep mode is not served.")

    async def wake_up(self, tags=None):
        raise NotImplementedError("Sleep mode is not served.")

    async def is_sleeping(self):
        return False

    async def add_lora(self, lora_request):
        raise NotImplementedError("LoRA adapters are not served yet.")

    # --- pause, and vLLM's weight-transfer API (the RL routes) --------------------------------------

    async def pause_generation(self, *, mode="abort", clear_cache=True):
        self.weight_sync.arm()  # its deadline ends a /pause nobody ends
        await self.batcher.pause(mode, clear_cache)

    async def resume_generation(self):
        await self.batcher.release("pause")

    async def is_paused(self):
        return not self.batcher.gate.is_set()

    async def init_weight_transfer_engine(self, request):
        fields, group = stock_group(request.init_info, self.weight_sync.world_size)
        await self.weight_sync.join("stock", fields, **group)

    async def start_weight_update(self):
        self.weight_sync.check_allowed()
        await self.weight_sync.start()

    async def update_weights(self, request):
        sync = self.weight_sync
        sync.check_allowed()
        sync.check_group("stock")
        plans, names = stock_plans(request.update_info, len(sync.replicas), sync.workers,
                                   checkpoint_shapes(sync.args.model, sync.args.revision), sync.group)
        await sync.receive("stock", plans, names)

    async def finish_weight_update(self, weight_version=None):
        await self.weight_sync.finish(weight_version)

    async def shutdown_weight_transfer_engine(self):
        await self.weight_sync.leave()

    async def start_draft_weight_update(self):
        raise NotImplementedError("Speculative draft models are not served.")

    async def update_weight_version(self, new_version):
        await self.weight_sync.set_version(new_version)

    async def get_weight_version(self):
        return self.weight_sync.update.version

    def shutdown(self, timeout=None):
        """vLLM's launcher calls this from a thread at SIGINT or SIGTERM, with --shutdown-timeout: drain,
        stop."""
        if not self.batcher.failure and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.batcher.drain(timeout or 0), self.loop).result()
        self.batcher.replicas.stop()
        self.renderer.shutdown()


# ------------------------------------------------------------------------------------------------
# Routes of ours: parsing, health, TRL's weight sync (parse → validate → delegate)
# ------------------------------------------------------------------------------------------------


def finite(x):
    """Logprob for JSON: NaN → null; -inf → -9999.0 as stock vLLM (JSON has no infinities)."""
    if x is None or math.isnan(x):
        return None
    return max(x, -9999.0)


async def read_json(request):
    """The body as a JSON object, else 400. Its size is capped by `Guard`, chunked bodies included."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # nobody is left to read the answer; say why in the access log
        raise http_error("The client disconnected before sending the whole body.") from None
    if len(raw) > JSON_THREAD_BYTES:  # parsing a big body takes a while: keep the event loop free meanwhile
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


def parse_json(raw):
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise http_error(f"Malformed JSON body: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise http_error("The request body must be a JSON object.")
    check_json(body)
    return body


def check_json(value):
    """400 for what `json.loads` accepts but nothing downstream should see: nesting deeper than
    MAX_JSON_DEPTH (recursion in pydantic, Jinja, or the pickling to the replicas) and lone UTF-16
    surrogates such as "\\ud800" (no tokenizer encodes them)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    message = "The body holds a string that is not valid Unicode (a lone surrogate)."
                    raise http_error(message) from None
            continue
        if depth > MAX_JSON_DEPTH:
            raise http_error(f"The body is nested deeper than {MAX_JSON_DEPTH} levels.")
        children = item if isinstance(item, list) else [*item.keys(), *item.values()]
        stack.extend([(c, depth + 1) for c in children if type(c) in (str, list, dict)])


def listed(body, key, required=True):
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or (required and not value):
        raise http_error(f"`{key}` must be a non-empty list.", param=key)
    return value


def unchecked_field(body):
    """vLLM 0.32's completion and chat request models read `structured_outputs` (both) and `tools` (chat, when
    `tool_choice` names a function) in validators that run before any type check, and a value of the wrong
    type raises AttributeError or KeyError there: a 500, on stock `vllm serve` too (upstream bug). → (param,
    message) of the 400 that vLLM's type checks would answer, or None."""
    if not isinstance(body, dict):
        return None
    if body.get("structured_outputs") is not None and not isinstance(body["structured_outputs"], dict):
        return "structured_outputs", "`structured_outputs` must be an object."
    if isinstance(body.get("tool_choice"), dict) and isinstance(body.get("tools"), list):
        for i, tool in enumerate(body["tools"]):
            function = tool.get("function", ...) if isinstance(tool, dict) else None
            if function is ... or isinstance(function, dict) and "name" not in function:
                return (f"tools.{i}.function",
                        'Each tool must be {"type": "function", "function": {"name": ...}}.')
    return None


@dataclasses.dataclass
class Server:
    """What our handlers share."""

    args: argparse.Namespace
    replicas: Replicas
    batcher: Batcher
    weight_sync: WeightSync
    client: ReplicaEngineClient = None
    exit_code: int = 0  # 1 once a replica died


def state(request) -> Server:
    return request.app.state.rollout


async def health(request):
    server = state(request)
    if server.batcher.failure or server.batcher.closing:
        raise http_error(str(server.batcher.failure or server.batcher.closing), status=503)
    return JSONResponse({"status": "ok", "paused": not server.batcher.gate.is_set(),
                         "requests_running": server.batcher.running,
                         "requests_waiting": server.batcher.waiting,
                         "requests_aborted": server.batcher.aborted,  # their client left while they ran
                         "requests_finished_per_rank": server.batcher.finished,
                         "weights": server.weight_sync.report()})


async def get_world_size(request):
    weight_sync = state(request).weight_sync
    return JSONResponse({"world_size": weight_sync.world_size, "weight_sync_backend": weight_sync.backend})


def param_meta(weight_sync, body):
    """{name, dtype, shape} checked against the checkpoint before any broadcast starts (a wrong one
    would leave the trainer and the replicas waiting on broadcasts of different sizes)."""
    if not isinstance(body, dict):
        raise http_error("Each parameter must be an object {name, dtype, shape}.", param="params")
    name, dtype, shape = body.get("name"), body.get("dtype"), body.get("shape")
    if not isinstance(name, str) or not name:
        raise http_error("`name` must be a non-empty string.", param="name")
    if not isinstance(dtype, str) or dtype.split(".")[-1] not in TORCH_DTYPES:
        raise http_error(f"Unsupported dtype {dtype!r}; one of {sorted(TORCH_DTYPES)}.", param="dtype")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise http_error("`shape` must be a list of non-negative integers.", param="shape")
    known = checkpoint_shapes(weight_sync.args.model, weight_sync.args.revision)
    if known is not None:
        if name not in known:
            raise http_error(f"Unknown parameter {name!r}: not in the served checkpoint.", param="name")
        if shape != known[name]:
            raise http_error(f"Shape mismatch for {name!r}: got {shape}, the model has {known[name]}.",
                             param="shape")
    return {"name": name, "dtype": dtype, "shape": shape}


def version_of(body):
    """The version a trainer names for the update its call belongs to (optional; a string, as vLLM's)."""
    version = body.get("version")
    if version is not None and (not isinstance(version, str) or not version):
        raise http_error("`version` must be a non-empty string.", param="version")
    return version


async def init_communicator(request):
    weight_sync = state(request).weight_sync
    weight_sync.check_allowed()
    body = await read_json(request)
    host, port = body.get("host"), body.get("port")
    if not isinstance(host, str) or not 0 < len(host) <= 253 or not host.isprintable() or " " in host:
        raise http_error("`host` must be a host name or an IP address.", param="host")
    if not is_int(port) or not 0 < port < 65536:
        raise http_error("`port` must be an integer in 1-65535.", param="port")
    ours = weight_sync.world_size
    offset, world_size = body.get("rank_offset", 0), body.get("world_size", ours + 1)
    if not is_int(offset) or not is_int(world_size) or offset < 0 or offset + ours > world_size - 1:
        raise http_error(f"This server's {ours} ranks start at `rank_offset` and must lie below the "
                         "trainer's, the last of `world_size`: need 0 <= rank_offset and rank_offset + "
                         f"{ours} <= world_size - 1, got {json.dumps(offset)} and "
                         f"{json.dumps(world_size)}.", param="rank_offset")
    gpu = shared_gpu(str(body.get("client_device_uuid")),
                     [u for i in weight_sync.replicas.infos for u in i["gpu_uuids"]])
    if gpu and weight_sync.backend == "nccl":  # gloo goes through host memory: any device will do
        raise http_error(f"The trainer's device (GPU {gpu}) is one this server's vLLM workers use; NCCL "
                         "cannot broadcast within one device. Put the trainer on another GPU "
                         "(CUDA_VISIBLE_DEVICES).", param="client_device_uuid")
    await weight_sync.join("legacy", {"rank": offset, "host": host, "port": port, "world_size": world_size,
                                      "source": world_size - 1, "barrier": weight_sync.backend == "nccl"})
    return JSONResponse({"message": "Request received, initializing communicator", "world_size": world_size,
                         "weight_sync_backend": weight_sync.backend})


async def update_named_param(request):
    """One tensor of a per-parameter update, broadcast after this answers. The update commits once every
    parameter of the checkpoint arrived, at /reset_prefix_cache, or at /close_communicator."""
    weight_sync = state(request).weight_sync
    weight_sync.check_allowed()
    body = await read_json(request)
    meta = param_meta(weight_sync, body)
    await weight_sync.receive("legacy", dict.fromkeys(range(len(weight_sync.replicas)),
                                                      transfer_plan([meta], "tensors")),
                              {meta["name"]}, per_parameter=True, version=version_of(body))
    return JSONResponse({"message": "Request received, updating named parameter"})


async def update_named_params(request):
    """Many tensors, broadcast in buckets after this answers; the update commits once they arrived (`finish`:
    false leaves it open for /finish_weight_update: a client syncing several servers commits them together).
    """
    weight_sync = state(request).weight_sync
    weight_sync.check_allowed()
    body = await read_json(request)
    metas = [param_meta(weight_sync, p) for p in listed(body, "params")]
    bucket_bytes = body.get("bucket_bytes", WEIGHT_BUCKET_BYTES)
    if not is_int(bucket_bytes) or bucket_bytes < 1:
        raise http_error("`bucket_bytes` must be a positive integer.", param="bucket_bytes")
    layout = body.get("layout")
    # a client without `layout` packs back to back (layout 1)
    if not is_int(layout) or layout != WEIGHT_LAYOUT:
        raise http_error(f"`layout` must be {WEIGHT_LAYOUT} (each tensor padded to {WEIGHT_ALIGN_BYTES} "
                         f"bytes in its bucket), got {json.dumps(layout)}: a client that sends none packs "
                         "tensors back to back. Use the vllm_client.py that ships with this server.",
                         param="layout")
    pause, finish = body.get("pause", "wait"), body.get("finish", True)
    if pause not in ("wait", "keep"):
        raise http_error("`pause` must be \"wait\" (running requests finish first) or \"keep\" (they freeze "
                         "during the update).", param="pause")
    if not isinstance(finish, bool):
        raise http_error("`finish` must be a boolean.", param="finish")
    plan = transfer_plan(metas, "buckets", bucket_bytes)
    await weight_sync.receive("legacy", dict.fromkeys(range(len(weight_sync.replicas)), plan),
                              {meta["name"] for meta in metas}, drain=pause == "wait", finish=finish,
                              version=version_of(body))
    return JSONResponse({"message": "Request received, updating named parameters", "num_buckets": len(plan)})


async def reset_prefix_cache(request):
    """TRL calls it after a sync: it commits an open per-parameter update (TRL's protocol has no other end
    marker), then empties the prefix cache."""
    server = state(request)
    outcome = await server.weight_sync.finish()
    if server.weight_sync.broken:
        server.weight_sync.check_group("legacy")  # the 409 that says the last update failed, and what to do
    results = await server.replicas.call("reset_prefix_cache")
    return JSONResponse({"message": f"Request received, resetting prefix cache status: {all(results)}",
                         "success": all(results), "weights": outcome})


async def abort_weight_update(request):
    """Ours, in both dialects: the open update, if any, rolls back at once (a client whose update failed on
    another server of its group rolls back them all)."""
    weights = await state(request).weight_sync.abort()
    return JSONResponse({"message": "Weight update aborted", "weights": weights})


async def close_communicator(request):
    await state(request).weight_sync.leave(commit=True)
    return JSONResponse({"message": "Request received, closing communicator"})


# ------------------------------------------------------------------------------------------------
# TRL's legacy generation routes: vLLM's request models and rendering, TRL's shapes
# ------------------------------------------------------------------------------------------------


LEGACY_DEFAULTS = {"n": 1, "repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                   "min_p": 0.0, "max_tokens": 16, "logprobs": 0}  # trl vllm-serve's


def legacy_request(model_cls, body, fields, **extra):
    """TRL's body → vLLM's request model: its named fields and TRL's defaults, then `generation_kwargs`
    (any field of the request model; a key it lacks is a 400, not silently dropped)."""
    values = {name: LEGACY_DEFAULTS[name] if body.get(name) is None and name != "logprobs" else body.get(name)
              for name in fields}
    if "logprobs" in fields and "logprobs" not in body:
        values["logprobs"] = LEGACY_DEFAULTS["logprobs"]
    values["top_k"] = values.get("top_k") or -1  # TRL's 0 means "off", as vLLM's -1
    kwargs = body.get("generation_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise http_error("`generation_kwargs` must be an object.", param="generation_kwargs")
    unknown = set(kwargs) - set(model_cls.model_fields)
    if unknown:
        raise http_error(f"Unknown generation_kwargs: {sorted(unknown)}.", param="generation_kwargs")
    if body.get("structured_outputs_regex"):
        values["structured_outputs"] = {"regex": body["structured_outputs_regex"]}
    merged = {**values, **kwargs, **extra}
    if error := unchecked_field(merged):
        raise http_error(error[1], param=error[0])
    try:
        return model_cls.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise http_error(f"{err['msg']} (field: {param})" if param else err["msg"], param=param) from None


async def legacy_generate_all(server, serving, request, engine_inputs, max_tokens, param):
    """One generate() per engine input, all at once → their final RequestOutputs. TRL's contract: a 400
    when `max_tokens` does not fit beside the prompt (the /v1 routes clamp it instead)."""
    max_model_len = server.client.model_config.max_model_len
    for engine_input in engine_inputs:
        if "type" not in engine_input:  # a raw prompt (with images): vLLM checks its length once rendered
            continue
        room = max_model_len - len(engine_input["prompt_token_ids"])
        if max_tokens > room:
            raise http_error(f"max_tokens={max_tokens} does not fit in max_model_len={max_model_len} beside "
                             f"a prompt of {len(engine_input['prompt_token_ids'])} tokens.", param=param)
    params = request.to_sampling_params(max_tokens, serving.default_sampling_params)

    async def final(engine_input, i):
        output = None
        async for output in server.client.generate(engine_input, params, f"legacy-{i}-{id(request)}"):
            pass
        return output

    return await asyncio.gather(*(final(e, i) for i, e in enumerate(engine_inputs)))  # vLLM's handlers answer


def legacy_response(outputs, versions=False):
    """TRL's shape: prompt_ids per prompt; completion_ids, logprobs, logprob_token_ids per completion, the
    logprobs of each position sorted by rank (the sampled token's included, as vLLM returns it). `versions`:
    weight_versions too, per completion (as the /v1 routes give them)."""
    completions = [c for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]
    logprobs = ids = None
    if completions and all(c.logprobs is not None for c in completions):
        ranked = [[sorted(pos.items(), key=lambda kv: kv[1].rank) for pos in c.logprobs] for c in completions]
        logprobs = [[[finite(lp.logprob) for _, lp in pos] for pos in c] for c in ranked]
        ids = [[[tid for tid, _ in pos] for pos in c] for c in ranked]
    response = {"prompt_ids": [list(o.prompt_token_ids) for o in outputs],
                "completion_ids": [list(c.token_ids) for c in completions], "logprobs": logprobs,
                "logprob_token_ids": ids}
    if versions:
        response["weight_versions"] = [[dataclasses.asdict(span) for span in c.weight_versions or ()]
                                       for c in completions]
    return response


async def legacy_generate(request):
    server, body = state(request), await read_json(request)
    prompts, images = listed(body, "prompts"), listed(body, "images", required=False)
    if not all(isinstance(p, str) or (isinstance(p, list) and all(is_int(t) for t in p)) for p in prompts):
        raise http_error("Each prompt must be a string or a list of token ids.", param="prompts")
    serving = request.app.state.openai_serving_completion
    fields = ["n", "repetition_penalty", "temperature", "top_p", "top_k", "min_p", "max_tokens", "logprobs"]
    vllm_request = legacy_request(CompletionRequest, body, fields, prompt=prompts)
    if images:  # vLLM's engine renders multimodal prompts itself (its placeholders expand per image)
        engine_inputs = [with_images(prompt, images_of)
                         for prompt, images_of in zip(prompts, legacy_images(images, prompts))]
    else:
        engine_inputs = await serving.render_completion_request(vllm_request)
    if not isinstance(engine_inputs, list):
        raise rendering_error(engine_inputs)
    outputs = await legacy_generate_all(server, serving, vllm_request, engine_inputs, vllm_request.max_tokens,
                                        "max_tokens")
    return JSONResponse(legacy_response(outputs, body.get("return_weight_versions") is True))


def legacy_images(images, prompts):
    """TRL's `images` (per prompt: null or a list of base64 PNG/JPEG strings) → per prompt, PIL images."""
    if len(images) != len(prompts) or not all(i is None or isinstance(i, list) for i in images):
        raise http_error("`images` must have one entry per prompt: null or a list of base64 strings.",
                         param="images")
    decoded = []
    for entry in images:
        try:
            decoded.append([Image.open(io.BytesIO(base64.b64decode(b, validate=True))) for b in entry or []])
            for image in decoded[-1]:
                image.load()
        except Exception as exc:
            raise http_error(f"Invalid base64 image: {type(exc).__name__}: {exc}", param="images") from None
    return decoded


def with_images(prompt, images):
    engine_input = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    return {**engine_input, "multi_modal_data": {"image": images}} if images else engine_input


async def legacy_chat(request):
    server, body = state(request), await read_json(request)
    conversations = listed(body, "messages")
    if not all(isinstance(c, list) and all(isinstance(m, dict) for m in c) for c in conversations):
        raise http_error("`messages` must be a list of conversations (lists of message objects).",
                         param="messages")
    serving = request.app.state.openai_serving_chat
    logprobs = body.get("logprobs", LEGACY_DEFAULTS["logprobs"])
    extra = {k: body[k] for k in ("tools", "chat_template", "chat_template_kwargs") if k in body}
    outputs = []
    for conversation in conversations:  # one render per conversation, as /v1/chat/completions
        for message in conversation:  # TRL sends images as `image_pil` parts holding base64
            for part in message.get("content") if isinstance(message.get("content"), list) else ():
                if isinstance(part, dict) and part.get("type") == "image_pil":
                    part.update(type="image_url",
                                image_url={"url": f"data:image/png;base64,{part.pop('image_pil')}"})
        vllm_request = legacy_request(
            ChatCompletionRequest, body, ["n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                          "max_tokens"], messages=conversation, **extra,
            **({"logprobs": True, "top_logprobs": logprobs} if logprobs is not None else {}))
        rendered = await serving.render_chat_request(vllm_request)
        if not isinstance(rendered, tuple):
            raise rendering_error(rendered)
        outputs.append((vllm_request, rendered[1]))
    results = await asyncio.gather(*(legacy_generate_all(server, serving, r, e, r.max_tokens, "max_tokens")
                                     for r, e in outputs))
    return JSONResponse(legacy_response([o for result in results for o in result],
                                        body.get("return_weight_versions") is True))


async def legacy_sequence_logprobs(request):
    """Teacher scoring: top-k logprobs of every completion position of prompt+completion sequences."""
    server, body = state(request), await read_json(request)
    sequences, prompt_lengths = listed(body, "sequences"), listed(body, "prompt_lengths")
    top_k, temperature = body.get("top_logprobs", LEGACY_LOGPROB_TOP_K), body.get("temperature", 1.0)
    fmt = body.get("response_format", "json")
    if len(sequences) != len(prompt_lengths):
        raise http_error("`sequences` and `prompt_lengths` must have the same length.",
                         param="prompt_lengths")
    if not all(isinstance(s, list) and s and all(is_int(t) for t in s) for s in sequences):
        raise http_error("Each sequence must be a non-empty list of token ids.", param="sequences")
    if (not is_int(top_k) or top_k < 1 or not isinstance(temperature, (int, float))
            or isinstance(temperature, bool) or not 0 < temperature < math.inf):
        raise http_error("top_logprobs must be an int >= 1 and temperature a finite number > 0.",
                         param="top_logprobs")
    if fmt not in ("json", "binary"):
        raise http_error("response_format must be 'json' or 'binary'.", param="response_format")
    if not all(is_int(n) and 0 <= n <= len(s) for s, n in zip(sequences, prompt_lengths)):
        raise http_error("Each prompt_length must be in [0, len(sequence)].", param="prompt_lengths")
    serving = request.app.state.openai_serving_completion
    vllm_request = legacy_request(CompletionRequest, {}, [], prompt=sequences, prompt_logprobs=top_k,
                                  temperature=temperature, max_tokens=1)
    engine_inputs = await serving.render_completion_request(vllm_request)
    if not isinstance(engine_inputs, list):
        raise rendering_error(engine_inputs)
    outputs = await legacy_generate_all(server, serving, vllm_request, engine_inputs, 1, "sequences")
    rows = [teacher_rows(seq, n, out.prompt_logprobs or [], top_k)
            for seq, n, out in zip(sequences, prompt_lengths, outputs)]
    if fmt == "json":
        return JSONResponse({"logprobs": [r[0] for r in rows], "logprob_token_ids": [r[1] for r in rows]})
    return JSONResponse(binary_logprobs(rows, top_k))


def teacher_rows(seq, prompt_length, positions, top_k):
    """→ (top-k logprobs, their ids, the actual token's logprob, its id), one row per scored position."""
    scored = range(max(prompt_length, 1), len(seq))
    ranked = [sorted((positions[i] or {}).items(), key=lambda kv: kv[1].rank) if i < len(positions) else []
              for i in scored]
    ranked = [[kv for kv in row if kv[1].rank <= top_k][:top_k] or row[:top_k] for row in ranked]
    actual = [(positions[i] or {}).get(seq[i]) if i < len(positions) else None for i in scored]
    rows = ([[finite(lp.logprob) for _, lp in row] for row in ranked],
            [[tid for tid, _ in row] for row in ranked],
            [[finite(a.logprob) if a else None] for a in actual], [[seq[i]] for i in scored])
    if prompt_length == 0:  # the first token has no logprob (nothing precedes it)
        rows = ([[]] + rows[0], [[]] + rows[1], [[None]] + rows[2], [[seq[0]]] + rows[3])
    return rows


def binary_logprobs(rows, top_k):
    """TRL's binary response: float32/int32 arrays [batch, positions, k] as base64, -inf where empty."""
    lengths = [len(r[0]) for r in rows]
    shape = [len(rows), max(lengths, default=0), top_k]
    lp, ids = np.full(shape, -np.inf, dtype=np.float32), np.zeros(shape, dtype=np.int32)
    alp, aid = np.full(shape[:2] + [1], -np.inf, dtype=np.float32), np.zeros(shape[:2] + [1], dtype=np.int32)
    for b, (row_lp, row_ids, actual_lp, actual_ids) in enumerate(rows):
        for t, (lps, tids) in enumerate(zip(row_lp, row_ids)):
            lp[b, t, :len(lps)] = [x if x is not None else np.nan for x in lps]
            ids[b, t, :len(tids)] = tids
        for t, ((a_lp,), (a_id,)) in enumerate(zip(actual_lp, actual_ids)):
            alp[b, t, 0] = a_lp if a_lp is not None else np.nan
            aid[b, t, 0] = a_id
    b64 = lambda a: base64.b64encode(a.tobytes()).decode()  # noqa: E731
    return {"logprobs_b64": b64(lp), "token_ids_b64": b64(ids), "actual_logprobs_b64": b64(alp),
            "actual_token_ids_b64": b64(aid), "shape": shape, "completion_lengths": lengths}


def both(path, endpoint, methods):
    """A route under its legacy trailing-slash spelling and without it."""
    return [Route(path, endpoint, methods=methods), Route(path + "/", endpoint, methods=methods)]


ROUTES = [  # ours; a path here replaces vLLM's route of the same path
    *both("/health", health, ["GET"]),
    *both("/get_world_size", get_world_size, ["GET"]),
    *both("/generate", legacy_generate, ["POST"]),
    *both("/chat", legacy_chat, ["POST"]),
    *both("/get_sequence_logprobs", legacy_sequence_logprobs, ["POST"]),
    *both("/init_communicator", init_communicator, ["POST"]),
    *both("/update_named_param", update_named_param, ["POST"]),
    *both("/update_named_params", update_named_params, ["POST"]),
    *both("/reset_prefix_cache", reset_prefix_cache, ["POST"]),
    *both("/close_communicator", close_communicator, ["POST"]),
    *both("/abort_weight_update", abort_weight_update, ["POST"]),
]

VLLM_ROUTES = {  # vLLM's routes we serve, as its app registers them; any other route of its app is removed
    "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/load", "/version", "/metrics", "/ping",
    "/tokenize", "/detokenize", "/v1/models", "/invocations", "/v1/chat/completions", "/v1/completions",
    "/v1/chat/completions/batch", "/v1/responses", "/v1/responses/{response_id}", "/v1/systemone",
    "/v1/responses/{response_id}/cancel", "/v1/messages", "/v1/messages/count_tokens", "/generative_scoring",
    # scale-out routes: 403 unless --enable-scale-out, as in stock
    "/v1/chat/completions/render", "/v1/messages/render", "/v1/completions/render", "/v1/responses/render",
    "/v1/chat/completions/derender", "/v1/completions/derender", "/inference/v1/generate",
    "/inference/v1/abort_requests",
    # stock's RL routes (vLLM registers them in dev mode only): pause, and its weight-transfer engine
    "/server_info", "/pause", "/resume", "/is_paused", "/init_weight_transfer_engine", "/start_weight_update",
    "/update_weights", "/finish_weight_update", "/shutdown_weight_transfer_engine", "/update_weight_version",
    "/weight_info",
}


# ------------------------------------------------------------------------------------------------
# Middleware: field checks vLLM misses, errors in streams, weight versions in /v1 answers, auth, body cap
# ------------------------------------------------------------------------------------------------


async def read_body(receive):
    raw, more = [], True
    while more:
        message = await receive()
        raw.append(message.get("body", b""))
        more = message["type"] == "http.request" and message.get("more_body", False)
    return b"".join(raw)


def replayed(body, receive):
    """The body, read already, then what the client sends next (its disconnect)."""
    sent = []

    async def replay():
        if sent:
            return await receive()
        sent.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class StreamErrors:
    """ASGI middleware: an error raised once a stream's 200 went out ends the stream with an error event in
    vLLM's shape (Responses API: `event: error`), not a cut connection. vLLM's /v1/responses stream checks a
    request's structured outputs only then (upstream; stock cuts the stream there)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        streaming = []

        async def sending(message):
            if message["type"] == "http.response.start":
                streaming.append(any(k == b"content-type" and v.startswith(b"text/event-stream")
                                     for k, v in message["headers"]))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if not streaming or not streaming[0]:
                raise
            cause = exc.__cause__ or exc  # Starlette's "response already started" wraps the error
            error = create_error_response(cause).error
            if scope["path"] == "/v1/responses":
                event = {"type": "error", "code": error.type, "message": error.message, "param": error.param,
                         "sequence_number": -1}
                body = b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
            else:
                error_json = json.dumps({"error": error.model_dump()}).encode()
                body = b"data: " + error_json + b"\n\ndata: [DONE]\n\n"
            logger.warning("%s: a stream ended with %s: %s", scope["path"], error.code, error.message)
            await send({"type": "http.response.body", "body": body, "more_body": False})


class Bodies:
    """ASGI middleware: the body of a generation route, read once (parsed only when it names a field below).
    - The 400 for a body that vLLM would answer with a 500: fields its request models read before checking
      them (unchecked_field), or, on /invocations (whose handler parses it itself), nesting too deep to parse.
    - A /v1/completions or /v1/chat/completions body with `"return_weight_versions": true` (vLLM 0.33's field;
      0.32 has no such field) gets, per choice, the weights that sampled its tokens, in vLLM's shape:
      `weight_versions: [{version, start, end}]` over output-token indexes, `[start, end)` (a stream: on the
      last chunk of each choice).
    Any other request passes untouched: it stays byte for byte stock's."""

    ROUTES = {"/v1/completions", "/v1/chat/completions", "/invocations"}
    FIELD = "return_weight_versions"
    NAMES = (b"structured_outputs", b"tool_choice", FIELD.encode(), b"\\u")  # \u: a name may be escaped

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.ROUTES:
            return await self.app(scope, receive, send)
        body, asked = await read_body(receive), None
        if scope["path"] == "/invocations" or any(name in body for name in self.NAMES):
            try:
                asked = json.loads(body)
            except RecursionError:  # FastAPI's parse answers a 400, vLLM's /invocations a 500
                return await error_response(http_error("The request body is nested too deeply to parse."))(
                    scope, receive, send)
            except ValueError:  # vLLM's parse answers it
                pass
        if error := unchecked_field(asked):
            return await error_response(http_error(error[1], param=error[0]))(scope, receive, send)
        if (scope["path"] == "/invocations" or not isinstance(asked, dict)
                or asked.pop(self.FIELD, None) is not True):
            return await self.app(scope, replayed(body, receive), send)
        body = json.dumps(asked).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        spans, n = {}, asked.get("n") if is_int(asked.get("n")) else 1
        token = VERSION_SPANS.set(spans)
        try:
            await self.app(scope, replayed(body, receive), self.sender(send, spans, scope["path"], n))
        finally:
            VERSION_SPANS.reset(token)

    @staticmethod
    def choice_spans(spans, path, n):
        """{choice index: spans}. Completions: vLLM's request ids end with the prompt's index, and choice =
        prompt index x n + completion index; chat: one prompt."""
        if path == "/v1/chat/completions":
            return {index: value for (_, index), value in spans.items()}
        return {int(rid.rsplit("-", 1)[1]) * n + index: value for (rid, index), value in spans.items()}

    def sender(self, send, spans, path, n):
        held, parts, pending = {}, [], [b""]

        def stamped(data):
            for choice in data.get("choices") or ():
                if choice.get("finish_reason") is not None:
                    choice["weight_versions"] = self.choice_spans(spans, path, n).get(choice.get("index"))
            return data

        async def wrapped(message):
            if message["type"] == "http.response.start":
                held["start"], held["stream"] = message, any(
                    k == b"content-type" and v.startswith(b"text/event-stream")
                    for k, v in message["headers"])
                if held["stream"]:
                    await send(message)
                return
            if message["type"] != "http.response.body":
                return await send(message)
            if held["stream"]:  # SSE: rewrite whole events only
                events = (pending[0] + message.get("body", b"")).split(b"\n\n")
                pending[0] = events.pop()
                out = []
                for event in events:
                    if event.startswith(b"data: {"):
                        with contextlib.suppress(ValueError):
                            event = b"data: " + json.dumps(stamped(json.loads(event[6:]))).encode()
                    out.append(event + b"\n\n")
                more = message.get("more_body", False)
                if not more and pending[0]:
                    out.append(pending[0])
                return await send({**message, "body": b"".join(out)})
            parts.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(parts)
            if held["start"]["status"] == 200:
                with contextlib.suppress(ValueError):
                    body = json.dumps(stamped(json.loads(body))).encode()
            start = held["start"]
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return wrapped


class Guard:
    """ASGI middleware, outermost: bearer-token auth (every path but OPEN_PATHS and CORS preflight), then the
    body-size cap: a declared Content-Length is checked before anything is read; a chunked body (which
    declares none) is read here, up to the cap, before the app sees it (vLLM's body parsing would turn
    an error raised while reading into a 400)."""

    def __init__(self, app, api_keys, max_body):
        self.app, self.max_body = app, max_body
        self.expected = [f"Bearer {key}".encode() for key in api_keys or ()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        TRAINER.set(headers.get(TRAINER_HEADER, b"").decode("latin-1") or None)  # for WeightSync.check_owner
        open_path = scope["path"].rstrip("/") in OPEN_PATHS or scope["method"] == "OPTIONS"
        given = headers.get(b"authorization", b"")
        if self.expected and not open_path and not any(hmac.compare_digest(given, key)
                                                       for key in self.expected):
            error = http_error("Invalid or missing API key (Authorization: Bearer <key>).", status=401)
            return await error_response(error)(scope, receive, send)
        too_large = error_response(http_error(f"Request body larger than {self.max_body} bytes "
                                              "(--max-request-body-bytes).", status=413))
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_body:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------------------------------------------
# App, launcher, main()
# ------------------------------------------------------------------------------------------------


async def build(args, server: Server, parent_config):
    """vLLM's app (its routes on VLLM_ROUTES, its state initialized over our client) plus ROUTES, behind
    Guard."""
    tasks = server.replicas.infos[0]["supported_tasks"]
    server.client = ReplicaEngineClient(parent_config, server.batcher, server.weight_sync, tasks,
                                        args.weight_sync_timeout)
    vllm_args = argparse.Namespace(**{**vars(args), "api_key": None})  # Guard owns the key, for every route
    app = build_app(vllm_args, tasks, parent_config.model_config)
    # stock's RL routes, which dev mode alone would register; filtered below
    app.include_router(rl_router.router)
    server_info_router.attach_router(app)
    await init_app_state(server.client, app.state, vllm_args, tasks)
    ours = {route.path for route in ROUTES}
    app.router.routes[:] = [r for r in app.router.routes
                            if getattr(r, "path", None) in VLLM_ROUTES and r.path not in ours] + ROUTES
    # Starlette raises its HTTPException for an unknown route, and FastAPI for a body it cannot parse (too
    # deep, say): vLLM's handler, registered for FastAPI's subclass only, answers them in OpenAI's shape too.
    app.add_exception_handler(HTTPException, http_exception_handler)
    app.middleware_stack = None  # built already (vLLM's set-up looked at it); rebuilt at the first request
    app.add_middleware(StreamErrors)
    app.add_middleware(Bodies)
    app.add_middleware(Guard, api_keys=args.api_key, max_body=args.max_request_body_bytes)  # the outermost
    app.state.rollout = server
    return app


async def supervise(server: Server, app):
    """A dead replica: requests in flight and later ones get 503 at once, /health answers 503, every process
    of the pool is stopped (an engine a dead replica left behind would hold the accelerator's memory), then
    the server exits with status 1 for its supervisor."""
    if not await server.replicas.watch():
        return
    logger.error("a vLLM replica or its engine died; exiting with status 1 in %.0f s so a supervisor "
                 "restarts the server", REPLICA_DEATH_GRACE_S)
    server.exit_code = 1
    server.batcher.fail_all(RetryableRequestError(
        "A vLLM replica process died; the server is exiting for its supervisor to restart it."))
    await asyncio.gather(asyncio.to_thread(server.replicas.stop), asyncio.sleep(REPLICA_DEATH_GRACE_S))
    if (http := getattr(app.state, "server", None)) is not None:  # else vLLM's watchdog stops it once it runs
        http.should_exit = True


def exposed_without_key(host, api_key):
    """Whether anyone beyond this machine could generate and overwrite the weights."""
    if api_key or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every interface): assume it is reachable
        return True


def warn_if_exposed(args):
    if not args.uds and exposed_without_key(args.host, args.api_key):
        logger.warning("Listening on %s without --api-key: anyone who can reach port %d can generate and "
                       "overwrite the model weights.", args.host, args.port)


def uvicorn_options(args):
    """What `vllm serve` gives uvicorn (vLLM's build_and_serve), and our grace for the answers cut at
    shutdown."""
    options = dict(host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                   access_log=not args.disable_uvicorn_access_log,
                   timeout_keep_alive=vllm.envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE, ssl_keyfile=args.ssl_keyfile,
                   ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
                   ssl_cert_reqs=args.ssl_cert_reqs, ssl_ciphers=args.ssl_ciphers,
                   h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
                   h11_max_header_count=args.h11_max_header_count,
                   timeout_graceful_shutdown=SHUTDOWN_ANSWER_S)
    if (log_config := get_uvicorn_log_config(args)) is not None:
        options["log_config"] = log_config
    return options


async def serve(args, server: Server, parent_config, sock):
    """The app on vLLM's launcher until SIGINT or SIGTERM (the engine client drains, then stops the pool) or a
    replica's death."""
    app = await build(args, server, parent_config)
    tasks = [asyncio.create_task(server.batcher.run()), asyncio.create_task(supervise(server, app))]
    try:
        await (await serve_http(app, sock, enable_ssl_refresh=args.enable_ssl_refresh,
                                **uvicorn_options(args)))
    finally:
        for task in tasks:
            task.cancel()
        if server.client is not None:  # after a death: stop what is left; after a signal: a no-op
            await asyncio.to_thread(server.client.shutdown, 0)


def stop_on_signals():
    """Until vLLM's launcher takes SIGINT and SIGTERM over: a clean exit (main() stops what started), once."""
    def stop(*_):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        sys.exit(0)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


def main(argv=None):
    args = parse_args(argv)
    level = args.uvicorn_log_level.upper() if args.uvicorn_log_level != "trace" else "DEBUG"
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop_on_signals()
    adopt_orphans()
    parent_config, replica_configs = make_configs(args)
    on_cuda = parent_config.device_config.device_type == "cuda"
    try:
        envs = replica_envs(len(replica_configs), parent_config.parallel_config.world_size, on_cuda,
                            os.environ.get("CUDA_VISIBLE_DEVICES"), current_platform.device_count() if on_cuda
                            else 0, os.cpu_count())
        # vLLM's own checks (tool and reasoning parsers, their plugins loaded), then the socket, bound before
        # the engines load, as `vllm serve` does
        listen_address, sock = setup_server(args, reuse_port=False)
        # vLLM's socket has proto 0, so asyncio's loop leaves Nagle on in the connections it accepts (uvloop,
        # stock's loop, turns it off): a keep-alive client's next request waited 40 ms for a delayed ACK. They
        # inherit the listener's TCP_NODELAY.
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (ValueError, KeyError, OSError) as exc:
        sys.exit(f"vllm_serve.py: error: {exc}")
    warn_if_exposed(args)
    replicas = Replicas(replica_configs, envs, log_stats=not args.disable_log_stats)
    batcher = Batcher(replicas, args.batch_wait_ms / 1000, args.round_wait_ms / 1000)
    weight_sync = WeightSync(args, replicas, batcher, parent_config.weight_transfer_config.backend, on_cuda)
    server = Server(args, replicas, batcher, weight_sync)
    try:
        replicas.start(args.replica_start_timeout)
        logger.info("%d vLLM replica(s) ready: %s; serving on %s", len(replicas), replicas.infos,
                    listen_address)
        asyncio.run(serve(args, server, parent_config, sock))
    except ReplicaError as exc:
        logger.error("%s", exc)
        sys.exit(1)
    finally:
        replicas.stop()  # a no-op once the engine client stopped them
        weight_sync.close()
        sock.close()
        if "METRICS_DIR" in globals():
            shutil.rmtree(METRICS_DIR, ignore_errors=True)
    sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
