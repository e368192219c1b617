"""Training progress for people: a live rich bar in a terminal, sparse plain lines elsewhere.

Batch jobs (Slurm, CI) write stdout to a file, where a live bar either vanishes or turns into one
line per refresh. There we print a plain line at every `every_pct` percent of the run and at most
every `interval_s` seconds otherwise, so a log shows the run is alive without growing per step.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from llmx.utils import is_rank0


def _fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _fmt_loss(loss: Optional[float]) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def _fmt_tps(tps: Optional[float]) -> str:
    return "-" if tps is None else f"{tps:,.0f}"


class Progress:
    """Progress(total_steps, start_step) with update(step, loss=, tokens_per_s=) and close().

    `enabled` defaults to "this is rank 0" so that N ranks do not draw N bars.
    `interactive` None asks rich whether stdout is a terminal.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        enabled: Optional[bool] = None,
        description: str = "train",
        interactive: Optional[bool] = None,
        every_pct: float = 10.0,
        interval_s: float = 30.0,
    ):
        self.total = max(int(total_steps), 0)
        self.start_step = int(start_step)
        self.step = self.start_step
        self.enabled = is_rank0() if enabled is None else bool(enabled)
        self.description = description
        self.every_pct = every_pct
        self.interval_s = interval_s
        self.loss: Optional[float] = None
        self.tokens_per_s: Optional[float] = None
        self._t0 = time.monotonic()
        self._last_print = self._t0
        self._next_pct = 0.0
        self._printed_step: Optional[int] = None
        self._bar = None
        self._task = None
        self._closed = False
        self.interactive = False
        if not self.enabled:
            return
        if interactive is None:
            from rich.console import Console

            interactive = Console().is_interactive
        self.interactive = interactive
        if interactive:
            self._start_bar()
        else:
            self._advance_milestone()
            self._print_line(prefix="start")

    def _start_bar(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress as RichProgress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self._bar.start()
        self._task = self._bar.add_task(
            self.description, total=self.total, completed=self.start_step, loss="-", tps="-"
        )

    def _advance_milestone(self) -> None:
        # The next percentage at which a plain line is due, strictly above the current one.
        if self.total <= 0 or self.every_pct <= 0:
            self._next_pct = float("inf")
            return
        pct = 100.0 * self.step / self.total
        self._next_pct = (int(pct // self.every_pct) + 1) * self.every_pct

    def _eta(self) -> Optional[float]:
        done = self.step - self.start_step
        if done <= 0:
            return None
        rate = done / max(time.monotonic() - self._t0, 1e-9)
        return (self.total - self.step) / rate

    def _print_line(self, prefix: str = "step") -> None:
        pct = 100.0 * self.step / self.total if self.total else 100.0
        line = (
            f"[{self.description}] {prefix} {self.step}/{self.total} ({pct:.0f}%)"
            f" | loss {_fmt_loss(self.loss)} | {_fmt_tps(self.tokens_per_s)} tok/s"
            f" | elapsed {_fmt_duration(time.monotonic() - self._t0)} | eta {_fmt_duration(self._eta())}"
        )
        # sys.stdout looked up now, not at import: pytest and log redirection swap it.
        print(line, file=sys.stdout, flush=True)
        self._last_print = time.monotonic()
        self._printed_step = self.step

    def update(self, step: int, loss: Optional[float] = None, tokens_per_s: Optional[float] = None) -> None:
        if not self.enabled or self._closed:
            return
        self.step = int(step)
        if loss is not None:
            self.loss = float(loss)
        if tokens_per_s is not None:
            self.tokens_per_s = float(tokens_per_s)
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=self.step,
                loss=_fmt_loss(self.loss),
                tps=_fmt_tps(self.tokens_per_s),
            )
            return
        pct = 100.0 * self.step / self.total if self.total else 0.0
        if pct >= self._next_pct or time.monotonic() - self._last_print >= self.interval_s:
            self._print_line()
            self._advance_milestone()

    def print(self, message: str) -> None:
        """A message above the bar (or a plain line), e.g. an evaluation result."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.stop()
        elif self._printed_step != self.step:
            # The final state, unless the last line already showed it.
            self._print_line(prefix="done" if self.total and self.step >= self.total else "stopped at")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
