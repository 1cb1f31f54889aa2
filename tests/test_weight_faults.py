"""A weight update is a transaction (issue 23), proven on CPU over gloo against one DP-2 server, in each dialect.

Faults, for batched and per-parameter updates in both dialects: the trainer process dies (os._exit) before its
first, k-th or last broadcast; it dies after its last broadcast but before the commit; it stalls past
--weight-sync-timeout; a load raises on one replica only. After each one: the server lives; once /health
reports the update rolled back, eight greedy requests each give the previous weights' exact output; then a
complete sync from a new trainer process gives the new weights' exact output, and the version advanced by one.

A trainer process (tests/trainer.py) runs the real VLLMClient; its faults are injected under the client, at
torch's ProcessGroup.broadcast. The process that makes the recovery sync of one case is the faulty trainer of
the next, so each case starts one trainer; and the next one is always started ahead (`spare`), importing torch
and vLLM while the current case runs.
"""

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import threading

import psutil
import pytest

from support import GREEDY, HANG_S, PROMPTS, ROOT, checkpoint, free_port, greedy_ids
from vllm_client import VLLMClient, VLLMClientError

TIMEOUT_S = 6  # the servers' --weight-sync-timeout: the stalled and uncommitted cases wait this long
MAX_TOKENS = 12
OTHER = {"seed0": "seed1", "seed1": "seed0"}


class Trainer:
    """tests/trainer.py as a subprocess: started joined to the server's group, then told syncs on stdin."""

    def __init__(self, server, dialect):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "trainer.py"), server.url,
                                      str(free_port()), dialect], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=os.environ)
        self.ready = False

    def join(self):
        """Once it is up (it prints "ready" after its imports), join the server's group."""
        if not self.ready:
            assert self.answer() == {"ready": True}
            self.ready = True
        self.tell({"init": True})
        assert self.answer() == {"ok": True}
        return self

    def tell(self, order):
        self.proc.stdin.write(json.dumps(order) + "\n")
        self.proc.stdin.flush()

    def answer(self):
        """The next JSON line it prints; None once it exited. (Bounded: the tests' hang guard.)"""
        lines = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(HANG_S)
        assert lines, "the trainer printed nothing within the hang guard"
        return json.loads(lines[0]) if lines[0] else None

    def sync(self, model, batched, **fault):
        self.tell({"model": model, "batched": batched, **fault})
        return self.answer()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()  # it leaves its group at exit
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(60)


@dataclasses.dataclass
class Served:
    """One DP-2 server and what it serves now."""
    server: object
    dialect: str
    models: dict
    expected: dict
    current: str = "seed0"
    trainer: Trainer = None
    spare: Trainer = None  # the next trainer, started ahead
    load_file: object = None

    def weights(self):
        return self.server.health()["weights"]

    def version(self):
        return int(self.server.get("/weight_info").json()["weight_version"].replace("default", "0"))

    def greedy_each(self):
        """Eight greedy requests at once, one prompt each, alternately pinned to replica 0 and 1 → their token
        ids, in prompt order."""
        def one(i):
            body = self.server.post("/v1/completions", {"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, **GREEDY},
                                    headers={"X-data-parallel-rank": str(i % 2)}).json()
            return body["choices"][0]["token_ids"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(len(PROMPTS))))

    def next_trainer(self, join=True):
        """The spare, joined (the old trainer stopped first: it leaves its group at exit); a new spare starts."""
        if self.trainer is not None:
            self.trainer.stop()
        self.trainer, self.spare = self.spare or Trainer(self.server, self.dialect), Trainer(self.server, self.dialect)
        return self.trainer.join() if join else self.trainer

    def recover(self, target):
        """A complete sync from a new trainer process: exact output of `target`, the version one up."""
        before = self.version()
        trainer = self.next_trainer()
        assert trainer.sync(self.models[target], batched=True) == {"ok": True}
        assert self.greedy_each() == self.expected[target]
        assert self.version() == before + 1
        self.current = target


