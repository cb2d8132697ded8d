"""Everything the CLI shows a person: Rich tables, progress bars and error lines.

This is the only module that imports Rich (ruff's banned-api rule keeps it so).
Machine output (``--json``) is plain JSON on stdout and never passes through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from nexus_cli.api import VerifyResult
from nexus_cli.metadata import VersionRecord
from nexus_cli.transfer import Progress as ProgressCallback

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def say(message: str) -> None:
    """A line for a person, on stdout."""
    stdout.print(message)


def error(message: str) -> None:
    """One error line on stderr."""
    stderr.print(f"[bold red]error:[/] {escape(message)}")


@contextlib.contextmanager
def progress_bar(description: str, total: int) -> Iterator[ProgressCallback]:
    """A transfer bar (bytes, speed, time left) on stderr, shown only on a terminal."""
    if not (stdout.is_terminal and stderr.is_terminal):
        yield lambda _count: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(escape(description), total=total)
        yield lambda count: bar.advance(task, count)


def _metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in metrics.items())


def versions_table(versions: Sequence[VersionRecord]) -> None:
    table = Table(title="Model versions, newest first (● = latest)", title_justify="left")
    for column in ("model", "commit", "format", "size", "stored"):
        table.add_column(column, no_wrap=True, justify="right" if column == "size" else "left")
    table.add_column("message, metrics", min_width=16)
    for record in versions:
        marker = "[green]●[/]" if record.is_latest else " "
        notes = " · ".join(filter(None, (record.message, _metrics_text(record.metrics))))
        table.add_row(
            escape(record.model_name),
            f"{marker} {record.short_commit}",
            record.format,
            human_size(record.size_bytes),
            record.created_at[:10],
            escape(notes),
        )
    stdout.print(table)


def verify_table(results: Sequence[VerifyResult]) -> None:
    table = Table(title="Verification", title_justify="left")
    for column in ("status", "model", "commit", "size", "detail"):
        table.add_column(column)
    styles = {"ok": "[green]ok[/]", "missing": "[yellow]missing[/]", "mismatch": "[red]mismatch[/]"}
    for result in results:
        record = result.record
        table.add_row(
            styles[result.status],
            escape(record.model_name),
            record.short_commit,
            human_size(record.size_bytes),
            escape(result.detail),
        )
    stdout.print(table)
