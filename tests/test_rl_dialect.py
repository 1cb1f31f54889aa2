"""Stock vLLM's RL dialect on this server: /pause in its three modes, /resume, and vLLM's weight-transfer
routes over our gloo engine (the trainer as rank 0), driven by our VLLMClient in its "stock" dialect. Every
sync is checked exact: greedy outputs equal a fresh in-process engine loaded from the pushed weights.
Servers run vLLM's default multiprocess layout, where the engine pauses as stock's does."""

import json
import socket
import threading

import pytest
import requests

from support import GREEDY, HANG_S, PROMPTS, Trained, checkpoint, free_port, greedy_ids, unending, wait_until
from vllm_client import VLLMClient, VLLMClientError

MAX_TOKENS = 12
STREAM_TOKENS = 1000  # decode steps ahead of each stream once under way: minutes of work on any machine
MP = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def greedy(server, headers=None):
    body = server.post("/v1/completions", {"prompt": PROMPTS, "max_tokens": MAX_TOKENS, **GREEDY},
                       headers=headers).json()
    return [c["token_ids"] for c in body["choices"]]


@pytest.fixture(scope="module")
def expected(models, reference_llm):
    refs = {name: greedy_ids(reference_llm(models[name]), PROMPTS, MAX_TOKENS) for name in ("seed0", "seed1")}
    assert refs["seed0"] != refs["seed1"]
    return refs


def stock_client(server, **kwargs):
    client = VLLMClient(base_url=server.url, group_port=free_port(), connection_timeout=60, timeout=HANG_S,
                        weight_sync="stock", **kwargs)
    client.init_communicator(device="cpu")
    return client


@pytest.fixture(scope="module")
def launched(models, start_server):
    """This module's two servers, launched side by side (a start is mostly one core importing vLLM: two cores
    start two in about the time of one). "sync", for the tests below that take `server` (a start costs more
    than either); "short": a short --weight-sync-timeout (5 s), and TRL's documented transfer backend, NCCL, on
    a CPU server: the tests that take it use no weight transfer."""
    servers = {"sync": start_server(models["seed0"], name="rl-sync", env=MP, wait=False),
               "short": start_server(models["seed0"], "--weight-sync-timeout", "5", "--weight-transfer-config",
                                     '{"backend": "nccl"}', name="rl-short", env=MP, wait=False)}
    yield servers
    for srv in servers.values():
        assert srv.stop() == 0 and not srv.left_behind, srv.left_behind


@pytest.fixture
def server(launched, models, expected):
    """The shared server serving the seed-0 weights again, whatever the test before it left."""
    shared = launched["sync"].wait_healthy()
    if greedy(shared) != expected["seed0"]:
        client = stock_client(shared)
        client.update_named_params(checkpoint(models["seed0"]))
        client.close_communicator()
    assert greedy(shared) == expected["seed0"]
    return shared


