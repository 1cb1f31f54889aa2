"""Faults behind vLLM's router: three servers (DP 1 each), our client given the router's one URL. A server
taken from the router mid-step finishes that step and leaves the group at the next sync; a server killed
mid-step fails that step, naming it, and the two others keep the weights they had."""

import psutil
import pytest

from support import HANG_S, PROMPTS, checkpoint, free_port, greedy_ids
from vllm_client import VLLMClient, VLLMClientError

MAX_TOKENS = 8
BUCKET_BYTES = 300_000  # several buckets for the tiny model: the fault comes between two of them


@pytest.fixture(scope="module")
def trio(models, start_server):
    servers = start_server.side_by_side(3, models["seed0"], name="routed")
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def expected(models, reference_llm):
    return {name: greedy_ids(reference_llm(models[name]), PROMPTS, MAX_TOKENS) for name in ("seed0", "seed1")}


def greedy(server):
    return VLLMClient(base_url=server.url, timeout=HANG_S).generate(
        PROMPTS, temperature=0, max_tokens=MAX_TOKENS, generation_kwargs={"ignore_eos": True})["completion_ids"]


def sync(client, model):
    client.update_named_params(checkpoint(model), bucket_bytes=BUCKET_BYTES)
    client.reset_prefix_cache()


def after_first_bucket(client, act):
    """`act()` once, as soon as the first bucket of the client's next batched sync is on every server."""
    wait, acted = client._await, []

    def waited(work, announced=()):
        wait(work, announced)
        if not acted:
            acted.append(act())

    client._await = waited
    return acted


def routed(servers, start_router):
    """A router in front of `servers`, and our client given its URL, in a weight-sync group over them."""
    router = start_router([server.url for server in servers])
    client = VLLMClient(base_url=router.url, group_port=free_port(), timeout=HANG_S)
    client.init_communicator(device="cpu")
    return router, client


def test_a_server_taken_from_the_router_mid_step_finishes_it_and_leaves_the_group_at_the_next(
        trio, models, expected, start_router):
    router, client = routed(trio, start_router)
    leaving = trio[2]
    removed = after_first_bucket(client, lambda: router.remove(leaving.url) or leaving.url)
    sync(client, models["seed1"])  # the step began with three: all three take it
    assert removed == [leaving.url]
    assert [greedy(server) for server in trio] == [expected["seed1"]] * 3
    sync(client, models["seed0"])  # the group formed again without it, first
    assert sorted(s.url for s in client.group) == sorted(server.url for server in trio[:2])
    assert [greedy(server) for server in trio] == [expected["seed0"]] * 2 + [expected["seed1"]]
    assert leaving.health()["weights"]["group"] is None  # its side of the old group closed
    client.close_communicator()
    direct = VLLMClient(base_url=leaving.url, group_port=free_port(), timeout=HANG_S)
    direct.init_communicator(device="cpu")
    sync(direct, models["seed0"])  # as the next test expects it
    direct.close_communicator()


def test_a_server_killed_mid_step_fails_it_naming_the_server_and_the_others_keep_their_weights(
        trio, models, expected, start_router):
    router, client = routed(trio, start_router)
    victim = trio[1]
    tree = [psutil.Process(victim.proc.pid), *psutil.Process(victim.proc.pid).children(recursive=True)]
    after_first_bucket(client, lambda: [process.kill() for process in tree])
    with pytest.raises(VLLMClientError, match=victim.url.removeprefix("http://")):
        sync(client, models["seed1"])
    for server in (trio[0], trio[2]):
        assert server.health()["weights"]["last"]["outcome"] == "rolled back"
        assert greedy(server) == expected["seed0"]
