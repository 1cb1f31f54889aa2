"""What a GPU box needs that a CPU run can still check: GPU assignment and the same-device refusal through
their pure helpers, the client's device handling, and a stop at any moment of start-up leaving no process
behind (an orphaned engine holds the GPU memory the restarted server needs).

The CUDA-only lines these helpers feed (NCCL groups, CUDA events) are listed in the README's "GPU box" section.
"""

import contextlib
import os
import signal
import threading

import psutil
import pytest
import torch

import support
import vllm_client
import vllm_serve
from support import HANG_S, SERVER_ARGS, wait_until

# ------------------------------------------------------------------------------------------------
# GPU assignment and the same-device refusal (pure helpers the server calls)
# ------------------------------------------------------------------------------------------------


def test_each_replica_gets_its_own_gpus():
    assert vllm_serve.replica_envs(2, 2, True, None, 4, 2) == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                                                {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert vllm_serve.replica_envs(2, 1, True, "5,7,3", 3, 2) == [{"CUDA_VISIBLE_DEVICES": "5"},
                                                                   {"CUDA_VISIBLE_DEVICES": "7"}]
    assert vllm_serve.replica_envs(1, 2, True, "5,7", 2, 2) == [{}]  # one replica keeps what it was given


@pytest.mark.parametrize("dp, world, visible, gpus", [(2, 2, None, 3), (3, 1, "0,1", 2), (1, 2, None, 1),
                                                      (2, 1, None, 0), (2, 1, "0,1,2,3", 1)])
def test_too_few_gpus_are_refused_before_anything_starts(dp, world, visible, gpus):
    """No GPU counted (nvidia-smi missing, say) is refused too: every replica would land on GPU 0."""
    with pytest.raises(ValueError, match=f"need {dp * world} GPUs"):
        vllm_serve.replica_envs(dp, world, True, visible, gpus, 2)


def test_cpu_replicas_get_their_own_core(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert vllm_serve.replica_envs(3, 1, False, None, 0, 2) == [{"VLLM_CPU_OMP_THREADS_BIND": str(r)}
                                                                for r in (0, 1, 0)]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "all")  # the user's binding wins
    assert vllm_serve.replica_envs(2, 1, False, None, 0, 2) == [{}, {}]


def test_a_trainer_on_a_worker_gpu_is_found():
    workers = ["GPU-a", "GPU-b", None]
    assert vllm_serve.shared_gpu("GPU-b", workers) == "GPU-b"
    assert vllm_serve.shared_gpu("GPU-c", workers) is None
    assert vllm_serve.shared_gpu("cpu", [None]) is None  # a CPU trainer, CPU workers
    assert vllm_serve.shared_gpu("None", [None, None]) is None


def test_a_bare_cuda_device_gets_the_current_index(monkeypatch):
    """PyNccl asserts an indexed device: "cuda" means the current one, as torch does."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert vllm_client._as_device("cuda") == torch.device("cuda", 3)
    assert vllm_client._as_device("cuda:1") == torch.device("cuda", 1)
    assert vllm_client._as_device(2) == vllm_client._as_device("2") == torch.device("cuda", 2)
    assert vllm_client._as_device("cpu") == torch.device("cpu")


def test_a_deadline_poll_gives_up_on_what_never_completes():
    """The check behind every NCCL wait: a stream blocked by a broadcast whose sender died reads as not done."""
    answers = iter([False, False, True])
    assert vllm_serve.completed(lambda: next(answers), timeout_s=HANG_S)
    assert not vllm_serve.completed(lambda: False, timeout_s=0)
    assert not vllm_client._completed(lambda: False, timeout_s=0)


class NcclGroup:
    """A stand-in for PyNcclCommunicator (pure unit tests): its calls return at once, `destroy` is recorded."""

    def __init__(self):
        self.destroyed = False
        self.group = self

    def broadcast(self, tensor, src):
        pass

    def barrier(self):
        pass

    def destroy(self):
        self.destroyed = True


class Exited(Exception):
    """os._exit, stood in for: the code path that would end the process."""


def exit_raises(monkeypatch):
    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr(vllm_serve.os, "_exit", exit_)


@pytest.mark.parametrize("drained", [True, False])
def test_a_broadcast_past_its_deadline_destroys_the_group_and_a_blocked_stream_ends_the_worker(monkeypatch,
                                                                                                drained):
    """The worker's side of the NCCL lifecycle (WeightEngine): a broadcast whose stream does not drain within the
    deadline raises, leaving the group destroys it (NCCL's abort), and if the stream is still blocked after
    that the worker process exits (its engine dies, and the server exits 1 for its supervisor:
    tests/test_reliability.py)."""
    engine = vllm_serve.WeightEngine(None, None, torch.device("cuda", 0))
    engine.group, engine.spec = NcclGroup(), {"source": 1, "timeout_s": 5, "barrier": True}
    comm, checks = engine.group, []
    # the broadcast's own check never drains; the one after the abort drains or not
    monkeypatch.setattr(engine, "_stream_drained", lambda timeout_s, epoch: checks.append(timeout_s) or
                        (drained and len(checks) > 1))
    exit_raises(monkeypatch)
    with pytest.raises(TimeoutError, match="did not complete within 5 s"):
        engine._broadcast(torch.empty(4), 0)
    with contextlib.nullcontext() if drained else pytest.raises(Exited):
        engine.leave()
    assert comm.destroyed and engine.group is None
    assert checks == [5, vllm_serve.NCCL_ABORT_GRACE_S]


def nccl_fakes(monkeypatch, communicator):
    """NCCL's set-up without CUDA: the store and vLLM's communicator stood in for (pure unit tests)."""
    from vllm.distributed import utils as distributed_utils

    monkeypatch.setattr(distributed_utils.StatelessProcessGroup, "create", staticmethod(lambda **kwargs: "store"))
    monkeypatch.setattr(vllm_serve, "PyNcclCommunicator", communicator)  # the name vllm_serve imported
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


def test_nccl_group_set_up_has_a_deadline_and_refuses_a_disabled_communicator(monkeypatch):
    """ncclCommInitRank has no deadline of its own: a set-up still running at the group's deadline ends the
    worker (it cannot be aborted); one that comes back disabled is refused, as the client refuses its own."""
    engine = vllm_serve.WeightEngine(None, None, torch.device("cuda", 0))
    spec = {"host": "127.0.0.1", "port": 1, "rank": 0, "world_size": 2, "timeout_s": 0.2}
    released = threading.Event()

    class Stuck:
        def __init__(self, store, device):
            released.wait(HANG_S)  # a trainer that joined the store, then never called ncclCommInitRank

    nccl_fakes(monkeypatch, Stuck)
    exit_raises(monkeypatch)
    try:
        with pytest.raises(Exited):
            engine._nccl_group(spec, 0)
    finally:
        released.set()

    class Disabled:
        def __init__(self, store, device):
            self.disabled = True

    nccl_fakes(monkeypatch, Disabled)
    with pytest.raises(RuntimeError, match="disabled"):
        engine._nccl_group({**spec, "timeout_s": HANG_S}, 0)
    with pytest.raises(vllm_client.VLLMClientError, match="disabled"):
        vllm_client._enabled(Disabled(None, None))


def test_the_client_refuses_transports_it_cannot_speak_before_any_group_forms():
    client = vllm_client.VLLMClient.__new__(vllm_client.VLLMClient)
    client._device = torch.device("cpu")
    with pytest.raises(vllm_client.VLLMClientError, match="NCCL, which needs a CUDA device"):
        client._transport({"nccl"})  # init_communicator(device="cpu") against an NCCL server
    for backends in ({"ipc"}, {"gloo", "nccl"}, {None}):
        with pytest.raises(vllm_client.VLLMClientError, match="gloo or NCCL"):
            client._transport(set(backends))
    assert client._transport({"gloo"}) == "gloo"


def test_the_client_packs_after_the_optimizer_and_within_its_deadline(monkeypatch):
    """Stock's NCCL producer packs on vLLM's side streams: each first waits for the trainer's current stream (an
    optimizer step still writing the weights). It blocks the host on those streams, so it runs watched: past
    the deadline the communicator is destroyed, which ends its broadcasts, and the sync raises."""
    from vllm.distributed.weight_transfer import packed_tensor

    events, release = [], threading.Event()

    class Stream:
        def wait_stream(self, other):
            events.append(("wait", other))

    monkeypatch.setattr(packed_tensor, "_get_streams", lambda index, count: [Stream() for _ in range(count)])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "trainer stream")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(packed_tensor, "packed_nccl_broadcast_producer",
                        lambda *args, **kwargs: events.append(("pack", None)) or release.wait(HANG_S))
    client = vllm_client.VLLMClient.__new__(vllm_client.VLLMClient)
    client._device, client.timeout, client.packed_bytes = torch.device("cuda", 0), 0.2, 1 << 20
    client.communicator, client._pack_buffers = NcclGroup(), []
    comm = client.communicator
    try:
        with pytest.raises(vllm_client.VLLMClientError, match="did not complete"):
            client._produce([("w", torch.zeros(2))])
    finally:
        release.set()
    assert events[:2] == [("wait", "trainer stream")] * 2 and events[2] == ("pack", None)
    assert comm.destroyed and client.communicator is None


def test_the_client_destroys_its_nccl_communicator_when_it_leaves():
    client = vllm_client.VLLMClient.__new__(vllm_client.VLLMClient)  # no server: the group alone
    client.communicator, client._pack_buffers = NcclGroup(), []
    comm = client.communicator
    client._leave_group()
    assert comm.destroyed and client.communicator is None


# ------------------------------------------------------------------------------------------------
# A stop at any moment of start-up
# ------------------------------------------------------------------------------------------------


def named(prefix):
    return lambda server, tree: any(p.name().startswith(prefix) for p in tree)


def replica_spawned(server, tree):
    return any("spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())
               for p in tree)


# A stop of a healthy server is every fixture's teardown: it must exit 0 with nothing left behind (conftest.py)
STAGES = {"replica spawned": replica_spawned, "engine core spawned": named("VLLM::EngineCor"),
          "model worker spawned": named("VLLM::Worker")}


def tree_of(pid, seen):
    """Every descendant of `pid` seen so far (those a stop orphans are no longer descendants): {pid: (process,
    command line)}. The command line is read while the process runs: one in its exit reads as empty."""
    for process in support.descendants(pid):
        if process.pid not in seen:
            with contextlib.suppress(psutil.Error):
                if command := " ".join(process.cmdline()):
                    seen[process.pid] = (process, command)
    return [process for process, _ in seen.values()]


@pytest.mark.parametrize("stage, signum", [(stage, "SIGTERM") for stage in STAGES] + [("model worker spawned", "SIGINT")])
def test_a_stop_at_any_stage_of_start_up_leaves_nothing_behind(models, tmp_path, stage, signum):
    """SIGTERM to the server, or SIGINT to its whole process group (Ctrl-C in a terminal), as soon as start-up
    reaches `stage` (seen in the process tree): it exits, and no process of its tree outlives it
    (an engine process still loading on a GPU box would hold the memory the restarted server needs). Only the
    resource trackers may end a moment later, by themselves."""
    server = support.Server(models["seed0"], *SERVER_ARGS, log_dir=tmp_path, name="stop",
                            env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}).launch()
    seen = {}
    try:
        def reached():
            if server.proc.poll() is not None:
                raise AssertionError(f"exited with {server.proc.returncode} before {stage}:\n{server.log_tail()}")
            tree = tree_of(server.proc.pid, seen)
            try:
                return STAGES[stage](server, [p for p in tree if p.is_running()])
            except psutil.Error:  # a process that ended while we looked
                return False

        wait_until(reached, stage, support.HEALTH_TIMEOUT_S)
        if signum == "SIGINT":
            os.killpg(server.proc.pid, signal.SIGINT)
        else:
            server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: tree_of(server.proc.pid, seen) is not None and server.proc.poll() is not None,
                   "the server's exit")
        # multiprocessing's resource trackers exit by themselves once the last process holding their pipe is gone
        outlived = [(p.pid, command) for p, command in seen.values()
                    if vllm_serve.running(p) and "resource_tracker" not in command]
        assert not outlived
        _, alive = psutil.wait_procs([p for p, _ in seen.values()], timeout=support.STOP_TIMEOUT_S)
        assert not alive, [(p.pid, seen[p.pid][1]) for p in alive]
    finally:
        server.stop()
        for process, _ in seen.values():
            with contextlib.suppress(psutil.Error):
                process.kill()


# ------------------------------------------------------------------------------------------------
# make gpu-check, in its CPU mode
# ------------------------------------------------------------------------------------------------


def test_gpu_check_passes_in_its_cpu_mode(tmp_path):
    """The self-check a user runs on a fresh GPU box, run here in its CPU mode so that it cannot rot: every
    check passes (greedy ids equal the in-process engine's, DP samples apart, the synced weights answer as a
    fresh engine, the server stops with nothing left behind)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(support.ROOT / "bench" / "gpu_check.py"), "--cpu", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=support.HEALTH_TIMEOUT_S * 2,
                         start_new_session=True)
    table = [line for line in run.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert run.returncode == 0 and len(table) == 4 and all(row.startswith("PASS") for row in table), \
        run.stdout[-3000:] + run.stderr[-3000:]
