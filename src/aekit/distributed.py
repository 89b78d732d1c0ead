"""Training on several processes with PyTorch's DistributedDataParallel (DDP).

``torchrun --nproc-per-node N -m aekit train ...`` starts N processes (ranks) and tells each
its place through the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`setup` joins them into one process group: NCCL with one GPU per rank
(``cuda:LOCAL_RANK``), gloo on CPUs. Outside torchrun nothing here does anything: every
helper answers as for a single process, so the training loop has no branches of its own.

What DDP training means here:

- ``--batch-size B`` is the *global* batch, as in Keras' distribution strategies: step k of
  an epoch trains on rows ``[k*B, (k+1)*B)`` of the epoch's shuffle, and rank r takes every
  N-th of them from row r. The step count and the learning-rate schedule do not depend on N,
  and the union of the ranks' rows is exactly the single-process batch.
- Each rank's loss is weighted so that DDP's average of the ranks' gradients is the gradient
  of the whole batch's mean loss: N ranks compute what one process computes, up to the
  order of floating-point sums.
- Checkpoints hold the model, Adam's state and the epoch count, which are the same on every
  rank, so a checkpoint made with N ranks resumes with M.
- Only rank 0 writes files and shows progress; validation is split across the ranks and
  its sums are all-reduced, so every rank sees the same metrics and stops at the same epoch.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from aekit.models import Loss, loss

# How long a rank waits in a collective (a gradient all-reduce, a barrier) before giving
# up. torchrun already stops every rank as soon as one exits with an error; this bounds the
# wait when processes are started some other way, or when a rank hangs instead of failing.
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes: rank ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run (cuda:LOCAL_RANK for NCCL)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, prints and shows progress bars."""
        return self.rank == 0

    def share(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's rows of the global ``batch`` (B, C, H, W), and their loss weight.

        Rank r takes rows r, r+N, r+2N, ...; with weight ``N * len(rows) / B`` the average
        over ranks of (weight * mean loss of the rows) is the mean loss of the whole batch,
        also when B is not a multiple of N. A short last batch can leave a rank no rows: it
        then takes one row with weight 0, so that it still joins the step's all-reduce.
        """
        if self.size == 1:
            return batch, 1.0
        rows = batch[self.rank::self.size]
        if len(rows) == 0:
            return batch[:1], 0.0
        return rows, self.size * len(rows) / len(batch)

    def span(self, n: int) -> tuple[int, int]:
        """This rank's contiguous part ``[start, stop)`` of ``n`` items (for evaluation)."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all ranks (itself in one process)."""
        if self.size == 1:
            return tensor
        total = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(tensor.device)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of ``tensor`` over all ranks."""
        return tensor if self.size == 1 else self.sum(tensor) / self.size

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` for training: itself in one process, a DDP wrapper across ranks.

        The wrapper answers ``loss(x, target, objective)`` like the model
        (:func:`aekit.models.loss`), through DDP's forward, which its gradient
        synchronisation needs; so DDP trains any model's objective. It shares the model's
        parameters: the optimiser and the checkpoints keep working on the model itself.
        """
        if self.size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return _Synchronised(nn.parallel.DistributedDataParallel(_Objective(model), device_ids=device_ids))


class _Objective(nn.Module):
    """``forward`` = the model's loss: DDP only synchronises what goes through forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        return loss(self.model, x, target, objective)


class _Synchronised:
    """The model's loss, computed through one DDP-wrapped :class:`_Objective`."""

    def __init__(self, ddp: nn.Module):
        self.ddp = ddp

    def loss(self, x: torch.Tensor, target: torch.Tensor, objective: str) -> Loss:
        return self.ddp(x, target, objective)


def current() -> Ranks:
    """This process's :class:`Ranks`: from the process group if one is running, else 1 of 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Ranks(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def launched() -> bool:
    """True inside a launcher such as torchrun that started more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched with several ranks; return this rank's device.

    ``device`` is what the run asked for (see :func:`aekit.config.resolve_device`). With
    several ranks a CUDA device becomes ``cuda:LOCAL_RANK`` with NCCL, the CPU uses gloo.
    Calling it again, or inside a process group the caller started, changes nothing.
    """
    if not launched() or dist.is_initialized():
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return device
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed; run without torchrun")
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f'device="{device}" names one GPU, but torchrun started {_env_int("WORLD_SIZE", 1)} '
                'ranks that each need their own; pass device="cuda" (rank r uses cuda:LOCAL_RANK)'
            )
        local_rank = _env_int("LOCAL_RANK", 0)
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs on this machine; "
                "start at most one rank per GPU (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training runs on CUDA GPUs or CPUs, not {device.type}; "
                         'pass device="cpu" or device="cuda"')
    dist.init_process_group(backend, timeout=TIMEOUT)
    atexit.register(_teardown)
    if dist.get_rank() != 0:
        # Rank 0 speaks for the run: the others keep only their errors, so that a warning
        # (a collapse, early stopping) is printed once, not once per rank.
        logging.getLogger("aekit").addFilter(lambda record: record.levelno >= logging.ERROR)
    return device


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a download into a shared cache), then the others.

    It is also a meeting point: no rank leaves it before every rank has entered it, so
    what each rank checked before it still holds when rank 0 starts writing after it.
    """
    ranks = current()
    if not ranks.is_main:
        ranks.barrier()
    yield
    if ranks.is_main:
        ranks.barrier()


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank went away or hung.

    When one rank stops with an error, the others see its connection close in their next
    all-reduce (gloo) or a backend error (NCCL); the first rank's own error says why.
    """
    if not (launched() and isinstance(exc, RuntimeError)):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(words in text for words in ("closed by peer", "reset by peer", "timed out", "timeout"))


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer; "
                         "it is set by torchrun, check the launch command") from None


__all__ = ["Ranks", "current", "launched", "setup", "main_first", "lost_peer", "TIMEOUT"]
