"""Data-parallel training on torch.distributed, launched by torchrun.

`oecl train` runs unchanged under `torchrun --nproc-per-node N [--nnodes M ...]`: torchrun
starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; `distributed_context`
reads them, joins the process group (NCCL on GPUs, gloo on CPUs) with a collective timeout,
and leaves it at the end. A plain `oecl train` (no torchrun variables) is a job of one rank and
touches nothing in torch.distributed.

Process management is torchrun's: when a rank fails, its elastic agent stops the others and
reports the first failure (the error file written by `record` on the training entry point);
a rank that hangs instead of failing makes its peers' next collective time out.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from oecl_train.devices import resolve_device

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class Dist:
    """This process's place in a torch.distributed job (rank 0 of 1 when not distributed).

    `device` is the device the launcher assigned to this rank (cuda:LOCAL_RANK under torchrun
    on GPUs); None lets the trainer resolve the configured device itself.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather along dim 0 in rank order, with gradients (every rank sees every row).

        The backward pass sums the incoming gradients over ranks. When every rank computes the
        same loss from the gathered rows, each rank's rows get world × the gradient of that
        loss, and DDP's averaging over ranks cancels the factor: the parameter gradient equals
        the one-process gradient of the loss on the concatenated batch.
        """
        if self.world == 1:
            return x
        return autograd_all_gather()(x.contiguous())

    def barrier(self) -> None:
        if self.world == 1 or not tdist.is_initialized():
            return
        if self.device is not None and self.device.type == "cuda":
            tdist.barrier(device_ids=[self.device.index])
        else:
            tdist.barrier()


# The differentiable all-gather has had several names: torch 2.13 names it
# all_gather_single_autograd (its plain all_gather_single became differentiable too, but only
# recently, so that name alone does not promise gradients); older releases (2.4-2.12, the GPU
# machines' torch among them) have all_gather_tensor_autograd, deprecated in 2.13. Both sum
# the incoming gradients over ranks in backward, as torch.distributed.nn's all_gather, the
# last resort, does.
FUNCTIONAL_GATHERS = ("all_gather_single_autograd", "all_gather_tensor_autograd")


def autograd_all_gather(functional: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The all-gather along dim 0 over the default group, with gradients, of the torch that
    runs: the first of FUNCTIONAL_GATHERS that `functional` (default: torch's
    _functional_collectives module) has, else torch.distributed.nn's. Imported here, by jobs
    of several ranks only: torch builds without distributed support lack these modules, and
    a one-process run must not need them."""
    if functional is None:
        import torch.distributed._functional_collectives as functional

    for name in FUNCTIONAL_GATHERS:
        fn = getattr(functional, name, None)
        if fn is not None:
            # The result waits for the collective on first use (AsyncCollectiveTensor).
            return functools.partial(fn, gather_dim=0, group=tdist.group.WORLD)
    from torch.distributed.nn.functional import all_gather

    return lambda x: torch.cat(all_gather(x))


def torchrun_environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun, None for a plain process."""
    present = [k for k in TORCHRUN_VARIABLES if k in os.environ]
    if not present:
        return None
    if len(present) != len(TORCHRUN_VARIABLES):
        missing = ", ".join(k for k in TORCHRUN_VARIABLES if k not in os.environ)
        raise ValueError(
            f"incomplete torch.distributed environment: {missing} unset; launch with torchrun"
        )
    try:
        rank, world, local = (int(os.environ[k]) for k in TORCHRUN_VARIABLES)
    except ValueError:
        values = ", ".join(f"{k}={os.environ[k]!r}" for k in TORCHRUN_VARIABLES)
        raise ValueError(f"torch.distributed variables must be integers: {values}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world, local


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of this rank: the configured one, with the GPU index set by LOCAL_RANK."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK {local_rank} but only {count} CUDA device(s) visible: start at most "
            f"{count} processes per node (torchrun --nproc-per-node)"
        )
    if dev.index is not None and dev.index != local_rank:
        # Two ranks on one GPU would make NCCL fail obscurely; pick GPUs with
        # CUDA_VISIBLE_DEVICES instead, every rank then takes the one at its local rank.
        raise ValueError(
            f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; pass "
            "--device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", local_rank)


@contextmanager
def distributed_context(device: str = "auto", timeout_s: float = 600.0) -> Iterator[Dist]:
    """Join the torchrun job this process belongs to for the duration of the block.

    Yields `Dist()` for a process not started by torchrun. Otherwise binds the rank to its
    device, initialises the default process group (NCCL for CUDA, gloo for CPU) with
    `timeout_s` as the collective timeout, and on the way out waits for all ranks (so no rank
    tears down its communicator while a peer still has collectives in flight) and destroys
    the group. After an exception there is no barrier: the peers are being stopped by torchrun
    or will time out, and waiting for them would only delay the failure.
    """
    if timeout_s <= 0:
        raise ValueError("--dist-timeout must be positive")
    env = torchrun_environment()
    if env is None:
        yield Dist()
        return
    rank, world, local = env
    if tdist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    dev = rank_device(device, local)
    kwargs: dict = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev  # eager NCCL communicator bound to this rank's GPU
    tdist.init_process_group(
        backend="nccl" if dev.type == "cuda" else "gloo",
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    d = Dist(rank=rank, world=world, local_rank=local, device=dev)
    try:
        yield d
        d.barrier()
    finally:
        tdist.destroy_process_group()
