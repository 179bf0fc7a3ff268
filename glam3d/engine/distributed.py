"""Process-group set-up for ``torchrun`` (or Slurm ``srun`` + ``torchrun``): one code path from a laptop CPU to many
GPUs on many nodes.

``setup(device)`` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by torchrun); with ``WORLD_SIZE > 1`` it joins
the process group (NCCL on GPUs, gloo on CPU; rendezvous from ``MASTER_ADDR``/``MASTER_PORT``) and pins each
process to ``cuda:LOCAL_RANK``. Without them it is a plain single process.

Usage::

    env = setup("auto")          # DistEnv(rank=0, world_size=1, local_rank=0, device=cpu|cuda:0, ...)
    total = all_reduce_sum(torch.tensor([x]), env)
    cleanup(env)
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` (cuda if available else cpu), ``cpu``, ``cuda`` (the local rank's GPU), ``cuda:N``."""
    pref = (pref or "auto").strip().lower()
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {pref!r} requested but no CUDA GPU is available (use --device cpu)")
        if pref == "cuda":
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        try:
            return torch.device(pref)
        except RuntimeError:
            raise UserError(f"bad device {pref!r} (expected auto, cpu, cuda or cuda:N)") from None
    raise UserError(f"bad device {pref!r} (expected auto, cpu, cuda or cuda:N)")


def setup(device: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, None, False)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    here = False
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise UserError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun "
                                f"(see experiments/launch/)")
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_min), **kwargs)
        here = True
    return DistEnv(rank, world, local_rank, dev, backend, here)


_ENDED_GROUP = False  # set once this process has destroyed a process group it created (see end_process)


def cleanup(env: DistEnv) -> None:
    global _ENDED_GROUP
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
        _ENDED_GROUP = True


def ended_group() -> bool:
    """Whether this process destroyed a process group it had created (a distributed job ran here)."""
    return _ENDED_GROUP


def end_process(rc: int) -> int:
    """Return ``rc``, or end the process at once with it if this process ran a distributed job.

    PyTorch (seen with 2.13, gloo) keeps a process group alive after ``destroy_process_group`` once a
    ``DistributedDataParallel`` was built on it: its gloo threads outlive the job, and the interpreter's own
    teardown then races them (a rank killed by ``terminate called without an active exception``, SIGABRT, after
    its run had finished and written everything). A command that ran a distributed job therefore ends here: the
    garbage it left is collected (DataLoader workers joined), logs and streams flushed, then ``os._exit(rc)``,
    skipping only that teardown (and ``atexit`` handlers: glam3d registers none). Single-process runs (and tests
    calling commands in-process) return ``rc``; a process that ran a distributed job ends at its first call, so a
    Python script under torchrun that goes on after ``train()`` must not call a command's ``main`` before it is
    done.
    """
    if not _ENDED_GROUP:
        return rc
    import gc
    import logging
    import sys

    gc.collect()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of ``t`` over ranks (returned on ``t``'s device; communicated on the backend's device)."""
    if not env.distributed:
        return t
    src = t.to(env.device)
    dist.all_reduce(src, op=dist.ReduceOp.SUM)
    return src.to(t.device)


def all_gather_object(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn, env: DistEnv):
    """``fn()`` on rank 0 only (a write every rank depends on: the run folder, a shared file); every rank returns
    rank 0's result, or raises the :class:`~glam3d.errors.UserError` rank 0 raised, with its line — so a refusal
    stops all ranks alike instead of leaving the others waiting at the next collective. Another exception on rank
    0 is re-raised there and reported to the others as a ``RuntimeError``."""
    if not env.distributed:
        return fn()
    outcome, crash = None, None
    if env.is_main:
        try:
            outcome = ("ok", fn())
        except UserError as err:
            outcome = ("user", str(err))
        except BaseException as err:  # noqa: BLE001 - reported to the other ranks, then re-raised here
            outcome, crash = ("crash", f"{type(err).__name__}: {err}"), err
    outcome = broadcast_object(outcome, env)
    if crash is not None:
        raise crash
    kind, value = outcome
    if kind == "user":
        raise UserError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value
