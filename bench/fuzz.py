"""Fuzz every served route; fail on any input-caused 5xx (issue 24).

    .venv/bin/python bench/fuzz.py [--seed N] [--cases N] [--stock] [--url URL]   # or: make fuzz ARGS=...
    .venv/bin/python bench/fuzz.py --stock --replay bench/results/fuzz.json       # that run's failing cases

Starts its own server on the tiny model (tests/support.py's `Server`, the tests' standard flags; --stock:
tests/conftest.py's stock_server) unless --url. Ours gets --weight-sync-timeout 5: a join no trainer answers
ends fast. Each valid request of `seeds()` is sent once, then --cases mutations of them: 1-3 per case, each a
field (of the body or of any object in it) set to a wrong type, an out-of-range or huge number, NaN/Infinity,
an odd string, null, nested garbage, a bad enum, or a bad value of its own (FIELDS); a field dropped; a nested
value replaced; an unknown field. Token budgets and n are brought down (MAX_TOKENS, 8) unless out of range
anyway. A share is raw HTTP (RAW_KINDS). After a 2xx (or no answer) on a weight-sync/RL route the update is
aborted, generation resumed, and /health and /is_paused must say the server serves, else the run stops.
Failures: a 5xx (but 501 where a valid body gets 501 too: the model lacks the route), an SSE error event of
code 5xx, an answer cut off ("200-cut": the app raised after it began). Prints counts by route and status,
writes them and each failing request to bench/results/fuzz.json; exit 1 on a failure or a dead server.
"""

import argparse
import base64
import collections
import copy
import json
import pathlib
import random
import re
import socket
import sys
import time
import urllib.parse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
from common import RESULTS, log, support  # noqa: E402