@pytest.fixture(scope="module")
def expected(models, reference_llm):
    refs = {name: greedy_ids(reference_llm(models[name]), PROMPTS, MAX_TOKENS) for name in ("seed0", "seed1")}
    assert refs["seed0"] != refs["seed1"]
    return refs


@pytest.fixture(scope="module")
def launched(models, start_server, tmp_path_factory):
    """The server, launched at once (it waits for the first test), and each dialect's first trainer process,
    which imports torch and vLLM meanwhile. The load fault of TRL's dialect needs the fault plugin
    (tests/faults.py) in the workers. `current`: the weights the server serves between the dialects' tests."""
    load_file = tmp_path_factory.mktemp("faults") / "fail-load"
    server = start_server(models["seed0"], "--data-parallel-size", "2", "--weight-sync-timeout", str(TIMEOUT_S),
                          "--logits-processors", "faults:FailingLogitsProcessor", name="faults", wait=False,
                          env={"PYTHONPATH": str(ROOT / "tests"), "FAULTS_LOAD_FILE": str(load_file)})
    launched = {"server": server, "load_file": load_file, "current": "seed0",
                "trainers": {dialect: Trainer(server, dialect) for dialect in ("legacy", "stock")}}
    yield launched
    for trainer in launched["trainers"].values():
        trainer.stop()  # (a no-op for one that served)
    server.stop()


@pytest.fixture(scope="module", params=["legacy", "stock"])
def served(request, launched, models, expected):
    server = launched["server"]
    server.wait_healthy()
    state = Served(server, request.param, models, expected, current=launched["current"],
                   spare=launched["trainers"][request.param], load_file=launched["load_file"])
    assert state.greedy_each() == expected[state.current]
    state.next_trainer()
    yield state
    for trainer in (state.trainer, state.spare):
        trainer.stop()  # each leaves its group at exit: the other dialect's trainer starts a new one
    launched["current"] = state.current


def settled(served, counts):
    """Wait until /health reports the update that the fault interrupted as settled; → its outcome."""
    return served.server.wait_for_health(
        lambda h: h["weights"]["state"] == "idle" and (h["weights"]["commits"], h["weights"]["rollbacks"]) != counts
    )["weights"]["last"]


FAULTS = {  # id → the trainer's fault
    "dies-before-1st-broadcast": {"fault": "die", "at": 1},
    "dies-before-3rd-broadcast": {"fault": "die", "at": 3},
    "dies-before-last-broadcast": {"fault": "die", "at": "last"},
    "dies-before-commit": {"fault": "die-before-commit"},
    "stalls-past-the-timeout": {"fault": "stall", "at": 2},
}


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-parameter"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_trainer_fault_rolls_back_and_the_next_trainer_syncs_exactly(served, fault, batched):
    counts = (served.weights()["commits"], served.weights()["rollbacks"])
    if served.trainer.proc.poll() is not None:  # a case before failed with its trainer dead: one case, one failure
        served.next_trainer()
    version, target, trainer = served.version(), OTHER[served.current], served.trainer
    answer = trainer.sync(served.models[target], batched, **FAULTS[fault])
    assert answer is None or "fault" in answer, answer  # it died, or told us it stalls
    outcome = settled(served, counts)
    assert served.server.proc.poll() is None
    whole = fault == "dies-before-commit" and not batched and served.dialect == "legacy"
    if whole:  # TRL's per-parameter protocol: every parameter arrived, so the update commits without an end marker
        assert outcome["outcome"] == "committed" and served.version() == version + 1, outcome
        served.current, version, target = target, version + 1, served.current
    else:
        assert outcome["outcome"] == "rolled back" and served.version() == version, outcome
    assert served.greedy_each() == served.expected[served.current]
    trainer.proc.kill()
    trainer.proc.wait(60)
    served.recover(target)


