"""Test harness only: every rank of a tests/two_ranks.py run destroys its process group before the interpreter
finalizes. Never in the product; last on the children's PYTHONPATH (the sitecustomize files before it chain
to it).

Why: ms-swift never calls `torch.distributed.destroy_process_group()`, and with gloo a rank then sometimes
dies after training finished and logged everything: "terminate called without an active exception", SIGABRT
(exit -6), and torchrun reports the run failed. Gloo's worker threads can still hold finished work objects
whose tensors need the GIL while the interpreter is being torn down (pytorch/pytorch#190489; the atexit fix in
pytorch/pytorch#179291 was abandoned). Seen here in about one 2-rank run in ten, DDP and FSDP alike.
Destroying the group from an atexit handler, while the interpreter is whole, is what torch's docs ask of
every program; it changes nothing a run computes or logs.
"""

import atexit
import sys


def _destroy_process_group():
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # exiting anyway: say so, never raise from atexit
        print(f"rank_exit: destroy_process_group failed: {exc!r}", file=sys.stderr, flush=True)


atexit.register(_destroy_process_group)
