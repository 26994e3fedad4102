"""Streaming (online learning, `train.streaming`): one pass in time order over the train split cut into
`train.stream_windows` windows, then the valid and the test window; each window is evaluated before
the model trains on it (prequential evaluation, items of earlier windows counting as seen), and the
final model is the run's model. Runs on a `Trainer`'s public steps: `train_rows`, `evaluate`, `log`,
`save_last` / `save_best`, `progress_bar` and `at_max_steps`.

The final model (best.pt) has trained on valid and test, so the run's held-out numbers are only the
prequential ones in metrics.json; `mmrank evaluate` refuses a streaming run rather than report
in-sample metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from trainer.train.batches import take

if TYPE_CHECKING:
    from trainer.train.loop import Trainer


def stream_windows(trainer: Trainer) -> list[tuple[str, str, int, int]]:
    """(name, split, first row, end row): the train split cut by time into equal windows, then valid, test."""
    n = len(trainer.samples("train"))
    cuts = np.linspace(0, n, trainer.t.stream_windows + 1).astype(int)
    windows = [
        (f"train{i}", "train", int(a), int(b))
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))
    ]
    return windows + [(split, split, 0, len(trainer.samples(split))) for split in ("valid", "test")]


def stream(trainer: Trainer) -> None:
    """One time-ordered pass; window w is evaluated (items of windows < w count as seen) before training on it."""
    s = trainer.state
    windows = stream_windows(trainer)
    with trainer.progress_bar([b - a for _, _, a, b in windows]) as bar:
        while s.epoch < len(windows) and not trainer.at_max_steps():
            stream_eval(trainer, windows, s.epoch)
            _, split, lo, hi = windows[s.epoch]
            if not trainer.train_rows(trainer.samples(split), trainer.dist.shard(np.arange(lo, hi)), bar):
                break
            s.epoch += 1
            s.batch_in_epoch = 0
            trainer.save_last()
    for w, (_, split, _, _) in enumerate(windows):
        if split != "train":
            stream_eval(trainer, windows, w)
    trainer.save_last()  # the evaluations above belong to the state
    trainer.save_best(s)


def stream_eval(trainer: Trainer, windows: list[tuple[str, str, int, int]], w: int) -> None:
    s = trainer.state
    if w == 0 or any(entry["window"] == windows[w][0] for entry in s.windows):
        return
    seen = [trainer.samples(split).item_id[lo:hi] for _, split, lo, hi in windows[:w]]
    name, split, lo, hi = windows[w]
    metrics = trainer.evaluate(
        trainer.model,
        take(trainer.samples(split), np.arange(lo, hi)),
        split,
        np.unique(np.concatenate(seen)),
        trainer.lengths(False),
    )
    s.windows.append({"window": name, "split": split, "step": s.global_step, **metrics})
    trainer.log({"event": "stream_eval", **s.windows[-1]})
