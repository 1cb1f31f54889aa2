"""The OpenAI routes of vllm_serve.py against real vLLM on CPU: values compared to in-process vLLM."""

import base64
import concurrent.futures
import io
import json
import socket

import openai
import pytest
import requests

from support import (GREEDY, HANG_S, PROMPTS, WEATHER_TOOL, chat_prompt_ids, dump, forced_tool_call_regex,
                     greedy_ids, reference, unending)

PROMPTS = PROMPTS[:4]


def sdk(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)


def test_models(server):
    body = server.get("/v1/models").json()
    (card,) = body["data"]
    assert body["object"] == "list"
    assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 512
    assert isinstance(card["created"], int) and card["owned_by"]


def test_completions_greedy_equals_llm_generate(server, models, reference_llm):
    ref = reference(reference_llm(models["seed0"]), PROMPTS, temperature=0, max_tokens=16, ignore_eos=True)
    body = server.post("/v1/completions", {"model": "tiny", "prompt": PROMPTS, "max_tokens": 16, **GREEDY}).json()
    assert [c["token_ids"] for c in body["choices"]] == [list(r.outputs[0].token_ids) for r in ref], dump(body)
    assert [c["prompt_token_ids"] for c in body["choices"]] == [list(r.prompt_token_ids) for r in ref]
    assert [c["text"] for c in body["choices"]] == [r.outputs[0].text for r in ref]
    assert body["usage"]["completion_tokens"] == 16 * len(PROMPTS)
    # the same through token-id prompts and through the official SDK
    ids = [list(r.prompt_token_ids) for r in ref]
    result = sdk(server).completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.token_ids for c in result.choices] == [list(r.outputs[0].token_ids) for r in ref]
    single = server.post("/v1/completions", {"prompt": ids[1], "max_tokens": 16, **GREEDY}).json()
    assert single["choices"][0]["token_ids"] == list(ref[1].outputs[0].token_ids)


def test_chat_prompt_ids_and_tokens_match(server, models, reference_llm, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    expected_prompt = chat_prompt_ids(tokenizer, messages)
    (ref,) = reference(reference_llm(models["seed0"]), [expected_prompt], temperature=0, max_tokens=12,
                                ignore_eos=True)
    result = sdk(server).chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 extra_body={"ignore_eos": True, "return_token_ids": True})
    assert result.prompt_token_ids == expected_prompt
    assert result.choices[0].token_ids == list(ref.outputs[0].token_ids)
    assert result.choices[0].message.content == ref.outputs[0].text
    assert result.usage.prompt_tokens == len(expected_prompt) and result.usage.completion_tokens == 12


def test_logprobs_close_to_in_process(server, models, reference_llm, tokenizer):
    (ref,) = reference(reference_llm(models["seed0"]), [PROMPTS[1]], temperature=0, max_tokens=6,
                                ignore_eos=True, logprobs=3)
    body = server.post("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 6, "logprobs": 3,
                                           "return_tokens_as_token_ids": True, **GREEDY}).json()
    lp = body["choices"][0]["logprobs"]
    for pos, (token_id, ref_pos) in enumerate(zip(ref.outputs[0].token_ids, ref.outputs[0].logprobs)):
        assert lp["tokens"][pos] == f"token_id:{token_id}"
        assert lp["token_logprobs"][pos] == pytest.approx(ref_pos[token_id].logprob, abs=1e-4)
        top = {int(k.split(":")[1]): v for k, v in lp["top_logprobs"][pos].items()}
        assert top == pytest.approx({tid: x.logprob for tid, x in ref_pos.items()}, abs=1e-4)
    # chat: top_logprobs per position, ids recoverable
    messages = [{"role": "user", "content": "Hello"}]
    (ref_chat,) = reference(reference_llm(models["seed0"]), [chat_prompt_ids(tokenizer, messages)],
                                     temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
    chat = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 4, "logprobs": True,
                                                "top_logprobs": 2, "return_tokens_as_token_ids": True, **GREEDY}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    for entry, token_id, ref_pos in zip(content, ref_chat.outputs[0].token_ids, ref_chat.outputs[0].logprobs):
        assert entry["token"] == f"token_id:{token_id}"
        assert entry["logprob"] == pytest.approx(ref_pos[token_id].logprob, abs=1e-4)
        assert len(entry["top_logprobs"]) == 2


