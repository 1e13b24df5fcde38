"""Where one process stands in a data-parallel job, and the few collectives the loop needs.

`train` takes a `Ranks`; the default, `SINGLE`, is one process and every method is a no-op
there, so the one-device loop is unchanged. Under torchrun, `Ranks.from_env()` joins the
process group (gloo on CPU, NCCL on CUDA). The global batch is drawn on every rank from the
same generator and each rank keeps its own rows (`rows`), so the data order is the
single-process one whatever the world size; DDP averages the gradients of equal shards,
which is the gradient of the whole batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Stop decisions as the integers rank 0 broadcasts.
_STOPS = (None, "cancel", "shutdown", "pause")  # training.STOP_STATUS's keys


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, best weights, progress and events."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> tuple[Ranks, str]:
        """Joins the process group torchrun described in RANK/WORLD_SIZE/LOCAL_RANK;
        returns it and this rank's device ("cuda" becomes "cuda:<local rank>")."""
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
        return cls(rank, world, local), device

    def rows(self, batch_size: int) -> slice | None:
        """This rank's rows of a global batch (None: all of them)."""
        if self.world == 1:
            return None
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # Buffers (rotary tables) are the same everywhere: no broadcast each forward.
        return DDP(model, device_ids=ids, broadcast_buffers=False)

    def no_sync(self, run_model: torch.nn.Module, last_micro_step: bool):
        """Skips DDP's all-reduce on all but the last micro-step of gradient accumulation."""
        if self.world == 1 or last_micro_step:
            return contextlib.nullcontext()
        return run_model.no_sync()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks (a copy)."""
        if self.world == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def agree_stop(self, hooks) -> str | None:
        """Rank 0 asks its hooks; every rank gets the same answer (one broadcast a step)."""
        if self.world == 1:
            return hooks.should_stop()
        code = torch.zeros(1, dtype=torch.int64)
        if self.is_main:
            code[0] = _STOPS.index(hooks.should_stop())
        if dist.get_backend() == "nccl":
            code = code.cuda()
        dist.broadcast(code, src=0)
        return _STOPS[int(code.item())]

    def gather_rng(self) -> list[torch.Tensor] | None:
        """Every rank's torch RNG state (rank 0 gets the list), for an exact resume."""
        if self.world == 1:
            return None
        out: list = [None] * self.world
        dist.all_gather_object(out, torch.get_rng_state())
        return out

    def seed_apart(self, seed: int) -> None:
        """Gives each rank its own torch RNG stream (dropout) after identical init."""
        if self.world > 1:
            torch.manual_seed(seed + 1_000_003 * self.rank)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = Ranks()
