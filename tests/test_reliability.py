"""Reliability and security of vllm_serve.py (issue 7), on real vLLM: the API key on every route, the
body cap, nothing unpickled, fuzzed hostile input, client disconnects, load with every answer checked
against its own request, a worker killed mid-batch, and SIGTERM with requests in flight.

One shared server (its key from a `--config` file's `env:`, a 1 MiB body cap) serves every test that
leaves it alive; after each of them a good request must still get exactly the greedy tokens of a fresh
in-process engine. The worker-kill and SIGTERM tests start their own servers.
"""

import ast
import base64
import concurrent.futures
import contextlib
import functools
import json
import pickle
import signal
import socket
import threading
import types

import openai
import psutil
import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import support
import vllm_serve
from support import HANG_S, ROOT, chat_prompt_ids, dump, endless, free_port, greedy_ids, wait_until
from vllm_client import VLLMClient, VLLMClientError

API_KEY = "reliability-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY_CAP = 1 << 20  # the shared server's --max_request_body_bytes
SYNC_TIMEOUT_S = 60  # the shared server's --weight_sync_timeout: a group started by mistake blocks this long
PROMPTS = support.PROMPTS[:3]
CHAT = support.CHATS[0]
MAX_TOKENS = 8
CASE_TIMEOUT_S = 60  # one fuzz case; longer is a hang
BODYLESS_ROUTES = {"/reset_prefix_cache", "/close_communicator", "/metrics", "/ping", "/load", "/version", "/pause",
                   "/resume", "/shutdown_weight_transfer_engine", "/start_weight_update", "/abort_weight_update",
                   "/finish_weight_update"}  # read no body (or, as FastAPI's optional ones, none that is not JSON):
#                  any POST answers 200
FUZZ_EXAMPLES = {"generation": 160, "weight_sync": 60, "raw_http": 60}
FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                     suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def own(models, start_server):
    """The servers of the tests at the end that need their own (each test stops or kills its own), launched
    with the shared one: a start is mostly one core importing vLLM, so they start while the tests before them
    run. → {name: launched support.Server}."""
    launch = functools.partial(start_server, models["seed0"], wait=False)
    fault = ("--api-key", API_KEY, "--logits-processors", "faults:FailingLogitsProcessor")
    return {**{name: launch(env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_API_KEY": API_KEY}, name=name)
               for name in ("kill-replica", "kill-vllm-worker")},
            "sigterm": launch("--api-key", API_KEY, "--shutdown_timeout", str(HANG_S), name="sigterm"),
            # the cut comes 15 s after SIGTERM: the refusals, checked before it, take milliseconds
            "sigterm-cut": launch("--api-key", API_KEY, "--shutdown_timeout", "15", name="sigterm-cut"),
            "step-fault": launch(*fault, env={"PYTHONPATH": str(ROOT / "tests")}, name="step-fault")}


@pytest.fixture(scope="module")
def server(models, start_server, tmp_path_factory, own):
    """The shared server (`own`: launched first, beside it); its key comes from a config file's `env:`,
    exported only after vllm_serve is imported (the key used to be read at import time, so this server used to
    run with no auth)."""
    config = tmp_path_factory.mktemp("config") / "serve.yaml"
    config.write_text(json.dumps({"env": {"VLLM_API_KEY": API_KEY}}))  # JSON is YAML
    srv = start_server(models["seed0"], "--config", str(config), "--enable_auto_tool_choice", "--tool_call_parser",
                       "hermes", "--max_request_body_bytes", str(BODY_CAP), "--weight_sync_timeout",
                       str(SYNC_TIMEOUT_S), name="reliability")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def expected(models, reference_llm, tokenizer):
    """Greedy tokens of a fresh in-process engine: {"completions": [ids per prompt], "chat": (prompt, ids)}."""
    chat_ids = chat_prompt_ids(tokenizer, CHAT)
    tokens = greedy_ids(reference_llm(models["seed0"]), [*PROMPTS, chat_ids], MAX_TOKENS)
    return {"completions": tokens[:-1], "chat": (chat_ids, tokens[-1])}


def post(server, path, body, **kwargs):
    return server.post(path, body, headers={**AUTH, **kwargs.pop("headers", {})}, **kwargs)


def assert_exact(server, expected, timeout=HANG_S):
    """A good completion and a good chat request get exactly the reference's greedy tokens."""
    greedy = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    body = post(server, "/v1/completions", {"prompt": PROMPTS, **greedy}, timeout=timeout).json()
    assert [c["token_ids"] for c in body["choices"]] == expected["completions"], dump(body)
    chat = post(server, "/v1/chat/completions", {"messages": CHAT, **greedy}, timeout=timeout).json()
    assert (chat["prompt_token_ids"], chat["choices"][0]["token_ids"]) == expected["chat"], dump(chat)


def assert_error_shape(response, status=None):
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}, code = the HTTP status."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, response.text
    assert isinstance(error["message"], str) and error["message"] and error["code"] == response.status_code
    assert status is None or response.status_code == status, response.text


def log_since(server, offset):
    server.log.flush()
    return server.log_path.read_text(errors="replace")[offset:]


def log_size(server):
    server.log.flush()
    return len(server.log_path.read_text(errors="replace"))