def test_n_seed_and_stop_behave_as_vllm(server, models, reference_llm):
    llm = reference_llm(models["seed0"])
    (ref,) = reference(llm, [PROMPTS[0]], n=3, temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    body = server.post("/v1/completions", {"prompt": PROMPTS[0], "n": 3, "temperature": 1.0, "seed": 1234,
                                           "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}).json()
    assert sorted(c["token_ids"] for c in body["choices"]) == sorted(list(o.token_ids) for o in ref.outputs)
    assert len({tuple(c["token_ids"]) for c in body["choices"]}) > 1  # n samples, not one repeated
    # stop: cut the greedy text at a substring it really contains
    (greedy,) = reference(llm, [PROMPTS[0]], temperature=0, max_tokens=16, ignore_eos=True)
    stop = greedy.outputs[0].text[4:7]
    (ref_stop,) = reference(llm, [PROMPTS[0]], temperature=0, max_tokens=16, stop=[stop])
    body = server.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0,
                                           "stop": [stop]}).json()
    choice = body["choices"][0]
    assert choice["text"] == ref_stop.outputs[0].text and stop not in choice["text"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop


def test_64_concurrent_sdk_chats_are_not_cross_wired(server, models, tokenizer):
    client = sdk(server)
    conversations = [[{"role": "user", "content": f"Request number {i}: say {i * 7}"}] for i in range(64)]

    def one(messages):
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"return_token_ids": True})

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, conversations))
    for messages, result in zip(conversations, results):
        assert result.prompt_token_ids == chat_prompt_ids(tokenizer, messages)
        assert result.choices[0].finish_reason in ("length", "stop")


@pytest.fixture
def running(long_server):
    """An unending request in the engine; its connection is closed at the end, which aborts it, and /health
    must then show nothing running."""
    data = json.dumps(unending()).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    long_server.wait_for_health(lambda h: h["requests_running"] == 0)
    with socket.create_connection(("127.0.0.1", long_server.port), timeout=HANG_S) as sock:
        sock.sendall(head + data)
        long_server.wait_for_health(lambda h: h["requests_running"] == 1)
        yield long_server
    long_server.wait_for_health(lambda h: h["requests_running"] == 0)


def test_health_answers_while_a_batch_generates(running):
    """/health is served by the event loop, never queued behind the engine: each probe is answered while
    the unending request runs (a blocked loop would hang the probe until the hang guard)."""
    for _ in range(5):
        response = running.get("/health", timeout=HANG_S)
        assert response.status_code == 200 and response.json()["requests_running"] == 1, response.text


@pytest.fixture(scope="module")
def short_ids(models, reference_llm):
    """The reference for the short request, computed before the unending one starts: an in-process engine
    beside a server decoding flat out fights it for the cores (one run took 221 s computing it there)."""
    return greedy_ids(reference_llm(models["seed0"]), [PROMPTS[3]], 4)[0]


def test_a_short_request_joins_a_running_generation(short_ids, running):
    """Continuous batching: a request that arrives while an unending one generates is answered, with exactly
    the greedy ids it gets alone, while the unending one keeps running (a static batcher would make it wait
    for the whole unending request: the hang guard)."""
    short = running.post("/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 4, **GREEDY}).json()
    assert short["choices"][0]["token_ids"] == short_ids, dump(short)
    assert running.health()["requests_running"] == 1  # the unending one is still generating


def test_streaming_reassembles_the_same_text(server):
    client = sdk(server)
    messages = [{"role": "user", "content": "Tell me about Paris"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # completions
    full = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True) if c.choices)
    assert streamed == full.choices[0].text
    raw = requests.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True},
                        timeout=60).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_tool_call_auto_is_parsed_by_hermes(server):
    regex = forced_tool_call_regex("get_weather", {"city": "Paris"})
    result = sdk(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
        tool_choice="auto", max_tokens=64, temperature=0, extra_body={"structured_outputs": {"regex": regex}})
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id and call.type == "function"


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_named_and_required_tool_choice_give_valid_arguments(server, tool_choice):
    result = sdk(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL],
        tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=120, temperature=0)
    choice = result.choices[0]
    assert choice.message.tool_calls, choice
    assert choice.finish_reason == ("tool_calls" if tool_choice == "required" else "stop")
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    json.loads(call.function.arguments)  # JSON, whatever a random model puts in it (test_differential: as stock)


