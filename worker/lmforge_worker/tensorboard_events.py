"""Optional TensorBoard event files of a job's training (Settings.tensorboard).

Written by the worker beside the job's checkpoints (`<artifacts>/jobs/<id>/tensorboard/`,
one run directory per attempt) with torch's SummaryWriter, which needs the `tensorboard`
package (`pip install 'lmforge[tensorboard]'`). Scalars: train/loss, train/learning_rate,
train/grad_norm, train/tokens_per_second, val/loss, val/bits_per_byte, by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class EventLog:
    """Scalars of logged steps and evaluations, flushed as they come."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=5)

    def progress(self, p: dict[str, Any]) -> None:
        step = p["step"]
        for name, key in (
            ("train/loss", "loss"),
            ("train/learning_rate", "learning_rate"),
            ("train/grad_norm", "grad_norm"),
            ("train/tokens_per_second", "tokens_per_second"),
        ):
            if key in p:
                self.writer.add_scalar(name, p[key], step)

    def evaluation(self, step: int, val_loss: float, val_bpb: float) -> None:
        self.writer.add_scalar("val/loss", val_loss, step)
        self.writer.add_scalar("val/bits_per_byte", val_bpb, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
