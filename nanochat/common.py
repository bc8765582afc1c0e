"""Process, device and distributed setup shared by the scripts and the training loop."""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist

# Measured on the shared 2-core CI box (depth-2 model, 8x64 tokens, fwd+bwd): 1 thread 50 ms,
# 2 threads 1090 ms. OpenMP workers spin-wait for each other, so with any other process on the
# cores (tokenizer threads, a second DDP rank, other jobs) using every core collapses. Default:
# half the cores, split over the ranks of this machine.
DEFAULT_CPU_THREADS = max(1, (os.cpu_count() or 1) // 2)


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment (0, 0, 1 otherwise)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def is_ddp() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, so torchrun logs are not doubled."""
    if dist_info()[0] == 0:
        print(*args, **kwargs, flush=True)


def device_setup(
    device: str | None = None, threads: int | None = None
) -> tuple[torch.device, contextlib.AbstractContextManager, int, int]:
    """Pick the device, start the process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)
    and return (device, autocast_ctx, ddp_rank, ddp_world).

    autocast_ctx is a bf16 autocast on CUDA and a no-op elsewhere: CPU bf16 matmuls are slower
    than fp32 on most CPUs, so the CPU path trains in fp32.
    """
    rank, local_rank, world = dist_info()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # CPU ranks on one machine share its cores.
        torch.set_num_threads(threads or max(1, DEFAULT_CPU_THREADS // world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            device_id=dev if dev.type == "cuda" else None,
        )
    if dev.type == "cuda":
        autocast_ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    else:
        autocast_ctx = contextlib.nullcontext()
    return dev, autocast_ctx, rank, world


def device_teardown() -> None:
    """Leave the process group. The barrier first: a gloo rank that tears down while a peer
    is still talking to it aborts the whole process ("terminate called without an active
    exception"), seen here on the 2-core box when one rank finished before the other."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_rank() -> None:
    """End a spawned rank that has written its results and left the process group, skipping
    the interpreter's own teardown: gloo's connection threads can abort it ("terminate called
    without an active exception", SIGABRT) when the peer rank exits first, which fails a
    finished job. Exit code 0, as torch.multiprocessing.spawn expects of a rank that
    succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
