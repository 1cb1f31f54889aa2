"""Weight sync into live workers over gloo (CPU), proven exact: after pushing the seed-1 weights, greedy
outputs equal those of a fresh in-process vLLM engine loaded from seed-1."""

import concurrent.futures
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import requests

from support import GREEDY, HANG_S, PROMPTS, ROOT, free_port, greedy_ids, wait_until
from vllm_client import VLLMClient, VLLMClientError

MAX_TOKENS = 12


def checkpoint(model_dir):
    """The trainer's tensors, in checkpoint names and order."""
    from safetensors.torch import load_file

    return list(load_file(str(pathlib.Path(model_dir) / "model.safetensors")).items())


def greedy(server):
    body = server.post("/v1/completions", {"prompt": PROMPTS, "max_tokens": MAX_TOKENS, **GREEDY}).json()
    return [c["token_ids"] for c in body["choices"]]


@pytest.fixture(scope="module")
def expected(models, reference_llm):
    """{model name: greedy token ids of a fresh in-process engine}."""
    refs = {name: greedy_ids(reference_llm(models[name]), PROMPTS, MAX_TOKENS)
            for name in ("seed0", "seed1", "tied0", "tied1")}
    assert refs["seed0"] != refs["seed1"] and refs["tied0"] != refs["tied1"]
    return refs


def connect(server):
    client = VLLMClient(base_url=server.url, group_port=free_port(), connection_timeout=60, timeout=HANG_S)
    client.init_communicator(device="cpu")
    return client


def test_per_parameter_then_batched_sync_are_exact(models, start_server, expected):
    server = start_server(models["seed0"], name="sync")
    try:
        assert greedy(server) == expected["seed0"]
        client = connect(server)
        for name, tensor in checkpoint(models["seed1"]):  # TRL's legacy path: one call + broadcast each
            client.update_named_param(name, tensor)
        client.reset_prefix_cache()
        assert greedy(server) == expected["seed1"]
        client.update_named_params(checkpoint(models["seed0"]), bucket_bytes=200_000)  # several buckets
        assert greedy(server) == expected["seed0"]
        # wrong input is refused before any broadcast starts; the group stays usable
        for meta, param in [({"name": "model.nope.weight", "dtype": "torch.float32", "shape": [2]}, "name"),
                            ({"name": "model.norm.weight", "dtype": "torch.float32", "shape": [3]}, "shape"),
                            ({"name": "model.norm.weight", "dtype": "torch.int8", "shape": [128]}, "dtype")]:
            response = server.post("/update_named_param", meta)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        client.update_named_params(checkpoint(models["seed1"]))
        assert greedy(server) == expected["seed1"]
        client.close_communicator()
        response = server.post("/update_named_param", {"name": "model.norm.weight", "dtype": "torch.float32",
                                                       "shape": [128]})
        assert response.status_code == 409 and "init_communicator" in response.json()["error"]["message"]
    finally:
        server.stop()


def test_data_parallel_2_updates_every_rank(models, start_server, expected):
    server = start_server(models["seed0"], "--data_parallel_size", "2", name="sync-dp2")
    try:
        client = connect(server)
        assert client.get_world_size() == 2
        client.update_model_params(ParamsOf(checkpoint(models["seed1"])))  # batched by default
        client.reset_prefix_cache()
        assert greedy(server) == expected["seed1"]  # 8 prompts: 4 on each rank
        client.close_communicator()
    finally:
        server.stop()


class ParamsOf:
    """The smallest `model` update_model_params accepts: something with named_parameters()."""

    def __init__(self, named):
        self.named = named

    def named_parameters(self):
        return iter(self.named)


