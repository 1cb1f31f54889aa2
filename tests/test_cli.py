"""The command line: vLLM's own parser (every `vllm serve` flag), TRL 1.9's spellings, this server's defaults
and flags, the refused layout flags, a YAML `--config` with an `env:` mapping, and the configs it builds
(the parent reports N replicas; each replica's engine has data-parallel size 1 and its own seed)."""

import json
import os
import socket
import types

import pytest

import vllm_serve


def test_trl_command_line_keeps_working(models):
    args = vllm_serve.parse_args([
        "--model", models["seed0"], "--tensor_parallel_size", "1", "--data_parallel_size", "2",
        "--host", "127.0.0.1", "--port", "8001", "--gpu_memory_utilization", "0.5", "--dtype", "float32",
        "--max_model_len", "512", "--enable_prefix_caching", "false", "--enforce_eager", "--kv_cache_dtype", "auto",
        "--trust_remote_code", "true", "--log_level", "warning", "--vllm_model_impl", "transformers"])
    assert (args.model, args.tensor_parallel_size, args.data_parallel_size, args.host, args.port) == \
        (models["seed0"], 1, 2, "127.0.0.1", 8001)
    assert (args.gpu_memory_utilization, args.dtype, args.max_model_len, args.kv_cache_dtype) == \
        (0.5, "float32", 512, "auto")
    assert args.enable_prefix_caching is False and args.enforce_eager is True and args.trust_remote_code is True
    assert (args.uvicorn_log_level, args.model_impl) == ("warning", "transformers")


def test_stock_flags_and_our_defaults(models):
    args = vllm_serve.parse_args([models["seed0"], "--served-model-name", "tiny", "--max-num-seqs", "8",
                                  "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--round-wait-ms", "2"])
    assert args.model == models["seed0"] and args.served_model_name == ["tiny"] and args.max_num_seqs == 8
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes" and args.round_wait_ms == 2
    # where stock's default differs, TRL's server wins (RL needs it)
    assert (args.host, args.max_logprobs, args.logprobs_mode) == ("0.0.0.0", -1, "processed_logprobs")
    assert args.shutdown_timeout == vllm_serve.SHUTDOWN_TIMEOUT_S and args.enable_prefix_caching is None


@pytest.mark.parametrize("flags", [["--data-parallel-address", "10.0.0.1"], ["--data-parallel-rank", "1"],
                                   ["--data-parallel-size-local", "1"], ["--data-parallel-hybrid-lb"],
                                   ["--data-parallel-external-lb"], ["--headless"], ["--api-server-count", "2"]])
def test_layout_flags_that_cannot_hold_over_one_pool_are_refused(models, flags, capsys):
    with pytest.raises(SystemExit) as info:
        vllm_serve.parse_args(["--model", models["seed0"], *flags])
    assert info.value.code == 2 and "one server per node" in capsys.readouterr().err


def test_device_ids_with_several_replicas_are_refused_and_every_worker_takes_a_rank(models, capsys):
    """--device-ids would keep the whole list in every replica, whose GPUs are narrowed to its own: refused with
    DP > 1. Weight-sync ranks count every worker of a replica (tensor x pipeline parallel), not TP alone."""
    with pytest.raises(SystemExit) as info:
        vllm_serve.parse_args(["--model", models["seed0"], "--data-parallel-size", "2", "--device-ids", "0,1"])
    assert info.value.code == 2 and "CUDA_VISIBLE_DEVICES" in capsys.readouterr().err
    assert vllm_serve.parse_args(["--model", models["seed0"], "--device-ids", "1"]).device_ids

    class TwoReplicas(list):  # of tp 2 x pp 2 workers each, as Replica.info reports them
        infos = [{"workers": 4}] * 2

    sync = vllm_serve.WeightSync.__new__(vllm_serve.WeightSync)
    sync.replicas, sync.backend = TwoReplicas([0, 1]), "gloo"
    sync.args, sync.counter = types.SimpleNamespace(weight_sync_timeout=5), types.SimpleNamespace(name="abort")
    assert sync.world_size == 8
    assert [sync.spec(replica, rank=1)["rank"] for replica in range(2)] == [1, 5]  # stock's rank_offset 1


def test_yaml_config_exports_env_and_sets_flags(models, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "")  # recorded as unset, so the config's export is undone afterwards
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"model": models["seed0"], "max-model-len": 256,
                                  "env": {"VLLM_API_KEY": "from-config"}}))  # JSON is YAML
    args = vllm_serve.parse_args(["--config", str(config), "--port", "8002"])
    assert (args.model, args.max_model_len, args.port) == (models["seed0"], 256, 8002)
    assert args.api_key == ["from-config"]


def test_replicas_get_data_parallel_size_1_their_own_seed_and_the_extension(models):
    args = vllm_serve.parse_args(["--model", models["seed0"], "--data-parallel-size", "3", "--dtype", "float32",
                                  "--max-model-len", "512", "--seed", "5"])
    parent, replicas = vllm_serve.make_configs(args)
    assert parent.parallel_config.data_parallel_size == 3 and parent.parallel_config.world_size_across_dp == 3
    assert [c.parallel_config.data_parallel_size for c in replicas] == [1, 1, 1]
    seeds = [c.model_config.seed for c in replicas]
    assert len(set(seeds)) == 3  # each replica derives its own from --seed, its rank and the server's address
    assert seeds == [vllm_serve.replica_seed(5, rank, f"{socket.gethostname()}:{args.port}") for rank in range(3)]
    other = vllm_serve.replica_seed(5, 0, f"{socket.gethostname()}:{args.port + 1}")
    assert other not in seeds  # a second server on this box, started with the same --seed
    assert {c.parallel_config.worker_extension_cls for c in replicas} == {"vllm_serve.WeightSyncWorkerExtension"}


@pytest.mark.parametrize("model, offline", [("org/name", "unset"), (None, "1")])
def test_make_serve_reaches_the_hub_only_for_a_named_model(model, offline, tmp_path):
    """`make serve MODEL=org/name` on a fresh box must download it; the tiny model (and the tests) stay offline.
    The recipe runs with PY replaced by a probe that prints what the server would see."""
    import subprocess
    import sys

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text("{}")  # the tiny model exists: not rebuilt
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".complete").touch()  # and so does the venv
    probe = f"{sys.executable} -c 'import os; print(\"HF_HUB_OFFLINE=\" + os.environ.get(\"HF_HUB_OFFLINE\", \"unset\"))'"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "-s", "serve", f"PY={probe}", f"TINY={tiny}", f"VENV={tmp_path / 'venv'}",
                          *([f"MODEL={model}"] if model else [])], cwd=vllm_serve.pathlib.Path(vllm_serve.__file__).parent,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == f"HF_HUB_OFFLINE={offline}", out


def test_vllm_message_queues_spin_briefly_on_cpu_and_recheck_often():
    """Importing the server set vLLM's queue knobs (the names must still exist in the installed vLLM): a reader
    spins QUEUE_SPIN_S after a read on CPU, and looks for a lost wake-up every QUEUE_RECHECK_MS. (Read from the
    signature: a real SpinCondition's zmq sockets once aborted the test process at the context's term.)"""
    import inspect

    from vllm.distributed.device_communicators import shm_broadcast
    from vllm.platforms import current_platform

    assert shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS == vllm_serve.QUEUE_RECHECK_MS
    spin = inspect.signature(shm_broadcast.SpinCondition.__init__).parameters["busy_loop_s"].default
    assert spin == (vllm_serve.QUEUE_SPIN_S if current_platform.is_cpu() else 1)
