"""The same requests to stock `vllm serve` and to vllm_serve.py, on the same tiny model with the same flags:
every answer must match in status, JSON keys and types, and values (greedy text, token ids, logprobs to
1e-3). Only the values of `id`, `created`, `created_at` (timestamps and random ids) and
`system_fingerprint` may differ. Streams are compared reassembled (chunk boundaries depend on timing,
in stock too), plus the set of chunk shapes. On failure every difference is printed."""

import json

import pytest
import requests

import support
from support import HANG_S

EXEMPT = {"id", "created", "created_at", "system_fingerprint"}
TOLERANCE = 1e-3
GREEDY = {"temperature": 0, "max_tokens": 8}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}
BARE = {"type": "function", "function": {"name": "ping"}}  # no description, no parameters
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                          "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "What is 2 + 2?"}]


def forced_call(name, arguments):
    """A structured_outputs regex that makes the random tiny model emit exactly one hermes tool call."""
    text = f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'
    return "".join("\\" + ch if ch in r".^$*+?{}[]\|()" else ch for ch in text)


def completions():
    prompts = support.PROMPTS
    cases = [{"prompt": p, **GREEDY} for p in prompts[:4]]
    cases += [
        {"prompt": prompts[:3], **GREEDY, "return_token_ids": True},
        {"prompt": [996, 333, 294, 278], **GREEDY, "logprobs": 3},
        {"prompt": prompts[1], **GREEDY, "logprobs": 2, "return_tokens_as_token_ids": True},
        {"prompt": prompts[2], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0},  # lm-eval scoring
        {"prompt": prompts[3], **GREEDY, "echo": True},
        {"prompt": prompts[0], **GREEDY, "prompt_logprobs": 2},
        {"prompt": prompts[0], "max_tokens": 100000, "temperature": 0},  # clamped to the room left
        {"prompt": prompts[4], "temperature": 0, "max_tokens": 16, "stop": [" the"], "ignore_eos": True},
        {"prompt": prompts[5], **GREEDY, "n": 2, "ignore_eos": True},
        {"prompt": prompts[6], **GREEDY, "min_tokens": 6, "top_k": 5, "repetition_penalty": 1.2},
        {"prompt": prompts[7], **GREEDY, "seed": 7, "temperature": 0.8, "top_p": 0.9},
        {"prompt": prompts[1], **GREEDY, "stop_token_ids": [869], "include_stop_str_in_output": True},
        {"prompt": prompts[2], **GREEDY, "allowed_token_ids": [10, 20, 30, 40]},
        {"prompt": prompts[3], **GREEDY, "structured_outputs": {"choice": ["yes", "no"]}},
        {"prompt": prompts[0], **GREEDY, "logprobs": 0, "echo": True, "return_token_ids": True},
    ]
    return [("POST", "/v1/completions", {"model": "tiny", **c}) for c in cases]


def chats():
    cases = [
        {"messages": USER, **GREEDY},
        {"messages": [{"role": "system", "content": "Be brief."}, *USER], **GREEDY, "return_token_ids": True},
        {"messages": [{"role": "developer", "content": "Answer in French."}, *USER], **GREEDY,
         "return_token_ids": True},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Be kind."},
                      *USER], **GREEDY, "return_token_ids": True},
        {"messages": USER, **GREEDY, "logprobs": True, "top_logprobs": 3},
        {"messages": USER, **GREEDY, "chat_template_kwargs": {"add_generation_prompt": False},
         "return_token_ids": True},
        {"messages": [*USER, {"role": "assistant", "content": "It is"}], **GREEDY, "add_generation_prompt": False,
         "continue_final_message": True, "return_token_ids": True},
        {"messages": USER, **GREEDY, "echo": True},
        {"messages": USER, **GREEDY, "chat_template": "{{ messages[0].content }}", "return_token_ids": True},  # (opt-in)
        {"messages": USER, "temperature": 0, "max_completion_tokens": 5, "n": 2},
        {"messages": USER, "temperature": 0, "max_tokens": 100000},  # clamped
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                   {"type": "text", "text": "there"}]}], **GREEDY},
        {"messages": USER, **GREEDY, "stop": ["a"], "include_stop_str_in_output": True},
        {"messages": USER, **GREEDY, "response_format": {"type": "json_object"}, "max_tokens": 16},
        {"messages": USER, **GREEDY, "structured_outputs": {"choice": ["four", "five"]}},
        {"messages": [{"role": "system", "content": "You add."}, *USER, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "And 3 + 3?"}], **GREEDY, "return_token_ids": True},
    ]
    return [("POST", "/v1/chat/completions", {"model": "tiny", **c}) for c in cases]


