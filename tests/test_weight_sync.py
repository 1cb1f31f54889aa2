"""Weight sync into live workers over gloo (CPU), proven exact: after pushing the seed-1 weights, greedy
outputs equal those of a fresh in-process vLLM engine loaded from seed-1."""

import concurrent.futures
import functools
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import requests

import support
import vllm_serve
from support import GREEDY, HANG_S, PROMPTS, ROOT, checkpoint, free_port, greedy_ids, wait_until
from vllm_client import VLLMClient, VLLMClientError

MAX_TOKENS = 12


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


def connect(server, **kwargs):
    client = VLLMClient(base_url=server.url, group_port=free_port(), connection_timeout=60, timeout=HANG_S, **kwargs)
    client.init_communicator(device="cpu")
    return client


@pytest.fixture(scope="module")
def launched(models, start_server, tmp_path_factory):
    """This module's servers, launched at once (a start is mostly one core importing vLLM: two cores start two
    in about the time of one). "sync" is shared by the tests that take `server`: a start costs more than most
    of them; its deadline is short: a trainer that announces a group and never joins it is given up after 8 s.
    "tied", "int8" and "odd" (the first of `odd_models`) are a test's own: it waits for it and stops it."""
    root = tmp_path_factory.mktemp("own")
    int8 = int8_checkpoint(pathlib.Path(models["seed0"]), root / "int8")
    servers = {
        "sync": start_server(models["seed0"], "--weight_sync_timeout", "8", name="sync", wait=False),
        "tied": start_server(models["tied0"], name="sync-tied", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
                             wait=False),
        "int8": start_server(str(int8), *INT8_DTYPE_ARGS, "--weight_sync_timeout", "30", name="sync-int8",
                             wait=False),
        "odd": start_server(odd_models(root)[0], "--weight_sync_timeout", "60", name="sync-odd", wait=False)}
    yield servers
    shared = servers["sync"]
    assert shared.stop() == 0 and not shared.left_behind, shared.left_behind


@pytest.fixture
def server(launched, models, expected):
    """The shared server serving the seed-0 weights again, whatever the test before it left (a sync of them
    when it left others), with no weight-sync group open."""
    shared = launched["sync"].wait_healthy()
    if greedy(shared) != expected["seed0"]:
        client = connect(shared)
        client.update_named_params(checkpoint(models["seed0"]))
        client.close_communicator()
    assert greedy(shared) == expected["seed0"]
    return shared


