"""Two gloo processes training one config on the CPU, each saving its replica's state_dict: the DDP
tests compare the replicas bit for bit."""

import os
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from trainer import checkpoint
from trainer.config import resolve
from trainer.data.schema import load_dataset
from trainer.run import data_identity
from trainer.train import Dist, Trainer, open_run_dir

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slow(save_best, delay: float):
    def slow_save_best(*args):
        time.sleep(delay)  # a large best.pt on a slow disk
        save_best(*args)

    return slow_save_best


def _worker(rank: int, port: int, data: str, out: str, preset: str, sets: dict, best_delay: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    if best_delay and rank == 0:
        checkpoint.save_best = _slow(checkpoint.save_best, best_delay)
    cfg = resolve(preset, sets=sets)
    dist = Dist.init()
    try:
        run = Path(out) / "run"
        open_run_dir(run, cfg, False, dist, data_identity(data))
        trainer = Trainer(cfg, load_dataset(data), run, dist, False, False)
        trainer.run()
        torch.save(trainer.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.close()


def train_replicas(
    data: Path, out: Path, preset: str, sets: dict, best_delay: float = 0.0
) -> list[dict[str, torch.Tensor]]:
    """Train `preset` with `sets` on WORLD processes (run folder out/run); every rank's state_dict.
    `best_delay`: seconds rank 0 sleeps before each best.pt write."""
    mp.spawn(
        _worker, args=(free_port(), str(data), str(out), preset, sets, best_delay), nprocs=WORLD, join=True
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
