"""Every answer says which weights produced it (issue 23): a request that asks (`return_weight_versions`, vLLM
0.33's field) gets vLLM's spans, [{version, start, end}] over output-token indexes, per choice and on a stream's
last chunk, on /v1 (the openai SDK's `extra_body`) and on TRL's legacy routes. Versions advance with every
committed update, and match the weights exactly. A request frozen across an update reports the switch, its
later tokens being the new weights' continuation. The prefix cache never serves a block the old weights
computed. And an empty update leaves everything as it was."""

import json
import threading

import openai
import pytest

from support import GREEDY, HANG_S, PROMPTS, checkpoint, free_port, greedy_ids, wait_until
from vllm_client import VLLMClient

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def expected(models, reference_llm):
    return {name: greedy_ids(reference_llm(models[name]), PROMPTS, MAX_TOKENS) for name in ("seed0", "seed1")}


@pytest.fixture(scope="module")
def server(models, start_server):
    srv = start_server(models["seed0"], "--enable-prompt-tokens-details", name="versions")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def trainer(server):
    client = VLLMClient(base_url=server.url, group_port=free_port(), timeout=HANG_S, weight_sync="stock")
    client.init_communicator(device="cpu")
    yield client
    client.close_communicator()


def versioned(server, prompts=PROMPTS):
    """Greedy completions that ask for versions → [(token ids, spans)] per prompt."""
    body = server.post("/v1/completions", {"prompt": prompts, "max_tokens": MAX_TOKENS, **GREEDY,
                                           "return_weight_versions": True}).json()
    return [(c["token_ids"], c["weight_versions"]) for c in sorted(body["choices"], key=lambda c: c["index"])]


def spans(version, end=MAX_TOKENS):
    return [{"version": version, "start": 0, "end": end}]


def serving(server, expected):
    """Which model's weights the server serves now, told by its greedy output."""
    tokens = [ids for ids, _ in versioned(server)]
    (name,) = [name for name, ids in expected.items() if ids == tokens]
    return name, "seed1" if name == "seed0" else "seed0"


def test_versions_advance_with_each_commit_and_match_the_weights(server, trainer, models, expected):
    version = int(server.get("/weight_info").json()["weight_version"].replace("default", "0"))
    name = "default" if version == 0 else str(version)
    assert versioned(server) == [(ids, spans(name)) for ids in expected["seed0"]]
    plain = server.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 4, **GREEDY}).json()
    assert "weight_versions" not in plain["choices"][0]  # asked for by nobody: stock's answer
    for step, model in enumerate(("seed1", "seed0"), start=1):
        trainer.update_named_params(checkpoint(models[model]))
        trainer.reset_prefix_cache()
        now = str(version + step)
        assert server.get("/weight_info").json() == {"weight_version": now}
        assert server.health()["weights"]["version"] == now
        assert versioned(server) == [(ids, spans(now)) for ids in expected[model]]
    now = str(version + 2)
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    completion = sdk.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"return_weight_versions": True, "ignore_eos": True})
    assert completion.choices[0].model_extra["weight_versions"] == spans(now)
    chat = sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, extra_body={"return_weight_versions": True, "ignore_eos": True})
    assert chat.choices[0].model_extra["weight_versions"] == spans(now, 4)
    chunks = list(sdk.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True, extra_body={"return_weight_versions": True, "ignore_eos": True}))
    assert [c.choices[0].model_extra.get("weight_versions") for c in chunks if c.choices][-1] == spans(now)
    legacy = server.post("/generate/", {"prompts": PROMPTS[:2], "max_tokens": MAX_TOKENS, "temperature": 0,
                                        "return_weight_versions": True}).json()
    assert legacy["weight_versions"] == [spans(now, len(ids)) for ids in legacy["completion_ids"]]
    ours = VLLMClient(base_url=server.url).generate(PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0,
                                                    return_weight_versions=True)
    assert ours["weight_versions"] == [spans(now, len(ids)) for ids in ours["completion_ids"]]


def stream(server, body, chunks, done):
    def run():
        try:
            with server.post("/v1/completions", {**body, "stream": True}, stream=True) as response:
                for line in response.iter_lines():
                    if line.startswith(b"data: {"):
                        chunks.append(json.loads(line[len(b"data: "):]))
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()


def test_a_request_frozen_across_an_update_reports_both_versions_and_continues_on_the_new_weights(
        server, trainer, models, expected, reference_llm, tokenizer):
    """The request is frozen (/pause keep) mid-generation, the update commits, and it goes on: vLLM 0.32
    preempted it, so its later tokens are the new weights' greedy continuation of the same prefix."""
    before = server.get("/weight_info").json()["weight_version"]
    current, new = serving(server, expected)
    prompt_ids = tokenizer.encode(PROMPTS[1])
    chunks, done = [], threading.Event()
    stream(server, {"prompt": prompt_ids, "max_tokens": 400, **GREEDY, "return_weight_versions": True}, chunks, done)
    wait_until(lambda: chunks, "the stream's first token")
    assert server.post("/pause?mode=keep", {}).status_code == 200
    trainer.pause_mode = "keep"
    try:
        trainer.update_named_params(checkpoint(models[new]))  # its own pause, start, update, finish, resume
    finally:
        trainer.pause_mode = "wait"
    assert server.post("/resume", {}).status_code == 200
    assert done.wait(HANG_S)
    tokens = [t for c in chunks for t in c["choices"][0]["token_ids"] or ()]
    (first, second) = chunks[-1]["choices"][0]["weight_versions"]
    after = server.get("/weight_info").json()["weight_version"]
    switch = first["end"]
    assert first == {"version": before, "start": 0, "end": switch} and 0 < switch < 400
    assert second == {"version": after, "start": switch, "end": 400} and after != before
    assert tokens[:switch] == greedy_ids(reference_llm(models[current]), [prompt_ids], 400)[0][:switch]
    assert tokens[switch:] == greedy_ids(reference_llm(models[new]), [prompt_ids + tokens[:switch]], 400 - switch)[0]