def tools():
    call = {"structured_outputs": {"regex": forced_call("get_weather", {"city": "Paris"})}}
    cases = [
        {"tools": [WEATHER], "tool_choice": "none"},
        {"tools": [WEATHER], "tool_choice": "auto"},
        {"tools": [WEATHER], "tool_choice": "auto", **call, "max_tokens": 64},
        {"tools": [WEATHER, CLOCK], "tool_choice": "required", "max_tokens": 64},
        {"tools": [WEATHER, CLOCK], "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 64},
        {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 6},  # truncated forced call
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
         "max_tokens": 64},
        {"tools": [WEATHER, CLOCK], "tool_choice": {"type": "function", "function": {"name": "get_time"}},
         "max_tokens": 32},
        {"tools": [BARE], "tool_choice": "auto", "return_token_ids": True},
        {"tools": [BARE, WEATHER], "tool_choice": "none", "return_token_ids": True},
        {"tools": [WEATHER], "tool_choice": "auto", **call, "max_tokens": 64, "stream": True},
        {"tools": [WEATHER, CLOCK], "tool_choice": "required", "max_tokens": 64, "stream": True},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
         "max_tokens": 64, "stream": True},
        {"tools": [WEATHER], "tool_choice": "auto", "messages": [
            *USER, {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], "return_token_ids": True},
    ]
    return [("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, "temperature": 0, "max_tokens": 8,
                                              **c}) for c in cases]


def streams():
    usage = {"stream_options": {"include_usage": True}}
    return [("POST", "/v1/completions", {"model": "tiny", "prompt": p, **GREEDY, "stream": True})
            for p in support.PROMPTS[:3]] + [
        ("POST", "/v1/completions", {"model": "tiny", "prompt": support.PROMPTS[3], **GREEDY, "stream": True,
                                     "logprobs": 2, **usage}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": support.PROMPTS[:2], **GREEDY, "stream": True,
                                     "return_token_ids": True}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, **GREEDY, "stream": True}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, **GREEDY, "stream": True, **usage}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, **GREEDY, "stream": True,
                                          "logprobs": True, "top_logprobs": 2}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, "temperature": 0, "max_tokens": 4,
                                          "n": 2, "stream": True}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, **GREEDY, "stream": True,
                                          "return_token_ids": True}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, **GREEDY, "stream": True,
                                          "stream_options": {"include_usage": True,
                                                             "continuous_usage_stats": True}}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": support.PROMPTS[4], **GREEDY, "stream": True,
                                     "echo": True}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": support.PROMPTS[5], "temperature": 0,
                                     "max_tokens": 12, "stream": True, "stop": [" the"]}),
    ]