def test_tools_render_into_the_prompt_and_mix_in_one_batch(server, models, tokenizer):
    plain = [{"role": "user", "content": "Hi"}]
    bodies = [{"messages": plain, "max_tokens": 4, "return_token_ids": True},
              {"messages": plain, "tools": [WEATHER_TOOL], "max_tokens": 4, "return_token_ids": True},
              {"messages": plain, "max_tokens": 4, "return_token_ids": True, "temperature": 0.5, "seed": 3,
               "chat_template": "{% for m in messages %}{{ m.content }}|{% endfor %}"}]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda b: server.post("/v1/chat/completions", b).json(), bodies))
    assert results[0]["prompt_token_ids"] == chat_prompt_ids(tokenizer, plain)
    assert results[1]["prompt_token_ids"] == chat_prompt_ids(tokenizer, plain, tools=[WEATHER_TOOL])
    assert results[2]["prompt_token_ids"] == chat_prompt_ids(tokenizer, plain,
                                                             chat_template=bodies[2]["chat_template"])


def test_legacy_generate_and_chat_shapes(server, models, reference_llm, tokenizer):
    ref = reference(reference_llm(models["seed0"]), PROMPTS[:2], temperature=0, max_tokens=8,
                             ignore_eos=True, logprobs=2)
    for path in ("/generate/", "/generate"):
        body = server.post(path, {"prompts": PROMPTS[:2], "max_tokens": 8, "temperature": 0, "logprobs": 2,
                                  "generation_kwargs": {"ignore_eos": True}}).json()
        assert body["prompt_ids"] == [list(r.prompt_token_ids) for r in ref]
        assert body["completion_ids"] == [list(r.outputs[0].token_ids) for r in ref]
        for ids, lps, r in zip(body["logprob_token_ids"], body["logprobs"], ref):
            for pos_ids, pos_lps, ref_pos in zip(ids, lps, r.outputs[0].logprobs):
                ranked = sorted(ref_pos.items(), key=lambda kv: kv[1].rank)
                assert pos_ids == [tid for tid, _ in ranked]
                assert pos_lps == pytest.approx([x.logprob for _, x in ranked], abs=1e-4)
    body = server.post("/generate/", {"prompts": PROMPTS[:2], "n": 2, "max_tokens": 3, "logprobs": None}).json()
    assert len(body["prompt_ids"]) == 2 and len(body["completion_ids"]) == 4
    assert body["logprobs"] is None and body["logprob_token_ids"] is None
    chat = server.post("/chat/", {"messages": [[{"role": "user", "content": "Hi"}],
                                               [{"role": "user", "content": "Bye"}]], "max_tokens": 3,
                                  "generation_kwargs": {"ignore_eos": True}}).json()  # sampled: EOS may come
    assert chat["prompt_ids"][1] == chat_prompt_ids(tokenizer, [{"role": "user", "content": "Bye"}])
    assert [len(c) for c in chat["completion_ids"]] == [3, 3] and len(chat["logprobs"][0][0]) == 1


def test_legacy_sequence_logprobs(server, models, reference_llm):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    seq = [996, 333, 294, 278, 78, 70, 12, 13]
    (ref,) = reference_llm(models["seed0"]).generate([TokensPrompt(prompt_token_ids=seq)],
                                                     SamplingParams(max_tokens=1, prompt_logprobs=3), use_tqdm=False)
    body = server.post("/get_sequence_logprobs/", {"sequences": [seq], "prompt_lengths": [5], "top_logprobs": 3,
                                                   "response_format": "json"}).json()
    assert len(body["logprobs"][0]) == 3  # positions 5, 6, 7
    for row_ids, row_lps, pos in zip(body["logprob_token_ids"][0], body["logprobs"][0], ref.prompt_logprobs[5:]):
        ranked = [kv for kv in sorted(pos.items(), key=lambda kv: kv[1].rank) if kv[1].rank <= 3]
        assert row_ids == [tid for tid, _ in ranked]
        assert row_lps == pytest.approx([x.logprob for _, x in ranked], abs=1e-4)
    binary = server.post("/get_sequence_logprobs", {"sequences": [seq], "prompt_lengths": [5], "top_logprobs": 3,
                                                    "response_format": "binary"}).json()
    assert binary["shape"] == [1, 3, 3] and binary["completion_lengths"] == [3]
    import numpy as np

    actual = np.frombuffer(base64.b64decode(binary["actual_logprobs_b64"]), dtype=np.float32)
    assert actual.tolist() == pytest.approx([ref.prompt_logprobs[i][seq[i]].logprob for i in (5, 6, 7)], abs=1e-4)


