"""Progress bars for long jobs (rich, on stderr so stdout stays parseable)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


def progress_bar(*extra_columns) -> Progress:
    """A bar with count, percentage, elapsed and remaining time; pass e.g. a tokens/s column."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        *extra_columns, TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    )
