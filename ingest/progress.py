"""Progress bars for long jobs (rich, on stderr so stdout stays parseable)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


def progress_bar(*extra_columns) -> Progress:
    """A bar with count, percentage, elapsed and remaining time; pass e.g. a tokens/s column."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        *extra_columns, TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    )


class RateColumn(ProgressColumn):
    """Units per second of a task (e.g. tokens/s), from rich's own speed estimate."""

    def __init__(self, unit: str = "tokens") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")
