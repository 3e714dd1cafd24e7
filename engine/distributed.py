"""Data parallel training over torchrun processes: DDP or FSDP2 (``fully_shard``).

Every rank draws the whole global batch from the one run generator and trains on its own slice
(:func:`take`), so the update depends on the global batch, not on how it is split over ranks
and micro-steps, and a checkpoint resumes on any number of processes. Checkpoints stay one file
of full tensors: :meth:`Dist.full` gathers a sharded tensor for rank 0 to write, and
:meth:`Dist.shard_like` cuts a full tensor from that file back to a parameter's sharding.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.params import DIST_MODES as MODES  # noqa: E402


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@dataclass
class Dist:
    """Where this process stands; world 1 (no process group) is plain single-process training."""

    mode: str = "none"
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False      # this object started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ model
    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """The module the training forwards go through. DDP returns a wrapper (its reducer hooks
        need the forward to pass through it); FSDP2 shards ``module`` in place, each block of its
        top-level ModuleLists (Flux's double and single blocks) being one all-gather unit."""
        if not self.active or self.mode == "none":
            return module
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (self.world,))
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                for block in child:
                    fully_shard(block, mesh=mesh)
        # FSDP2 leaves the root's parameters gathered after a no-grad forward by default; the EMA
        # swap, a checkpoint load or an update then writes into the shards while the next forward
        # still reads the stale gathered copy. Resharding the root too keeps the shards the truth.
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
        return module

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, last: bool):
        """DDP: skip the all-reduce on all but the last micro-step (its gradients are full-size
        anyway). FSDP2 reduce-scatters every micro-step: keeping unsharded gradients until the
        last one would cost a full model of gradient memory per rank."""
        if self.active and self.mode == "ddp" and not last:
            with model.no_sync():
                yield
        else:
            yield

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body first (filling a shared cache, say), the others after it."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ------------------------------------------------------------------ full <-> sharded
    def full(self, t: torch.Tensor) -> torch.Tensor | None:
        """A full CPU copy of ``t`` on rank 0, None elsewhere. Collective for a sharded ``t``:
        every rank must call it, in the same order. One tensor at a time, so no device ever
        holds more than one gathered parameter."""
        if is_dtensor(t):
            t = t.full_tensor()
            return t.cpu() if self.main else None
        return t if self.main else None

    @staticmethod
    def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``full`` (a checkpoint tensor) on ``like``'s device, and with its sharding when ``like``
        is a DTensor. Every rank holds the same file, so each cuts its own shard: no traffic."""
        if is_dtensor(like):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(full.detach().to(like.device), like.device_mesh, like.placements,
                                     src_data_rank=None)
        return full.to(like.device)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(mode: str, device: torch.device, timeout_s: float = 600.0) -> Dist:
    """Join the torchrun job (WORLD_SIZE / RANK / LOCAL_RANK, MASTER_ADDR / MASTER_PORT from
    the environment) or an already initialised process group; nccl on CUDA, gloo on CPU. A
    collective that waits longer than ``timeout_s`` (a rank hung or died) fails the job instead
    of waiting for the backends' 30-minute default."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if env_world > 1 or (dist.is_initialized() and dist.get_world_size() > 1):
            raise RuntimeError(f"started as one of {max(env_world, 1)} processes (torchrun) but distributed=none: "
                               f"every process would train its own copy and write the same files; "
                               f"set distributed=ddp or distributed=fsdp")
        return Dist()
    owns = False
    if not dist.is_initialized():
        if env_world == 1:
            return Dist(mode)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        import datetime

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=float(timeout_s)))
        owns = True
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Dist(mode, dist.get_world_size(), dist.get_rank(), local_rank, owns)


def take(choices: dict, batch_shape: torch.Size, sl: slice) -> dict:
    """This slice's share of a method's random choices drawn for the whole global batch.
    ``engine.methods`` lays per-sample draws out as (..., *x1.shape) (DRaFT-LV's re-noisings are
    (n, B, N, C)); anything else (a step index, a list of steps) is shared by the whole batch."""
    out = {}
    for key, val in choices.items():
        if torch.is_tensor(val) and val.dim() >= len(batch_shape) and val.shape[val.dim() - len(batch_shape):] == batch_shape:
            d = val.dim() - len(batch_shape)
            val = val[(slice(None),) * d + (sl,)]
        out[key] = val
    return out