def png_data_uri():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BAD_COMPLETIONS = [  # (body, the `param` stock's answer names); tests/test_differential.py compares the rest
    ({"prompt": "", "max_tokens": 4}, "prompt"),
    ({"prompt": "x", "max_tokens": 4, "structured_outputs": "x"}, "structured_outputs"),  # stock: 500
    ({"prompt": [], "max_tokens": 4}, None),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 0}, None),
    ({"prompt": "x", "max_tokens": "many"}, "body.max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "body.temperature"),
    ({"prompt": "x " * 600, "max_tokens": 4}, "input_tokens"),
    ({"prompt": "x", "max_tokens": 10 ** 6}, "max_tokens"),
    ({"prompt": [10 ** 9], "max_tokens": 4}, None),
    ({"prompt": "x", "logprobs": -5}, "logprobs"),
    ({"prompt": "x", "structured_outputs": {"regex": "("}}, None),
    ({"prompt": 12}, None),
]
BAD_CHATS = [
    ({"messages": []}, None),
    # stock answers these two with a 500 (vLLM's request model reads the field before checking its type)
    ({"messages": [{"role": "user", "content": "hi"}], "structured_outputs": [1]}, "structured_outputs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}],
      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tools.0.function"),
    ({"messages": "hi"}, "body.messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, None),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 10 ** 6, "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]},
     None),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS, ids=[f"completions-{i}" for i in range(len(BAD_COMPLETIONS))])
def test_bad_completions_get_400(server, body, param):
    response = server.post("/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"] == 400
    if param:
        assert error["param"] == param, error


@pytest.mark.parametrize("body,param", BAD_CHATS, ids=[f"chat-{i}" for i in range(len(BAD_CHATS))])
def test_bad_chats_get_400(server, body, param):
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert error["param"] == param, error


def test_what_stock_answers_with_500_or_a_cut_stream_gets_a_400(server):
    """Found by bench/fuzz.py, on stock `vllm serve` as on ours before: a schema only guidance takes, after a
    request that fixed the engines' backend to xgrammar (a 500 in the engine step, stock too), gets xgrammar's
    400 (a stream: its error event); the legacy routes check `structured_outputs` as /v1 does; and a
    /v1/responses stream whose schema fails its check ends with an error event (the SDK yields it), not a cut."""
    choice = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2,
                                             "structured_outputs": {"choice": ["a", "b"]}})
    assert choice.status_code == 200 and choice.json()["choices"][0]["text"] in ("a", "b"), choice.text
    guidance_only = {"type": "object", "properties": {"a": {"type": "integer"}, "b": False}, "required": ["a"]}
    for stream in (False, True):
        response = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4,
                                                   "structured_outputs": {"json": guidance_only}, "stream": stream})
        if stream:  # vLLM's completions stream starts before its engine request: an error event ends it
            events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
            assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]"), response.text
            error = events[-1]["error"]
        else:
            assert response.status_code == 400, response.text
            error = response.json()["error"]
        assert error["code"] == 400 and "grammar" in error["message"], error
    deep = b'{"structured_outputs": ' + b'{"a": ' * 5000 + b'1' + b'}' * 5001  # too deep for Python's json
    for path in ("/v1/chat/completions", "/invocations"):  # vLLM's /invocations parses it itself: a 500 there
        response = requests.post(server.url + path, data=deep, timeout=HANG_S,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.text)
    legacy = server.post("/generate/", {"prompts": ["x"], "max_tokens": 2,
                                        "generation_kwargs": {"structured_outputs": "x"}})
    assert legacy.status_code == 400 and legacy.json()["error"]["param"] == "structured_outputs", legacy.text
    events = list(sdk(server).responses.create(model="tiny", input="Hi", max_output_tokens=4, stream=True, text={
        "format": {"type": "json_schema", "name": "a", "schema": {"type": "bogus"}}}))
    assert events[-1].type == "error" and "bogus" in events[-1].message, events[-1]
    assert server.health()["status"] == "ok"