MAX_TOKENS = 4  # every generation case's token budget (brought down to it when a mutation raises it)
TIMEOUT_S = 60  # per case: only a hang reaches it
LONG = 3000  # a "long string": long enough to matter, short enough to stay fast
NAN, INF = float("nan"), float("inf")
CHAT = [{"role": "user", "content": "What is 2 + 2?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
NORM = {"name": "model.norm.weight", "dtype": "torch.float32", "shape": [128]}


def deep(n, leaf=1):
    for _ in range(n):
        leaf = [leaf]
    return leaf


def seeds(port):
    """[(method, path, body)]: valid requests of every route; `port`: a closed one, for weight-sync joins."""
    gen, m = {"model": "tiny", "max_tokens": MAX_TOKENS}, {"model": "tiny"}
    named = {"type": "function", "function": {"name": "get_weather"}}
    bodies = {
        "/v1/completions": [{**gen, "prompt": "Hello world", "temperature": 0},
                            {**gen, "prompt": [[1, 2, 3], [4, 5]], "logprobs": 2, "echo": True},
                            {**gen, "prompt": "def f(x):", "n": 2, "seed": 1, "temperature": 1.0, "stop": ["\n"],
                             "logit_bias": {"5": 1.5}, "stream": True, "stream_options": {"include_usage": True}},
                            {**gen, "prompt": "Pick:", "structured_outputs": {"choice": ["yes", "no"]},
                             "stop_token_ids": [7], "return_token_ids": True, "prompt_logprobs": 1, "top_k": 5}],
        "/v1/chat/completions": [
            {**gen, "messages": CHAT, "temperature": 0, "logprobs": True, "top_logprobs": 2},
            {**gen, "messages": [{"role": "system", "content": "Be brief."}, *CHAT], "tools": [TOOL], "stream": True},
            {**gen, "messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "a",
                                                                                                "schema": SCHEMA}}},
            {**gen, "messages": CHAT, "tools": [TOOL], "tool_choice": named, "seed": 3},
            {**gen, "messages": CHAT, "structured_outputs": {"regex": "[0-9]+"}, "logit_bias": {"5": -1}},
            {**gen, "messages": [*CHAT, {"role": "assistant", "content": "4"}], "continue_final_message": True,
             "add_generation_prompt": False, "chat_template_kwargs": {"enable_thinking": False}}],
        "/v1/responses": [{**m, "input": "Hello", "max_output_tokens": MAX_TOKENS},
                          {**m, "input": CHAT, "max_output_tokens": MAX_TOKENS, "temperature": 0.5,
                           "tools": [{"type": "function", "name": "f", "parameters": SCHEMA}]},
                          {**m, "input": "Hi", "max_output_tokens": MAX_TOKENS, "stream": True,
                           "text": {"format": {"type": "json_schema", "name": "a", "schema": SCHEMA}}}],
        "/v1/messages": [{**gen, "messages": CHAT, "system": "Be brief.", "temperature": 0, "stop_sequences": ["x"]},
                         {**gen, "messages": CHAT, "stream": True, "tool_choice": {"type": "auto"},
                          "tools": [{"name": "f", "description": "d", "input_schema": SCHEMA}]}],
        "/v1/messages/count_tokens": [{**m, "messages": CHAT}],
        "/v1/chat/completions/batch": [{**gen, "messages": [CHAT, CHAT]}],
        "/tokenize": [{**m, "prompt": "Hello world"}, {**m, "messages": CHAT}],
        "/detokenize": [{**m, "tokens": [1, 2, 3]}],
        "/invocations": [{**gen, "prompt": "Hi"}, {**gen, "messages": CHAT}],
        "/generative_scoring": [{**m, "query": "Is it", "items": [" yes", " no"], "label_token_ids": [5, 6]}],
        "/v1/systemone": [{**m, "state": "sunny", "questions": {"q": {"type": "boolean"}}}],
        "/v1/completions/render": [{**gen, "prompt": "Hi"}], "/v1/chat/completions/render": [{**gen, "messages": CHAT}],
        "/v1/responses/render": [{**m, "input": "Hi"}], "/v1/messages/render": [{**gen, "messages": CHAT}],
        "/v1/completions/derender": [{**m, "tokens": [1, 2]}],
        "/inference/v1/generate": [{**m, "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": MAX_TOKENS}}],
        "/inference/v1/abort_requests": [{"request_ids": ["x"]}], "/v1/responses/resp_123/cancel": [{}],
        "/generate/": [{"prompts": ["Hello", "Hi"], "max_tokens": MAX_TOKENS, "n": 2, "logprobs": 1},
                       {"prompts": ["Hi"], "max_tokens": MAX_TOKENS, "generation_kwargs": {"seed": 1, "stop": ["x"]},
                        "structured_outputs_regex": "[ab]+"}],
        "/chat/": [{"messages": [CHAT, CHAT], "max_tokens": MAX_TOKENS, "tools": [TOOL], "chat_template_kwargs": {}}],
        "/get_sequence_logprobs/": [{"sequences": [[1, 2, 3, 4], [5, 6]], "prompt_lengths": [2, 0],
                                     "top_logprobs": 2, "response_format": "binary"}],
        "/pause?mode=keep": [{}], "/pause?mode=abort&clear_cache=false": [{}], "/pause?mode=wait": [{}],
        "/resume": [{}], "/start_weight_update": [{}], "/finish_weight_update": [{"weight_version": "v1"}],
        "/update_weight_version": [{"new_version": "v2"}], "/shutdown_weight_transfer_engine": [{}],
        "/update_weights": [{"update_info": {"names": [NORM["name"]], "dtype_names": ["float32"], "shapes": [[128]]}}],
        "/init_weight_transfer_engine": [{"init_info": {"master_address": "127.0.0.1", "master_port": port,
                                                        "rank_offset": 1, "world_size": 2, "timeout_s": 5}}],
        "/init_communicator": [{"host": "127.0.0.1", "port": port, "world_size": 2}],
        "/update_named_param": [NORM],
        "/update_named_params": [{"params": [NORM], "layout": 2, "pause": "keep", "finish": False}],
        "/reset_prefix_cache": [{}], "/close_communicator": [{}], "/abort_weight_update": [{}]}
    gets = ["/v1/models", "/version", "/load", "/ping", "/health", "/get_world_size", "/get_world_size?include_dp=0",
            "/is_paused", "/weight_info", "/server_info", "/server_info?config_format=json", "/v1/responses/resp_123"]
    return [("POST", path, b) for path, bs in bodies.items() for b in bs] + [("GET", p, None) for p in gets]