def test_stock_dialect_syncs_exactly_and_one_group_is_open_at_a_time(models, server, expected):
    client = stock_client(server)
    client.update_model_params(Trained(checkpoint(models["seed1"])))  # pause(wait), start, update, finish
    client.reset_prefix_cache()
    assert greedy(server) == expected["seed1"]
    with client.weight_update():  # TRL 1.16's block, and its (metadata, iterator) call form
        named = checkpoint(models["seed0"])
        client.update_named_params([(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in named],
                                   iter(named))
    assert greedy(server) == expected["seed0"]
    assert server.get("/health").json()["paused"] is False
    # a legacy group replaces the idle stock group, and syncs exactly; then stock's replaces it again
    legacy = VLLMClient(base_url=server.url, group_port=free_port(), timeout=HANG_S)
    legacy.init_communicator(device="cpu")
    legacy.update_named_params(checkpoint(models["seed1"]))
    assert greedy(server) == expected["seed1"]
    response = server.post("/update_weights", {"update_info": {"names": [], "dtype_names": [], "shapes": []}})
    assert response.status_code == 409, response.text  # that group was replaced by the legacy one
    client = stock_client(server)
    response = server.post("/update_named_param", {"name": "model.norm.weight", "dtype": "torch.float32",
                                                   "shape": [128]})
    assert response.status_code == 409, response.text  # and the legacy group by this one
    client.update_named_params(checkpoint(models["seed0"]))
    client.reset_prefix_cache()
    assert greedy(server) == expected["seed0"]
    client.close_communicator()
    assert server.get("/weight_info").status_code == 200


def stream_chunks(server, body, chunks, done):
    """POST a streamed completion; each parsed chunk is appended to `chunks`; `done` set at the end."""
    def run():
        try:
            with requests.post(server.url + "/v1/completions", json={**body, "stream": True}, stream=True,
                               timeout=HANG_S) as response:
                for line in response.iter_lines():
                    if line.startswith(b"data: {"):
                        chunks.append(json.loads(line[len(b"data: "):]))
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def streams_under_way(server, count, max_tokens=STREAM_TOKENS):
    """`count` streams of `max_tokens`, all mid-generation on return: sent while the server holds new requests
    (paused), admitted together at the resume, and each has its first token. They cannot finish before the
    caller acts: max_tokens decode steps lie ahead of each. → [(chunks, done)]."""
    assert server.post("/pause?mode=keep", {}).status_code == 200
    streams = [([], threading.Event()) for _ in range(count)]
    for i, (chunks, done) in enumerate(streams):
        stream_chunks(server, {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 1.0,
                               "ignore_eos": True, "return_token_ids": True}, chunks, done)
    server.wait_for_health(lambda h: h["requests_waiting"] == count)
    assert server.post("/resume", {}).status_code == 200
    wait_until(lambda: all(chunks for chunks, _ in streams), "every stream's first token")
    return streams


def test_pause_keep_freezes_running_requests_and_resume_continues_them(long_server):
    chunks, done = [], threading.Event()
    stream_chunks(long_server, unending(), chunks, done)
    wait_until(lambda: len(chunks) >= 3, "the stream's first tokens")
    assert long_server.post("/pause?mode=keep", {}).json() == {"status": "paused"}
    assert long_server.get("/is_paused").json() == {"is_paused": True}
    assert long_server.health()["paused"] and long_server.health()["requests_running"] == 1  # frozen, not ended
    frozen = len(chunks)
    waiting = {}  # a new request waits while paused, then runs
    thread = threading.Thread(target=lambda: waiting.update(r=long_server.post(
        "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 4, **GREEDY})))
    thread.start()
    assert not done.is_set() and "r" not in waiting
    assert long_server.post("/resume", {}).json() == {"status": "resumed"}
    wait_until(lambda: len(chunks) > frozen + 3, "the frozen stream going on after /resume")
    thread.join(HANG_S)
    assert waiting["r"].status_code == 200 and len(waiting["r"].json()["choices"][0]["token_ids"]) == 4
    assert not done.is_set() and chunks[-1]["choices"][0]["finish_reason"] is None
    long_server.post("/pause?mode=abort", {})  # ends the unending stream
    long_server.post("/resume", {})


def test_pause_abort_ends_running_requests_and_wait_lets_them_finish(long_server):
    chunks, done = [], threading.Event()
    stream_chunks(long_server, unending(), chunks, done)
    wait_until(lambda: len(chunks) >= 3, "the stream's first tokens")
    assert long_server.post("/pause?mode=abort", {}).status_code == 200
    assert done.wait(HANG_S) and chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert long_server.health()["requests_running"] == 0
    long_server.post("/resume", {})
    # wait: /pause returns only once the running requests finished, and they finished whole
    streams = streams_under_way(long_server, 4, max_tokens=1000)
    assert long_server.post("/pause?mode=wait", {}).status_code == 200
    assert long_server.health()["requests_running"] == 0
    for chunks, done in streams:
        assert done.wait(HANG_S)
        assert sum(len(c["choices"][0]["token_ids"] or []) for c in chunks) == 1000
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    long_server.post("/resume", {})


def test_keep_during_a_sync_loses_no_stream(models, long_server, expected, reference_llm):
    """16 streams mid-generation when a stock-dialect sync pauses with "keep": every stream completes with
    all its tokens, none cut or lost. (vLLM 0.32 preempts the frozen requests: after the sync they are
    recomputed on the new weights, so a kept stream's later tokens come from the new model.)"""
    client = stock_client(long_server, pause_mode="keep")
    streams = streams_under_way(long_server, 16)
    assert long_server.post("/pause?mode=keep", {}).status_code == 200  # frozen: none can finish meanwhile
    assert long_server.health()["requests_running"] == 16
    client.update_named_params(checkpoint(models["seed1"]))  # pauses (keep) again, syncs, resumes
    for chunks, done in streams:
        assert done.wait(HANG_S)
        assert sum(len(c["choices"][0]["token_ids"] or []) for c in chunks) == STREAM_TOKENS
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    client.close_communicator()
    # the same through TRL's legacy protocol: a batched update that asks to keep the running requests
    legacy = VLLMClient(base_url=long_server.url, group_port=free_port(), timeout=HANG_S, pause_mode="keep")
    legacy.init_communicator(device="cpu")
    streams = streams_under_way(long_server, 8)
    legacy.update_named_params(checkpoint(models["seed0"]))
    for chunks, done in streams:
        assert done.wait(HANG_S)
        assert sum(len(c["choices"][0]["token_ids"] or []) for c in chunks) == STREAM_TOKENS
    legacy.close_communicator()
    body = long_server.post("/v1/completions", {"prompt": PROMPTS, "max_tokens": MAX_TOKENS, **GREEDY}).json()
    assert [c["token_ids"] for c in body["choices"]] == expected["seed0"]


@pytest.fixture
def short_server(launched):
    return launched["short"].wait_healthy()


def test_paused_requests_get_503_after_the_timeout_and_the_server_resumes_itself(short_server):
    """A request waits for a resume for up to --weight-sync-timeout; a pause nobody ends ends itself that long
    after the last /pause (a trainer that died mid-update)."""
    server = short_server
    assert server.post("/pause?mode=keep", {}).status_code == 200
    answers = {}
    thread = threading.Thread(target=lambda: answers.update(r=server.post(
        "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2})))
    thread.start()
    server.wait_for_health(lambda h: h["requests_waiting"] == 1)
    assert server.post("/pause?mode=keep", {}).status_code == 200  # re-armed: it outlasts that request's wait
    thread.join(HANG_S)
    response = answers["r"]
    assert response.status_code == 503 and "paused" in response.json()["error"]["message"], response.text
    wait_until(lambda: server.get("/is_paused").json() == {"is_paused": False}, "resumed by itself")
    body = server.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2, **GREEDY}).json()
    assert len(body["choices"][0]["token_ids"]) == 2  # the engines resumed too


def test_nccl_on_a_cpu_server_starts_and_its_transfers_are_refused(short_server):
    """TRL's documented command line, run here: accepted at start-up; a transfer gets a 400 naming gloo."""
    server = short_server
    config = server.get("/server_info?config_format=json").json()["vllm_config"]
    assert config["weight_transfer_config"]["backend"] == "nccl"
    init_info = {"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2}
    for path, body in [("/init_weight_transfer_engine", {"init_info": init_info}),
                       ("/init_communicator", {"host": "127.0.0.1", "port": free_port()})]:
        response = server.post(path, body)
        assert response.status_code == 400 and "gloo" in response.json()["error"]["message"], response.text
    with pytest.raises(VLLMClientError):
        stock_client(server)
    assert server.get("/health").status_code == 200


def test_an_init_during_a_transfer_rolls_it_back_at_once_and_the_new_group_syncs(models, server, expected):
    """A trainer that started an update and went silent (alive: its group stays open) does not lock out the next
    one: the new /init_weight_transfer_engine ends the workers' wait for the silent broadcast at once, the update
    rolls back (its /update_weights gets a 409 saying so), and the new group syncs exactly."""
    silent = stock_client(server)
    named = checkpoint(models["seed1"])
    info = {"names": [n for n, _ in named], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in named],
            "shapes": [list(t.shape) for _, t in named]}
    assert server.post("/start_weight_update", {}).status_code == 200
    update = {}
    thread = threading.Thread(target=lambda: update.update(r=server.post("/update_weights", {"update_info": info})))
    thread.start()  # in flight until the trainer broadcasts, which it never does
    server.wait_for_health(lambda h: h["weights"]["state"] == "receiving")
    client = stock_client(server)  # the next trainer
    thread.join(HANG_S)
    assert update["r"].status_code == 409 and "aborted" in update["r"].text, update["r"].text
    assert server.health()["weights"]["last"]["outcome"] == "rolled back"
    assert greedy(server) == expected["seed0"]
    with pytest.raises(VLLMClientError) as refused:  # the silent trainer, back: its group was replaced
        silent.update_named_params(named)
    assert refused.value.status_code == 409 and "replaced" in refused.value.message
    client.update_named_params(named)
    client.reset_prefix_cache()
    assert greedy(server) == expected["seed1"]
    client.close_communicator()


def test_the_group_is_hosted_on_an_address_the_server_reaches():
    import vllm_client

    assert vllm_client._local_address_towards("127.0.0.1") == "127.0.0.1"
    address = vllm_client._local_address_towards(socket.gethostbyname(socket.gethostname()))
    assert address != "0.0.0.0"
    socket.inet_aton(address)