# ------------------------------------------------------------------------------------------------
# Security: API key, body cap, no unpickling, exposure warning
# ------------------------------------------------------------------------------------------------

def every_route():
    """(method, path) of every route the server serves (ours, and vLLM's on its allow-list, both methods), so
    a route added later is covered too."""
    ours = [(method, route.path) for route in vllm_serve.ROUTES for method in sorted(route.methods - {"HEAD"})]
    return ours + [(method, path) for path in sorted(vllm_serve.VLLM_ROUTES) for method in ("GET", "POST")]


def test_every_route_but_the_probes_requires_the_key(server, expected):
    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}, {"Authorization": API_KEY},
             {"Authorization": f"bearer {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"},
             {"Authorization": f"Bearer {API_KEY[:-1]}"}, {"X-API-Key": API_KEY}]
    # valid-looking weight-sync bodies: refused before anything starts (a group would block for SYNC_TIMEOUT_S)
    bodies = {"/init_communicator": {"host": "127.0.0.1", "port": free_port(), "world_size": 2},
              "/update_named_param": {"name": "model.norm.weight", "dtype": "torch.float32", "shape": [128]}}
    routes = every_route()
    assert len(routes) >= 20 and ("POST", "/update_named_params/") in routes
    served_gets = {"/health", "/health/", "/get_world_size", "/get_world_size/", "/v1/models", "/version", "/load",
                   "/ping", "/metrics", "/openapi.json"}
    for method, path in [*routes, ("GET", "/no/such/route"), ("POST", "/v1/embeddings")]:
        for headers in wrong:
            response = requests.request(method, server.url + path, json=bodies.get(path.rstrip("/"), {}),
                                        headers=headers, timeout=30)
            if path.rstrip("/") in vllm_serve.OPEN_PATHS:  # probes and scrapers
                assert response.status_code in (200, 405), (path, headers)
            else:  # an unknown route too: nothing is revealed without the key
                assert_error_shape(response, 401)
                assert response.json()["error"]["type"] == "Unauthorized"  # vLLM's type for a GracefulHTTPError(401)
        if method == "GET" and path in served_gets:  # with the key: served
            assert requests.get(server.url + path, headers=AUTH, timeout=30).status_code == 200, path
    assert_error_shape(requests.get(server.url + "/no/such/route", headers=AUTH, timeout=30), 404)
    assert_no_weight_sync_group(server)
    assert_exact(server, expected)


def assert_no_weight_sync_group(server):
    """No request above opened a weight-sync group (it would hold the workers for SYNC_TIMEOUT_S): an
    update is refused for want of one."""
    response = post(server, "/update_named_param", {"name": "model.norm.weight", "dtype": "torch.float32",
                                                    "shape": [128]})
    assert_error_shape(response, 409)
    assert "init_communicator" in response.json()["error"]["message"]


def test_both_clients_pass_the_key(server, expected, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with VLLMClient(base_url=server.url, api_key=API_KEY, connection_timeout=30) as client:
        out = client.generate(PROMPTS, temperature=0, max_tokens=MAX_TOKENS, generation_kwargs={"ignore_eos": True})
        assert out["completion_ids"] == expected["completions"]
        assert client.get_world_size() == 1
    with VLLMClient(base_url=server.url, connection_timeout=30) as client, pytest.raises(VLLMClientError) as info:
        client.generate(PROMPTS, max_tokens=2)
    assert info.value.status_code == 401
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)  # the client reads it like the server does
    with VLLMClient(base_url=server.url, connection_timeout=30) as client:
        assert client.chat([CHAT], temperature=0, max_tokens=MAX_TOKENS,
                           generation_kwargs={"ignore_eos": True})["completion_ids"] == [expected["chat"][1]]

    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    result = sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    assert (result.prompt_token_ids, result.choices[0].token_ids) == expected["chat"]
    assert [m.id for m in sdk.models.list()] == ["tiny"]
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert info.value.body["code"] == 401 and "API key" in info.value.body["message"]


@pytest.mark.parametrize("host, api_key, exposed", [
    ("0.0.0.0", None, True), ("::", None, True), ("", None, True), ("192.0.2.7", None, True),
    ("fe80::1", None, True), ("trainer-node-3", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False),
    ("127.3.2.1", None, False), ("::1", None, False), ("localhost", None, False)])
def test_exposure_decision(host, api_key, exposed):
    assert vllm_serve.exposed_without_key(host, api_key) is exposed


def test_exposure_warning_is_logged(caplog):
    for host, api_key, uds, warned in [("0.0.0.0", None, None, True), ("0.0.0.0", "k", None, False),
                                       ("127.0.0.1", None, None, False), ("0.0.0.0", None, "/tmp/s.sock", False)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="vllm_serve"):
            vllm_serve.warn_if_exposed(types.SimpleNamespace(host=host, port=8000, api_key=api_key, uds=uds))
        assert any("without --api-key" in r.getMessage() for r in caplog.records) is warned, (host, api_key, uds)


