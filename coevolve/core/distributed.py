"""The processes of one step started by a multi-process launcher (`accelerate launch`, deepspeed,
torchrun; `cfg.launch`): which one this is, its share of a list, and the shares brought back together.

Every process runs the whole step. Sampling and scoring split their prompts into contiguous shares,
one per process, and gather the results in order, so every process goes on with the full lists; the
trainers split their batches themselves. Only the main process writes the run directory. With one
process (no launcher), every function here is a no-op. torch is imported only with several processes:
the run directory's tools (the stores) ask `is_main` without it.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the launcher's process group (gloo on CPU, nccl on GPU) on this process's own GPU; the
    trainers' accelerate finds the group made and uses it."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def finish() -> None:
    """Leave the process group. Left to the interpreter's exit, gloo's threads can abort the process
    (SIGABRT, "terminate called without an active exception"; pytorch issue 190489)."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def share(n: int) -> range:
    """This process's contiguous share of `n` items; shares differ in size by at most one."""
    r, size = rank(), world_size()
    return range(r * n // size, (r + 1) * n // size)


def gather(part: list) -> list:
    """Every process's `part`, concatenated in process order: with `share`, the whole list in order."""
    if world_size() == 1:
        return part
    import torch.distributed as dist

    parts: list = [None] * world_size()
    dist.all_gather_object(parts, part)
    return [item for p in parts for item in p]


def from_main(value):
    """The main process's `value`, on every process (for a decision only the main process can make)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()
