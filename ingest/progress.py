"""What a job shows: progress bars on stderr (shown while the `ingest` loggers show progress, so `atlas -q`
hides them) and result lines on stdout, so stdout holds only what the job produced."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

log = logging.getLogger(__name__)
# soft_wrap: a result stays one line however narrow the terminal; the file is sys.stdout when printing.
_results = Console(soft_wrap=True, highlight=False)


def show_result(message: str) -> None:
    """One result line on stdout (rich markup allowed)."""
    _results.print(message)


def progress_bar(*extra_columns) -> Progress:
    """A bar with count, percentage, elapsed and remaining time; pass e.g. a tokens/s column."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        *extra_columns, TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False, disable=not log.isEnabledFor(logging.INFO),
    )


class RateColumn(ProgressColumn):
    """Units per second of a task (e.g. tokens/s), from rich's own speed estimate."""

    def __init__(self, unit: str = "tokens") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")