def test_the_prefix_cache_never_serves_a_block_of_the_old_weights(server, trainer, models, expected,
                                                                  reference_llm, tokenizer):
    """A prompt longer than a KV block is served twice (the second hits the cache), then the weights change:
    served again, it hits nothing and gives the new weights' exact output; then it is cached anew."""
    prompt = tokenizer.encode(" ".join(PROMPTS * 6))[:300]
    current, new = serving(server, expected)

    def served():
        body = server.post("/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, **GREEDY}).json()
        return body["choices"][0]["token_ids"], body["usage"]["prompt_tokens_details"]["cached_tokens"]

    want = {name: greedy_ids(reference_llm(models[name]), [prompt], MAX_TOKENS)[0] for name in (current, new)}
    assert served()[0] == want[current]
    ids, cached = served()
    assert ids == want[current] and cached > 0
    trainer.update_named_params(checkpoint(models[new]))
    assert served() == (want[new], 0)
    ids, cached = served()
    assert ids == want[new] and cached > 0


def test_an_empty_update_changes_nothing(server, trainer, expected):
    """start then finish with nothing sent: 200 as stock answers, and the model and its version as they were.
    Also without any group (a trainer that has not joined one yet)."""
    before = server.health()["weights"]
    for path in ("/start_weight_update", "/finish_weight_update"):
        assert server.post(path, {}).status_code == 200
    after = server.health()["weights"]
    assert (after["version"], after["commits"], after["state"]) == (before["version"], before["commits"], "idle")
    tokens = [ids for ids, _ in versioned(server)]
    assert tokens in (expected["seed0"], expected["seed1"])


def test_an_update_without_pause_freezes_running_requests_and_holds_new_ones(server, trainer, models, expected,
                                                                             reference_llm, tokenizer):
    """TRL 1.16's `weight_update()`: /start_weight_update with no /pause, while greedy streams run and more
    requests arrive. Nothing steps through a half-loaded model: every request ends with 200, and its tokens
    are exact for the versions its spans name (a stream that crossed: the old weights' tokens up to the
    switch, then the new weights' continuation of that prefix)."""
    current, new = serving(server, expected)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:4]]
    running = [([], threading.Event()) for _ in prompts]
    for prompt, (chunks, done) in zip(prompts, running):
        stream(server, {"prompt": prompt, "max_tokens": 300, **GREEDY, "return_weight_versions": True}, chunks, done)
    wait_until(lambda: all(chunks for chunks, _ in running), "every stream's first token")
    assert server.post("/start_weight_update", {}).status_code == 200
    arriving = {}
    threads = [threading.Thread(target=lambda i=i: arriving.update({i: server.post("/v1/completions", {
        "prompt": prompts[i], "max_tokens": MAX_TOKENS, **GREEDY, "return_weight_versions": True})}))
        for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    server.wait_for_health(lambda h: h["requests_waiting"] == len(prompts))
    named = checkpoint(models[new])
    info = {"names": [n for n, _ in named], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in named],
            "shapes": [list(t.shape) for _, t in named]}
    update = threading.Thread(target=lambda: arriving.update(update=server.post("/update_weights",
                                                                                {"update_info": info})))
    update.start()
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    tensors = iter(named)
    while (chunk := pack_tensors(tensors, lambda item: item[1], trainer.packed_bytes)) is not None:
        trainer.communicator.broadcast(chunk.packed_tensor, root=0).wait()
    update.join(HANG_S)
    assert arriving["update"].status_code == 200, arriving["update"].text
    assert server.post("/finish_weight_update", {"weight_version": "frozen-" + new}).status_code == 200
    for thread in threads:
        thread.join(HANG_S)
    for i, prompt in enumerate(prompts):
        response = arriving[i]
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["weight_versions"] == spans("frozen-" + new)  # waited at the gate: all new weights
        assert choice["token_ids"] == greedy_ids(reference_llm(models[new]), [prompt], MAX_TOKENS)[0]
    for prompt, (chunks, done) in zip(prompts, running):
        assert done.wait(HANG_S)
        tokens = [t for c in chunks for t in c["choices"][0]["token_ids"] or ()]
        versions = chunks[-1]["choices"][0]["weight_versions"]
        assert len(tokens) == 300 and versions[-1]["version"] == "frozen-" + new, versions
        switch = versions[-1]["start"]
        assert tokens[:switch] == greedy_ids(reference_llm(models[current]), [prompt], 300)[0][:switch]
        assert tokens[switch:] == greedy_ids(reference_llm(models[new]), [prompt + tokens[:switch]],
                                             300 - switch)[0]
