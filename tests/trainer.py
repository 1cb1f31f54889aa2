"""A trainer process for the weight-update fault tests: it joins a server's weight-sync group with VLLMClient,
then runs the syncs it is told on stdin (one JSON object per line), answering each with a JSON line on stdout.

    python tests/trainer.py URL GROUP_PORT DIALECT
    {"init": true}      (first: join the group)
    {"model": DIR, "batched": true, "fault": null | "die" | "stall" | "die-before-commit", "at": K | "last"}

A fault makes it die (os._exit) or stall (sleep for an hour, alive) right before its K-th weight broadcast, once
the server reports the update receiving (the announce that precedes the broadcasts is sent from another thread,
and a trainer that died before it reached the server began no update), or die after its last broadcast but
before the commit. The broadcast is intercepted at torch's ProcessGroup class,
under the client, so the client's own code runs as in a real trainer.
"""

import json
import os
import sys
import time

import requests
import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import vllm_client  # noqa: E402
from support import checkpoint  # noqa: E402
from vllm.distributed import utils  # noqa: E402, F401  (imported before "ready", as a TRL trainer has: ~2.5 s)
from vllm.distributed.weight_transfer import packed_tensor  # noqa: E402, F401
from vllm_client import VLLMClient  # noqa: E402

BUCKET_BYTES = 200_000  # the tiny model (2.2 MB) then takes about a dozen broadcasts in either dialect
STALL_S = 3600


def broadcasts(client, named, batched):
    """How many broadcasts this sync makes."""
    if not batched:
        return len(named)
    if client.weight_sync == "legacy":
        return len(vllm_client._buckets(named, BUCKET_BYTES))
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    tensors, count = iter(named), 0
    while pack_tensors(tensors, lambda item: item[1], client.packed_bytes) is not None:
        count += 1
    return count


def receiving(url):
    """Wait until the server at `url` reports an update receiving (bounded: the tests' hang guard)."""
    for _ in range(3000):
        if requests.get(url + "/health", timeout=10).json()["weights"]["state"] == "receiving":
            return
        time.sleep(0.1)
    raise RuntimeError("the server never reported the update receiving")


def arm(order, total, url):
    """Install the fault `order` asks for."""
    fault, at = order.get("fault"), order.get("at")
    if fault == "die-before-commit":
        VLLMClient._commit = lambda self: os._exit(0)
    elif fault in ("die", "stall"):
        at = total if at == "last" else at
        group_class, original, seen = torch._C._distributed_c10d.ProcessGroup, \
            torch._C._distributed_c10d.ProcessGroup.broadcast, [0]

        def broadcast(self, *args, **kwargs):
            seen[0] += 1
            if seen[0] == at:
                receiving(url)
                print(json.dumps({"fault": fault, "at": at}), flush=True)
                if fault == "die":
                    os._exit(1)
                time.sleep(STALL_S)
            return original(self, *args, **kwargs)

        group_class.broadcast = broadcast


def main():
    url, port, dialect = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # started beside a server still starting (the tests' bound for a start: 600 s), as a trainer may be
    client = VLLMClient(base_url=url, group_port=port, timeout=120, weight_sync=dialect, connection_timeout=600)
    client.packed_bytes = BUCKET_BYTES
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        order = json.loads(line)
        if order.get("init"):
            client.init_communicator(device="cpu")
            print(json.dumps({"ok": True}), flush=True)
            continue
        named = checkpoint(order["model"])
        arm(order, broadcasts(client, named, order["batched"]), url)
        try:
            if order["batched"]:
                client.update_named_params(named, bucket_bytes=BUCKET_BYTES)
            else:
                for name, tensor in named:
                    client.update_named_param(name, tensor)
                client.reset_prefix_cache()
            print(json.dumps({"ok": True}), flush=True)
        except Exception as exc:
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)


if __name__ == "__main__":
    main()
