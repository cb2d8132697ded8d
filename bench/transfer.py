"""Transfer benchmark: `nexus store` / `nexus load` against the tools a user would compare with.

Every figure is a ratio measured side by side in one run (baseline and nexus
alternate), the median of ``--runs`` repetitions, on a file of random bytes:

    local  nexus store          ÷  cp FILE STORE && sha256sum FILE      goal ≤ 1.2
    local  nexus load           ÷  cp OBJECT OUT && sha256sum OUT       goal ≤ 1.2
    local  second nexus store   ÷  sha256sum FILE                       goal ≤ 1.2
    peak RSS of each nexus process                                      goal ≤ 300 MB

Coreutils' sha256sum may not use the CPU's SHA extensions (here it runs at a third of
OpenSSL's speed), so each figure is also given against ``openssl dgst -sha256``.

With ``--s3`` the rows of ``bench/transfer_s3.py`` (a moto server on 127.0.0.1) follow.
The file stays in the page cache, so these are CPU-and-copy figures, not disk figures.

    python bench/transfer.py --size-mib 1024 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NEXUS = [sys.executable, "-m", "nexus_cli"]
GNU_TIME = "/usr/bin/time"  # for the peak RSS of one process


@dataclass
class Row:
    figure: str
    nexus_s: float
    baseline_s: float
    goal: str
    peak_rss_mb: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.nexus_s / self.baseline_s


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


def timed(command: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float]:
    """Run ``command``; return (seconds, peak RSS in MB of that one process).

    Dirty pages are flushed first, so one side's writeback is not billed to the next.
    The RSS comes from GNU time: ``wait4`` here would report at least this process's own
    RSS at the fork, since Linux keeps a process's high-water mark across ``exec``.
    """
    os.sync()
    with tempfile.NamedTemporaryFile(suffix=".rss") as report:
        start = time.perf_counter()
        process = subprocess.Popen(
            [GNU_TIME, "-f", "%M", "-o", report.name, *command],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, status, _ = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()}")
        process.stderr.close()
        return elapsed, int(Path(report.name).read_text().split()[-1]) / 1024


def shell(script: str, cwd: Path) -> float:
    return timed(["bash", "-c", script], cwd)[0]


def make_file(path: Path, size: int) -> None:
    block = 16 * 1024 * 1024
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            handle.write(os.urandom(min(block, remaining)))
            remaining -= min(block, remaining)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def make_repo(path: Path) -> None:
    path.mkdir()
    git(path, "init", "-q")
    git(path, "config", "user.email", "bench@example.com")
    git(path, "config", "user.name", "bench")
    (path / ".gitignore").write_text("*.bin\n")
    git(path, "add", ".gitignore")
    git(path, "commit", "-q", "-m", "bench")


def local_rows(work: Path, weights: Path, runs: int) -> list[Row]:
    """The three local figures, each against the issue's baseline (coreutils ``sha256sum``)
    and against ``openssl dgst -sha256``, the fastest sha256 on the machine."""
    repo = work / "repo"
    make_repo(repo)
    store_root = repo / ".nexus" / "store"
    meta = repo / ".nexus_meta.json"
    copy_target = work / "copy.bin"
    load_target = work / "loaded.bin"
    hashers = {"sha256sum": "sha256sum", "openssl": "openssl dgst -sha256"}
    store_cmd = [*NEXUS, "store", str(weights), "model", "--json"]

    samples = Samples()
    record = samples.record

    for run in range(runs):
        shutil.rmtree(store_root, ignore_errors=True)
        meta.unlink(missing_ok=True)
        # alternate which goes first so drift in the machine hits both sides alike
        order = ["nexus", *hashers] if run % 2 == 0 else [*hashers, "nexus"]
        for side in order:
            copy_target.unlink(missing_ok=True)
            if side == "nexus":
                record("store", *timed(store_cmd, repo))
            else:
                script = f"cp {weights} {copy_target} && {hashers[side]} {weights} >/dev/null"
                record(f"store/{side}", shell(script, work))

        stored = next(p for p in store_root.rglob("*.bin"))
        for side in order:
            copy_target.unlink(missing_ok=True)
            load_target.unlink(missing_ok=True)
            if side == "nexus":
                record("load", *timed([*NEXUS, "load", "model", "-o", str(load_target)], repo))
            else:
                script = f"cp {stored} {copy_target} && {hashers[side]} {copy_target} >/dev/null"
                record(f"load/{side}", shell(script, work))

        for side in order:
            if side == "nexus":
                record("again", *timed(store_cmd, repo))
            else:
                record(f"again/{side}", shell(f"{hashers[side]} {weights} >/dev/null", work))

    median, rss = samples.median, samples.rss
    rows = []
    for key, figure, baseline in (
        ("store", "local: nexus store", "cp + {}"),
        ("load", "local: nexus load (verified)", "cp + {}"),
        ("again", "local: second nexus store (nothing uploaded)", "{}"),
    ):
        for hasher in hashers:
            rows.append(Row(figure, median[key], median[f"{key}/{hasher}"],
                            "≤ 1.2" if hasher == "sha256sum" else "(stricter)", rss[key],
                            baseline.format(hashers[hasher])))  # fmt: skip
    return rows


def print_table(rows: list[Row], size: int, runs: int) -> None:
    print(f"\nfile: {size / 2**20:.0f} MiB of random bytes, median of {runs} runs, "
          f"{os.cpu_count()} CPUs\n")  # fmt: skip
    print("| figure | nexus (s) | baseline (s) | ratio | goal | peak RSS (MB) | baseline |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- |")
    for row in rows:
        rss = f"{row.peak_rss_mb:.0f}" if row.peak_rss_mb is not None else "-"
        print(f"| {row.figure} | {row.nexus_s:.2f} | {row.baseline_s:.2f} | {row.ratio:.2f} "
              f"| {row.goal} | {rss} | {row.note} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--s3", action="store_true", help="add the S3 rows (moto on 127.0.0.1)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: tmp)")
    args = parser.parse_args()

    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="nexus-bench-", dir=args.dir) as scratch:
        work = Path(scratch)
        weights = work / "weights.bin"
        make_file(weights, size)
        rows = local_rows(work, weights, args.runs)
        if args.s3:
            sys.path.insert(0, str(Path(__file__).parent))
            from transfer_s3 import s3_rows

            for row in s3_rows(weights, args.runs):
                rows.append(Row(row["figure"], row["nexus_s"], row["baseline_s"], row["goal"],
                                row.get("peak_rss_mb"), row.get("note", "")))  # fmt: skip
    print_table(rows, size, args.runs)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "transfer.json").write_text(
        json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=2)
    )


if __name__ == "__main__":
    main()
