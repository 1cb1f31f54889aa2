"""Many servers, one client: `VLLMClient(base_url=[a, b])` spreads generation over both by load and returns
it in input order, sends a dead server's prompts to the other, samples apart on both, and syncs weights
into both in one group (each bucket broadcast once). Behind vLLM's router (`vllm-router`), the OpenAI SDK
and our client take its one URL: generation goes through the router, weight sync to every server behind it,
one added between syncs included. Two servers of DP 1 on this machine."""

import json
import os
import subprocess
import sys
import threading

import openai
import psutil
import pytest
import requests

import vllm_client
from support import (CHATS, HANG_S, PROMPTS, ROOT, WEATHER_TOOL, checkpoint, forced_tool_call_regex, free_port,
                     greedy_ids)
from vllm_client import Server, VLLMClient, VLLMClientError, _buckets

MAX_TOKENS = 8
LONG_TOKENS = 200  # the killed server's half: that many decode steps ahead of it when it is killed
SYNC_TIMEOUT_S = 30  # the servers' --weight-sync-timeout: a sync whose trainer left fails this long after
BUCKET_BYTES = 300_000  # several buckets for the tiny model


@pytest.fixture(scope="module")
def fleet(models, start_server):
    """Two servers started alike (same model, same --seed, vLLM's default 0), side by side; tool calls on."""
    servers = start_server.side_by_side(2, models["seed0"], "--weight-sync-timeout", str(SYNC_TIMEOUT_S),
                                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", name="fleet")
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def expected(models, reference_llm):
    """Greedy ids of in-process engines, computed before any server generates (they would share the cores)."""
    refs = {name: greedy_ids(reference_llm(models[name]), PROMPTS, MAX_TOKENS) for name in ("seed0", "seed1")}
    refs["long"] = greedy_ids(reference_llm(models["seed0"]), PROMPTS, LONG_TOKENS)
    return refs


def client_of(fleet, **kwargs):
    return VLLMClient(base_url=[server.url for server in fleet], group_port=free_port(), timeout=HANG_S, **kwargs)


def finished(server):
    return sum(server.health()["requests_finished_per_rank"])


def flat(rows):
    """[row][position][k] → one list (pytest.approx compares flat sequences)."""
    return [value for row in rows for position in row for value in position]


def greedy(client, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    return client.generate(prompts, temperature=0, max_tokens=max_tokens,
                           generation_kwargs={"ignore_eos": True})["completion_ids"]


def test_identical_unseeded_requests_over_two_servers_sample_apart(fleet):
    """Both servers have the same --seed: were each engine's seed that alone, the k-th sample on one would be
    the k-th on the other, and a GRPO group spread over them would hold duplicates. A seeded request samples
    alike on either server."""
    client = client_of(fleet)
    before = [finished(server) for server in fleet]
    out = client.generate([PROMPTS[0]] * 16, temperature=1.0, max_tokens=16, generation_kwargs={"ignore_eos": True})
    assert [finished(server) - b for server, b in zip(fleet, before)] == [8, 8]  # spread evenly
    assert len({tuple(ids) for ids in out["completion_ids"]}) == 16
    seeded = client.generate([PROMPTS[0]] * 2, temperature=1.0, max_tokens=16,
                             generation_kwargs={"ignore_eos": True, "seed": 7})["completion_ids"]
    assert seeded[0] == seeded[1]  # one on each server


def test_generation_is_spread_over_both_servers_and_returned_in_input_order(fleet, expected):
    client, single = client_of(fleet), VLLMClient(base_url=fleet[0].url, timeout=HANG_S)
    before = [finished(server) for server in fleet]
    assert greedy(client, PROMPTS * 4) == expected["seed0"] * 4
    assert all(finished(server) > b for server, b in zip(fleet, before))
    chats = CHATS * 4
    spread, alone = (c.chat(chats, temperature=0, max_tokens=MAX_TOKENS, logprobs=2) for c in (client, single))
    assert spread["prompt_ids"] == alone["prompt_ids"] and spread["completion_ids"] == alone["completion_ids"]
    assert spread["logprob_token_ids"] == alone["logprob_token_ids"]
    assert flat(spread["logprobs"]) == pytest.approx(flat(alone["logprobs"]), abs=1e-4)
    sequences = [p + c for p, c in zip(alone["prompt_ids"], alone["completion_ids"])]
    lengths = [len(p) for p in alone["prompt_ids"]]
    spread, alone = (c.get_sequence_logprobs(sequences, lengths, top_logprobs=3) for c in (client, single))
    assert spread["logprob_token_ids"] == alone["logprob_token_ids"]
    assert flat(spread["logprobs"]) == pytest.approx(flat(alone["logprobs"]), abs=1e-4)
    assert client.get_world_size() == 2


@pytest.mark.parametrize("dialect", ["legacy", "stock"])
def test_one_group_syncs_both_servers_and_broadcasts_each_bucket_once(fleet, models, expected, dialect):
    """Batched, then per parameter: both servers then answer exactly as a fresh engine on those weights, and
    the client sent each bucket (or tensor) once, not once per server."""
    client = client_of(fleet, weight_sync=dialect)
    client.init_communicator(device="cpu")
    named = checkpoint(models["seed1"])
    client.update_named_params(named, bucket_bytes=BUCKET_BYTES)
    client.reset_prefix_cache()
    if dialect == "legacy":
        assert client.broadcasts == len(_buckets(named, BUCKET_BYTES)) > 1
    else:
        assert client.broadcasts == 1  # vLLM's packing: one 1 GiB chunk holds the tiny model
    for server in fleet:
        assert greedy(VLLMClient(base_url=server.url, timeout=HANG_S)) == expected["seed1"]
    sent = client.broadcasts
    for name, tensor in checkpoint(models["seed0"]):
        client.update_named_param(name, tensor)
    client.reset_prefix_cache()
    assert client.broadcasts == sent + len(named)
    for server in fleet:
        assert greedy(VLLMClient(base_url=server.url, timeout=HANG_S)) == expected["seed0"]
    client.close_communicator()


def direct(server):
    return VLLMClient(base_url=server.url, timeout=HANG_S)


def test_the_openai_sdk_through_the_router_gets_what_a_server_answers_directly(fleet, start_router):
    """Chat (plain and streamed) and /v1/responses through the router's one URL: the greedy text one of the
    servers gives when asked directly. A client that does not name the router (the SDK) needs nothing else."""
    router = start_router([server.url for server in fleet])
    via, first = (openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=HANG_S)
                  for url in (router.url, fleet[0].url))
    chat = dict(model="tiny", messages=CHATS[0], max_tokens=8, temperature=0)
    text = first.chat.completions.create(**chat).choices[0].message.content
    assert via.chat.completions.create(**chat).choices[0].message.content == text
    assert "".join(c.choices[0].delta.content or "" for c in via.chat.completions.create(**chat, stream=True)
                   if c.choices) == text
    responses = dict(model="tiny", input="What is 2 + 2?", max_output_tokens=8, temperature=0)
    assert via.responses.create(**responses).output_text == first.responses.create(**responses).output_text


def agent_turns(url):
    """An agent framework's loop over the OpenAI SDK: the model calls a tool, gets its result, answers. → the
    call's name and arguments, and the answer."""
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=HANG_S)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    regex = forced_tool_call_regex("get_weather", {"city": "Paris"})
    asked = sdk.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], tool_choice="auto",
                                        max_tokens=64, temperature=0,
                                        extra_body={"structured_outputs": {"regex": regex}}).choices[0]
    assert asked.finish_reason == "tool_calls", asked
    (call,) = asked.message.tool_calls
    messages += [{"role": "assistant", "tool_calls": [{"id": "call-1", "type": "function",
                                                       "function": call.function.model_dump()}]},
                 {"role": "tool", "tool_call_id": "call-1", "content": "Sunny, 21 C"}]
    answer = sdk.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=8,
                                         temperature=0).choices[0].message.content
    return call.function.name, json.loads(call.function.arguments), answer