def stock_update_info(named):
    return {"names": [n for n, _ in named], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in named],
            "shapes": [list(t.shape) for _, t in named]}


def test_a_load_that_raises_on_one_replica_rolls_back_both(served, tmp_path):
    """Stock's dialect lets a trainer give each worker its own `update_info`: replica 1's names a tensor of the
    checkpoint with its two dimensions swapped, which passes the announce (names and sizes) and fails
    replica 1's load only, after replica 0 loaded everything. TRL's dialect gives every replica the same
    announce (checked against the checkpoint's exact shapes), so there the fault plugin (tests/faults.py)
    makes replica 1's load raise, in a one-bucket update that replica 0 takes whole."""
    counts = (served.weights()["commits"], served.weights()["rollbacks"])
    version, target = served.version(), OTHER[served.current]
    named = checkpoint(served.models[target])
    client = VLLMClient(base_url=served.server.url, group_port=free_port(), timeout=HANG_S,
                        weight_sync=served.dialect)
    client.init_communicator(device="cpu")
    try:
        if served.dialect == "stock":
            bad = [(name, t.t() if name.endswith("mlp.down_proj.weight") else t) for name, t in named]
            assert served.server.post("/start_weight_update", {}).status_code == 200
            answers = {}
            thread = threading.Thread(target=lambda: answers.update(r=served.server.post(
                "/update_weights", {"update_info": [stock_update_info(named), stock_update_info(bad)]})))
            thread.start()
            from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

            tensors = iter(named)
            while (chunk := pack_tensors(tensors, lambda item: item[1], 1 << 30)) is not None:
                client.communicator.broadcast(chunk.packed_tensor, root=0).wait()
            thread.join(HANG_S)
            response = answers["r"]
            assert response.status_code == 409 and "rolled back" in response.text, response.text
        else:
            workers = [p for p in psutil.Process(served.server.proc.pid).children(recursive=True)
                       if p.name() == "VLLM::Worker"]  # one per replica: the processes that load weights
            assert len(workers) == 2, workers
            served.load_file.write_text(str(max(p.pid for p in workers)))
            try:
                with pytest.raises(VLLMClientError) as info:
                    client.update_named_params(named, bucket_bytes=1 << 30)
                assert "fault injected" in str(info.value), info.value
            finally:
                served.load_file.unlink()
        outcome = settled(served, counts)
        assert outcome["outcome"] == "rolled back" and served.version() == version, outcome
        assert served.greedy_each() == served.expected[served.current]
    finally:
        client.close_communicator()
    served.recover(target)


def test_a_trainer_restarted_mid_update_rolls_it_back_at_once(served):
    """The old trainer stalls (alive) in the middle of its update; a new trainer's init rolls that update back
    at once, ending the workers' wait for the stalled broadcast (the rollback says it was aborted, not timed
    out), and its first complete sync is exact."""
    counts = (served.weights()["commits"], served.weights()["rollbacks"])
    version, target, stalled = served.version(), OTHER[served.current], served.trainer
    restarted, served.spare = served.spare, Trainer(served.server, served.dialect)
    assert restarted.answer() == {"ready": True}  # up, not joined yet
    restarted.ready = True
    stalled.tell({"model": served.models[target], "batched": True, "fault": "stall", "at": 3})
    assert stalled.answer() == {"fault": "stall", "at": 3}
    restarted.join()
    outcome = settled(served, counts)
    assert outcome["outcome"] == "rolled back" and "aborted" in outcome["reason"], outcome
    assert served.version() == version and served.greedy_each() == served.expected[served.current]
    stalled.proc.kill()
    stalled.proc.wait(60)
    served.trainer = restarted  # (the stalled one is gone: nothing to stop)
    assert restarted.sync(served.models[target], batched=True) == {"ok": True}
    assert served.greedy_each() == served.expected[target] and served.version() == version + 1
    served.current = target
