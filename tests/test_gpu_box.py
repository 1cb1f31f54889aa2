"""What a GPU box needs that a CPU run can still check: GPU assignment and the same-device refusal through
their pure helpers, the client's device handling, and a stop at any moment of start-up leaving no process
behind (an orphaned engine holds the GPU memory the restarted server needs).

The CUDA-only lines these helpers feed (NCCL groups, CUDA events) are listed in the README's "GPU box" section.
"""

import contextlib
import os
import signal

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


@pytest.mark.parametrize("drained", [True, False])
def test_a_broadcast_past_its_deadline_destroys_the_group_and_a_blocked_stream_ends_the_worker(monkeypatch,
                                                                                                drained):
    """The worker's side of the NCCL lifecycle: a broadcast whose stream does not drain within the deadline
    raises, the group is destroyed (NCCL's abort), and if the stream is still blocked after that the worker
    process exits (its engine dies, and the server exits 1 for its supervisor: tests/test_reliability.py)."""
    worker = vllm_serve.WeightSyncWorkerExtension()
    worker.weight_comm, worker.weight_client_rank, worker.weight_timeout_s = NcclGroup(), 1, 5
    worker.device = worker.weight_device = torch.device("cuda", 0)
    comm, checks, exits = worker.weight_comm, [], []
    # the broadcast's own check never drains; the one after the abort drains or not
    monkeypatch.setattr(worker, "_stream_drained", lambda timeout_s: checks.append(timeout_s) or
                        (drained and len(checks) > 1))
    monkeypatch.setattr(vllm_serve.os, "_exit", exits.append)
    with pytest.raises(TimeoutError, match="did not complete within 5 s"):
        with worker._closed_on_error():
            worker._broadcast(torch.empty(4))
    assert comm.destroyed and worker.weight_comm is None
    assert checks == [5, vllm_serve.NCCL_ABORT_GRACE_S] and exits == ([] if drained else [1])


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


def healthy(server, tree):
    try:
        return server.get("/health", timeout=10).status_code == 200
    except support.requests.RequestException:
        return False


STAGES = {"replica spawned": replica_spawned, "engine core spawned": named("VLLM::EngineCor"),
          "model worker spawned": named("VLLM::Worker"), "healthy": healthy}


def tree_of(pid, seen):
    """Every descendant of `pid` seen so far (those a stop orphans are no longer descendants)."""
    for process in support.descendants(pid):
        seen.setdefault(process.pid, process)
    return list(seen.values())


def tracker(process):
    """multiprocessing's resource tracker: it exits by itself once the last process holding its pipe is gone."""
    with contextlib.suppress(psutil.Error):
        return "resource_tracker" in " ".join(process.cmdline())


@pytest.mark.parametrize("stage, signum", [(stage, "SIGTERM") for stage in STAGES] + [("model worker spawned", "SIGINT")])
def test_a_stop_at_any_stage_of_start_up_leaves_nothing_behind(models, tmp_path, stage, signum):
    """SIGTERM to the server, or SIGINT to its whole process group (Ctrl-C in a terminal), as soon as start-up
    reaches `stage` (seen in the process tree, or /health): it exits, and no process of its tree outlives it
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
        outlived = [p for p in seen.values() if vllm_serve.running(p) and not tracker(p)]
        assert not outlived, [(p.pid, p.name()) for p in outlived]
        _, alive = psutil.wait_procs(list(seen.values()), timeout=support.STOP_TIMEOUT_S)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        server.stop()
        for process in seen.values():
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