def mixed_checkpoint(base_dir, replaced, out_dir):
    """A copy of the model at `base_dir` with the tensors `replaced` {name: tensor} → its directory."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(base_dir, out_dir)
    tensors = dict(checkpoint(base_dir)) | replaced
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def test_per_parameter_then_batched_sync_are_exact(models, server, expected, reference_llm, tmp_path):
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
    # TRL's per-parameter protocol may send part of a layer: the parts not sent keep their old values.
    # Layer 0: q, k, v weights and the q bias; the k and v biases keep seed 1's (merged on any device).
    seed0 = dict(checkpoint(models["seed0"]))
    attn = "model.layers.{}.self_attn.{}_proj.{}"
    sent = {attn.format(0, p, "weight"): seed0[attn.format(0, p, "weight")] for p in "qkv"}
    sent[attn.format(0, "q", "bias")] = seed0[attn.format(0, "q", "bias")]
    for name, tensor in sent.items():
        client.update_named_param(name, tensor)
    client.reset_prefix_cache()
    assert server.health()["weights"]["last"]["unchanged_layers"] == []
    mixed = mixed_checkpoint(pathlib.Path(models["seed1"]), sent, tmp_path / "mixed")
    assert greedy(server) == greedy_ids(reference_llm(str(mixed)), PROMPTS, MAX_TOKENS) != expected["seed1"]
    # Layer 1: its q weight alone. CPU's GEMM repacks the fused qkv weight, so k and v cannot be merged into
    # it: the layer keeps its old weights whole, and the commit names it. (CUDA keeps the checkpoint format,
    # and merges.) Never uninitialized memory: before, the unsent k and v gave token 0 sixteen times over.
    client.update_named_param(attn.format(1, "q", "weight"), seed0[attn.format(1, "q", "weight")])
    client.reset_prefix_cache()
    unchanged = server.health()["weights"]["last"]["unchanged_layers"]
    if unchanged:
        assert unchanged == ["model.layers.1.self_attn.qkv_proj"]
        assert greedy(server) == greedy_ids(reference_llm(str(mixed)), PROMPTS, MAX_TOKENS)
    else:
        merged = mixed_checkpoint(mixed, {attn.format(1, "q", "weight"): seed0[attn.format(1, "q", "weight")]},
                                  tmp_path / "merged")
        assert greedy(server) == greedy_ids(reference_llm(str(merged)), PROMPTS, MAX_TOKENS)
    client.close_communicator()
    response = server.post("/update_named_param", {"name": "model.norm.weight", "dtype": "torch.float32",
                                                   "shape": [128]})
    assert response.status_code == 409 and "init_communicator" in response.json()["error"]["message"]


def test_tied_embeddings_follow_in_both_dialects(models, launched, expected):
    """A tied lm_head follows the new embedding, the only one of the two a trainer sends: TRL's legacy
    dialect, then stock's (a trainer of TRL 1.16 that pauses, starts, updates and finishes). In vLLM's
    multiprocess layout. (Data parallel 2 in both dialects, every replica exact: test_weight_faults.py.)"""
    server = launched["tied"].wait_healthy()
    try:
        assert greedy(server) == expected["tied0"]
        client = connect(server)
        named = checkpoint(models["tied1"])
        assert not any(name == "lm_head.weight" for name, _ in named)  # only the embedding is sent
        client.update_named_params(named)
        assert greedy(server) == expected["tied1"]
        client.close_communicator()
        client = connect(server, weight_sync="stock")
        client.update_named_params(checkpoint(models["tied0"]))
        client.reset_prefix_cache()
        assert greedy(server) == expected["tied0"]
        client.close_communicator()
    finally:
        server.stop()


def test_generation_during_sync_sees_one_weight_set_per_span(models, server, expected, reference_llm, tokenizer):
    """Three loops generate while per-parameter and batched syncs alternate. No token comes from a mix of two
    weight sets: a request either ran on one set (exactly its greedy output), or (per-parameter updates
    freeze running requests rather than wait for them) was frozen across a commit, and then its spans name
    the switch: the old weights' tokens, then the new weights' continuation of that prefix. A batched update
    of our client drains first (its `pause_mode` "wait"): nothing crosses it."""
    client = connect(server)
    stop, outputs = threading.Event(), []
    weights = {server.get("/weight_info").json()["weight_version"]: "seed0"}  # version → model

    def generate():
        while not stop.is_set():
            body = server.post("/v1/completions", {"prompt": PROMPTS, "max_tokens": MAX_TOKENS, **GREEDY,
                                                   "return_weight_versions": True}).json()
            outputs.append([(c["token_ids"], c["weight_versions"]) for c in body["choices"]])

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        loops = [pool.submit(generate) for _ in range(3)]
        try:
            for round_, name in enumerate(["seed1", "seed0", "seed1", "seed0"]):
                if round_ % 2:
                    client.update_named_params(checkpoint(models[name]), bucket_bytes=300_000)
                else:
                    for pname, tensor in checkpoint(models[name]):
                        client.update_named_param(pname, tensor)
                    client.reset_prefix_cache()
                weights[server.get("/weight_info").json()["weight_version"]] = name
                answered = len(outputs)
                wait_until(lambda: len(outputs) > answered, "a generation after the sync")  # on these weights
        finally:
            stop.set()
        for loop in loops:
            loop.result(timeout=300)
    assert len(outputs) >= 4
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    for i, out in enumerate(outputs):
        for k, (tokens, spans) in enumerate(out):
            if len(spans) == 1:
                assert tokens == expected[weights[spans[0]["version"]]][k], (i, k, spans)
                continue
            (first, second), switch = spans, spans[0]["end"]
            assert tokens[:switch] == expected[weights[first["version"]]][k][:switch], (i, k, spans)
            assert tokens[switch:] == greedy_ids(reference_llm(models[weights[second["version"]]]),
                                                 [prompt_ids[k] + tokens[:switch]], MAX_TOKENS - switch)[0]
    client.close_communicator()


TRAINER = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {root!r})
    from vllm_client import VLLMClient
    client = VLLMClient(base_url={url!r}, group_port={port}, timeout=120)
    client.init_communicator(device="cpu")
    print("joined", flush=True)
    signal.pause()  # until the test kills it: a trainer that dies without closing its group
""")


