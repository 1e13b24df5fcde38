"""The progress bar `jobs.wait(progress=True)` and the CLI draw while a job trains."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from lmforge.types import Job, JobEvent, JobState, Progress


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_rate(tokens_per_second: float) -> str:
    if tokens_per_second >= 1e6:
        return f"{tokens_per_second / 1e6:.1f}M tok/s"
    if tokens_per_second >= 1e3:
        return f"{tokens_per_second / 1e3:.1f}k tok/s"
    return f"{tokens_per_second:.0f} tok/s"


def describe(progress: Progress) -> str:
    """ "loss 1.234 · val 1.456 · 12.3k tok/s · ETA 0:42": what is known so far."""
    parts = []
    if progress.loss:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.val_loss:
        parts.append(f"val {progress.val_loss:.4f}")
    if progress.tokens_per_second:
        parts.append(format_rate(progress.tokens_per_second))
    if progress.eta_seconds and progress.step < progress.total_steps:
        parts.append(f"ETA {format_duration(progress.eta_seconds)}")
    return " · ".join(parts)


class JobProgressBar:
    """step/total, loss, tokens/s and the server's ETA for one job, on stderr."""

    def __init__(self, job: Job, *, file: TextIO | None = None):
        # Before its first progress event a job's total is its spec's max_steps.
        total = job.progress.total_steps or job.spec.training.max_steps or None
        self._bar = tqdm(
            total=total,
            initial=job.progress.step,
            desc=self._desc(job.state),
            unit="step",
            file=file or sys.stderr,
            dynamic_ncols=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )
        self._state = job.state
        self._show(job.progress)

    @staticmethod
    def _desc(state: JobState) -> str:
        return f"{state.value.lower():<9}"

    def _show(self, progress: Progress) -> None:
        if progress.total_steps and self._bar.total != progress.total_steps:
            self._bar.total = progress.total_steps
        if progress.step != self._bar.n:
            self._bar.n = progress.step
        text = describe(progress)
        self._bar.set_postfix_str(text, refresh=False)
        self._bar.refresh()

    def update(self, event: JobEvent) -> None:
        if event.state != self._state:
            self._state = event.state
            self._bar.set_description_str(self._desc(event.state), refresh=False)
        if event.progress.total_steps or event.progress.step:
            self._show(event.progress)
        else:
            self._bar.refresh()
        if event.message and event.type.value in ("EVAL", "LOG"):
            self._bar.write(f"  {event.message}", file=self._bar.fp)

    def close(self) -> None:
        self._bar.close()
