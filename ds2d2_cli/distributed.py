"""Multi-process training under `torchrun`: process group, device per rank, rank-0-only output.

`torchrun --nproc_per_node N -m ds2d2_cli <stage> ...` starts N copies of the command with
RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) in the environment.
`setup` turns that into an initialised process group (NCCL on GPUs, gloo on CPU) and the
rank's device; without those variables everything is single-process and these helpers
are no-ops. The engine then wraps the trainable module in DistributedDataParallel, gives
each rank its slice of every global batch and lets only rank 0 write files and progress.
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from ds2d2_cli.errors import InputError

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in _ENV_KEYS) and int(os.environ["WORLD_SIZE"]) > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (once); returns this rank's device.

    `device` is what `--device` resolved to: on CUDA each rank takes `cuda:LOCAL_RANK`
    (one GPU per process), on CPU every rank uses the CPU with the gloo backend.
    """
    if not launched_by_torchrun():
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node; "
                             "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=30)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        atexit.register(shutdown)
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 writes checkpoints, logs, summaries and progress; the others only compute."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks, so every rank takes the same branch."""
    if world_size() == 1:
        return list(flags)
    tensor = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The average of each named value over all ranks (the loss of the whole global batch)."""
    if world_size() == 1 or not values:
        return dict(values)
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return {k: v / world_size() for k, v in zip(values, tensor.tolist())}


def gather_lists(items: list[Any]) -> list[Any]:
    """Concatenate every rank's list (rank order), on every rank."""
    if world_size() == 1:
        return list(items)
    gathered: list[list[Any] | None] = [None] * world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