def test_dead_trainer_then_reinit_and_a_trainer_that_never_joins(models, server, expected):
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


def test_weight_sync_input_errors(server):
    response = server.post("/init_communicator", {"host": "0.0.0.0", "port": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "port"
    response = server.post("/update_named_params", {"params": [{"name": "model.norm.weight"}]})
    assert response.status_code == 400
    with pytest.raises(VLLMClientError, match="init_communicator"):
        VLLMClient(base_url=server.url, connection_timeout=30).update_named_params([])  # refused by the client
    response = server.post("/update_named_params", {"params": [{"name": "model.norm.weight", "dtype": "torch.float32",
                                                                "shape": [128]}], "layout": 2})
    assert response.status_code == 409 and "init_communicator" in response.json()["error"]["message"]
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


INT8_DTYPE_ARGS = ["--dtype", "bfloat16"]  # after SERVER_ARGS' float32: the last one wins


def int8_checkpoint(model_dir, out_dir):
    """A W8A8 int8 copy of a tiny model in compressed-tensors format: int8 linear weights with a scale per
    output channel. One of the quantized formats vLLM's CPU build serves (its fp8 paths need AMX). Served in
    bfloat16 (INT8_DTYPE_ARGS), which both of its int8 GEMMs take: oneDNN's (any dtype) and, on AMX CPUs,
    the SGL kernel (bf16 or half activations only). The pytest header says which one this machine uses."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    shutil.copytree(model_dir, out_dir)
    tensors = {}
    for name, tensor in checkpoint(model_dir):
        if name.endswith("_proj.weight"):  # attention and MLP linears; embeddings, norms and lm_head stay float32
            scale = tensor.abs().amax(dim=1, keepdim=True) / 127
            tensors[name] = torch.round(tensor / scale).to(torch.int8)
            tensors[name.removesuffix("weight") + "weight_scale"] = scale
        else:
            tensors[name] = tensor
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    int8 = {"num_bits": 8, "type": "int", "symmetric": True}
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {**int8, "strategy": "channel", "dynamic": False},
            "input_activations": {**int8, "strategy": "token", "dynamic": True}}}}
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def test_weight_sync_into_a_quantized_model_is_refused(launched):
    """Until scales are synced too, every weight-sync call into a quantized model gets a 409 saying why,
    before anything reaches the workers: generation goes on with the served weights."""
    server = launched["int8"].wait_healthy()
    try:
        served = greedy(server)
        meta = {"name": "model.norm.weight", "dtype": "torch.float32", "shape": [128]}
        for path, body in [("/init_communicator", {"host": "127.0.0.1", "port": free_port(), "world_size": 2,
                                                   "client_device_uuid": "cpu"}),
                           ("/update_named_param", meta), ("/update_named_params", {"params": [meta]})]:
            response = server.post(path, body)
            assert response.status_code == 409, (path, response.text)
            error = response.json()["error"]
            assert error["type"] == "Conflict" and "quantized model (compressed-tensors)" in error["message"]
        with pytest.raises(VLLMClientError) as info:
            connect(server)  # what a trainer sees
        assert info.value.status_code == 409
        assert greedy(server) == served
    finally:
        server.stop()


def test_a_model_this_cpu_cannot_run_in_the_served_dtype_is_refused_at_start_up(models, start_server, tmp_path):
    """On AMX CPUs vLLM's int8 GEMM takes only bf16 or half activations: served in float32, the int8 model
    would report healthy and fail every request. The replicas' warm-up forward pass catches it, and the server
    exits non-zero naming the dtype to use. (Elsewhere float32 runs: this machine's path is in the header.)"""
    if not support.cpu_paths()["sgl_int8"]:
        pytest.skip("this CPU's int8 GEMM (oneDNN) takes float32: nothing to refuse here")
    model = int8_checkpoint(pathlib.Path(models["seed0"]), tmp_path / "int8")
    server = start_server(str(model), name="int8-float32", wait=False)
    assert server.proc.wait(support.HEALTH_TIMEOUT_S) == 1
    assert "serve it with --dtype bfloat16" in server.log_text(), server.log_tail()


def test_the_warm_up_refusal_names_the_dtype_to_serve_in():
    amx = RuntimeError("int8_scaled_mm_with_quant: expect A to be bfloat16 or half")
    assert vllm_serve.warm_up_refusal("torch.float32", amx).endswith("serve it with --dtype bfloat16.")
    half = Exception("Worker failed with error 'kernel needs half inputs'")
    assert vllm_serve.warm_up_refusal("bfloat16", half).endswith("serve it with --dtype float16.")
    other = ValueError("a kernel failed")
    assert "try another --dtype" in vllm_serve.warm_up_refusal("float32", other)


@functools.cache
def odd_models(root):
    """Two tiny models of hidden size 97 (3 heads of 32; vLLM's Qwen2 takes head_dim = hidden // heads),
    whose norm weights hold 97 elements: sent as bf16 one takes 194 bytes, which leaves the fp32 tensor
    after it 2 bytes off a 4-byte boundary unless the bucket pads. Every weight of the second model is
    bf16-exact (norms perturbed so that they matter), so sending any of them as bf16 loses nothing."""
    import tiny_model
    import torch
    from safetensors.torch import save_file

    first, second = (tiny_model.build(root / f"odd{seed}", seed=seed, hidden_size=97) for seed in (0, 1))
    gen = torch.Generator().manual_seed(1)
    exact = {name: (t + 0.3 * torch.randn(t.shape, generator=gen) if "norm" in name else t).bfloat16().float()
             for name, t in checkpoint(second)}
    save_file(exact, str(second / "model.safetensors"), metadata={"format": "pt"})
    return str(first), str(second)


def test_mixed_dtype_buckets_sync_exactly_and_another_layout_is_refused(launched, reference_llm):
    """A bucket holding odd-length bf16 tensors between fp32 ones loads exactly (greedy ids equal a fresh
    engine's). A body without `layout: 2` (an old client, whose buckets are unpadded) or with another
    value gets a 400 before any broadcast; the server stays healthy and the next correct sync works.
    One server for both: a start costs more than either check."""
    import torch

    server = launched["odd"]
    first, second = server.model, odd_models(pathlib.Path(server.model).parent)[1]
    refs = {path: greedy_ids(reference_llm(path), PROMPTS, MAX_TOKENS) for path in (first, second)}
    assert refs[first] != refs[second]
    server.wait_healthy()
    try:
        assert greedy(server) == refs[first]
        client = connect(server)
        mixed = [(name, t.bfloat16() if "norm" in name else t) for name, t in checkpoint(second)]
        assert any(a.dtype == torch.bfloat16 and a.numel() % 2 and b.dtype != a.dtype
                   for (_, a), (_, b) in zip(mixed, mixed[1:]))  # the case the padding is for
        client.update_named_params(mixed)  # one bucket
        assert greedy(server) == refs[second]

        metas = [{"name": name, "dtype": str(t.dtype), "shape": list(t.shape)} for name, t in checkpoint(first)]
        for extra in ({}, {"layout": 1}, {"layout": "2"}, {"layout": 3}):
            response = server.post("/update_named_params", {"params": metas, **extra})
            assert response.status_code == 400 and response.json()["error"]["param"] == "layout", response.text
        assert server.get("/health").json()["requests_running"] == 0
        client.update_named_params(checkpoint(first), bucket_bytes=100_000)  # several buckets
        assert greedy(server) == refs[first]
        client.close_communicator()
    finally:
        server.stop()