def test_tied_embeddings_in_multiprocess_engine(models, start_server, expected):
    """Tied lm_head must follow the new embedding; run in vLLM's default multiprocess layout."""
    server = start_server(models["tied0"], name="sync-tied", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    try:
        assert greedy(server) == expected["tied0"]
        client = connect(server)
        named = checkpoint(models["tied1"])
        assert not any(name == "lm_head.weight" for name, _ in named)  # only the embedding is sent
        client.update_named_params(named)
        assert greedy(server) == expected["tied1"]
        client.close_communicator()
    finally:
        server.stop()


def test_generation_during_sync_sees_old_or_new_weights_never_a_mix(models, start_server, expected):
    server = start_server(models["seed0"], name="sync-mix")
    try:
        client = connect(server)
        stop, outputs = threading.Event(), []

        def generate():
            while not stop.is_set():
                outputs.append(greedy(server))

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            loops = [pool.submit(generate) for _ in range(3)]
            for round_, name in enumerate(["seed1", "seed0", "seed1", "seed0"]):
                if round_ % 2:
                    client.update_named_params(checkpoint(models[name]), bucket_bytes=300_000)
                else:
                    for pname, tensor in checkpoint(models[name]):
                        client.update_named_param(pname, tensor)
                    client.reset_prefix_cache()
                answered = len(outputs)
                wait_until(lambda: len(outputs) > answered, "a generation after the sync")  # on these weights
            stop.set()
            for loop in loops:
                loop.result(timeout=300)
        allowed = (expected["seed0"], expected["seed1"])
        assert len(outputs) >= 4
        for i, out in enumerate(outputs):  # per request: one prompt's tokens, all from one weight set
            for prompt_index, tokens in enumerate(out):
                assert tokens in (allowed[0][prompt_index], allowed[1][prompt_index]), (i, prompt_index)
        client.close_communicator()
    finally:
        server.stop()


TRAINER = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {root!r})
    from vllm_client import VLLMClient
    client = VLLMClient(base_url={url!r}, group_port={port}, timeout=120)
    client.init_communicator(device="cpu")
    print("joined", flush=True)
    signal.pause()  # until the test kills it: a trainer that dies without closing its group
""")


def test_dead_trainer_then_reinit_and_a_trainer_that_never_joins(models, start_server, expected):
    server = start_server(models["seed0"], "--weight_sync_timeout", "8", name="sync-faults")
    try:
        port = free_port()
        trainer = subprocess.Popen([sys.executable, "-c", TRAINER.format(root=str(ROOT), url=server.url, port=port)],
                                   stdout=subprocess.PIPE, text=True, env=os.environ)
        assert trainer.stdout.readline().strip() == "joined"
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
        # a new trainer on the same group port: the stale group is closed (TRL #3408) and the sync works
        client = VLLMClient(base_url=server.url, group_port=port, connection_timeout=60, timeout=120)
        client.init_communicator(device="cpu")
        client.update_named_params(checkpoint(models["seed1"]))
        assert greedy(server) == expected["seed1"]
        client.close_communicator()

        # a trainer that announces itself but never joins: an error after --weight_sync_timeout, no hang
        response = server.post("/init_communicator", {"host": "0.0.0.0", "port": free_port(), "world_size": 2,
                                                      "client_device_uuid": "cpu"})
        assert response.status_code == 200
        assert greedy(server) == expected["seed1"]  # waits for the timed-out group (8 s), then generates
        response = server.post("/update_named_param", {"name": "model.norm.weight", "dtype": "torch.float32",
                                                       "shape": [128]})
        assert response.status_code == 409 and "failed" in response.json()["error"]["message"], response.text
        client = connect(server)  # and a fresh group works afterwards
        client.update_named_params(checkpoint(models["seed0"]))
        assert greedy(server) == expected["seed0"]
        client.close_communicator()
    finally:
        server.stop()


def test_weight_sync_input_errors(server):
    response = server.post("/init_communicator", {"host": "0.0.0.0", "port": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "port"
    response = server.post("/update_named_params", {"params": [{"name": "model.norm.weight"}]})
    assert response.status_code == 400
    with pytest.raises(VLLMClientError) as info:
        VLLMClient(base_url=server.url, connection_timeout=30).update_named_params([])
    assert info.value.status_code in (400, 409)
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
