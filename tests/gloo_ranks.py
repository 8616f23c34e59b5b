"""Run a function on N gloo ranks in spawned processes on 127.0.0.1 and collect what each returned.

Shared by the tests of the sharded ID head and the sharded CLIP-ReID prompts: each rank calls
``worker(rank, world, tmp)`` (a module-level function of the test module, so the spawned
process can import it) and returns a dict of tensors, saved as ``rank<r>.safetensors``.
"""

import os
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from safetensors.torch import load_file, save_file


def _entry(rank: int, worker, world: int, port: int, tmp: str, rendezvous: str) -> None:
    import torch

    # the variables Ray Train's workers get (and torchrun's), no more: DeepSpeed's CPU backend
    # reads LOCAL_SIZE (an MPI launcher's) and, when it equals the world, opens a 66 MB shared
    # memory segment per rank that nothing ever unlinks; training never sets it, and the tests
    # that did left 264 MB of RAM in /dev/shm per suite run
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # a file rendezvous, not tcp://: a port picked free here can be taken by another process
    # (a Ray test's) before rank 0's store binds it, and the rank then aborts (seen in CI)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        result = worker(rank, world, tmp)
        save_file({k: v.detach().contiguous().reshape(-1) if v.dim() == 0 else v.detach().contiguous()
                   for k, v in result.items()}, str(Path(tmp) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_memory_left(port: int) -> list[str]:
    """Shared memory segments left in /dev/shm by the ranks that used ``port`` (DeepSpeed names its
    CPU all-reduce buffers ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``)."""
    shm = Path("/dev/shm")
    return sorted(p.name for p in shm.glob(f"*_{port}_*")) if shm.is_dir() else []


def run_ranks(worker, world: int, tmp: Path, timeout_s: float) -> list[dict]:
    """Each rank's returned tensors, in rank order; the test fails if the ranks do not finish in
    time, or leave shared memory behind."""
    rendezvous = Path(tmp) / f"rendezvous-{uuid.uuid4().hex}"  # must not exist before the ranks start
    port = _free_port()
    ctx = tmp_mp.start_processes(_entry, args=(worker, world, port, str(tmp), str(rendezvous)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.time() + timeout_s
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} gloo ranks did not finish in {timeout_s} s")
    left = shared_memory_left(port)
    assert not left, f"the ranks left shared memory in /dev/shm: {left}"
    return [load_file(str(tmp / f"rank{r}.safetensors")) for r in range(world)]
