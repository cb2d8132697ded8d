"""Everything the CLI shows a person: Rich tables, progress bars and error lines.

This is the only module that imports Rich (ruff's banned-api rule keeps it so), and it
is imported only when a person is to read something: ``nexus --help`` never loads it.
Machine output (``--json``) is plain JSON on stdout and never passes through here.

Every string that came from a file or an argument (a message, a metric name, a path, a
model name, an error) reaches the terminal through ``safe``: its control characters
are shown escaped (``\\x1b``) and its Rich markup is shown, not interpreted, so a
hand-edited ``.nexus_meta.json`` cannot clear the screen or fake a table row, and a
folder named ``exp[v1]`` prints as itself. Messages take such values as keyword
arguments (``say("Stored {name}", name=...)``), so the escaping cannot be forgotten.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from nexus_cli.names import CONTROL_CHAR_RE

if TYPE_CHECKING:
    from nexus_cli.api import VerifyResult
    from nexus_cli.metadata import VersionRecord
    from nexus_cli.transfer import Progress as ProgressCallback


stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def _can_encode(console: Console, text: str) -> bool:
    try:
        text.encode(console.encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def symbol(fancy: str, plain: str, console: Console = stdout) -> str:
    """``fancy`` where the terminal's encoding can show it, else the ASCII ``plain``."""
    return fancy if _can_encode(console, fancy) else plain


def _escape_control(match) -> str:  # noqa: ANN001 - a re.Match
    return match.group().encode("unicode_escape").decode("ascii")


def printable(value: object) -> str:
    """``value`` as text with every control character shown as its escape (``\\x1b``)."""
    return CONTROL_CHAR_RE.sub(_escape_control, str(value))


def safe(value: object) -> str:
    """``value`` ready to sit inside Rich markup: control characters and markup escaped."""
    return escape(printable(value))


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def say(template: str, /, **values: object) -> None:
    """A line for a person, on stdout: ``template`` is our markup, ``values`` are escaped."""
    stdout.print(template.format(**{name: safe(value) for name, value in values.items()}))


def note(template: str, /, **values: object) -> None:
    """A remark on stderr (stdout may be carrying JSON)."""
    stderr.print(template.format(**{name: safe(value) for name, value in values.items()}))


def error(message: str) -> None:
    """One error line on stderr."""
    stderr.print(f"[bold red]error:[/] {safe(message)}")


def usage(text: str) -> None:
    """Usage text (from the argument parser) on stderr, as it is."""
    stderr.print(safe(text))


@contextlib.contextmanager
def progress_bar(description: str, total: int) -> Iterator[ProgressCallback]:
    """A transfer bar (bytes, speed, time left) on stderr, shown only on a terminal."""
    if not (stdout.is_terminal and stderr.is_terminal):
        yield lambda _count: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(safe(description), total=total)
        yield lambda count: bar.advance(task, count)


def _metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in metrics.items())


def versions_table(versions: Sequence[VersionRecord]) -> None:
    from rich.table import Table

    marker = symbol("●", "*")
    table = Table(title=f"Model versions, newest first ({marker} = latest)", title_justify="left")
    for column in ("model", "commit", "format", "size", "stored"):
        table.add_column(column, no_wrap=True, justify="right" if column == "size" else "left")
    table.add_column("message, metrics", min_width=16)
    separator = symbol(" · ", " | ")
    for record in versions:
        shown = f"[green]{marker}[/]" if record.is_latest else " "
        notes = separator.join(filter(None, (record.message, _metrics_text(record.metrics))))
        table.add_row(
            safe(record.model_name),
            f"{shown} {safe(record.short_commit)}",
            safe(record.format),
            human_size(record.size_bytes),
            safe(record.created_at[:10]),
            safe(notes),
        )
    stdout.print(table)


def verify_table(results: Sequence[VerifyResult]) -> None:
    from rich.table import Table

    table = Table(title="Verification", title_justify="left")
    for column in ("status", "model", "commit", "size", "detail"):
        table.add_column(column)
    styles = {"ok": "[green]ok[/]", "missing": "[yellow]missing[/]", "mismatch": "[red]mismatch[/]"}
    for result in results:
        record = result.record
        table.add_row(
            styles[result.status],
            safe(record.model_name),
            safe(record.short_commit),
            human_size(record.size_bytes),
            safe(result.detail),
        )
    stdout.print(table)


def gc_table(leftovers: Sequence, *, dry_run: bool) -> None:
    from rich.table import Table

    title = "Would remove (dry run)" if dry_run else "Removed"
    table = Table(title=title, title_justify="left")
    for column in ("kind", "name", "size", "started"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for leftover in leftovers:
        table.add_row(
            safe(leftover.kind),
            safe(leftover.name),
            "?" if leftover.size is None else human_size(leftover.size),
            safe(leftover.started_at.strftime("%Y-%m-%d %H:%M")),
        )
    stdout.print(table)