def test_body_cap_answers_413_with_content_length_and_chunked(server, expected):
    greedy = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
              "return_token_ids": True}
    exact = json.dumps(greedy).encode()
    exact += b" " * (BODY_CAP - len(exact))  # exactly at the cap: allowed (JSON ignores trailing blanks)
    over = exact + b" "
    headers = {**AUTH, "Content-Type": "application/json"}

    def chunked(data, size=64 << 10):  # a generator body: requests sends it chunked, with no Content-Length
        for i in range(0, len(data), size):
            yield data[i:i + size]

    for path in ["/v1/completions", "/v1/chat/completions", "/generate/", "/update_named_params"]:
        response = requests.post(server.url + path, data=over, headers=headers, timeout=60)
        assert_error_shape(response, 413)
        response = requests.post(server.url + path, data=chunked(over * 4), headers=headers, timeout=60)
        assert response.request.headers.get("Transfer-Encoding") == "chunked"
        assert_error_shape(response, 413)
    for body in [exact, chunked(exact)]:
        response = requests.post(server.url + "/v1/completions", data=body, headers=headers, timeout=120)
        assert response.json()["choices"][0]["token_ids"] == expected["completions"][0], response.text[:500]
    # without the key, the body is refused unread: 401, not 413
    assert_error_shape(requests.post(server.url + "/v1/completions", data=over, timeout=60), 401)
    assert_exact(server, expected)


class Payload:
    """Unpickling this creates `marker` (a harmless stand-in for arbitrary code execution)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_nothing_received_is_unpickled(server, expected, tmp_path):
    source = (ROOT / "vllm_serve.py").read_text()
    unsafe_modules = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
    unsafe_calls = {"torch.load", "np.load", "numpy.load", "yaml.load", "yaml.unsafe_load", "pickle.loads",
                    "pickle.load", "eval", "exec"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = {a.name.split(".")[0] for a in node.names} | {(getattr(node, "module", None) or "").split(".")[0]}
            assert not names & unsafe_modules, ast.unparse(node)
        if isinstance(node, ast.Call):
            assert ast.unparse(node.func) not in unsafe_calls, ast.unparse(node)

    marker = tmp_path / "unpickled"
    blob = pickle.dumps(Payload(marker))
    b64 = base64.b64encode(blob).decode()
    post_routes = sorted({path for method, path in every_route() if method == "POST"})
    for path in post_routes:
        for content_type in ["application/octet-stream", "application/python-pickle", "application/json"]:
            response = requests.post(server.url + path, data=blob, headers={**AUTH, "Content-Type": content_type},
                                     timeout=60)
            assert 400 <= response.status_code < 500 or path.rstrip("/") in BODYLESS_ROUTES, (path, response.text)
    post(server, "/abort_weight_update", {})  # /start_weight_update opened an (empty) update: it held new requests
    assert not server.health()["paused"]  # /resume came after /pause
    for path, body in [
            ("/generate/", {"prompts": ["Hi"], "images": [[b64]], "max_tokens": 2}),
            ("/chat/", {"messages": [[{"role": "user", "content": [{"type": "image_pil", "image_pil": b64}]}]]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}]}]}),
            ("/update_named_params", {"params": b64}), ("/get_sequence_logprobs/", {"sequences": b64})]:
        response = post(server, path, body)
        assert_error_shape(response, 400)
    assert not marker.exists()
    assert_exact(server, expected)


# ------------------------------------------------------------------------------------------------
# Bad input: property-based fuzzing of every route
# ------------------------------------------------------------------------------------------------

class Deep:
    """A value nested `depth` lists deep; `encode` writes it out (json.dumps itself would recurse too deep)."""

    def __init__(self, depth):
        self.depth = depth

    def __repr__(self):
        return f"Deep({self.depth})"


def encode(body, ascii_only=True):
    """JSON bytes as a hostile client would send them: NaN/Infinity allowed, lone surrogates either
    escaped (\\ud800) or written raw (invalid UTF-8), Deep(n) expanded."""
    deep = []

    def default(value):
        deep.append(value.depth)
        return f"@deep{len(deep) - 1}@"

    text = json.dumps(body, default=default, ensure_ascii=ascii_only)
    for i, depth in enumerate(deep):
        text = text.replace(f'"@deep{i}@"', "[" * depth + "1" + "]" * depth)
    return text.encode("utf-8", "surrogatepass")


HUGE_NUMBERS = [2**31, 2**53 + 1, 2**63, 2**64, 10**30, -1, -(2**63) - 1, 0, 1e308, -1e308, 5e-324]
HOSTILE_TEXT = ["", " ", "\ud800", "x\udfffy", "\x00", "\u202e\ufeff", "😀" * 40, "A" * 5000, "{{ 7 * 7 }}",
                "{% for i in range(99999) %}x{% endfor %}", "<|im_end|><|im_start|>system\n", "<tool_call>",
                "../../../../etc/passwd", "data:image/png;base64,AAAA", "token_id:5", "%s%n%x", "null", "[DONE]"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE_NUMBERS),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=24), st.sampled_from(HOSTILE_TEXT))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=12)
deep_values = st.builds(Deep, st.sampled_from([65, 200, 999, 1000, 5000, 100_000]))
values = st.one_of(json_values, json_values, json_values, deep_values)
roles = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "developer", "function"]), values)
content_parts = st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["text", "image_url", "input_audio",
                                                                           "image_pil", "video_url"]), values)},
                                      optional={"text": values, "image_url": values, "image_pil": values})
messages = st.lists(st.fixed_dictionaries(
    {"role": roles, "content": st.one_of(st.sampled_from(HOSTILE_TEXT), st.lists(content_parts, max_size=3), values)},
    optional={"tool_calls": values, "name": values, "tool_call_id": values, "reasoning": values}), max_size=3)

GENERATION_ROUTES = {  # path → (valid base body, the fields a client may send)
    "/v1/completions": ({"model": "tiny", "prompt": "Hello", "max_tokens": 4},
                        ["model", "prompt", "max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                         "stream", "stream_options", "logprobs", "echo", "logit_bias", "prompt_logprobs", "ignore_eos",
                         "return_token_ids", "min_tokens", "stop_token_ids", "structured_outputs", "response_format",
                         "use_beam_search", "suffix", "truncate_prompt_tokens", "allowed_token_ids", "bad_words",
                         "repetition_penalty", "presence_penalty", "frequency_penalty", "vllm_xargs", "priority",
                         "return_tokens_as_token_ids", "skip_special_tokens", "prompt_embeds", "cache_salt"]),
    "/v1/chat/completions": ({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                             ["model", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p",
                              "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "tools",
                              "tool_choice", "parallel_tool_calls", "chat_template", "chat_template_kwargs",
                              "add_generation_prompt", "continue_final_message", "documents", "response_format",
                              "structured_outputs", "ignore_eos", "return_token_ids", "echo", "prompt_logprobs",
                              "include_reasoning", "reasoning_effort", "add_special_tokens", "mm_processor_kwargs"]),
    "/generate/": ({"prompts": ["Hello"], "max_tokens": 4},
                   ["prompts", "images", "n", "repetition_penalty", "temperature", "top_p", "top_k", "min_p",
                    "max_tokens", "logprobs", "structured_outputs_regex", "generation_kwargs"]),
    "/chat/": ({"messages": [[{"role": "user", "content": "Hi"}]], "max_tokens": 4},
               ["messages", "n", "temperature", "top_k", "max_tokens", "logprobs", "tools", "chat_template",
                "chat_template_kwargs", "generation_kwargs", "structured_outputs_regex"]),
    "/get_sequence_logprobs/": ({"sequences": [[1, 2, 3, 4]], "prompt_lengths": [2], "top_logprobs": 2},
                                ["sequences", "prompt_lengths", "top_logprobs", "temperature", "response_format"]),
}


def field_values(path, name):
    if name == "messages" and path == "/chat/":
        return st.one_of(st.lists(messages, max_size=2), values)
    if name == "messages":
        return st.one_of(messages, values)
    return values


def mutated(path, base, fields):
    """The route's valid body with 1-3 hostile edits: a field set to a hostile value, removed, or added."""
    edit = st.one_of(st.tuples(st.just("set"), st.sampled_from(fields)).flatmap(
                         lambda op: st.tuples(st.just(op[0]), st.just(op[1]), field_values(path, op[1]))),
                     st.tuples(st.just("drop"), st.sampled_from(sorted(base)), st.none()),
                     st.tuples(st.just("add"), st.text(min_size=1, max_size=12), values))

    def apply(edits):
        body = dict(base)
        for op, name, value in edits:
            if op == "drop":
                body.pop(name, None)
            else:
                body[name] = value
        return body

    return st.lists(edit, min_size=1, max_size=3).map(apply)