def responses():
    cases = [
        {"input": "What is 2 + 2?"},
        {"input": "Hello", "instructions": "Be brief."},
        {"input": [{"role": "user", "content": "Hi"}]},
        {"input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"input": "Tell me a joke", "max_output_tokens": 12},
        {"input": "What is 2 + 2?", "stream": True},
        {"input": "Hello", "stream": True, "max_output_tokens": 5},
        {"input": "Weather in Paris?", "tools": [{"type": "function", "name": "get_weather",
                                                   "parameters": WEATHER["function"]["parameters"]}]},
        {"input": "Hi", "top_p": 0.5},
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi there"}]}]},
        {"input": "Hello", "text": {"format": {"type": "json_object"}}, "max_output_tokens": 12},
        {"input": "Weather in Paris?", "stream": True, "tools": [
            {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]},
    ]
    return [("POST", "/v1/responses", {"model": "tiny", "temperature": 0, "max_output_tokens": 8, **c})
            for c in cases]


def tokenization():
    return [
        ("POST", "/tokenize", {"model": "tiny", "prompt": "Hello world"}),
        ("POST", "/tokenize", {"model": "tiny", "prompt": "Hello world", "add_special_tokens": False}),
        ("POST", "/tokenize", {"model": "tiny", "prompt": "def f(x):", "return_token_strs": True}),
        ("POST", "/tokenize", {"model": "tiny", "messages": USER}),
        ("POST", "/tokenize", {"model": "tiny", "messages": USER, "add_generation_prompt": False}),
        ("POST", "/tokenize", {"model": "tiny", "messages": USER, "tools": [WEATHER]}),
        ("POST", "/detokenize", {"model": "tiny", "tokens": [996, 333, 294, 278]}),
        ("POST", "/detokenize", {"model": "tiny", "tokens": [1, 433, 84, 201]}),
        ("POST", "/detokenize", {"model": "tiny", "tokens": []}),
        ("POST", "/detokenize", {"model": "tiny", "tokens": [10 ** 6]}),
        ("GET", "/v1/models", None),
        ("GET", "/version", None),
        ("POST", "/tokenize", {"model": "tiny", "prompt": "<|im_start|>user\nHi<|im_end|>"}),
    ]


def bad_input():
    return [
        ("POST", "/v1/completions", b"{not json"),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}),
        ("POST", "/v1/completions", {"model": "gpt-17", "prompt": "x"}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x " * 600, "max_tokens": 4}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": [10 ** 9], "max_tokens": 4}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "("}}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": []}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": "hi"}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, "tools": [WEATHER],
                                          "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]}),
        ("POST", "/v1/responses", {"model": "tiny", "input": 5}),
        ("POST", "/tokenize", {"model": "tiny"}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": -5}),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, "top_logprobs": 3}),  # without logprobs
        ("POST", "/v1/completions", {"model": "tiny", "prompt": ""}),
    ]


CASES = {"completions": completions(), "chat": chats(), "tools": tools(), "streams": streams(),
         "responses": responses(), "tokenize": tokenization(), "bad input": bad_input()}


@pytest.fixture(scope="module")
def servers(stock_server, server):
    """Stock vLLM and ours (conftest.py), the same tiny model and flags, both in vLLM's default multiprocess
    layout."""
    return stock_server, server


def send(server, method, path, body):
    kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    response = requests.request(method, server.url + path, timeout=HANG_S, **kwargs)
    streamed = response.headers.get("content-type", "").startswith("text/event-stream")
    return response.status_code, (events(response.text) if streamed else response.json())


