"""The progress bars of rpl-train and rpl-eval, readable in an 80-column terminal.

What a user looks for comes first and is short (name, step/total, bar, img/s, elapsed, ETA);
the bar takes whatever width is left, so nothing is cut at 80 columns. Losses and validation
results are not squeezed into the bar: the trainer prints them as log lines above it.
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text


class ImagesPerSecond(ProgressColumn):
    """Throughput in images per second: the task's ``ips`` field when given, else rich's own speed of
    ``completed`` (which counts images in rpl-eval)."""

    def render(self, task) -> Text:
        speed = task.fields.get("ips")
        if speed is None:
            speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:.1f} img/s", style="progress.data.speed")


def make_progress(console: Console | None = None, enabled: bool = True, transient: bool = False) -> Progress:
    """A bar per task: ``description  done/total  ━━━━  12.3 img/s  0:01:02  eta 0:04:10``."""
    return Progress(TextColumn("[bold]{task.description}"), MofNCompleteColumn(), BarColumn(bar_width=None),
                    ImagesPerSecond(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console or Console(stderr=True), disable=not enabled, expand=True, transient=transient)
