"""Training (`mmrank train`) and evaluation of a finished run (`mmrank evaluate`); see docs/design.md.

By concern: `distributed` (processes of a DDP job), `batches` (row order -> Batches), `loop` (one
training stage, `Trainer`), `schedules` (task-specific PE / two-stage and the pe table around it; the
LoRA phase lives in the loop), `run_dir` (the run folder), `commands` (the CLI entry points).
"""

from trainer.train.commands import cli, cli_evaluate, evaluate_run, train
from trainer.train.distributed import Dist, seed_everything
from trainer.train.loop import Trainer, amp_dtype
from trainer.train.run_dir import open_run_dir
from trainer.train.schedules import build_content_table, stage1_config, train_stages

__all__ = [
    "Dist",
    "Trainer",
    "amp_dtype",
    "build_content_table",
    "cli",
    "cli_evaluate",
    "evaluate_run",
    "open_run_dir",
    "seed_everything",
    "stage1_config",
    "train",
    "train_stages",
]