def events(text):
    """SSE text → its data payloads (JSON objects, or the "[DONE]" marker), in order."""
    payloads = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[len("data:"):].strip()
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def reassembled(payloads):
    """A stream as values that do not depend on where chunk boundaries fall: per choice, the text, content,
    reasoning, tool-call names and arguments, token ids and logprobs concatenated, the last finish reason;
    plus the last usage (continuous usage stats put one in every chunk: their count is the chunk count), the
    event types (responses), the [DONE] marker, and every key path any chunk has (not whole-chunk shapes: a
    server that lags merges deltas, so a tool call's name and arguments may come in one chunk or two)."""
    choices, other, shapes, usage = {}, [], set(), None
    for payload in payloads:
        if payload == "[DONE]":
            other.append("[DONE]")
            continue
        shapes.update(key_paths(payload))
        if "type" in payload:  # /v1/responses events: their kinds in order (a run of deltas counts once)
            if not other or other[-1] != payload["type"]:
                other.append(payload["type"])
            if payload["type"] == "response.completed":  # and the final response, the whole text in it
                other.append(payload["response"])
            continue
        usage = payload.get("usage") or usage
        for choice in payload.get("choices", []):
            merged = choices.setdefault(choice["index"], {})
            delta = choice.get("delta") or {}
            for key, value in [("text", choice.get("text")), ("content", delta.get("content")),
                               ("reasoning", delta.get("reasoning")), ("token_ids", choice.get("token_ids"))]:
                if value:
                    merged[key] = merged.get(key, type(value)()) + value
            for call in delta.get("tool_calls") or []:
                entry = merged.setdefault("tool_calls", {}).setdefault(str(call["index"]), {"name": "", "arguments": ""})
                function = call.get("function") or {}
                entry["name"] += function.get("name") or ""
                entry["arguments"] += function.get("arguments") or ""
            logprobs = choice.get("logprobs")
            if logprobs:
                for key, value in logprobs.items():
                    if isinstance(value, list):
                        merged.setdefault("logprobs", {}).setdefault(key, []).extend(value)
            if choice.get("finish_reason") is not None:
                merged["finish_reason"] = choice["finish_reason"]
    return {"choices": choices, "other": other, "usage": usage, "shapes": sorted(shapes)}


def key_paths(value, path="$"):
    """The key paths in a JSON value, lists as `[]`: {"a": [{"b": 1}]} → {"$", "$.a", "$.a[]", "$.a[].b"}."""
    found = {path}
    if isinstance(value, dict):
        for key, item in value.items():
            found |= key_paths(item, f"{path}.{key}")
    elif isinstance(value, list):
        for item in value:
            found |= key_paths(item, f"{path}[]")
    return found


def differences(stock, ours, path="$"):
    """Every place where `ours` differs from `stock`, as (path, stock's, ours)."""
    if isinstance(stock, dict) and isinstance(ours, dict):
        found = [(f"{path}.{k}", stock.get(k, "<missing>"), ours.get(k, "<missing>"))
                 for k in sorted(set(stock) ^ set(ours))]
        for key in sorted(set(stock) & set(ours)):
            if key in EXEMPT:
                if type(stock[key]) is not type(ours[key]):
                    found.append((f"{path}.{key}", type(stock[key]).__name__, type(ours[key]).__name__))
                continue
            found += differences(stock[key], ours[key], f"{path}.{key}")
        return found
    if isinstance(stock, list) and isinstance(ours, list):
        if len(stock) != len(ours):
            return [(f"{path}[len]", len(stock), len(ours))]
        return [d for i, (a, b) in enumerate(zip(stock, ours)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(stock, float) and isinstance(ours, float):
        return [] if abs(stock - ours) <= TOLERANCE else [(path, stock, ours)]
    if type(stock) is not type(ours) or stock != ours:
        return [(path, stock, ours)]
    return []


def test_ours_answers_exactly_as_stock_vllm(servers, capsys):
    stock, ours = servers
    assert sum(len(cases) for cases in CASES.values()) >= 100
    assert all(len(cases) >= 10 for cases in CASES.values()), {k: len(v) for k, v in CASES.items()}
    report, failures = {}, []
    for category, cases in CASES.items():
        for method, path, body in cases:
            (stock_status, stock_body), (our_status, our_body) = (send(s, method, path, body) for s in servers)
            if isinstance(stock_body, list):
                stock_body, our_body = reassembled(stock_body), reassembled(our_body)
            found = differences({"status": stock_status, "body": stock_body}, {"status": our_status, "body": our_body})
            report.setdefault(category, [0, 0])[0] += 1
            report[category][1] += bool(found)
            if found:
                failures.append((category, path, body if isinstance(body, dict) else repr(body), found[:8]))
    with capsys.disabled():
        print("\n  differential (requests, differing):", {k: tuple(v) for k, v in report.items()}, flush=True)
    assert not failures, "\n".join(json.dumps(f, default=str)[:1500] for f in failures)