def test_an_agent_loop_through_the_router_calls_a_tool_and_answers_as_a_server_does(fleet, start_router):
    router = start_router([server.url for server in fleet])
    assert agent_turns(router.url) == agent_turns(fleet[0].url)


def test_our_client_given_the_router_syncs_every_server_behind_it_one_added_later_included(
        fleet, models, expected, start_router):
    """The router starts with one server; our client, given the router's URL, finds it is one and syncs
    that server. A second server is put behind the router: the next sync (per parameter) forms the group
    again over both first, so both answer as a fresh engine on the new weights, directly and through the
    router. Then stock's dialect, batched and per parameter, over both."""
    router = start_router([fleet[0].url])
    client = VLLMClient(base_url=router.url, group_port=free_port(), timeout=HANG_S)
    assert client.router is not None and client.get_world_size() == 1
    client.init_communicator(device="cpu")
    client.update_named_params(checkpoint(models["seed1"]), bucket_bytes=BUCKET_BYTES)
    client.reset_prefix_cache()
    assert [greedy(direct(server)) for server in fleet] == [expected["seed1"], expected["seed0"]]
    router.add(fleet[1].url)
    assert client.get_world_size() == 2
    for name, tensor in checkpoint(models["seed1"]):
        client.update_named_param(name, tensor)
    client.reset_prefix_cache()
    assert sorted(s.url for s in client.group) == sorted(server.url for server in fleet)
    assert [greedy(direct(server)) for server in fleet] == [expected["seed1"]] * 2
    assert greedy(client, PROMPTS * 2) == expected["seed1"] * 2
    client.close_communicator()
    stock = VLLMClient(base_url=router.url, group_port=free_port(), timeout=HANG_S, weight_sync="stock")
    stock.init_communicator(device="cpu")
    stock.update_named_params(checkpoint(models["seed0"]))
    stock.reset_prefix_cache()
    assert [greedy(direct(server)) for server in fleet] == [expected["seed0"]] * 2
    for name, tensor in checkpoint(models["seed1"]):
        stock.update_named_param(name, tensor)
    stock.reset_prefix_cache()
    assert [greedy(direct(server)) for server in fleet] == [expected["seed1"]] * 2
    stock.update_named_params(checkpoint(models["seed0"]))  # the weights the next tests expect
    stock.reset_prefix_cache()
    stock.close_communicator()