generation_cases = st.one_of(*(  # (path, body, whether the JSON text is ASCII-only)
    st.tuples(st.just(path), st.one_of(mutated(path, base, fields), mutated(path, base, fields),
                                       st.dictionaries(st.text(max_size=12), values, max_size=5)), st.booleans())
    for path, (base, fields) in GENERATION_ROUTES.items()))


def check_response(response, path, body, report):
    """No 5xx; an error in OpenAI's shape; a 200 is complete (JSON, or SSE that ends with [DONE])."""
    report[path] = report.get(path, 0) + 1
    report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
    assert response.status_code < 500, (path, repr(body)[:800], response.text[:800])
    if response.status_code != 200:
        assert_error_shape(response)
    elif not response.content:  # a body-less answer (/ping, as stock)
        assert path.rstrip("/") in BODYLESS_ROUTES, path
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
    elif path.rstrip("/") == "/metrics":  # Prometheus' text format, for any method (as stock)
        assert "vllm:" in response.text, response.text[:300]
    else:
        assert isinstance(response.json(), dict)


class FuzzCounts(dict):
    """Cases per route, and `statuses`: cases per HTTP status."""

    def __init__(self):
        super().__init__()
        self.statuses = {}


@pytest.fixture
def fuzz_report(server, expected, record_property, capsys):
    """Counts the cases a fuzz test ran, reports them, and checks the server afterwards: alive, still
    exact, and no unhandled error (a 5xx the test might not have seen) in its log."""
    counts, offset = FuzzCounts(), log_size(server)
    yield counts
    total = sum(counts.values())
    record_property("fuzz_cases", total)
    with capsys.disabled():
        print(f"\n  fuzz cases run: {total}; by route {dict(counts)}; by status {counts.statuses}", flush=True)
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert_exact(server, expected)
    log = log_since(server, offset)
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]


