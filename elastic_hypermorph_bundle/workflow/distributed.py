"""Multi-process training under ``torchrun`` (``configs/multi_gpu_train.json``): the process group, this process's
device, the wrapped network, and which process logs and saves."""

from __future__ import annotations

import logging
import os

import ignite.distributed as idist
import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "distributed_device",
    "is_main_process",
    "distributed_network",
    "quiet_other_ranks",
    "finish_distributed",
]


def distributed_device() -> torch.device:
    """This process's device under ``torchrun``: ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_distributed() -> int:
    """Join the ``torchrun`` process group (NCCL on CUDA, Gloo on CPU) unless already joined, select this process's
    GPU, register the group with ``ignite.distributed``, and return the rank."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("distributed training must be launched with torchrun (RANK/WORLD_SIZE are not set).")
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(distributed_device())
    # ignite sets up its view of the group with a collective call, on first use; make every rank take part now,
    # since some ignite objects (checkpoint savers) are created on the main process only
    idist.sync()
    return dist.get_rank()


def is_main_process() -> bool:
    """Whether this process logs and saves: rank 0 of the process group (or the only process)."""
    return idist.get_rank() == 0


def distributed_network(network: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``network`` on ``device`` wrapped in ``DistributedDataParallel`` (``device_ids=[device]`` on CUDA, none on the
    CPU, as Gloo wants)."""
    device = torch.device(device)
    device_ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network.to(device), device_ids=device_ids)


def quiet_other_ranks(engines, main_process: bool | None = None) -> None:
    """Let only the main process log engine progress at INFO: the other ranks' engine loggers are set to WARNING."""
    main = is_main_process() if main_process is None else bool(main_process)
    for engine in engines:
        engine.logger.setLevel(logging.INFO if main else logging.WARNING)


def finish_distributed() -> None:
    """Leave the process group (if joined) at the end of the run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
