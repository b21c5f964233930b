"""Data-parallel training on torch.distributed: who am I, and the few collectives fit() needs.

Every rank runs the same ``fit()``. Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in
the environment) :func:`setup` joins the process group (NCCL on CUDA, gloo on CPU) and picks
this rank's GPU; alone it returns a context whose collectives do nothing, so the single-process
path is the same code with ``world_size == 1``. ``cnntrain train --nproc N`` starts torchrun's
own launcher (:func:`launch`), not a home-made process pool.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from cnntrain.errors import CnnTrainError, UsageError, first_line

# How long a rank waits for the others at a training collective before giving up; a dead worker
# is normally noticed much sooner by torchrun, which then stops the whole job.
TIMEOUT = datetime.timedelta(minutes=10)
# How long the other ranks wait while rank 0 sets up alone (the first scan of a large dataset
# decodes every image; weights and datasets download). Only a rank 0 that is alive and working
# keeps them waiting: one that dies is noticed by torchrun, which stops the job.
SETUP_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and the collectives fit() uses; all no-ops when ``world_size == 1``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    # A gloo group with SETUP_TIMEOUT, for the waits of set-up and the per-step agreement: on the
    # CPU, so it neither waits for the GPU's queue nor meets NCCL's watchdog.
    host_group: Any = field(default=None, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def setup_barrier(self) -> None:
        """A barrier that waits as long as set-up may take (:data:`SETUP_TIMEOUT`)."""
        if self.enabled:
            dist.barrier(group=self.host_group)

    def all(self, flag: bool) -> bool:
        """True on every rank when every rank says so (a small all-reduce on the host group)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.host_group)
        return bool(value.item())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, returned on ``values``' device (NCCL reduces on the GPU)."""
        if not self.enabled:
            return values
        work = values.to(_collective_device(), copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(values.device)

    def all_gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` (its own number of rows, the same trailing shape) concatenated in
        rank order, on every rank: e.g. the per-image outputs of each validation shard. The rows
        are padded to the longest shard for the collective, which needs equal shapes, then trimmed."""
        if not self.enabled:
            return values
        device = _collective_device()
        lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world_size)]
        dist.all_gather(lengths, torch.tensor([len(values)], dtype=torch.int64, device=device))
        counts = [int(n) for n in torch.cat(lengths).tolist()]
        padded = torch.zeros((max(counts), *values.shape[1:]), dtype=values.dtype, device=device)
        padded[:len(values)] = values.to(device)
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(values.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says so: a stop request must stop all of them
        at the same step, or the others would wait forever in the next gradient sync."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. the run folder rank 0 just created, or the learning
        rate its range test found): set-up values, so over the host group and its long timeout."""
        if not self.enabled:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, group=self.host_group)
        return holder[0]

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (downloads, scans, disk caches), then the others, which
        find its results cached, so no file is written twice. The others wait at a barrier of
        the host group, whose timeout fits set-up, not at one with the training collectives' 10
        minutes (on a large dataset's first run NCCL's watchdog would end the job)."""
        if not self.is_main:
            self.setup_barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.setup_barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's rank under torchrun (0 when alone), readable before any set-up."""
    return int(os.environ.get("RANK", 0)) if under_torchrun() else 0


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun; returns the context and this rank's device.

    ``device`` is the resolved ``--device``: on CUDA each rank takes GPU ``LOCAL_RANK``.
    """
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistContext(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"process {local_rank} on this machine has no GPU ({torch.cuda.device_count()} "
                             "visible); use --nproc / --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UsageError(f"distributed training runs on CUDA (NCCL) or CPU (gloo), not {device.type}; "
                         "use --device cuda or --device cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT,
                                device_id=device if backend == "nccl" else None)
    host_group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    return DistContext(rank, world, local_rank, local_world, host_group), device


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    if sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (NCCL); on CPU each process keeps its own BatchNorm statistics")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (what the launched ranks must not see)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m cnntrain <argv>`` as ``nproc`` ranks on this machine through torchrun's
    launcher (standalone rendezvous on a free local port); returns the job's exit code.

    When any rank fails, torchrun stops the others and the job exits non-zero; a rank stopped
    by Ctrl-C/SIGTERM passes its 130/143 on.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise UsageError("--nproc must be at least 1")
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "cnntrain", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        for code in (130, 143, 2):
            if code in codes.values():
                return code
        first_rank, first = exc.get_first_failure()
        if first.exitcode is not None and first.exitcode < 0:  # killed: it could not say why itself
            raise CnnTrainError(f"training process {first_rank} was killed by {_signal_name(-first.exitcode)}; the job "
                                "stopped. last.pt holds the last completed epoch: resume with --resume") from None
        return next((c for c in codes.values() if c and c > 0), 1)
    except SignalException as exc:  # Ctrl-C / SIGTERM: the ranks saved and said where
        return 128 + int(exc.sigval)
    except Exception as exc:  # rendezvous or launch failure before any rank ran
        raise CnnTrainError(f"could not start {nproc} training processes: {first_line(exc)}") from None
    return 0


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank went away (it reports its own error)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(mark in text for mark in ("Connection reset by peer", "Connection closed by peer", "gloo", "NCCL"))
