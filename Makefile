# Two commands (see README): `make serve [MODEL=...]` and `make test`.
# Both create the project-local virtual env in .venv on first use and reuse it afterwards.

VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
MODEL   ?=
HOST    ?= 127.0.0.1
PORT    ?= 8000
TINY    := .cache/tiny-model
ARGS    ?=

# Keep vLLM quiet: no usage stats, loopback for its internal sockets. The hub stays reachable for
# `make serve MODEL=org/name` on a fresh box; the tiny model, the tests and the bench build their models
# locally and run offline.
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export VLLM_HOST_IP := 127.0.0.1

ifeq ($(HAS_GPU),1)
RUNTIME_REQS := requirements.txt
CPU_ARGS     :=
else
RUNTIME_REQS := requirements-cpu.txt
CPU_ARGS     := --dtype float32 --enforce_eager --kv_cache_memory_bytes 268435456
endif

.PHONY: serve test bench fuzz gpu-check venv clean

venv: $(VENV)/.complete

# The stamp is written last, so an interrupted install is redone from scratch next time.
$(VENV)/.complete: requirements.txt requirements-cpu.txt requirements-test.txt requirements-trl.txt
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PIP) install --no-cache-dir -q -r $(RUNTIME_REQS) -r requirements-test.txt
	@# TRL's clients for tests/test_trl.py, without their dependencies: they must not move torch or transformers
	$(PIP) install --no-cache-dir -q --no-deps -r requirements-trl.txt
ifneq ($(HAS_GPU),1)
	@# CUDA-only wheels the CPU build drags in; they break `import transformers` next to CPU torch.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton
endif
	$(PY) -c "import vllm, starlette, uvicorn, requests, openai, pytest, trl.generation.vllm_client; print('vllm', vllm.__version__)"
	touch $@

$(TINY)/config.json: tests/tiny_model.py | venv
	$(PY) tests/tiny_model.py $(TINY)

ifeq ($(MODEL),)
serve: export HF_HUB_OFFLINE := 1
serve: $(TINY)/config.json
	$(PY) vllm_serve.py --model $(TINY) --served_model_name tiny --host $(HOST) --port $(PORT) \
		--enable_auto_tool_choice --tool_call_parser hermes $(CPU_ARGS) $(ARGS)
else
serve: venv
	$(PY) vllm_serve.py --model $(MODEL) --host $(HOST) --port $(PORT) $(CPU_ARGS) $(ARGS)
endif

test bench fuzz gpu-check: export HF_HUB_OFFLINE := 1
test: venv
	$(PY) -m pytest tests -v -x --durations=15 $(ARGS)

bench: venv
	$(PY) bench/run_all.py $(ARGS)

# Seeded fuzz of every route, ours (ARGS=--stock: stock vLLM): counts by route and status, exit 1 on any 5xx
fuzz: venv
	$(PY) bench/fuzz.py $(ARGS)

# A fresh GPU box's self-check: serve, compare, sync, sample; a PASS/FAIL table (bench/gpu_check.py)
gpu-check: venv
	$(PY) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .cache
