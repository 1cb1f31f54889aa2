"""`make gpu-check`: prove an install on a fresh GPU box in a few minutes, before a training run relies on it.

    python bench/gpu_check.py [--cpu] [--out DIR]

It builds a tiny model locally (no hub), serves it with `vllm_serve.py` (CUDA graphs on, on a GPU), and checks:
- greedy completions equal an in-process `vllm.LLM`'s, token for token;
- data-parallel replicas sample apart: 16 unseeded completions are 16 distinct ones (needs DP 2);
- a weight sync of the seed-1 weights (NCCL from a GPU the server does not use, when there is one; else gloo
  from the CPU) makes the server answer exactly as a fresh in-process engine loaded from them.
Then it prints a PASS / FAIL / SKIP table and exits 1 if any check failed.

GPUs: 3 or more → DP 2 on GPUs 0-1, the trainer on GPU 2 (NCCL); 2 → DP 1 on GPU 0, trainer on GPU 1 (NCCL),
DP skipped; 1 → DP 1, trainer on the CPU (gloo), DP skipped. `--cpu` (or no GPU): DP 2 and gloo on the CPU;
the test suite runs this mode (tests/test_gpu_box.py), so the script cannot rot.
"""

import argparse
import multiprocessing
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import support  # noqa: E402  (vLLM offline, on loopback)

PROMPTS = support.PROMPTS
MAX_TOKENS = 16
SAMPLES = 16
GREEDY = dict(temperature=0.0, max_tokens=MAX_TOKENS, generation_kwargs={"ignore_eos": True})  # as the reference
GPU_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.3"]  # graphs on


def references(model, engine_kwargs, queue=None):
    """Greedy ids of PROMPTS from an in-process `vllm.LLM`; into `queue` when run in a child process."""
    from vllm import LLM

    ids = support.greedy_ids(LLM(model=model, **engine_kwargs), PROMPTS, MAX_TOKENS)
    return queue.put(ids) if queue else ids


def greedy_reference(model, engine_kwargs, on_gpu):
    """On a GPU, in a child process, so that its memory is freed before the server starts. On the CPU, here, in
    vLLM's in-process layout: four fewer Python processes loading vLLM beside the starting server."""
    if not on_gpu:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the server's own environment says "1"
        return references(model, engine_kwargs)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=references, args=(model, engine_kwargs, queue))
    process.start()
    ids = queue.get(timeout=support.HEALTH_TIMEOUT_S)
    process.join(support.HANG_S)
    return ids


def layout(cpu):
    """→ (on_gpu, DP size, the trainer's device, the server's CUDA_VISIBLE_DEVICES or None)."""
    import torch

    gpus = 0 if cpu else torch.cuda.device_count()
    if gpus >= 3:
        return True, 2, "cuda:2", "0,1"
    if gpus == 2:
        return True, 1, "cuda:1", "0"
    if gpus == 1:
        return True, 1, "cpu", "0"
    return False, 2, "cpu", None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="check the CPU build (what the test suite runs)")
    parser.add_argument("--out", help="where the models and the server's log go (default: a temp dir)")
    args = parser.parse_args(argv)
    import tiny_model

    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    on_gpu, dp, trainer, visible = layout(args.cpu)
    print(f"gpu-check: {'GPU' if on_gpu else 'CPU'} mode, DP {dp}, trainer on {trainer}; logs in {out}", flush=True)
    models = {seed: str(tiny_model.build(out / f"seed{seed}", seed=seed)) for seed in (0, 1)}
    engine = dict(dtype="float32", max_model_len=512, seed=0, logprobs_mode="processed_logprobs", max_logprobs=-1,
                  **(dict(gpu_memory_utilization=0.3) if on_gpu else dict(enforce_eager=True,
                                                                            kv_cache_memory_bytes=64 << 20)))
    transport = "nccl" if trainer.startswith("cuda") else "gloo"
    server = support.Server(models[0], *(GPU_ARGS if on_gpu else support.SERVER_ARGS), "--data-parallel-size",
                            str(dp), "--weight-transfer-config", f'{{"backend": "{transport}"}}', log_dir=out,
                            name="gpu-check", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1",  # vLLM's production layout
                                                   **({"CUDA_VISIBLE_DEVICES": visible} if visible else {})})
    if not on_gpu:  # CPU: the server starts while the references run; on a GPU they hold it first, then the server
        server.launch()
    results = []

    def check(name, passed, detail=""):
        results.append((name, "PASS" if passed else "FAIL", detail))

    try:
        expected = {seed: greedy_reference(models[seed], engine, on_gpu) for seed in (0, 1)}
        server.wait_healthy() if server.proc else server.start()
        from vllm_client import VLLMClient

        client = VLLMClient(base_url=server.url, timeout=support.HANG_S)
        greedy = client.generate(PROMPTS, **GREEDY)["completion_ids"]
        check("greedy == in-process vLLM", greedy == expected[0], f"{len(PROMPTS)} prompts x {MAX_TOKENS} tokens")
        if dp > 1:
            sampled = client.generate([PROMPTS[1]] * SAMPLES, temperature=1.0, max_tokens=MAX_TOKENS)["completion_ids"]
            distinct = len({tuple(ids) for ids in sampled})
            repeats = [[i for i, other in enumerate(sampled) if other == ids] for ids in sampled]
            check("DP replicas sample apart", distinct == SAMPLES, f"{distinct} of {SAMPLES} distinct" + (
                "" if distinct == SAMPLES else f"; the same at {sorted({tuple(r) for r in repeats if len(r) > 1})}"
                f"; finished per rank {server.health()['requests_finished_per_rank']}"))
        else:
            results.append(("DP replicas sample apart", "SKIP", "DP 2 needs 3 GPUs (2 + the trainer's)"))
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(models[1]).to(trainer)
        client.init_communicator(device=trainer)
        client.update_model_params(trained)
        client.reset_prefix_cache()
        synced = client.generate(PROMPTS, **GREEDY)["completion_ids"]
        check(f"weight sync ({transport}) == fresh engine", synced == expected[1] and synced != expected[0],
              f"seed-1 weights from {trainer}")
        client.close()
    except Exception as exc:  # a failure to start or to call: one FAIL row says why
        check("server and client", False, f"{type(exc).__name__}: {exc}"[:300])
    finally:
        server.stop()
        left = server.left_behind
        check("stopped, nothing left behind", server.exit_code == 0 and not left, f"exit {server.exit_code}"
              + (f", killed {len(left)} left behind" if left else ""))
    width = max(len(name) for name, _, _ in results)
    for name, verdict, detail in results:
        print(f"{verdict:4}  {name:{width}}  {detail}")
    failed = [name for name, verdict, _ in results if verdict == "FAIL"]
    print(f"gpu-check: {'FAIL: ' + ', '.join(failed) if failed else 'PASS'}; server log: {server.log_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
