"""Faults a test can cause inside a real server, through vLLM's own plugin points and no test-only code in the
server. Imported by vLLM's engine processes (the test puts tests/ on the server's PYTHONPATH).

    --logits-processors faults:FailingLogitsProcessor
        every engine step that runs a request sent with `"vllm_xargs": {"fail": 1}` raises.
"""

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality


class FailingLogitsProcessor(LogitsProcessor):
    """Raises in `apply` (the engine step's sampling) while a request that asked for it is in the batch."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.failing = set()  # batch indexes of the requests that asked

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
