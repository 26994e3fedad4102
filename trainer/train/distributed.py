"""Processes of a training job: a single process, or one rank of a `torchrun` (DDP) job.

Under `torchrun --nproc_per_node N` every process takes an equal share of each epoch's rows
(interleaved, `Dist.shard`), gradients are all-reduced by DistributedDataParallel, the model
all-gathers memory-bank writes itself, and rank 0 evaluates and writes every file.
"""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    """This process's place in the job; a single process is rank 0 of 1 with no process group."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls) -> Dist:
        """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world == 1:
            return cls(device=device)
        owns = not torch_dist.is_initialized()
        if owns:
            torch_dist.init_process_group("nccl" if cuda else "gloo")
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), device, owns)

    def close(self) -> None:
        """Leave the job. The group is destroyed here, with the interpreter alive: objects still holding
        it (DDP's reducer in a reference cycle) are collected first, because a gloo group that outlives
        this call can free its last collectives' buffers (Python-owned, e.g. broadcast_object_list's
        bytes) on its worker threads during interpreter teardown, which aborts the process ("terminate
        called without an active exception", pytorch/pytorch#179291)."""
        if self.owns_group and torch_dist.is_initialized():
            gc.collect()
            torch_dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's rows: an interleaved, equal share (the remainder is dropped so all ranks step together)."""
        per = len(rows) // self.world
        return rows[: per * self.world].reshape(per, self.world)[:, self.rank] if self.world > 1 else rows


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