WEIGHT_ROUTES = {"/pause", "/resume", "/start_weight_update", "/finish_weight_update", "/update_weight_version",
                 "/update_weights", "/init_weight_transfer_engine", "/shutdown_weight_transfer_engine",
                 "/init_communicator", "/update_named_param", "/update_named_params", "/reset_prefix_cache",
                 "/close_communicator", "/abort_weight_update"}
DEEP = {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/generate", "/chat",
        "/get_sequence_logprobs", "/tokenize"}  # picked 3x as often: their validation goes deepest
UNBOUNDED = {"/v1/chat/completions", "/v1/responses", "/v1/chat/completions/batch", "/invocations", "/chat"}
TOKEN_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens")
GENERIC = [None, True, False, 0, -1, 1, 2 ** 31, -2 ** 31 - 1, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 40, 0.5, -0.5,
           1e-320, 1e308, -1e308, NAN, INF, -INF, "NaN", "inf", "-Infinity", "1e999", "", " ", "x", "bogus",
           "A" * LONG, "\u0000", "\U0001f600", "<|im_start|>", "{{ 7 * 7 }}", [], {}, [None], [[]], ["x"], [1, 2],
           [-1], [10 ** 9], [2 ** 64], {"a": 1}, {"": None}, {"x": [{"y": NAN}]}, deep(50), deep(200)]
INTS = [0, -1, -2, 1, 8, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 30, -10 ** 30, 1.5, 1.0, True,
        "3", NAN, INF, -INF, "NaN"]
FLOATS = [NAN, INF, -INF, -1, 0, -0.0, 1e-320, 1e308, -1e308, 2.5, 100, 10 ** 400, "NaN", "inf", "0.5", True]
TOKEN_LISTS = [[-1], [10 ** 9], [2 ** 63], [2 ** 64], [], ["x"], [None], [1.5], list(range(2000)), [0] * 50]
FUNC = lambda **f: [{"type": "function", "function": {"name": "f", **f}}]  # noqa: E731
BAD_SCHEMAS = [{"type": "bogus"}, {"type": 5}, {"$ref": "#/nope"}, {"type": "string", "pattern": "("},
               {"type": "integer", "minimum": 3, "maximum": 1}, {"enum": []}, {"type": "array", "minItems": -1},
               {"anyOf": []}, {"type": "object", "properties": {"a": deep(30, {"type": "string"})}}, True, False,
               {"type": "object", "properties": {"a": {"type": "integer"}}, "required": [-0.5]}]
