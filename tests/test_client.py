"""`vllm_client.VLLMClient` against real servers on loopback: ours (`vllm_serve.py`, tiny model on CPU),
stock vLLM's OpenAI server, and a stub HTTP server for timeouts and errors.

TRL's client tests (tests/test_vllm_client_server.py) adapted, plus exact comparisons with in-process
`vllm.LLM` references: greedy ids, sampled ids and logprobs, and weights pushed over the sync group.
"""

import base64
import contextlib
import http.server
import io
import json
import subprocess
import sys
import threading

import pytest

import support
from support import CHATS as CONVERSATIONS
from support import HANG_S, ROOT, Trained, checkpoint, free_port, greedy_ids
from vllm_client import VLLMClient, VLLMClientError

PROMPTS = support.PROMPTS[3:5]
GREEDY = dict(temperature=0, max_tokens=16, generation_kwargs={"ignore_eos": True})


def get_weather(city: str) -> str:
    """Get the current weather in a given city.

    Args:
        city: The city to look up.
    """
    return "sunny"


@pytest.fixture(scope="module")
def client(server):
    with VLLMClient(base_url=server.url, group_port=free_port(), connection_timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def greedy_refs(models, reference_llm):
    refs = {name: greedy_ids(reference_llm(models[name]), PROMPTS, 16) for name in ("seed0", "seed1")}
    assert refs["seed0"] != refs["seed1"]
    return refs


def greedy(c):
    return c.generate(PROMPTS, **GREEDY)["completion_ids"]


def flat(nested):
    return [x for row in nested for x in (flat(row) if isinstance(row, list) else [row])]


def assert_int_lists(rows, count):
    assert len(rows) == count
    assert all(isinstance(row, list) and row and all(isinstance(t, int) for t in row) for row in rows)


# --- TRL's list ---------------------------------------------------------------------------------------


def test_generate(client):
    out = client.generate(PROMPTS)
    assert_int_lists(out["prompt_ids"], 2)
    assert_int_lists(out["completion_ids"], 2)
    # logprobs=0 (the default): exactly the sampled token at every position
    assert out["logprob_token_ids"] == [[[t] for t in c] for c in out["completion_ids"]]
    assert all(len(pos) == 1 and pos[0] <= 0 for row in out["logprobs"] for pos in row)


def test_generate_with_logprobs_none(client):
    out = client.generate(PROMPTS, logprobs=None)
    assert out["logprobs"] is None and out["logprob_token_ids"] is None


def test_chat(client):
    out = client.chat(CONVERSATIONS)
    assert_int_lists(out["prompt_ids"], 2)
    assert_int_lists(out["completion_ids"], 2)
    assert [len(row) for row in out["logprobs"]] == [len(c) for c in out["completion_ids"]]


def test_chat_with_logprobs_none(client):
    out = client.chat(CONVERSATIONS, logprobs=None)
    assert out["logprobs"] is None and out["logprob_token_ids"] is None


def test_chat_with_tools(client, models):
    from transformers import AutoTokenizer

    out = client.chat(CONVERSATIONS[:1], tools=[get_weather], max_tokens=4)
    prompt = AutoTokenizer.from_pretrained(models["seed0"]).decode(out["prompt_ids"][0])
    assert "Get the current weather in a given city." in prompt


def test_generate_with_token_ids(client, models):
    from transformers import AutoTokenizer

    ids = [AutoTokenizer.from_pretrained(models["seed0"]).encode(p) for p in PROMPTS]
    out = client.generate(ids, max_tokens=4)
    assert out["prompt_ids"] == ids
    assert_int_lists(out["completion_ids"], 2)


def test_generate_with_params(client):
    out = client.generate(PROMPTS, n=2, repetition_penalty=0.9, temperature=0.8, max_tokens=32)
    assert len(out["prompt_ids"]) == 2
    assert len(out["completion_ids"]) == 4
    assert all(1 <= len(c) <= 32 for c in out["completion_ids"])


def test_greedy_equals_in_process_llm(client, greedy_refs):
    assert greedy(client) == greedy_refs["seed0"]


def test_logprobs_match_in_process_llm_with_non_default_sampling(client, models, reference_llm):
    from vllm import SamplingParams

    kwargs = dict(temperature=0.7, repetition_penalty=1.05, top_p=0.9, max_tokens=8)
    out = client.generate(PROMPTS, logprobs=5, generation_kwargs={"seed": 1234}, **kwargs)
    refs = reference_llm(models["seed0"]).generate(PROMPTS, SamplingParams(seed=1234, logprobs=5, **kwargs),
                                                   use_tqdm=False)
    assert out["prompt_ids"] == [list(r.prompt_token_ids) for r in refs]
    assert out["completion_ids"] == [list(r.outputs[0].token_ids) for r in refs]
    rows = zip(refs, out["logprob_token_ids"], out["logprobs"], out["completion_ids"])
    for ref, ids_row, lps_row, completion in rows:
        ranked = [sorted(pos.items(), key=lambda item: item[1].rank) for pos in ref.outputs[0].logprobs]
        assert ids_row == [[tid for tid, _ in pos] for pos in ranked]
        assert flat(lps_row) == pytest.approx(flat([[lp.logprob for _, lp in pos] for pos in ranked]), abs=1e-4)
        for ids, lps, sampled in zip(ids_row, lps_row, completion):
            assert len(ids) > 1 and sampled in ids
            assert lps == sorted(lps, reverse=True)


def test_chat_logprobs_equal_generate_on_the_same_prompt(client):
    """Chat carries the sampled token plus the top k at every position, exactly as generate does."""
    kwargs = dict(temperature=1.0, max_tokens=12, logprobs=3, generation_kwargs={"seed": 7, "ignore_eos": True})
    chat = client.chat(CONVERSATIONS, **kwargs)
    gen = client.generate(chat["prompt_ids"], **kwargs)
    assert chat["completion_ids"] == gen["completion_ids"]
    assert chat["logprob_token_ids"] == gen["logprob_token_ids"]
    assert flat(chat["logprobs"]) == pytest.approx(flat(gen["logprobs"]), abs=1e-5)
    assert any(len(pos) == 4 for row in chat["logprob_token_ids"] for pos in row)  # sampled outside the top 3


def test_get_sequence_logprobs_binary_equals_json(client):
    out = client.generate(PROMPTS, **GREEDY)
    sequences = [p + c for p, c in zip(out["prompt_ids"], out["completion_ids"])]
    lengths = [len(p) for p in out["prompt_ids"]]
    binary = client.get_sequence_logprobs(sequences, lengths, top_logprobs=3, chunk_size=1)
    plain = client.get_sequence_logprobs(sequences, lengths, top_logprobs=3, use_binary=False)
    assert binary["logprob_token_ids"] == plain["logprob_token_ids"]
    assert flat(binary["logprobs"]) == pytest.approx(flat(plain["logprobs"]), abs=1e-5)
    assert binary["actual_token_ids"] == [[[t] for t in c] for c in out["completion_ids"]]
    # greedy completions: every actual token is the teacher's top-1
    assert [[pos[0] for pos in row] for row in plain["logprob_token_ids"]] == out["completion_ids"]


@pytest.mark.parametrize("device", [0, "0", "cpu"], ids=["int", "str", "torch.device"])
def test_init_communicator_device_spellings(client, models, greedy_refs, device):
    """On a CPU server the device is informational; the group must form and carry a tensor."""
    import torch

    client.group_port = free_port()
    client.init_communicator(device=torch.device(device) if device == "cpu" else device)
    try:
        assert client.rank == client.get_world_size() and client.communicator is not None
        name = "model.norm.weight"  # pushed unchanged: the shared server keeps seed-0 weights
        client.update_named_param(name, dict(checkpoint(models["seed0"]))[name])
        client.reset_prefix_cache()
    finally:
        client.close_communicator()
    assert client.communicator is None
    assert greedy(client) == greedy_refs["seed0"]


def test_client_buckets_match_server_buckets():
    import torch

    import vllm_client
    import vllm_serve

    shapes = [(300, 7), (5,), (1000,), (2, 2), (4096,), (10, 10, 10), ()]
    dtypes = [torch.float32, torch.bfloat16] * 4
    named = [(f"t{i}", torch.zeros(shape, dtype=dtype)) for i, (shape, dtype) in enumerate(zip(shapes, dtypes))]
    metas = [{"name": n, "dtype": str(t.dtype), "shape": list(t.shape)} for n, t in named]
    for bucket_bytes in (1, 4000, 8192, 1 << 20):
        client = [[id(t) for t in b] for b in vllm_client._buckets(named, bucket_bytes)]
        server = [[id(dict(named)[name]) for name, *_ in tensors]
                  for _, _, tensors in vllm_serve.transfer_plan(metas, "buckets", bucket_bytes)]
        assert client == server


def test_client_packing_reads_back_exactly_with_the_server_layout():
    """Mixed dtypes, odd lengths (a bf16 tensor of 5 elements, then an fp32 one): what the client packs, the
    workers' own unpacking code reads back bit for bit, in buckets of one tensor, of a few, and of all."""
    import types

    import torch

    import vllm_client
    import vllm_serve

    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 7), (1,), (1000,), (), (2, 3), (33,), (4, 4)]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.float32, torch.bfloat16,
              torch.float16, torch.float32]
    named = [(f"t{i}", torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
             for i, (shape, dtype) in enumerate(zip(shapes, dtypes))]
    metas = [{"name": n, "dtype": str(t.dtype), "shape": list(t.shape)} for n, t in named]
    sent, loaded = [], []

    class Group:  # gloo's broadcast, recorded (the sender reuses its buffers: keep copies)
        def broadcast(self, tensor, root):
            sent.append(tensor.clone())
            return types.SimpleNamespace(wait=lambda: None)

    for bucket_bytes in (1, 48, 200, 1 << 20):
        loaded.clear()
        vllm_client._broadcast_buckets(Group(), 1, vllm_client._buckets(named, bucket_bytes), [], lambda w: w.wait())
        engine = vllm_serve.WeightEngine(types.SimpleNamespace(load_weights=loaded.extend), None, torch.device("cpu"))
        engine.group, engine.buffer_device, engine.begin = "a group", torch.device("cpu"), lambda: 0
        engine._configured = contextlib.nullcontext
        engine._broadcast = lambda buffer, epoch: buffer.copy_(sent.pop(0))  # fails on a size mismatch
        engine.receive(vllm_serve.transfer_plan(metas, "buckets", bucket_bytes), 0)
        assert not sent and [n for n, _ in loaded] == [n for n, _ in named]
        for (_, got), (_, want) in zip(loaded, named):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_bucket_sender_packs_in_order_and_never_reuses_a_buffer_on_the_wire():
    """The gloo sender packs bucket k+1 while bucket k is sent: a pure unit test with a recording group."""
    import torch

    import vllm_client

    class Group:  # gloo's broadcast: returns at once, the tensor must stay intact until wait()
        def __init__(self):
            self.sent = []

        def broadcast(self, tensor, root):
            assert root == 3
            posted, sent = tensor.clone(), self.sent

            class Work:
                def wait(self):
                    assert torch.equal(tensor, posted), "buffer overwritten while its send was in flight"
                    sent.append(posted)
            return Work()

    gen = torch.Generator().manual_seed(0)
    named = [(f"t{i}", torch.randn(size, generator=gen).to(dtype)) for i, (size, dtype) in
             enumerate(zip([300, 5, 1000, 4, 4096, 1000, 7], [torch.float32, torch.bfloat16, torch.float16] * 3))]
    buffers = []
    for bucket_bytes in (4000, 1, 1 << 20):  # several buckets; one tensor each; then one bucket bigger than before
        group, buckets = Group(), vllm_client._buckets(named, bucket_bytes)
        vllm_client._broadcast_buckets(group, 3, buckets, buffers, lambda work: work.wait())
        expected = [torch.cat([torch.cat([b, torch.zeros(-b.numel() % 16, dtype=torch.uint8)])  # padded to 16 bytes
                               for b in (t.view(-1).view(torch.uint8) for t in bucket)]) for bucket in buckets]
        assert len(group.sent) == len(expected) and all(torch.equal(a, b) for a, b in zip(group.sent, expected))
        assert len(buffers) == 2  # kept across syncs, grown when a bucket outgrows them

# --- same results from stock vLLM ----------------------------------------------------------------------


def test_same_results_as_stock_vllm(client, stock_server):
    with VLLMClient(base_url=stock_server.url) as stock:
        calls = [("generate", PROMPTS, {}), ("chat", CONVERSATIONS, {}),
                 ("chat", CONVERSATIONS, {"tools": [get_weather]})]
        for method, inputs, extra in calls:
            ours = getattr(client, method)(inputs, logprobs=3, **GREEDY, **extra)
            theirs = getattr(stock, method)(inputs, logprobs=3, **GREEDY, **extra)
            assert ours["prompt_ids"] == theirs["prompt_ids"], method
            assert ours["completion_ids"] == theirs["completion_ids"], method
            assert ours["logprob_token_ids"] == theirs["logprob_token_ids"], method
            assert flat(ours["logprobs"]) == pytest.approx(flat(theirs["logprobs"]), abs=1e-4), method


# --- errors, timeouts, imports -------------------------------------------------------------------------


def test_bad_request_surfaces_the_server_message(client):
    """A prompt longer than the context is a 400 with vLLM's message (a long max_tokens is clamped, as stock)."""
    too_long = [" ".join(["word"] * 600)]
    with pytest.raises(VLLMClientError) as info:
        client.generate(too_long, max_tokens=4)
    assert info.value.status_code == 400 and "maximum context length" in info.value.message, info.value.message
    with pytest.raises(VLLMClientError) as info:
        client.chat([[{"role": "user", "content": too_long[0]}]], max_tokens=4)
    assert info.value.status_code == 400 and "maximum context length" in info.value.message, info.value.message


class StubServer(http.server.ThreadingHTTPServer):
    """A fake server on loopback: every GET answers 200; a POST answers `replies[path]`, else never answers."""

    def __init__(self, replies=None):
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.replies, self.seen, self.release = replies or {}, [], threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def posts(self):
        return [path for method, path, *_ in self.seen if method == "POST"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.shutdown()
        self.server_close()


class StubHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.seen.append(("GET", self.path, dict(self.headers), None))
        self.answer(200, {"status": "ok", "object": "list", "data": [{"id": "stub"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        self.server.seen.append(("POST", self.path, dict(self.headers), body))
        if self.path not in self.server.replies:
            self.server.release.wait(60)  # the client has to give up first
            return
        self.answer(*self.server.replies[self.path])

    def answer(self, status, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(body, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_timeout_surfaces_and_a_post_is_never_resent():
    with StubServer() as stub:
        with VLLMClient(base_url=stub.url, timeout=0.5) as c:  # the stub never answers: only the timeout ends it
            with pytest.raises(VLLMClientError) as info:
                c.generate(PROMPTS)
            assert info.value.status_code is None and "no answer within 0.5 s" in info.value.message
            with pytest.raises(VLLMClientError, match="init_communicator"):
                c.update_named_params([])  # no group: refused before anything is sent
        assert stub.posts() == ["/v1/completions"]


def test_error_bodies_auth_header_and_legacy_image_route(monkeypatch):
    from PIL import Image

    legacy = {"prompt_ids": [[1]], "completion_ids": [[2]], "logprobs": [[[-0.5]]], "logprob_token_ids": [[[2]]]}
    replies = {"/v1/completions": (503, {"error": {"message": "overloaded", "type": "x", "code": 503}}),
               "/v1/chat/completions": (502, b"bad gateway"), "/generate/": (200, legacy)}
    monkeypatch.setenv("VLLM_API_KEY", "sk-test")
    with StubServer(replies) as stub, VLLMClient(base_url=stub.url) as c:
        with pytest.raises(VLLMClientError) as info:
            c.generate(PROMPTS)
        assert (info.value.status_code, info.value.message) == (503, "overloaded")
        with pytest.raises(VLLMClientError) as info:
            c.chat(CONVERSATIONS[:1])
        assert (info.value.status_code, info.value.message) == (502, "bad gateway")
        assert c.generate([[1]], images=[[Image.new("RGB", (4, 4), "red")]]) == legacy
        body = stub.seen[-1][3]
        assert Image.open(io.BytesIO(base64.b64decode(body["images"][0][0]))).size == (4, 4)
        assert all(headers["Authorization"] == "Bearer sk-test" for _, _, headers, _ in stub.seen)


def test_unreachable_server_raises_after_connection_timeout():
    with pytest.raises(VLLMClientError, match="not up after 1"):
        VLLMClient(base_url=f"http://127.0.0.1:{free_port()}", connection_timeout=1)


def test_import_does_not_load_torch_or_vllm():
    code = ("import sys, vllm_client; heavy = {'torch', 'vllm', 'transformers', 'numpy'} & "
            "{m.split('.')[0] for m in sys.modules}; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_legacy_entries_rule():
    """Top k plus the sampled token, whatever extra entries the server sent (chat asks for k + 1)."""
    import vllm_client

    tok = lambda i: f"token_id:{i}"  # noqa: E731
    tops = [(tok(1), -0.1), (tok(2), -0.2), (tok(3), -0.3), (tok(4), -0.4)]
    assert vllm_client._entries((tok(9), -5.0), tops, 3) == [(1, -0.1), (2, -0.2), (3, -0.3), (9, -5.0)]
    assert vllm_client._entries((tok(2), -0.2), tops, 3) == [(1, -0.1), (2, -0.2), (3, -0.3)]
    assert vllm_client._entries((tok(4), -0.4), tops, 3) == [(1, -0.1), (2, -0.2), (3, -0.3), (4, -0.4)]
    assert vllm_client._entries((tok(9), None), [], 0) == [(9, None)]


# --- weight sync that changes outputs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_client(models, server):
    """A client in the shared server's weight-sync group; these tests overwrite its weights, and it leaves the
    seed-0 ones."""
    with VLLMClient(base_url=server.url, group_port=free_port(), timeout=HANG_S) as c:
        c.init_communicator(device=0)
        yield c
        push(c, models["seed0"])
        c.close_communicator()


def push(c, model_dir, **kwargs):
    """One sync step as a TRL trainer does it: push the weights, then reset the prefix cache."""
    c.update_model_params(Trained(checkpoint(model_dir)), **kwargs)
    c.reset_prefix_cache()


def test_update_model_params_changes_outputs(weights_client, models, greedy_refs):
    assert greedy(weights_client) == greedy_refs["seed0"]
    push(weights_client, models["seed1"])  # batched: one 256 MiB bucket holds the whole tiny model
    assert greedy(weights_client) == greedy_refs["seed1"]
    push(weights_client, models["seed0"])
    assert greedy(weights_client) == greedy_refs["seed0"]


def test_update_named_params_in_small_buckets(weights_client, models, greedy_refs):
    push(weights_client, models["seed0"])  # a known state, whatever the previous test left
    weights_client.update_named_params(checkpoint(models["seed1"]), bucket_bytes=128 << 10)
    weights_client.reset_prefix_cache()
    assert greedy(weights_client) == greedy_refs["seed1"]


def test_update_model_params_one_tensor_at_a_time(weights_client, models, greedy_refs):
    push(weights_client, models["seed0"])
    push(weights_client, models["seed1"], batched=False)  # TRL's legacy path: one HTTP call + broadcast each
    assert greedy(weights_client) == greedy_refs["seed1"]


def test_weight_update_block_pushes_and_resets(weights_client, models, greedy_refs):
    push(weights_client, models["seed0"])
    with weights_client.weight_update() as client:  # newer TRL's context manager
        client.update_named_params(checkpoint(models["seed1"]))
    assert greedy(weights_client) == greedy_refs["seed1"]


def test_reset_prefix_cache_ends_a_per_parameter_sync_and_serves_the_new_weights(weights_client, models,
                                                                                 reference_llm, tokenizer):
    """TRL's legacy step: one /update_named_param per tensor, then /reset_prefix_cache. A prompt longer than a
    KV block (128 tokens on CPU) is cached before the update; after it, that prompt gets exactly the new
    weights' greedy output. A reset that did nothing would leave new requests held until
    --weight_sync_timeout (600 s, past the client's HANG_S) or serve the stale cached prefix."""
    long_prompt = tokenizer.encode(" ".join(support.PROMPTS * 6))[:300]
    assert len(long_prompt) == 300

    def answer():
        return weights_client.generate([long_prompt], **GREEDY)["completion_ids"]

    push(weights_client, models["seed0"])
    assert answer() == greedy_ids(reference_llm(models["seed0"]), [long_prompt], 16)  # now cached
    for name, tensor in checkpoint(models["seed1"]):
        weights_client.update_named_param(name, tensor)
    weights_client.reset_prefix_cache()
    assert answer() == greedy_ids(reference_llm(models["seed1"]), [long_prompt], 16)


# --- the retirement path: the same client syncs weights into stock `vllm serve` ------------------------


def test_our_client_syncs_weights_into_stock_vllm(models, greedy_refs, stock_server):
    """The client sees no legacy routes and speaks stock's dialect. Generation and two syncs, each exact: a
    batched one, and a per-parameter one (its tensors share one weight-update session, ended by
    reset_prefix_cache(): vLLM rebuilds a fused layer, q/k/v or gate/up, from one session's tensors, and a
    session per tensor left those layers garbage)."""
    with VLLMClient(base_url=stock_server.url, group_port=free_port(), timeout=HANG_S) as client:
        assert greedy(client) == greedy_refs["seed0"]
        client.init_communicator(device="cpu")
        assert client.weight_sync == "stock"
        for name, batched in (("seed1", True), ("seed0", False)):  # seed 0 last: the fixture's promise
            client.update_model_params(Trained(checkpoint(models[name])), batched=batched)
            client.reset_prefix_cache()
            assert greedy(client) == greedy_refs[name]
        client.close_communicator()
