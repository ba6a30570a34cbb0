"""Multi-process runs under ``torchrun``: training (``configs/multi_gpu_train.json``) and inference or evaluation of a
cohort (``configs/multi_gpu_evaluate.json``): the process group, this process's device, the wrapped network, which
process logs and saves, and the output folder the processes of an inference or evaluation share."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import ignite.distributed as idist
import torch
import torch.distributed as dist

from .writers import OutputFiles

__all__ = [
    "init_distributed",
    "distributed_device",
    "is_main_process",
    "distributed_network",
    "quiet_other_ranks",
    "finish_distributed",
    "DistributedOutputFiles",
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


class DistributedOutputFiles(OutputFiles):
    """The :class:`~.writers.OutputFiles` of a ``torchrun`` inference or evaluation: all of the run's files, from every
    process, or none.

    Rank 0 makes the staging folder and sends its path to the others, so every process writes the files of its own
    pairs into the same folder (a folder on one machine, or on a file system every machine sees); when every
    process has finished (a barrier), rank 0 commits the whole set as one run would, so ``overwrite`` replaces the
    earlier run's set and nothing else. A process that fails deletes the staging folder and never reaches the
    barrier, so no process commits (``torchrun`` stops the others). Without a process group it is an
    :class:`~.writers.OutputFiles`.
    """

    def _written(self) -> list[str]:
        # the files of every process are in the shared folder; this process's list holds only its own
        staging = self.staging
        if staging is None or not staging.is_dir():
            return []
        return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())

    def run(self, workflow: Callable[[], object]) -> None:
        """:meth:`prepare`, share the staging folder, run ``workflow()`` in every process, wait for all, then commit
        on rank 0."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            super().run(workflow)
            return
        self.prepare()  # the output folder's checks, in every process, before any work
        try:
            shared = [str(self._staging()) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(shared, src=0)
            self.staging = Path(shared[0])
            workflow()
            dist.barrier()  # every process has written its pairs
            if dist.get_rank() == 0:
                self.commit()
            dist.barrier()  # the set is in place when any process returns
        except BaseException:
            self.discard()  # every process: the shared folder goes whichever process failed
            raise
