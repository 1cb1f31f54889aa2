"""Faults a test can cause inside a real server, through vLLM's own plugin points and no test-only code in the
server. Imported by vLLM's engine processes (the test puts tests/ on the server's PYTHONPATH).

    --logits-processors faults:FailingLogitsProcessor
        every engine step that runs a request sent with `"vllm_xargs": {"fail": 1}` raises;
        and with FAULTS_LOAD_FILE=<path> in the server's environment, while that file holds the PID of a vLLM
        worker process, that worker's weight loads raise (the worker's model class is wrapped when the
        processor is built, before the model loads).
"""

import os

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

LOAD_FILE = "FAULTS_LOAD_FILE"


def arm_load_fault():
    path = os.environ.get(LOAD_FILE)
    if not path:
        return
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    original = Qwen2ForCausalLM.load_weights
    if getattr(original, "faulty", False):
        return

    def load_weights(self, weights):
        if os.path.exists(path) and open(path).read().strip() == str(os.getpid()):
            raise RuntimeError(f"a weight load failed in worker {os.getpid()} (fault injected by {path})")
        return original(self, weights)

    load_weights.faulty = True
    Qwen2ForCausalLM.load_weights = load_weights


class FailingLogitsProcessor(LogitsProcessor):
    """Raises in `apply` (the engine step's sampling) while a request that asked for it is in the batch."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.failing = set()  # batch indexes of the requests that asked
        arm_load_fault()

    def is_argmax_invariant(self):
        return False  # applied to greedy requests too

    def update_state(self, batch_update: BatchUpdate | None):
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.failing.discard(index)
        for index, params, _, _ in batch_update.added:
            self.failing.discard(index)
            if (params.extra_args or {}).get("fail"):
                self.failing.add(index)
        for first, second, direction in batch_update.moved:
            at_first, at_second = first in self.failing, second in self.failing
            self.failing.difference_update({first, second})
            if at_first:
                self.failing.add(second)
            if at_second and direction == MoveDirectionality.SWAP:
                self.failing.add(first)

    def apply(self, logits):
        if self.failing:
            raise RuntimeError("FailingLogitsProcessor: a request in this step asked for a failed step")
        return logits
