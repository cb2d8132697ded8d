"""What every benchmark script shares: timing whole processes, medians, repositories, tables.

``transfer.py`` (local rows and the entry point of ``make bench``) and ``transfer_s3.py``
(S3 rows) both import from here, never from each other.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NEXUS = [sys.executable, "-m", "nexus_cli"]
GNU_TIME = "/usr/bin/time"  # for the peak RSS of one process
MiB = 1024 * 1024


@dataclass
class Row:
    """One line of the table: a nexus figure against its baseline, both medians in seconds.

    A row with ``baseline_s`` of ``None`` has an absolute goal (seconds), not a ratio.
    """

    figure: str
    nexus_s: float
    baseline_s: float | None
    goal: str
    peak_rss_mb: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.baseline_s is None else self.nexus_s / self.baseline_s


class Samples:
    """Seconds measured for each figure, and the highest peak RSS seen for each."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.rss: dict[str, float] = {}

    def record(self, name: str, seconds: float, peak: float | None = None) -> None:
        self.seconds.setdefault(name, []).append(seconds)
        if peak is not None:
            self.rss[name] = max(self.rss.get(name, 0.0), peak)

    @property
    def median(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.seconds.items()}


def compile_project() -> None:
    """Write the project's bytecode first, as installing a wheel does.

    With an editable install and ``PYTHONDONTWRITEBYTECODE=1`` (set on the development
    machine) every start would compile our modules from source again: a cost no installed
    nexus pays, and one that would be charged to nexus's side of every start-up figure.
    """
    root = Path(__file__).resolve().parents[1]
    packages = [str(root / name) for name in ("nexus_cli", "model_server", "proxy")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], check=True)


def timed(command: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float | None]:
    """Run ``command``; return (seconds, peak RSS in MB of that one process).

    Dirty pages are flushed first, so one side's writeback is not billed to the next.
    The RSS comes from GNU time where it is installed: ``wait4`` here would report at
    least this process's own RSS at the fork, since Linux keeps a process's high-water
    mark across ``exec``.
    """
    os.sync()
    use_time = shutil.which(GNU_TIME) is not None
    with tempfile.NamedTemporaryFile(suffix=".rss") as report:
        prefix = [GNU_TIME, "-f", "%M", "-o", report.name] if use_time else []
        start = time.perf_counter()
        process = subprocess.Popen(
            [*prefix, *command],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, status, _ = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()}")
        process.stderr.close()
        if not use_time:
            return elapsed, None
        return elapsed, int(Path(report.name).read_text().split()[-1]) / 1024


def shell(script: str, cwd: Path, env: dict | None = None) -> float:
    return timed(["bash", "-c", script], cwd, env)[0]


def make_file(path: Path, size: int) -> None:
    block = 16 * MiB
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            handle.write(os.urandom(min(block, remaining)))
            remaining -= min(block, remaining)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def make_repo(path: Path) -> None:
    """A git repository with one commit that ignores ``*.bin`` (the weights)."""
    path.mkdir()
    git(path, "init", "-q")
    git(path, "config", "user.email", "bench@example.com")
    git(path, "config", "user.name", "bench")
    (path / ".gitignore").write_text("*.bin\n")
    git(path, "add", ".gitignore")
    git(path, "commit", "-q", "-m", "bench")


def alternating(run: int, *sides: str) -> list[str]:
    """The sides in turn order for ``run``: reversed every other run, so that drift in the
    machine hits both sides alike."""
    return list(sides) if run % 2 == 0 else list(reversed(sides))


def print_table(rows: list[Row], header: str) -> None:
    print(f"\n{header}\n")
    print("| figure | nexus (s) | baseline (s) | ratio | goal | peak RSS (MB) | baseline |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- |")
    for row in rows:
        rss = f"{row.peak_rss_mb:.0f}" if row.peak_rss_mb is not None else "-"
        base = f"{row.baseline_s:.2f}" if row.baseline_s is not None else "-"
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        print(f"| {row.figure} | {row.nexus_s:.2f} | {base} | {ratio} | {row.goal} | {rss} "
              f"| {row.note} |")  # fmt: skip