def test_malformed_json_unknown_model_and_text_only_image(server):
    response = requests.post(server.url + "/v1/chat/completions", data=b"{not json", timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = server.post("/v1/completions", {"model": "gpt-17", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["type"] == "NotFoundError"
    image = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                          {"type": "image_url", "image_url": {"url": png_data_uri()}}]}]
    response = server.post("/v1/chat/completions", {"messages": image, "max_tokens": 2})
    assert response.status_code == 400, response.text  # the tiny model is text-only: vLLM refuses the image


def test_bad_requests_do_not_fail_good_ones_in_the_same_batch(server, models, reference_llm):
    (ref,) = reference(reference_llm(models["seed0"]), [PROMPTS[3]], temperature=0, max_tokens=8,
                                ignore_eos=True)
    good = {"prompt": PROMPTS[3], "max_tokens": 8, **GREEDY}
    bad = [body for body, _ in BAD_COMPLETIONS]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(server.post, "/v1/completions", good if i % 2 else bad[i // 2 % len(bad)])
                   for i in range(32)]
        responses = [f.result() for f in futures]
    for i, response in enumerate(responses):
        if i % 2:
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["token_ids"] == list(ref.outputs[0].token_ids)
        else:
            assert response.status_code == 400, response.text
    assert server.get("/health").status_code == 200


@pytest.fixture(scope="module", autouse=True)
def launched_dp2(request, models, start_server):
    """Data parallel 2, launched when the module starts if a test collected here takes it (its start overlaps
    the tests before it). A 1 s gathering window puts a burst of requests in one round: 8 requests per rank,
    the same batch on both, so replicas sharing random streams would show as repeats instead of being hidden by
    batch shapes."""
    if not any("dp2" in item.fixturenames for item in request.session.items if item.module is request.module):
        return None
    return start_server(models["seed0"], "--data_parallel_size", "2", "--batch_wait_ms", "1000", name="dp2",
                        wait=False)


@pytest.fixture(scope="module")
def dp2(launched_dp2):
    srv = launched_dp2.wait_healthy()
    yield srv
    assert srv.stop() == 0 and not srv.left_behind, srv.left_behind


def test_data_parallel_2_matches_dp_1_and_uses_both_workers(server, dp2):
    body = {"prompt": PROMPTS * 8, "max_tokens": 24, **GREEDY}
    before = dp2.health()["requests_finished_per_rank"]
    got = dp2.post("/v1/completions", body).json()
    want = server.post("/v1/completions", body).json()
    assert [c["token_ids"] for c in got["choices"]] == [c["token_ids"] for c in want["choices"]]
    after = dp2.health()["requests_finished_per_rank"]
    assert [a - b for a, b in zip(after, before)] == [16, 16]  # least-loaded first: half on each
    assert dp2.get("/get_world_size").json()["world_size"] == 2


# --- data-parallel sampling ------------------------------------------------------------------------------

SAMPLED = {"temperature": 1.0, "max_tokens": 16, "ignore_eos": True, "return_token_ids": True}


def test_data_parallel_ranks_sample_apart_and_a_seed_samples_alike(models, dp2, reference_llm):
    """Each DP replica draws its own random numbers: 16 unseeded requests give 16 completions (with one
    seed for every replica, the k-th request on each rank repeated the other's). A request's own `seed`
    gives the same tokens on either rank: those of an in-process engine."""
    def sample(_):
        return dp2.post("/v1/completions", {"prompt": PROMPTS[1], **SAMPLED}).json()["choices"][0]["token_ids"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        completions = list(pool.map(sample, range(16)))
    assert len({tuple(c) for c in completions}) == 16, completions

    # The X-data-parallel-rank header pins a request to a replica: the same seeded request on each.
    (ref,) = reference(reference_llm(models["seed0"]), [PROMPTS[1]], seed=1234, temperature=1.0,
                       max_tokens=16, ignore_eos=True)
    before = dp2.health()["requests_finished_per_rank"]
    for rank in (0, 1):
        body = dp2.post("/v1/completions", {"prompt": PROMPTS[1], "seed": 1234, **SAMPLED},
                        headers={"X-data-parallel-rank": str(rank)}).json()
        assert body["choices"][0]["token_ids"] == list(ref.outputs[0].token_ids), dump(body)
    after = dp2.health()["requests_finished_per_rank"]
    assert [a - b for a, b in zip(after, before)] == [1, 1]
    response = dp2.post("/v1/completions", {"prompt": PROMPTS[1], **SAMPLED}, headers={"X-data-parallel-rank": "2"})
    assert response.status_code == 400 and "out of range" in response.json()["error"]["message"], response.text


def test_requests_without_a_rank_go_to_the_least_loaded_replica_and_one_with_a_rank_goes_there():
    """The Batcher's placement on its own (a stand-in for the replica processes): unpinned requests fill the
    emptier replica first, a pinned one lands where it was sent, and a cancelled one frees its slot."""
    import asyncio
    import types

    import vllm_serve

    async def place():  # in a loop: the Batcher's events belong to one
        class Replicas(list):  # two stand-in replicas: only a count, and a bell nobody hears
            def ring(self):
                pass

        batcher = vllm_serve.Batcher(Replicas([None, None]), wait_s=0, round_s=0)
        request = lambda key: types.SimpleNamespace(request_id=key)  # noqa: E731
        for key, rank in [("a", None), ("b", None), ("c", None), ("d", 1), ("e", None)]:
            batcher.submit(key, request(key), "", rank, collector=None)
        placed = {key: p.rank for key, p in batcher.pending.items()}
        batcher.cancel("b")
        batcher.submit("f", request("f"), "", None, collector=None)
        return placed, batcher.pending["f"].rank, [[r.request_id for r, _ in batcher.queued[k]] for k in (0, 1)]

    placed, refilled, queued = asyncio.run(place())
    assert placed == {"a": 0, "b": 1, "c": 0, "d": 1, "e": 0} and refilled == 1
    assert queued == [["a", "c", "e"], ["d", "f"]]  # "b" left the queue unsent


# --- vLLM's app through the official SDK, and /metrics -----------------------------------------------------


def test_sdk_streams_token_by_token(long_server):
    """The first content chunk arrives while /health still counts the request as running: the stream is
    sent as the tokens come, not once the request is done (it cannot be: it is unending)."""
    client = openai.OpenAI(base_url=long_server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=HANG_S)
    body = unending()
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], stream=True,
                                            max_tokens=body["max_tokens"] - 64, temperature=1.0,
                                            extra_body={"ignore_eos": True})
    try:
        first = next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
        assert first.choices[0].finish_reason is None
        assert long_server.health()["requests_running"] == 1
    finally:
        stream.close()
    long_server.wait_for_health(lambda h: h["requests_running"] == 0)  # closing it aborted it


