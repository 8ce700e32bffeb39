"""Start N worker processes with a torch.distributed process group and collect what each returns.

One process per GPU with NCCL where GPUs are visible, gloo on the CPU otherwise (tests). NVLink
multicast (NVLS) is forced off before any process starts: on shared multi-GPU hosts it can take the
GPUs out of service, and point-to-point pipelines gain nothing from it.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import queue as queue_mod
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    """A TCP port free on loopback now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_rank(rank: int, world_size: int, port: int, device: torch.device) -> None:
    """Join the process group of N ranks from inside one of them: NCCL with `device` as this process's
    current CUDA device, gloo on a CPU; the rendezvous is tcp://127.0.0.1:`port` (`free_port`).
    Used by `spawn`'s workers and by the pipelined generator's rank processes."""
    os.environ.update(SAFE_ENV)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        device_id=device if cuda else None,
    )


def _worker(
    rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, queue: Any, timeout_s: float
) -> None:
    faulthandler.dump_traceback_later(timeout_s, exit=True)  # a hung rank shows where it hangs, then ends
    try:
        init_rank(rank, world_size, port, torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu"))
        result = fn(rank, world_size, *args)
        dist.barrier()
        # plain pickle copies tensors into the message; torch's shared-memory handles would die with
        # this process before the parent reads them
        queue.put((rank, pickle.dumps(result), None))
    except Exception:  # report to the parent instead of hanging the others' collect
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    world_size: int, fn: Callable[..., Any], args: tuple = (), backend: str | None = None, timeout_s: float = 900
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` processes; returns the results by rank.

    `fn` and its results must be picklable (module-level function, CPU tensors or plain data).
    """
    os.environ.update(SAFE_ENV)  # children inherit it, and so does anything they start
    backend = backend or default_backend()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, queue, timeout_s), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    strikes = 0  # a rank that exited may still have its result in the pipe: look a few more times
    while len(results) < world_size and not errors:
        try:
            rank, result, error = queue.get(timeout=1.0)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
            strikes = strikes + 1 if dead else 0
            if strikes >= 3:
                errors.append(f"ranks {dead} exited (codes {[procs[r].exitcode for r in dead]}) without a result")
            continue
        if error:
            errors.append(f"rank {rank}:\n{error}")
        else:
            results[rank] = pickle.loads(result)
    for p in procs:
        p.join(timeout=5 if errors else timeout_s)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