TRAINER = """
import sys
sys.path.insert(0, {root!r})
from vllm_client import VLLMClient
VLLMClient(base_url={urls!r}, group_port={port}, timeout=120).init_communicator(device="cpu")
print("joined", flush=True)
"""  # and exits without closing its group


def test_a_trainer_that_exits_without_closing_closes_the_group_on_every_server(fleet):
    """The client closes its group at interpreter exit (atexit), on both servers; a later step then finds no
    group (409) instead of waiting for broadcasts nobody sends. No thread may start at exit: the servers are
    called one by one there (a thread pool raised "cannot schedule new futures after interpreter shutdown")."""
    code = TRAINER.format(root=str(ROOT), urls=[server.url for server in fleet], port=free_port())
    trainer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S,
                             env=os.environ)
    assert trainer.returncode == 0 and trainer.stdout.strip() == "joined", trainer.stderr
    assert "Exception ignored" not in trainer.stderr, trainer.stderr
    for server in fleet:
        response = server.post("/update_named_param", {"name": "model.norm.weight", "dtype": "torch.float32",
                                                       "shape": [128]})
        assert response.status_code == 409 and "No weight-sync group" in response.text, response.text


def test_a_server_killed_mid_generate_loses_no_prompt_and_the_survivor_syncs_again(expected, fleet, models):
    """64 prompts over both; one server is SIGKILLed while it generates its half: every prompt still comes
    back exactly, the dead server's from the other. The next sync into the group (which still names the dead
    server) fails naming it, and a new group of the survivor syncs."""
    survivor, victim = fleet
    client = client_of(fleet)
    client.init_communicator(device="cpu")
    tree = [psutil.Process(victim.proc.pid), *psutil.Process(victim.proc.pid).children(recursive=True)]
    before, answers = finished(survivor), {}
    thread = threading.Thread(target=lambda: answers.update(ids=greedy(client, PROMPTS * 8, LONG_TOKENS)))
    thread.start()
    victim.wait_for_health(lambda h: h["requests_running"] > 0)  # LONG_TOKENS decode steps ahead of its 32 prompts
    for process in tree:
        process.kill()
    thread.join(HANG_S)
    assert answers["ids"] == expected["long"] * 8
    assert finished(survivor) - before == 64  # its own 32, then the victim's 32
    with pytest.raises(VLLMClientError, match=victim.url.removeprefix("http://")):
        client.update_named_params(checkpoint(models["seed1"]), bucket_bytes=BUCKET_BYTES)
    client.init_communicator(device="cpu")  # the live servers: the survivor alone
    assert client.group == client.servers[:1]
    client.update_named_params(checkpoint(models["seed1"]), bucket_bytes=BUCKET_BYTES)
    client.reset_prefix_cache()
    assert greedy(VLLMClient(base_url=survivor.url, timeout=HANG_S)) == expected["seed1"]
    client.close_communicator()


