"""Transfer benchmark: `nexus store` / `nexus load` against the tools a user would compare with.

Every figure is measured side by side in one run (baseline and nexus alternate), the
median of ``--runs`` repetitions, each side a whole process:

    startup  nexus --help                                  goal ≤ 0.25 s (floor: import typer)
    startup  nexus list, 10-version registry               goal ≤ 0.3 s
    local    nexus store  ÷  cp FILE COPY && sync COPY && openssl dgst -sha256 FILE   ≤ 1.5
    local    nexus load   ÷  the same, from the stored object                        ≤ 1.5
    local    second nexus store (nothing uploaded)  ÷  sha256sum FILE                ≤ 1.2
    peak RSS of each nexus process                                        goal ≤ 300 MB

nexus fsyncs what it stores, so the baseline syncs its copy too. With ``--s3`` the rows
of ``bench/transfer_s3.py`` follow (moto for stores, s3rver for loads where node is
installed). The file stays in the page cache, so these are CPU-and-copy figures, not
disk figures.

    python bench/transfer.py --size-mib 1024 --runs 3 --s3     # make bench
    python bench/transfer.py --quick --s3                       # a smoke run, a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from _harness import (
    NEXUS,
    MiB,
    Row,
    Samples,
    alternating,
    compile_project,
    git,
    make_file,
    make_repo,
    print_table,
    shell,
    timed,
)

#: runs of the startup rows: each takes a fraction of a second
STARTUP_RUNS = 7
BASELINE = "cp FILE COPY && sync COPY && openssl dgst -sha256 FILE"
SHA256 = "openssl dgst -sha256 >/dev/null"


def startup_rows(work: Path, runs: int) -> list[Row]:
    """How long a command takes before it does any work: imports, config, metadata."""
    repo = work / "startup-repo"
    make_repo(repo)
    for index in range(10):
        weights = repo / f"w{index}.bin"
        weights.write_bytes(os.urandom(1000))
        (repo / "train.py").write_text(f"# run {index}\n")
        git(repo, "add", "train.py")
        git(repo, "commit", "-q", "-m", f"train {index}")
        timed([*NEXUS, "store", str(weights), "model", "--allow-dirty"], repo)
    typer = [NEXUS[0], "-c", "import typer"]
    samples = Samples()
    for run in range(max(runs, STARTUP_RUNS)):
        for side in alternating(run, "help", "list", "typer"):
            command = {"help": [*NEXUS, "--help"], "list": [*NEXUS, "list"], "typer": typer}
            samples.record(side, *timed(command[side], repo))
    median, rss = samples.median, samples.rss
    return [
        Row("startup: python -c 'import typer' (the floor)", median["typer"], None, "-",
            rss["typer"]),
        Row("startup: nexus --help", median["help"], median["typer"], "≤ 0.25 s", rss["help"],
            "ratio: over import typer"),
        Row("startup: nexus list (10 versions)", median["list"], median["typer"], "≤ 0.3 s",
            rss["list"], "ratio: over import typer"),
    ]  # fmt: skip


def local_rows(work: Path, weights: Path, runs: int) -> list[Row]:
    """Store and load against a copy that is synced and hashed, and a second store (which
    only hashes) against sha256sum."""
    repo = work / "repo"
    make_repo(repo)
    store_root = repo / ".nexus" / "store"
    meta = repo / ".nexus_meta.json"
    copy = work / "copy.bin"
    loaded = work / "loaded.bin"
    store = [*NEXUS, "store", str(weights), "model", "--json"]
    samples = Samples()
    record = samples.record

    for run in range(runs):
        shutil.rmtree(store_root, ignore_errors=True)
        meta.unlink(missing_ok=True)
        order = alternating(run, "nexus", "baseline")
        for side in order:
            copy.unlink(missing_ok=True)
            if side == "nexus":
                record("store", *timed(store, repo))
            else:
                script = f"cp {weights} {copy} && sync {copy} && {SHA256} {weights}"
                record("store/base", shell(script, work))
        stored = next(p for p in store_root.rglob("*.bin"))
        for side in order:
            copy.unlink(missing_ok=True)
            loaded.unlink(missing_ok=True)
            if side == "nexus":
                record("load", *timed([*NEXUS, "load", "model", "-o", str(loaded)], repo))
            else:
                script = f"cp {stored} {copy} && sync {copy} && {SHA256} {copy}"
                record("load/base", shell(script, work))
        for side in order:
            if side == "nexus":
                record("again", *timed(store, repo))
            else:
                record("again/base", shell(f"sha256sum {weights} >/dev/null", work))
    copy.unlink(missing_ok=True)
    loaded.unlink(missing_ok=True)

    median, rss = samples.median, samples.rss
    return [
        Row("local: nexus store", median["store"], median["store/base"], "≤ 1.5",
            rss["store"], BASELINE),
        Row("local: nexus load (verified)", median["load"], median["load/base"], "≤ 1.5",
            rss["load"], BASELINE.replace("FILE", "OBJECT", 1)),
        Row("local: second nexus store (nothing uploaded)", median["again"],
            median["again/base"], "≤ 1.2", rss["again"], "sha256sum FILE"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="local rows' file size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="add the S3 rows (bench/transfer_s3.py)")
    parser.add_argument("--s3-sizes-mib", default="64,256", help="S3 rows' file sizes")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke test")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: tmp)")
    args = parser.parse_args()
    compile_project()
    if args.quick:
        args.size_mib, args.runs, args.s3_sizes_mib = 32, 1, "16,32"

    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="nexus-bench-", dir=args.dir) as scratch:
        work = Path(scratch)
        rows = startup_rows(work, args.runs)
        weights = work / "weights.bin"
        make_file(weights, size)
        rows += local_rows(work, weights, args.runs)
        weights.unlink()
        if args.s3:
            from transfer_s3 import s3_rows

            sizes = [int(s) * MiB for s in args.s3_sizes_mib.split(",") if s]
            rows += s3_rows(work, sizes, args.runs)
    print_table(rows, f"local file: {args.size_mib} MiB of random bytes, median of "
                      f"{args.runs} runs, {os.cpu_count()} CPUs")  # fmt: skip
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "transfer.json").write_text(
        json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=2)
    )


if __name__ == "__main__":
    main()