FIELDS = {  # field → bad values of its own (besides GENERIC); "add" mutations pick their field from here
    "logit_bias": [{"-1": 1.0}, {"abc": 1}, {"999999999": 1}, {"1": NAN}, {"1": INF}, {"1": -INF}, {"1": 1e308},
                   {"1": "x"}, {"1.5": 1}, {str(2 ** 64): 1}, {"": 1}, {"1": 101}, {" 1": 1}],
    "stop": ["", [""], ["a"] * 5, ["a" * LONG], [None], [1], ["\u0000"], "<|im_end|>"],
    "stop_token_ids": TOKEN_LISTS, "allowed_token_ids": TOKEN_LISTS, "logprob_token_ids": TOKEN_LISTS,
    "bad_words": [[""], ["x" * LONG], [" "], ["<|endoftext|>"], ["a"] * 200],
    "structured_outputs": [{"regex": "("}, {"regex": "a{99999}"}, {"json": "{"}, *({"json": s} for s in BAD_SCHEMAS),
                           {"grammar": "root ::= ("}, {"choice": []}, {"choice": [""]}, {"regex": "a", "choice": ["a"]},
                           {"structural_tag": "{"}, {"json_object": False}, {"whitespace_pattern": "("}, {},
                           {"grammar": ""}, {"regex": ""}, {"choice": ["a", None]}, {"json": {}, "regex": 5}, "regex",
                           ["json"], 1, True],
    "response_format": [{"type": "bogus"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {}},
                        *({"type": "json_schema", "json_schema": {"name": "x", "schema": s}} for s in BAD_SCHEMAS),
                        {"type": "json_object"}, {"type": "text"}, {"type": "structural_tag"},
                        {"type": "structural_tag", "format": {"type": "bogus"}},
                        {"type": "structural_tag", "structures": [{"begin": "<", "schema": {}, "end": ">"}],
                         "triggers": []}],
    "tools": [FUNC(parameters=s) for s in BAD_SCHEMAS] + [FUNC(name=""), FUNC(parameters=[]), [{"type": "function"}],
                                                          [{"type": "bogus", "function": {"name": "f"}}], [TOOL, TOOL]],
    "tool_choice": ["bogus", "required", "none", "auto", {"type": "function", "function": {"name": "nope"}},
                    {"type": "function"}, {"type": "function", "function": {}}, {"type": "tool", "name": "f"}],
    "messages": [[{"role": "bogus", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": [{"type": "bogus"}]}], [{"role": "tool", "content": "x"}],
                 [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                        "function": {"name": "f", "arguments": "{bad"}}]}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
                 [{"role": "user", "content": [{"type": "text"}]}], [{"role": "assistant", "content": "x"}],
                 [{"role": "user", "content": "x" * LONG}], [{"role": "system", "content": "x"}], [[CHAT]]],
    "prompt": ["", [], [[]], [-1], [10 ** 9], [2 ** 63], [[1, 2], [3]], [""], ["x", 1], "x" * LONG, [[1] * 600],
               [1.5], ["\u0000"], [[1, 2], "x"]],
    "input": ["", [], [{"role": "user", "content": ""}], [{"type": "bogus"}],
              [{"type": "function_call_output", "call_id": "x", "output": "y"}],
              [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]}]],
    "chat_template": ["{{", "{% for %}", "{{ raise_exception('x') }}", "{{ messages[99].content }}", "{{ 1/0 }}",
                      "{{ x.y.z }}", "{% for i in range(10**9) %}{% endfor %}", "", "x" * LONG],
    "chat_template_kwargs": [{"tools": 5}, {"add_generation_prompt": "x"}, {"messages": None},
                             {"chat_template": "{{"}, {"tokenize": True}, {"documents": [1]}],
    "generation_kwargs": [{"structured_outputs": "x"}, {"seed": 2 ** 64}, {"logit_bias": {"x": 1}}, {"bogus": 1},
                          {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, {"n": 0}],
    "mm_processor_kwargs": [{"x": 1}, {"size": -1}], "media_io_kwargs": [{"image": {"x": 1}}, {"x": 1}],
    "vllm_xargs": [{"a": [1, "x"]}, {"a": {"b": 1}}, {"": None}],
    "kv_transfer_params": [{"do_remote_prefill": True}, {"do_remote_decode": True}, {"x": 1}],
    "repetition_detection": [{}, {"max_pattern_size": -1}, {"min_count": 0}, {"max_pattern_size": 10 ** 9}],
    "stream_options": [{"include_usage": "x"}, {"continuous_usage_stats": True, "include_usage": True}],
    "truncation_side": ["middle"], "reasoning_effort": ["ultra"], "mm_payload": ["x"], "echo": [True],
    "text": [{"format": {"type": "json_schema", "name": "a", "schema": s}} for s in BAD_SCHEMAS],
    "cache_salt": ["", "x" * LONG], "request_id": ["", "x" * LONG, "a b"], "prompt_embeds": ["!!", "AAAA"],
    "system": [[{"type": "bogus"}], [{"type": "text"}], 5], "thinking": [{"type": "enabled", "budget_tokens": -1}],
    **dict.fromkeys(["n", "best_of", "logprobs", "top_logprobs", "prompt_logprobs", "seed", "top_k", "priority",
                     "truncate_prompt_tokens", "thinking_token_budget", "stream_interval", "max_tool_calls",
                     "routed_experts_prompt_start", *TOKEN_CAPS], INTS),
    **dict.fromkeys(["temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                     "length_penalty"], FLOATS)}
QUERY_VALUES = ["bogus", "", "1", "true", "-1", "NaN", "%00", "x" * 500, "keep", "abort", "wait"]
RAW_KINDS = ["malformed", "content-type", "huge", "deep", "chunked", "method", "header", "path"]
MALFORMED = [b"{", b"{\"prompt\": }", b"\xff\xfe{}", b"[]", b"null", b"123", b"\"str\"", b"{} trailing", b"",
             b"{\"a\": NaN, \"b\": -Infinity}", b"{\"prompt\": \"\\ud800\"}", b"{\"model\": \"tiny\",}", b"\x00" * 16,
             b"{\"a\": 1, \"a\": 2}", "{\"prompt\": \"é\"}".encode("latin-1"), b"{'prompt': 'x'}"]
CONTENT_TYPES = ["text/plain", "multipart/form-data; boundary=x", "", "json", "application/x-www-form-urlencoded",
                 "application/json; charset=utf-16", "application/json; charset=latin-1", "\x7f", "application/xml"]
BAD_HEADERS = [("Content-Length", "abc"), ("Content-Length", "-5"), ("Content-Length", "1"),
               ("Authorization", "Bearer \x01"), ("X-data-parallel-rank", "abc"), ("X-data-parallel-rank", "-1"),
               ("X-data-parallel-rank", "99"), ("X-Request-Id", "r" * 9000), ("X-Big", "b" * 70000),
               ("Content-Encoding", "gzip"), ("Transfer-Encoding", "gzip"), ("Expect", "100-continue"),
               ("X-Weight-Sync-Group", "\xff" * 10), ("Host", ""), ("Accept", "text/event-stream"),
               ("Connection", "Upgrade"), ("Upgrade", "websocket")]


def bad_value(rng, field):
    own = FIELDS.get(field, [])
    return copy.deepcopy(rng.choice(own if own and rng.random() < 0.5 else GENERIC))


def mutate(rng, body):
    """One mutation of a JSON object (in place) → it."""
    op = rng.choice(["set", "set", "set", "add", "drop", "nested", "unknown"]) if body else "add"
    if op == "set":
        key = rng.choice(sorted(body))
        body[key] = bad_value(rng, key)
    elif op == "drop":
        body.pop(rng.choice(sorted(body)))
    elif op == "add":  # into the body or any object in it (generation_kwargs, sampling_params, ...)
        objects, stack = [], [body]
        while stack:
            node = stack.pop()
            objects += [node] if isinstance(node, dict) else []
            stack += list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
        key = rng.choice(sorted(FIELDS))
        rng.choice(objects)[key] = bad_value(rng, key)
    elif op == "nested":  # walk down to a random nested value and replace it
        parent, key = body, rng.choice(sorted(body))
        for _ in range(6):
            node = parent[key]
            if not isinstance(node, (dict, list)) or not node:
                break
            parent, key = node, rng.choice(sorted(node)) if isinstance(node, dict) else rng.randrange(len(node))
        parent[key] = bad_value(rng, key if isinstance(key, str) else "")
    else:
        body[f"zz_{rng.randrange(100)}"] = bad_value(rng, "")
    return body


def bound(path, body):
    """Keep a case short: token budgets and n above what it needs come down (not values vLLM must refuse
    anyway); a generation route whose budget is missing or null (default: the whole context) gets
    MAX_TOKENS."""
    for key in TOKEN_CAPS:
        if type(body.get(key)) is int and MAX_TOKENS < body[key] <= 4096:
            body[key] = MAX_TOKENS
    caps = [key for key in TOKEN_CAPS[:3] if key in body]
    for key in caps:
        body[key] = MAX_TOKENS if body[key] is None else body[key]
    if not caps and path in UNBOUNDED:
        body["max_output_tokens" if path == "/v1/responses" else "max_tokens"] = MAX_TOKENS
    for key in ("n", "best_of"):
        if type(body.get(key)) is int and 8 < body[key] <= 2 ** 15:
            body[key] = 8
    if isinstance(info := body.get("init_info"), dict) and not (isinstance(info.get("timeout_s"), (int, float))
                                                                 and info["timeout_s"] <= 5):
        info["timeout_s"] = 5  # stock's wait for a trainer that never comes (ours: --weight-sync-timeout)
    return body


def case_of(kind, method, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    return {"kind": kind, "method": method, "path": path, "body": data,
            "headers": {"Content-Type": "application/json"} if headers is None else headers}


def json_case(rng, seed_cases):
    method, path, body = copy.deepcopy(rng.choices(seed_cases, [
        0.3 if m == "GET" else 3 if p.rstrip("/") in DEEP else 1 for m, p, _ in seed_cases])[0])
    if "?" in path and rng.random() < 0.4:  # a query parameter's value
        base, query = path.split("?", 1)
        params = dict(urllib.parse.parse_qsl(query))
        params[rng.choice(sorted(params))] = rng.choice(QUERY_VALUES)
        path = base + "?" + urllib.parse.urlencode(params)
    if body is not None:
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            body = mutate(rng, body)
        body = bound(path.split("?")[0].rstrip("/"), body)
    return case_of("json", method, path, body)


def raw_case(rng, seed_cases):
    kind = rng.choice(RAW_KINDS)
    method, path, body = rng.choice([c for c in seed_cases if c[0] == "POST"])
    case = case_of("raw/" + kind, method, path, bound(path.rstrip("/"), copy.deepcopy(body)))
    data, headers = case["body"], case["headers"]
    if kind == "malformed":
        case["body"] = rng.choice(MALFORMED)
    elif kind == "content-type":
        headers["Content-Type"] = rng.choice(CONTENT_TYPES)
        if rng.random() < 0.3:
            headers.pop("Content-Type")
    elif kind == "huge":  # a 1-8 MiB string in a field; or a declared length over the cap, nothing sent
        field = rng.choice(["prompt", "zz_pad", "model", "messages"])
        case["body"] = json.dumps({**json.loads(data), field: "y" * rng.choice([1 << 20, 3 << 20, 8 << 20])}).encode()
        if rng.random() < 0.3:
            headers["Content-Length"], case["body"] = str(rng.choice([1 << 40, 300 << 20])), b""
    elif kind == "deep":
        n = rng.choice([65, 100, 1000, 20000, 200000])
        case["body"] = rng.choice([b"[" * n + b"]" * n, b'{"a":' * n + b"1" + b"}" * n,
                                   data[:-1] + b', "zz": ' + b"[" * n + b"]" * n + b"}",
                                   data[:-1] + b', "prompt": ' + b'{"a":' * n + b"1" + b"}" * n + b"}"])
    elif kind == "chunked":
        headers["Transfer-Encoding"] = "chunked"
        cut = rng.randrange(1, max(2, len(data)))
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (data[:cut], data[cut:]) if p)
        case["body"] = rng.choice([chunks + b"0\r\n\r\n", chunks, b"zz\r\n" + data + b"\r\n0\r\n\r\n",
                                   b"%x\r\n%s\r\n0\r\n\r\n" % (len(data) + 50, data), chunks + b"0\r\nX-T: 1\r\n\r\n"])
        if rng.random() < 0.2:
            headers["Content-Length"] = str(len(case["body"]))
    elif kind == "method":
        case["method"] = rng.choice(["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO", "get"])
    elif kind == "header":
        name, value = rng.choice(BAD_HEADERS + [("Content-Length", str(len(data) + 9))])
        headers[name] = value
    else:
        case["path"] = rng.choice([path + "/../../health", path + "%00", "/" + "a" * 9000, "//v1//completions",
                                   path + "?x=" + "%ff" * 50, "/v1/responses/" + "r" * 5000, path.upper(),
                                   path + "#frag", "/%2e%2e/etc/passwd", "/v1/models/tiny", "*"])
    return case


def send(host, port, case, timeout=TIMEOUT_S):
    """One request over a raw socket, any bytes → (status or "no-answer"/"timeout", the answer's text)."""
    headers = {"Host": f"{host}:{port}", "Connection": "close", **case["headers"]}
    if not {"Content-Length", "Transfer-Encoding"} & set(headers) and (case["body"] or case["method"] == "POST"):
        headers["Content-Length"] = str(len(case["body"]))
    head = f"{case['method']} {case['path']} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    received = []
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(head.encode("latin-1", "replace") + b"\r\n" + case["body"])
            deadline, chunk = time.monotonic() + timeout, None
            if case["kind"].startswith("raw"):  # a body shorter than declared: end it after 2 s of silence
                sock.settimeout(2)
                try:
                    chunk = sock.recv(1 << 16)
                except socket.timeout:
                    sock.shutdown(socket.SHUT_WR)  # (not for JSON cases: vLLM cancels a request at EOF)
                sock.settimeout(timeout)
            chunk = sock.recv(1 << 16) if chunk is None else chunk
            while chunk:
                received.append(chunk)
                if time.monotonic() > deadline:
                    return "timeout", b"".join(received)[-2000:].decode("latin-1")
                chunk = sock.recv(1 << 16)
    except socket.timeout:
        return "timeout", b"".join(received)[-2000:].decode("latin-1")
    except OSError as exc:
        if not received:
            return "no-answer", f"{type(exc).__name__}: {exc}"
    text = b"".join(received).decode("utf-8", "replace")
    match = re.match(r"HTTP/1\.[01] (\d{3})", text)
    if not match:
        return "no-answer", text[:500]
    status, head = int(match.group(1)), text.split("\r\n\r\n", 1)[0].lower()
    if "transfer-encoding: chunked" in head and not text.endswith("0\r\n\r\n") and case["method"] != "HEAD":
        return f"{status}-cut", text[-2000:]
    if status == 200 and "text/event-stream" in head and (code := re.search(r'"code":\s*(5\d\d)', text)):
        return f"sse-{code.group(1)}", text[-2000:]
    return status, text[-2000:]


def recover(host, port, stock):
    """Close what a weight-sync/RL case opened → None once the server serves (/health 200, not paused), else
    why not."""
    for _ in range(30):
        for path in ("/finish_weight_update" if stock else "/abort_weight_update", "/resume"):
            send(host, port, case_of("json", "POST", path, {}))
        health, _ = send(host, port, case_of("json", "GET", "/health", None, {}))
        _, paused = send(host, port, case_of("json", "GET", "/is_paused", None, {}))
        if health == 200 and '"is_paused":false' in paused.replace(" ", ""):
            return None
        time.sleep(1)
    return f"/health {health}; /is_paused: {paused[-200:]}"


def campaign(host, port, cases, stock):
    """→ counts {route: {status: n}}, failures, why the server got stuck (None: it did not)."""
    counts, failures, unsupported, start = collections.defaultdict(collections.Counter), [], set(), time.monotonic()
    for i, case in enumerate(cases):
        status, text = send(host, port, case)
        path = case["path"].split("?")[0].rstrip("/") or "/"
        counts[case["kind"] if case["kind"].startswith("raw") else path][status] += 1
        if case["kind"] == "seed" and status == 501:
            unsupported.add(path)  # the model lacks this route: 501 whatever the body
        if case["kind"] == "seed" and not str(status).startswith("2"):
            log(f"valid seed {case['method']} {case['path']}: {status} {text[-160:]!r}")
        if str(status).startswith(("5", "sse-5")) and not (status == 501 and path in unsupported) \
                or str(status).endswith("-cut"):
            failures.append({"case": i, "status": status, "request": encode(case), "answer": text[-1500:]})
            log(f"case {i}: {status} on {case['method']} {case['path']}: {case['body'][:300]!r}")
        if status in ("no-answer", "timeout") or path in WEIGHT_ROUTES and str(status).startswith("2"):
            if stuck := recover(host, port, stock):
                log(f"case {i}: the server does not serve again after {case['method']} {case['path']}: {stuck}")
                return counts, failures, stuck
        if (i + 1) % 100 == 0:
            log(f"{i + 1}/{len(cases)} cases, {len(failures)} failures, {time.monotonic() - start:.0f} s")
    return counts, failures, None


def encode(case):
    """A case as JSON: a mutated body as itself, any other as base64 (and a preview)."""
    body = {"json": json.loads(case["body"]) if case["body"] else None} if case["kind"] in ("json", "seed") else \
        {"base64": base64.b64encode(case["body"]).decode(), "preview": case["body"][:300].decode("latin-1")}
    return {**{k: case[k] for k in ("kind", "method", "path", "headers")}, **body}


def decode(entry):
    body = entry["json"] if "json" in entry else base64.b64decode(entry["base64"])
    return case_of(entry["kind"], entry["method"], entry["path"], body, entry["headers"])


def table(counts):
    statuses = sorted({s for row in counts.values() for s in row}, key=str)
    width = max(len(r) for r in counts)
    lines = [f"{'route':<{width}} " + " ".join(f"{str(s):>9}" for s in statuses) + "     total"]
    lines += [f"{route:<{width}} " + " ".join(f"{counts[route].get(s, '') or '':>9}" for s in statuses)
              + f" {sum(counts[route].values()):>9}" for route in sorted(counts)]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=1200, help="mutated cases, besides one per valid seed")
    parser.add_argument("--stock", action="store_true", help="stock `vllm serve` (dev mode, the tests' flags)")
    parser.add_argument("--url", help="a running server to fuzz instead of starting one")
    parser.add_argument("--script", help="another copy of vllm_serve.py to start (e.g. an earlier commit's)")
    parser.add_argument("--replay", help="a fuzz.json: send its failing cases only")
    parser.add_argument("--raw-share", type=float, default=0.12, help="share of raw HTTP cases")
    parser.add_argument("--out", default=str(RESULTS / "fuzz.json"))
    args = parser.parse_args()
    server, url = None, urllib.parse.urlparse(args.url or "")
    host, port = url.hostname, url.port or 80
    if not args.url:
        extra, env = ["--weight-sync-timeout", "5"], {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        if args.stock:  # tests/conftest.py's stock_server
            extra = ["--worker-extension-cls", "vllm_serve.WeightSyncWorkerExtension", "--weight-transfer-config",
                     '{"backend": "gloo"}']
            env.update(VLLM_SERVER_DEV_MODE="1", PYTHONPATH=str(common.ROOT))
        server = support.Server(common.model_path("tiny"), *support.SERVER_ARGS, "--enable-auto-tool-choice",
                                "--tool-call-parser", "hermes", "--trust-request-chat-template", *extra,
                                kind="stock" if args.stock else "ours", log_dir=RESULTS, env=env, script=args.script,
                                name="fuzz-" + ("stock" if args.stock else "ours"))
        log(f"starting {server.kind} server, log {server.log_path}")
        server.start()
        host, port = "127.0.0.1", server.port
    try:
        if args.replay:
            cases = [decode(f["request"]) for f in json.loads(pathlib.Path(args.replay).read_text())["failures"]]
        else:
            rng, seed_cases = random.Random(args.seed), seeds(support.free_port())
            cases = [case_of("seed", *c) for c in seed_cases] + [
                raw_case(rng, seed_cases) if rng.random() < args.raw_share else json_case(rng, seed_cases)
                for _ in range(args.cases)]
        log(f"{len(cases)} cases against {host}:{port}")
        counts, failures, stuck = campaign(host, port, cases, args.stock)
        health, _ = send(host, port, case_of("json", "GET", "/health", None, {}))
        alive = health == 200 and (server is None or server.proc.poll() is None)
    finally:
        if server is not None:
            log(f"server stopped (exit {server.stop()}); left behind: {server.left_behind}")
    total = sum(counts.values(), collections.Counter())
    print(f"{table(counts)}\n\n{sum(total.values())} cases; by status: {dict(sorted(total.items(), key=str))}\n"
          f"failures: {len(failures)}; /health after the campaign: {health}; stuck: {stuck}")
    for f in failures:
        r = f["request"]
        print(f"  case {f['case']}: {f['status']} {r['method']} {r['path']} "
              f"{json.dumps(r.get('json', r.get('preview')))[:400]}")
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({
        "seed": args.seed, "cases": len(cases), "target": args.url or ("stock" if args.stock else "ours"),
        "replay": args.replay, "healthy_after": alive, "stuck": stuck, "failures": failures,
        "counts": {r: {str(s): n for s, n in row.items()} for r, row in counts.items()}}, indent=1))
    log(f"wrote {args.out}")
    sys.exit(1 if failures or not alive or stuck else 0)


if __name__ == "__main__":
    main()
