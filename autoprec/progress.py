"""Progress per stage, with an ETA, for runs that take minutes.

Each stage (statistics, ablation, search, verify) prints its name once and
then one Keras progress bar, which shows the count, the time spent and the
ETA. ``verbose=0`` prints nothing.

>>> progress = Progress(verbose=0)
>>> bar = progress.stage("search", total=10, unit="trial")
>>> bar.update(3); bar.done(10)
>>> progress.seconds["search"] >= 0
True
"""

from __future__ import annotations

import time
from typing import Any


class Progress:
    """Prints stages and their bars; records the seconds each stage took."""

    def __init__(self, verbose: int = 1) -> None:
        self.verbose = verbose
        self.seconds: dict[str, float] = {}
        self.stage_seconds: dict[str, float] = {}  # whole pipeline stages, as tune's StageClock timed them
        self.stage_peak_rss_gb: dict[str, float] = {}  # the process's peak RSS after each of them

    def say(self, message: str) -> None:
        """One line of progress, printed when verbose."""
        if self.verbose:
            print(message, flush=True)

    def stage(self, name: str, *, total: int | None, unit: str = "step") -> StageBar:
        """Start a stage of ``total`` steps (None when unknown)."""
        return StageBar(self, name, total, unit)


def plural(word: str, n: int) -> str:
    """``word`` for one, its plural otherwise.

    >>> plural("pass", 2), plural("micro-batch", 3), plural("trial", 1)
    ('passes', 'micro-batches', 'trial')
    """
    if n == 1:
        return word
    return word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")


class StageBar:
    """One stage's bar; ``done`` records the stage's time."""

    def __init__(self, progress: Progress, name: str, total: int | None, unit: str) -> None:
        self.progress, self.name, self.total, self.unit = progress, name, total, unit
        self.started = time.monotonic()
        self._bar: Any = None
        if progress.verbose:
            import keras

            print(
                f"autoprec: {name} ({total} {plural(unit, total)} at most)" if total else f"autoprec: {name}",
                flush=True,
            )
            self._bar = keras.utils.Progbar(total, unit_name=unit, stateful_metrics=["best"])

    def update(self, current: int, values: list | None = None) -> None:
        if self._bar is not None:
            self._bar.update(min(current, self.total) if self.total else current, values)

    def done(self, current: int, values: list | None = None) -> None:
        self.progress.seconds[self.name] = self.progress.seconds.get(self.name, 0.0) + time.monotonic() - self.started
        if self._bar is not None:
            self._bar.target = max(
                current, 1
            )  # a stage of unknown length ends with its count known: "2/2", not "2/Unknown"
            self._bar.update(current, values, finalize=True)