def test_sdk_stream_helper_fires_tool_call_events(server):
    """The openai SDK's stream helper sees the tool call as stock streams it: its arguments' done event, with
    the whole arguments, for the (last) call."""
    regex = forced_tool_call_regex("get_weather", {"city": "Paris"})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=HANG_S)
    with client.chat.completions.stream(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                        tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=64, temperature=0,
                                        extra_body={"structured_outputs": {"regex": regex}}) as stream:
        done = [event for event in stream if event.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [(e.name, json.loads(e.arguments)) for e in done] == [("get_weather", {"city": "Paris"})]
    assert final.choices[0].finish_reason == "tool_calls"


def test_sdk_responses_create_and_stream(server, models, reference_llm, tokenizer):
    """/v1/responses, the OpenAI Agents SDK's default route: the same greedy text plain and streamed, equal to
    an in-process engine's on the rendered prompt."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=HANG_S)
    kwargs = dict(model="tiny", input="What is 2 + 2?", max_output_tokens=8, temperature=0)
    response = client.responses.create(**kwargs)
    streamed = "".join(e.delta for e in client.responses.create(**kwargs, stream=True)
                       if e.type == "response.output_text.delta")
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": "What is 2 + 2?"}])
    (ref,) = reference(reference_llm(models["seed0"]), [prompt], temperature=0, max_tokens=8)
    assert response.output_text == streamed == ref.outputs[0].text


def test_metrics_show_the_replicas_engine_metrics(server):
    before = server.get("/metrics").text
    server.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 3, **GREEDY})
    text = server.get("/metrics").text
    tokens = [line for line in text.splitlines() if line.startswith("vllm:generation_tokens_total")]
    assert tokens and float(tokens[0].split()[-1]) >= 3, (tokens, before.count("vllm:"))
