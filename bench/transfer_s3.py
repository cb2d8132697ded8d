"""S3 transfer benchmark: `nexus` against bare boto3, both talking to moto on 127.0.0.1.

Side by side in one run, alternating which side goes first, medians of ``--runs``:

    s3  nexus store            ÷  boto3 upload_file (default TransferConfig)   goal ≤ 1.2
    s3  nexus load (verified)  ÷  boto3 download_file (default, unverified)    goal ≤ 1.2
    s3  second nexus store     ÷  sha256sum FILE                               goal ≤ 1.2
    peak RSS of each nexus process                                             goal ≤ 300 MB

Every side is its own Python process (interpreter start and imports included on both);
the moto server runs in this process, which only waits meanwhile. moto is no S3: it takes
uploads at well under 100 MB/s and re-reads the whole object for every ranged GET, so
these figures compare the two clients on the same slow server, not against real S3.

    python bench/transfer_s3.py --size-mib 1024 --runs 3
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from transfer import NEXUS, Samples, make_file, make_repo, shell, timed  # noqa: E402

BUCKET = "nexus-bench"
BOTO3 = """
import sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=sys.argv[1], config=Config(s3={"addressing_style": "path"}))
if sys.argv[2] == "up":
    s3.upload_file(sys.argv[3], sys.argv[4], sys.argv[5])
else:
    s3.download_file(sys.argv[4], sys.argv[5], sys.argv[3])
"""
FIGURES = (
    ("store", "s3: nexus store", "boto3 upload_file (default TransferConfig)"),
    ("load", "s3: nexus load (verified)", "boto3 download_file (default, no checksum)"),
    ("again", "s3: second nexus store (nothing uploaded)", "sha256sum FILE"),
)


def _reset(endpoint: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=60):
        pass


def s3_rows(path: Path, runs: int) -> list[dict]:
    """Time `nexus store`/`load` against boto3 on a moto server; one dict per figure."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NEXUS_PROVIDER": "s3",
        "NEXUS_BUCKET": BUCKET,
        "NEXUS_ENDPOINT_URL": endpoint,
    }
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    samples = Samples()
    record = samples.record

    try:
        with tempfile.TemporaryDirectory(prefix="nexus-bench-s3-", dir=path.parent) as scratch:
            work = Path(scratch)
            repo = work / "repo"
            make_repo(repo)
            out = work / "out.bin"
            store = [*NEXUS, "store", str(path), "model", "--json"]
            boto = [sys.executable, "-c", BOTO3, endpoint]
            for run in range(runs):
                _reset(endpoint)
                client.create_bucket(Bucket=BUCKET)
                (repo / ".nexus_meta.json").unlink(missing_ok=True)
                order = ["nexus", "boto3"] if run % 2 == 0 else ["boto3", "nexus"]
                for side in order:
                    if side == "nexus":
                        record("store", *timed(store, repo, env))
                    else:
                        record(
                            "store/base", timed([*boto, "up", str(path), BUCKET, "b"], repo, env)[0]
                        )
                for side in order:
                    out.unlink(missing_ok=True)
                    if side == "nexus":
                        record("load", *timed([*NEXUS, "load", "model", "-o", str(out)], repo, env))
                    else:
                        record(
                            "load/base", timed([*boto, "down", str(out), BUCKET, "b"], repo, env)[0]
                        )
                out.unlink(missing_ok=True)
                for side in order:
                    if side == "nexus":
                        record("again", *timed(store, repo, env))
                    else:
                        record("again/base", shell(f"sha256sum {path} >/dev/null", work))
    finally:
        server.stop()

    rows = []
    for key, figure, baseline in FIGURES:
        nexus_s = samples.median[key]
        baseline_s = samples.median[f"{key}/base"]
        rows.append({"figure": figure, "nexus_s": nexus_s, "baseline_s": baseline_s,
                     "ratio": nexus_s / baseline_s, "goal": "≤ 1.2",
                     "peak_rss_mb": samples.rss[key], "note": baseline})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: tmp)")
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="nexus-bench-", dir=args.dir) as scratch:
        weights = Path(scratch) / "weights.bin"
        make_file(weights, size)
        rows = s3_rows(weights, args.runs)
    print(f"\nfile: {args.size_mib} MiB of random bytes, median of {args.runs} runs, "
          f"{os.cpu_count()} CPUs, moto on 127.0.0.1\n")  # fmt: skip
    print("| figure | nexus (s) | baseline (s) | ratio | goal | peak RSS (MB) | baseline |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- |")
    for row in rows:
        print(f"| {row['figure']} | {row['nexus_s']:.2f} | {row['baseline_s']:.2f} "
              f"| {row['ratio']:.2f} | {row['goal']} (RSS ≤ 300 MB) | {row['peak_rss_mb']:.0f} "
              f"| {row['note']} |")  # fmt: skip


if __name__ == "__main__":
    main()