def test_fuzz_generation_routes(server, fuzz_report):
    @settings(max_examples=FUZZ_EXAMPLES["generation"], **FUZZ_SETTINGS)
    @given(case=generation_cases)
    @example(case=("/v1/completions", {"prompt": Deep(100_000)}, True))
    @example(case=("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}, True))
    @example(case=("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}, False))
    @example(case=("/v1/chat/completions", {"messages": [{"role": "user", "content": "x\udfff"}]}, True))
    @example(case=("/generate/", {"prompts": [[1, 2]], "structured_outputs_regex": 5}, True))
    @example(case=("/generate/", {"prompts": [[1, 2]], "images": [5]}, True))
    @example(case=("/chat/", {"messages": [[{"role": "user", "content": "hi", "tool_calls": [5]}]]}, True))
    @example(case=("/chat/", {"messages": [[{"role": "user", "content": [{"type": "text"}]}]]}, True))
    @example(case=("/get_sequence_logprobs/", {"sequences": [5], "prompt_lengths": [1]}, True))
    @example(case=("/get_sequence_logprobs/", {"sequences": [[1, 2]], "prompt_lengths": [1], "temperature": 1e309},
                   True))
    @example(case=("/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": float("nan")}, True))
    def case(case):
        path, body, ascii_only = case
        response = requests.post(server.url + path, data=encode(body, ascii_only), timeout=CASE_TIMEOUT_S,
                                 headers={**AUTH, "Content-Type": "application/json"})
        check_response(response, path, body, fuzz_report)

    case()


def test_fuzz_weight_sync_routes(server, expected, fuzz_report):
    """No trainer is connected: updates answer 4xx whatever the payload and no broadcast ever starts;
    /init_communicator is fuzzed with invalid payloads only (a valid one would start a real group)."""
    meta = st.fixed_dictionaries({}, optional={"name": st.one_of(st.just("model.norm.weight"), values),
                                               "dtype": st.one_of(st.just("torch.float32"), values),
                                               "shape": st.one_of(st.just([128]), values)})
    bad_host = st.one_of(st.none(), st.integers(), st.booleans(), st.just(""), st.lists(st.text(), max_size=2),
                         st.sampled_from(["a b", "x\x00y", "\n", "h" * 300]), deep_values)
    bad_port = st.one_of(st.none(), st.booleans(), st.sampled_from([0, -1, 65536, 2**64, 1.5, "8000", [8000]]),
                         st.integers(max_value=0), st.integers(min_value=65536), st.text(max_size=6), deep_values)
    init_bodies = st.one_of(
        st.fixed_dictionaries({"host": bad_host, "port": st.one_of(st.integers(1, 65535), bad_port)}),
        st.fixed_dictionaries({"host": st.one_of(st.just("127.0.0.1"), bad_host), "port": bad_port}),
        st.fixed_dictionaries({}, optional={"port": bad_port, "world_size": values, "client_device_uuid": values}))
    cases = st.one_of(
        st.tuples(st.just("/update_named_param"), st.one_of(meta, values)),
        st.tuples(st.just("/update_named_params"), st.one_of(
            st.fixed_dictionaries({"params": st.one_of(st.lists(meta, max_size=3), values)},
                                  optional={"bucket_bytes": values}), values)),
        st.tuples(st.just("/init_communicator"), init_bodies),
        st.tuples(st.sampled_from(["/close_communicator", "/reset_prefix_cache"]), values))

    @settings(max_examples=FUZZ_EXAMPLES["weight_sync"], **FUZZ_SETTINGS)
    @given(case=cases)
    @example(case=("/init_communicator", {"host": "127.0.0.1", "port": True}))
    @example(case=("/update_named_params", {"params": [{"name": "model.norm.weight", "dtype": "torch.float32",
                                                        "shape": [128]}], "bucket_bytes": True}))
    def case(case):
        path, body = case
        response = requests.post(server.url + path, data=encode(body), timeout=CASE_TIMEOUT_S,
                                 headers={**AUTH, "Content-Type": "application/json"})
        check_response(response, path, body, fuzz_report)
        if path in ("/update_named_param", "/update_named_params", "/init_communicator"):
            assert 400 <= response.status_code < 500, (path, body, response.text)

    case()
    assert_no_weight_sync_group(server)
    assert_exact(server, expected)  # not blocked behind a held batcher


def test_fuzz_raw_http(server, fuzz_report):
    """Bodies that are not JSON objects, oversized bodies, and hostile headers, on every POST route."""
    post_routes = sorted({path for method, path in every_route() if method == "POST"})
    bodies = st.one_of(
        st.binary(max_size=256), st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
        json_values.map(encode), st.sampled_from([b"", b"{", b"[1,", b'{"a": 1}}', b"\xff\xfe{}", b'{"a": NaN}',
                                                  b'{"a": 1, "a": 2}', b"{" * 100_000, b'"' + b"a" * 1000]),
        st.sampled_from([BODY_CAP + 1, 4 * BODY_CAP]).map(lambda n: b'{"prompt": "' + b"a" * n + b'"}'))
    content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/json; charset=utf-16", ""])

    @settings(max_examples=FUZZ_EXAMPLES["raw_http"], **FUZZ_SETTINGS)
    @given(path=st.sampled_from(post_routes), body=bodies, content_type=content_types, chunked=st.booleans())
    def case(path, body, content_type, chunked):
        data = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked and body else body
        response = requests.post(server.url + path, data=data, timeout=CASE_TIMEOUT_S,
                                 headers={**AUTH, "Content-Type": content_type})
        check_response(response, path, body[:200], fuzz_report)
        if len(body) > BODY_CAP and not (chunked and path.rstrip("/") in BODYLESS_ROUTES):
            assert response.status_code == 413, (path, response.text)
        if path.rstrip("/") == "/pause" and response.status_code == 200:  # a body-less route: it did pause
            assert post(server, "/resume", {}).status_code == 200

    case()
    # hostile framing, below the HTTP parser: each connection gets a 4xx (or is closed), never a 5xx or a hang
    for head in [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
                 b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
                 b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
                 b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                 b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",
                 b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
                 b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64]:  # a TLS hello
        status = raw_exchange(server.port, head)
        fuzz_report["raw socket"] = fuzz_report.get("raw socket", 0) + 1
        fuzz_report.statuses[status] = fuzz_report.statuses.get(status, 0) + 1
        assert status is None or 400 <= status < 500, (head[:80], status)


def raw_exchange(port, data, timeout=CASE_TIMEOUT_S):
    """Send bytes, read until the server closes or answers → the HTTP status (None if it just closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    return int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/") else None


# ------------------------------------------------------------------------------------------------
# Faults that leave the server running: clients that go away
# ------------------------------------------------------------------------------------------------

def request_bytes(body, path="/v1/completions", extra=b""):
    """A raw HTTP/1.1 POST of `body` with the key, for clients that hang up at chosen points."""
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + extra + data


def test_clients_that_disconnect_do_not_disturb_others(server, expected):
    long_body = {"prompt": PROMPTS * 8, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    offset = log_size(server)

    def good(i):
        return post(server, "/v1/completions", {"prompt": PROMPTS[i % 3], "max_tokens": MAX_TOKENS, "temperature": 0,
                                                "ignore_eos": True, "return_token_ids": True}).json()

    def hang_up(data, read=0):
        """Send `data`, read `read` bytes of the answer (0: none), then close the connection."""
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(data)
            if read:
                sock.recv(read)

    head = request_bytes(long_body)
    rude = [lambda: hang_up(head),  # mid-request: the whole request sent, gone before the answer
            lambda: hang_up(head[:len(head) - 10]),  # mid-upload: part of the body, then gone
            lambda: hang_up(request_bytes({**long_body, "stream": True}), read=64),  # mid-stream
            lambda: hang_up(request_bytes({**long_body, "stream": True}, path="/v1/completions"), read=1)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        goods = [pool.submit(good, i) for i in range(12)]
        for _ in range(3):
            for fn in rude:
                pool.submit(fn).result(timeout=120)
        stream = requests.post(server.url + "/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 200, "stream": True, "n": 4, "temperature": 1.0},
            headers=AUTH, stream=True, timeout=120)
        next(stream.iter_lines())  # first SSE line, then drop the connection mid-stream
        stream.close()
        results = [g.result(timeout=300) for g in goods]
    for i, result in enumerate(results):
        assert result["choices"][0]["token_ids"] == expected["completions"][i % 3], dump(result)
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert_exact(server, expected)
    log = log_since(server, offset)
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]


def test_a_client_that_disconnects_has_its_generation_aborted(server, expected):
    """A trainer that timed out (and will resend) must not leave vLLM generating for nobody: the prompts
    of a request whose connection closed are aborted in the engine, the others are untouched."""
    endless_request = request_bytes(endless(PROMPTS * 8, n=200))  # 24 prompts x 200 x 400 tokens
    before = server.wait_for_health(lambda h: h["requests_running"] == 0)["requests_aborted"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with socket.create_connection(("127.0.0.1", server.port), timeout=HANG_S) as sock:
            sock.sendall(endless_request)
            server.wait_for_health(lambda h: h["requests_running"] == 24)
            good = pool.submit(post, server, "/v1/completions", {  # shares the engine with them
                "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
        # the connection is closed: every one of the 24 is confirmed aborted by the worker
        state = server.wait_for_health(lambda h: h["requests_aborted"] >= before + 24 and h["requests_running"] == 0)
        assert state["requests_aborted"] == before + 24, state
        body = good.result(timeout=HANG_S).json()
    assert [c["token_ids"] for c in body["choices"]] == expected["completions"], dump(body)
    assert_exact(server, expected)


def test_a_trainer_timeout_aborts_the_generation_it_gave_up_on(server, expected):
    """VLLMClient's timeout closes the connection: the server aborts that endless generation (or never
    starts it, if the timeout came first), and the trainer's next request is answered exactly."""
    before = server.wait_for_health(lambda h: h["requests_running"] == 0)["requests_aborted"]
    with VLLMClient(base_url=server.url, api_key=API_KEY, connection_timeout=30, timeout=2) as client:
        with pytest.raises(VLLMClientError, match="no answer within 2 s"):  # endless: only the timeout ends it
            client.generate(PROMPTS[:1], n=4096, max_tokens=400, temperature=1.0,
                            generation_kwargs={"ignore_eos": True})
    server.wait_for_health(lambda h: h["requests_running"] == 0)
    assert_exact(server, expected)
    state = server.health()  # an endless orphan would still be running after another request was answered
    assert state["requests_running"] == 0 and state["requests_aborted"] in (before, before + 1), state


# ------------------------------------------------------------------------------------------------
# Load: every request answered once, with its own correct content; memory stable
# ------------------------------------------------------------------------------------------------

def test_load_100_requests_at_concurrency_32(server, models, reference_llm, tokenizer, capsys):
    llm = reference_llm(models["seed0"])
    warmup = support.expect(support.plan(64, seed=1), llm, tokenizer)
    jobs = support.expect(support.plan(100, seed=0), llm, tokenizer)
    assert len({tuple(job.prompt_ids) for job in jobs}) == len(jobs)  # distinct prompts: cross-wiring shows
    assert not support.check(warmup, support.send(server.url, warmup, 32, api_key=API_KEY))["bad"]
    rss_start = support.rss_by_process(server.proc.pid)
    answers = support.send(server.url, jobs, 32, api_key=API_KEY)
    rss_end = support.rss_by_process(server.proc.pid)
    result = support.check(jobs, answers)
    p50, p99 = support.latency_figures(answers)
    with capsys.disabled():
        print(f"\n  load: {len(jobs)} requests, p50 {p50:.2f} s, p99 {p99:.2f} s, "
              f"RSS {sum(rss_start.values()) >> 20} → {sum(rss_end.values()) >> 20} MiB", flush=True)
    assert result["answered"] == len(jobs) and not result["bad"], result["bad"][:5]
    assert (result["errors"], result["duplicates"], result["prompt_mismatches"], result["token_mismatches"]) == (0,) * 4
    assert sum(job.stream for job in jobs) == 25 and sum("chat" in job.route for job in jobs) == 50
    assert rss_end["server#0"] - rss_start["server#0"] < 32 << 20, (rss_start, rss_end)  # ours: flat
    assert sum(rss_end.values()) - sum(rss_start.values()) < 256 << 20, (rss_start, rss_end)  # vLLM's caches grow


# ------------------------------------------------------------------------------------------------
# Destructive faults, each on its own server: a worker killed mid-batch, SIGTERM
# ------------------------------------------------------------------------------------------------

def replica_process(server):
    """The replica process: the server's direct child that multiprocessing spawned (not its resource tracker)."""
    (worker,) = [p for p in psutil.Process(server.proc.pid).children()
                 if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
    return worker


def call_or_none(server, method, path, body=None):
    """The response, or None once the server no longer accepts connections."""
    try:
        return requests.request(method, server.url + path, json=body, headers=AUTH, timeout=HANG_S)
    except requests.ConnectionError:
        return None


def sigterm(server):
    """SIGTERM the server; return once it turns new requests away: a 503 while what runs drains (vLLM's launcher
    keeps listening meanwhile, as `vllm serve` does), or a refused connection once it stopped listening."""
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: (r := call_or_none(server, "GET", "/health")) is None or r.status_code == 503,
               "new requests turned away after SIGTERM")


def in_flight(server, body, answers, name, started=None):
    """POST `body` in a thread; its (status, text) lands in answers[name]. A streamed body sets `started`
    at its first data chunk: the request is then in the engine, and stays so whatever the machine's speed."""
    def send():
        try:
            with post(server, "/v1/completions", body, stream=True) as response:
                lines = []
                for line in response.iter_lines(decode_unicode=True):
                    lines.append(line)
                    if started is not None and line.startswith("data: {"):
                        started.set()
                answers[name] = (response.status_code, "\n".join(lines))
        except requests.RequestException as exc:
            answers[name] = (None, repr(exc))

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def model_worker_process(server):
    """vLLM's model worker under the replica's EngineCore (the process that holds the GPU on a GPU box)."""
    (worker,) = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if p.name() == "VLLM::Worker"]
    return worker


@pytest.mark.parametrize("victim", [replica_process, model_worker_process], ids=["replica", "vllm-worker"])
def test_worker_killed_mid_batch_fails_fast_and_exits_nonzero(own, victim, request):
    """vLLM's multiprocess layout (engine core and model worker in their own processes), as in production:
    a killed replica must not leave them behind, and a killed model worker (a CUDA crash, an OOM kill, a
    worker that exits on a blocked stream) takes the server down too instead of leaving a dead engine behind
    a 200 /health. The requests in flight are endless, so only the kill can end them: each must get a 503
    (a server that missed the death would keep them until the hang guard)."""
    server = own[f"kill-{request.node.callspec.id}"].wait_healthy()
    tree = psutil.Process(server.proc.pid).children(recursive=True)
    assert len(tree) >= 3, tree  # resource tracker, worker, engine core (+ its model worker)
    try:
        process, answers = victim(server), {}
        threads = [in_flight(server, endless(PROMPTS[i], n=1024), answers, i) for i in range(3)]
        server.wait_for_health(lambda h: h["requests_running"] == 3)  # all three in the engine
        process.send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join(HANG_S)
        assert len(answers) == 3, answers
        for status, text in answers.values():
            assert status == 503 and "replica" in json.loads(text)["error"]["message"], (status, text)
        # from then until it exits (vllm_serve.REPLICA_DEATH_GRACE_S later), anything else gets a 503 too
        for response in [call_or_none(server, "GET", "/health"),
                         call_or_none(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})]:
            assert response is None or assert_error_shape(response, 503) is None
        assert server.proc.wait(HANG_S) == 1
        _, alive = psutil.wait_procs(tree, timeout=support.STOP_TIMEOUT_S)
        assert not alive, [(p.pid, p.name()) for p in alive]  # the engine core did not outlive its worker
    finally:
        server.stop()
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_sigterm_lets_a_running_request_finish_then_exits_cleanly(models, own, reference_llm):
    """SIGTERM with a request generating: it completes with exact tokens (--shutdown_timeout is minutes, far
    beyond its need), the server exits 0 once it is answered, and no process is left behind. The request is
    in the engine when the signal is sent (its first chunk came), and 499 decode steps are still ahead."""
    server = own["sigterm"].wait_healthy()
    tree = psutil.Process(server.proc.pid).children(recursive=True)
    running = {"prompt": PROMPTS * 8, "max_tokens": 500, "temperature": 0, "ignore_eos": True,
               "return_token_ids": True, "stream": True}
    reference = greedy_ids(reference_llm(models["seed0"]), PROMPTS * 8, 500)
    answers, started = {}, threading.Event()
    thread = in_flight(server, running, answers, "running", started)
    assert started.wait(HANG_S)
    sigterm(server)
    thread.join(HANG_S)
    assert server.proc.wait(HANG_S) == 0
    status, text = answers["running"]
    chunks = [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: {")]
    assert status == 200 and text.rstrip().endswith("data: [DONE]"), text[-500:]
    tokens = [[] for _ in reference]  # a stream's chunks carry the tokens of its choices as they come
    for chunk in chunks:
        for choice in chunk["choices"]:
            tokens[choice["index"]] += choice["token_ids"] or []
    assert tokens == reference
    _, alive = psutil.wait_procs(tree, timeout=support.STOP_TIMEOUT_S)
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_sigterm_cuts_an_endless_request_with_a_503_then_exits_cleanly(own):
    """SIGTERM with an endless request: new requests get a 503 while it still runs, it is cut at
    --shutdown_timeout with a 503 in OpenAI's shape (not a dropped connection), the workers stop (one busy
    generating for nobody included), the exit status is 0, no traceback is logged, and no process is left."""
    server = own["sigterm-cut"].wait_healthy()
    tree = psutil.Process(server.proc.pid).children(recursive=True)
    answers = {}
    thread = in_flight(server, endless(), answers, "endless")
    server.wait_for_health(lambda h: h["requests_running"] == 1)
    sigterm(server)
    late = call_or_none(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 1})
    assert late is None or late.status_code == 503, late.text
    assert not answers, answers  # refused while the endless request was still being served
    thread.join(HANG_S)
    assert server.proc.wait(HANG_S) == 0
    status, text = answers["endless"]
    assert status == 503 and "shut down" in json.loads(text)["error"]["message"], (status, text[:500])
    assert "Traceback" not in server.log_text(), server.log_tail()
    _, alive = psutil.wait_procs(tree, timeout=support.STOP_TIMEOUT_S)
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_a_failed_engine_step_answers_500_for_its_requests_and_the_replica_serves_on(models, own, reference_llm):
    """An engine step that raises (here a logits processor, loaded with vLLM's own --logits-processors, that
    fails while a request asking for it is in the batch) is the server's fault: each request in that step
    gets a 500 in OpenAI's shape (a stream ends with an error event), on /v1 and on the legacy route alike,
    and the next request to the same replica completes with the reference's exact tokens."""
    server = own["step-fault"].wait_healthy()
    try:
        reference = greedy_ids(reference_llm(models["seed0"]), PROMPTS, MAX_TOKENS)
        greedy = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        fail = {"vllm_xargs": {"fail": 1}}
        for _ in range(2):  # twice: the replica that failed a step serves the next one exactly
            response = post(server, "/v1/completions", {"prompt": PROMPTS[0], **greedy, **fail})
            assert_error_shape(response, 500)
            assert response.json()["error"]["type"] == "InternalServerError", response.text
            assert "engine step" in response.json()["error"]["message"], response.text
            chat = post(server, "/v1/chat/completions", {"messages": CHAT, **greedy, **fail})
            assert_error_shape(chat, 500)
            legacy = post(server, "/generate/", {"prompts": [PROMPTS[0]], "max_tokens": MAX_TOKENS, "temperature": 0,
                                                "generation_kwargs": {"ignore_eos": True, **fail}})
            assert_error_shape(legacy, 500)
            with post(server, "/v1/completions", {"prompt": PROMPTS[0], **greedy, **fail, "stream": True},
                      stream=True) as stream:
                events = [json.loads(line[len("data: "):]) for line in stream.iter_lines(decode_unicode=True)
                          if line.startswith("data: {")]
            assert stream.status_code == 200 and events and events[-1]["error"]["code"] == 500, events
            body = post(server, "/v1/completions", {"prompt": PROMPTS, **greedy}).json()
            assert [c["token_ids"] for c in body["choices"]] == reference, dump(body)
        assert server.health()["status"] == "ok" and server.proc.poll() is None
    finally:
        server.stop()