# ------------------------------------------------------------------------------------------------
# The client's helpers, alone
# ------------------------------------------------------------------------------------------------

def test_split_evens_the_load_in_contiguous_parts():
    assert vllm_client._split(list(range(64)), [0, 0], 1) == [list(range(32)), list(range(32, 64))]
    assert vllm_client._split(list(range(4)), [6, 0], 2) == [[0], [1, 2, 3]]  # ends at loads 8 and 6
    assert vllm_client._split([3, 5], [0, 0, 0], 1) == [[3], [5], []]


def test_store_host_is_never_all_interfaces_for_a_fleet(monkeypatch):
    monkeypatch.setattr(vllm_client, "_local_address_towards", lambda host: "10.0.0.9")
    assert vllm_client._store_host(["127.0.0.1"]) == "127.0.0.1"
    assert vllm_client._store_host(["10.0.0.5"]) == "0.0.0.0"  # TRL's choice: only its own workers connect
    assert vllm_client._store_host(["10.0.0.5", "10.0.0.6"]) == "10.0.0.5"
    assert vllm_client._store_host(["127.0.0.1", "127.0.0.1"]) == "127.0.0.1"
    assert vllm_client._store_host(["127.0.0.1", "10.0.0.6"]) == "10.0.0.9"  # the first server runs here


def gone(url):
    try:
        raise requests.ConnectionError("refused")
    except requests.ConnectionError as exc:
        try:
            raise VLLMClientError(f"POST {url}: refused") from exc
        except VLLMClientError as error:
            return error


def test_spread_sends_a_dead_servers_items_once_to_the_others():
    client = VLLMClient.__new__(VLLMClient)  # no server to check: the spreading alone
    client.servers = [Server("http://a", "10.0.0.1"), Server("http://b", "10.0.0.2"), Server("http://c", "10.0.0.3")]
    client._lock, calls = threading.Lock(), []

    def run(server, part, done):
        calls.append((server.url, list(part)))
        if server.url == "http://b":
            done[part[0]] = "b"  # one finished before it died
            raise gone(server.url)
        done.update((i, server.url) for i in part)

    assert client._spread(6, run) == ["http://a", "http://a", "b", "http://a", "http://c", "http://c"]
    assert calls[-1] == ("http://a", [3]) and client.servers[1].down
    assert client._spread(2, run) == ["http://a", "http://c"]  # a server marked down is skipped
    client.servers[0].down = client.servers[2].down = True
    with pytest.raises(VLLMClientError, match="No server left for 1 of 1"):
        client._spread(1, lambda server, part, done: (_ for _ in ()).throw(gone(server.url)))
    assert client._spread(0, run) == []


def test_a_broadcast_that_fails_before_its_announce_names_the_server_that_went_away():
    """gloo may see a killed member's reset before the announce to it fails (a race the router test lost once:
    the RuntimeError of gloo reached the trainer). The error raised is the announce's of the server that went
    away, not gloo's, nor a survivor's answer that it rolled back; with no failed announce, one
    VLLMClientError carrying gloo's message."""
    from concurrent.futures import Future

    class Reset:  # gloo's Work for a broadcast whose peer reset the connection
        def is_completed(self):
            return True

        def wait(self):
            raise RuntimeError("Read error: Connection reset by peer")

    def answered(error):
        future = Future()
        future.set_exception(error)
        return future

    client = VLLMClient.__new__(VLLMClient)  # no server: the client's error path alone
    client.timeout = HANG_S
    survivor = answered(VLLMClientError("the update rolled back", 409))
    with pytest.raises(VLLMClientError) as info:
        client._await(Reset(), [survivor, answered(gone("http://b"))])
    assert info.value.message == "POST http://b: refused"
    with pytest.raises(VLLMClientError, match="rolled back"):
        client._await(Reset(), [survivor])
    with pytest.raises(VLLMClientError, match="A weight broadcast failed: Read error"):
        client._await(Reset(), [])
