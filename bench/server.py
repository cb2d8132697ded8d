"""Model server benchmark: whole processes side by side with plain torch, in one run.

The model is ``model_server.demo``'s MLP saved as a ``state_dict`` and served with
``NEXUS_MODEL_FACTORY``: ``--size big`` (default) is 1024 -> 4 x 4096 -> 16, about 285 MB
of fp32 weights; ``--size small`` (width 512, ~5 MB) is for smoke runs. It is stored with
``nexus``'s Python API on moto's S3 server (in this process) in a scratch git repository.
Figures, medians of ``--runs``, the two sides alternating which goes first:

    start to ready, cold cache, S3   ÷  python: import torch, boto3 download_file,
                                        torch.load(weights_only=True)          goal ≤ 1.3
    start to ready, warm cache       ÷  python: import torch, torch.load from disk
                                                                               goal ≤ 1.3
    POST /predict/batch, 32 samples  ÷  the same forward pass in this process   goal ≤ 1.15
    POST /predict/batch, 1 sample    ÷  the same, 1 sample                      goal ≤ 1.3
    peak RSS of the server           ÷  the model's size in memory   (reported)
    RSS after a reload to a new version ÷ RSS before it: no second copy left behind

Then where a request's time goes, from the ``Server-Timing`` header of each answer:
read (receiving the body), decode (JSON to arrays), queue (waiting for the device),
forward (on the device worker), encode (arrays to JSON), and the rest (HTTP parsing,
uvicorn, FastAPI, thread hops, the client).

    python bench/server.py                 # big model, 5 runs
    python bench/server.py --quick         # small model, 2 runs: a smoke check
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from _harness import Row, Samples, alternating, compile_project, make_repo, print_table
from transfer_s3 import moto_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = "bench_mlp"
BUCKET = "nexus-bench-server"
#: the request rows alternate server and in-process blocks this many times: drift on a
#: noisy machine (other tenants, memory bandwidth) then falls on both sides alike
REQUEST_BLOCKS = 6
FACTORIES = {"big": "model_server.demo:build_mlp", "small": "model_server.demo:build_small_mlp"}

BASELINE_S3 = """
import sys, boto3, torch
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=sys.argv[1], config=Config(s3={"addressing_style": "path"}))
s3.download_file(sys.argv[2], sys.argv[3], sys.argv[4])
torch.load(sys.argv[4], weights_only=True)
"""
BASELINE_DISK = """
import sys, torch
torch.load(sys.argv[1], weights_only=True)
"""


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


class Server:
    """``python -m model_server`` with ``env``; ``seconds_to_ready`` from spawn to 200."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "ab") as sink:
            started = time.perf_counter()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "model_server"],
                cwd=cwd,
                env={**env, "NEXUS_PORT": str(self.port)},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        while status_of(f"{self.url}/readyz") != 200:
            if self.process.poll() is not None or time.perf_counter() - started > 600:
                raise SystemExit(f"the server did not get ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.01)
        self.seconds_to_ready = time.perf_counter() - started

    def memory_mb(self, field: str) -> float:
        """``VmHWM`` (peak) or ``VmRSS`` (now) of the server process, in MB."""
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def run_process(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def post_timings(url: str, body: bytes, count: int) -> list[tuple[float, dict[str, float]]]:
    """Round trips of ``count`` POSTs on one kept-alive connection (after 3 to warm up),
    each with the server's own ``Server-Timing`` split (seconds per stage)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Content-Type": "application/json"}
    seen = []
    try:
        for index in range(count + 3):
            started = time.perf_counter()
            connection.request("POST", "/predict/batch", body, headers)
            response = connection.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - started
            if response.status != 200:
                raise SystemExit(f"predict failed: {response.status} {payload[:300]!r}")
            stages = {
                name: float(ms) / 1000
                for name, ms in re.findall(r"(\w+);dur=([\d.]+)", response.headers["server-timing"])
            }
            if index >= 3:
                seen.append((elapsed, stages))
    finally:
        connection.close()
    return seen


def forward_timings(model, batch, count: int) -> list[float]:
    import torch

    seconds = []
    with torch.inference_mode():
        for index in range(count + 3):
            started = time.perf_counter()
            model(batch).cpu()  # as the server: the output is back in host memory
            if index >= 3:
                seconds.append(time.perf_counter() - started)
    return seconds


def publish(repo: Path, weights: Path, environ: dict[str, str], features: int) -> None:
    """Store ``weights`` at a new commit, with a signature: the server warms up (touches
    every weight) before it says ready, as a real deployment would."""
    from nexus_cli.api import Project
    from nexus_cli.signature import signature_from_input_shape

    with open(repo / "train.py", "a") as handle:
        handle.write(f"# {time.time_ns()}\n")
    subprocess.run(["git", "add", "train.py"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "train"], cwd=repo, check=True)
    signature = signature_from_input_shape(str(features))
    Project(repo / ".nexus_meta.json", environ=environ).store(
        weights, MODEL, allow_dirty=True, signature=signature
    )
    subprocess.run(["git", "add", ".nexus_meta.json"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "store"], cwd=repo, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(FACTORIES), default="big")
    parser.add_argument("--runs", type=int, default=5, help="start-up runs per side")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per row")
    parser.add_argument("--quick", action="store_true", help="small model, 2 runs: a smoke test")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: tmp)")
    args = parser.parse_args()
    compile_project()
    if args.quick:
        args.size, args.runs, args.requests = "small", 2, 10

    import numpy as np
    import orjson
    import torch
    from model_server.demo import build_mlp, build_small_mlp, save
    from nexus_cli.metadata import Metadata

    work = Path(tempfile.mkdtemp(prefix="nexus-bench-server-", dir=args.dir))
    builder = build_mlp if args.size == "big" else build_small_mlp
    torch.manual_seed(1)
    model = builder().eval()
    weights = save(model, work / "weights.pt", "state_dict")
    model_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    features = model.input_features
    device = os.environ.get("NEXUS_DEVICE", "cpu")  # the same device on both sides
    model.to(device)
    print(f"model: {FACTORIES[args.size]}, {model_mb:.0f} MB of fp32 weights, in {work}")

    repo = work / "repo"
    make_repo(repo)
    Metadata().write(repo / ".nexus_meta.json")
    samples = Samples()
    rss: dict[str, float] = {}

    with moto_server() as endpoint:
        import boto3
        from botocore.config import Config

        aws = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        os.environ.update(aws)
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"})
        )
        s3.create_bucket(Bucket=BUCKET)
        storage = {"NEXUS_PROVIDER": "s3", "NEXUS_BUCKET": BUCKET, "NEXUS_ENDPOINT_URL": endpoint}
        env = {
            **os.environ,
            **aws,
            **storage,
            "NEXUS_MODEL_FACTORY": FACTORIES[args.size],
            "NEXUS_DEVICE": device,
        }
        publish(repo, weights, env, features)
        from nexus_cli.api import Project

        record = Project(repo / ".nexus_meta.json", environ=env).resolve(MODEL)
        warm_cache = work / "warm-cache"

        # start-up rows -------------------------------------------------------------------
        for run in range(args.runs):
            for side in alternating(run, "server", "baseline"):
                if side == "server":
                    cold = work / f"cold-{run}"
                    server = Server({**env, "NEXUS_CACHE_DIR": str(cold)}, repo, work / "log")
                    samples.record("cold", server.seconds_to_ready)
                    server.stop()
                    server = Server({**env, "NEXUS_CACHE_DIR": str(cold)}, repo, work / "log")
                    samples.record("warm", server.seconds_to_ready)
                    server.stop()
                    if run == 0:
                        cold.rename(warm_cache)
                    else:
                        shutil.rmtree(cold)
                else:
                    target = work / f"baseline-{run}.pt"
                    samples.record("cold_base", run_process(
                        [sys.executable, "-c", BASELINE_S3, endpoint, BUCKET,
                         record.storage_uri, str(target)], env))  # fmt: skip
                    samples.record("warm_base", run_process(
                        [sys.executable, "-c", BASELINE_DISK, str(target)], env))  # fmt: skip
                    target.unlink()
            print(f"start-up run {run + 1}/{args.runs} done", flush=True)

        # request rows, memory, reload ---------------------------------------------------------
        server = Server({**env, "NEXUS_CACHE_DIR": str(warm_cache)}, repo, work / "log")
        try:
            rng = np.random.default_rng(0)
            for size in (32, 1):
                batch = rng.normal(size=(size, features)).astype(np.float32)
                body = orjson.dumps({"inputs": batch}, option=orjson.OPT_SERIALIZE_NUMPY)
                tensor = torch.from_numpy(batch).to(device)
                per_block = max(args.requests // REQUEST_BLOCKS, 1)
                for run in range(REQUEST_BLOCKS):
                    for side in alternating(run, "server", "forward"):
                        if side == "server":
                            for value, stages in post_timings(server.url, body, per_block):
                                samples.record(f"post{size}", value)
                                for stage, seconds in stages.items():
                                    samples.record(f"{stage}{size}", seconds)
                        else:
                            for value in forward_timings(model, tensor, per_block):
                                samples.record(f"inproc{size}", value)
            rss["peak"] = server.memory_mb("VmHWM")
            rss["before_reload"] = server.memory_mb("VmRSS")
            torch.manual_seed(2)
            second = save(builder(), work / "weights-2.pt", "state_dict")
            publish(repo, second, env, features)
            request = urllib.request.Request(f"{server.url}/admin/reload", method="POST")
            with urllib.request.urlopen(request, timeout=600) as response:
                reload = json.loads(response.read())
            assert reload["changed"], reload
            post_timings(server.url, body, 3)  # the new model has run
            time.sleep(1)
            rss["after_reload"] = server.memory_mb("VmRSS")
            rss["peak_after_reload"] = server.memory_mb("VmHWM")
        finally:
            server.stop()

    median = samples.median
    rows = [
        Row("start to ready, cold cache, S3 (moto)", median["cold"], median["cold_base"],
            "≤ 1.3", note="import torch + boto3 download_file + torch.load"),
        Row("start to ready, warm cache", median["warm"], median["warm_base"], "≤ 1.3",
            note="import torch + torch.load from disk"),
        Row("POST /predict/batch, 32 samples", median["post32"], median["inproc32"],
            "≤ 1.15", note="the same forward pass in-process"),
        Row("POST /predict/batch, 1 sample", median["post1"], median["inproc1"], "≤ 1.3",
            note="the same forward pass in-process"),
    ]  # fmt: skip
    print_table(rows, f"Model server vs plain torch ({args.size} model, {model_mb:.0f} MB)")
    print(
        f"\npeak RSS of the server: {rss['peak']:.0f} MB = "
        f"{rss['peak'] / model_mb:.2f} x the model's {model_mb:.0f} MB"
    )
    print(
        f"RSS before a reload {rss['before_reload']:.0f} MB, after it "
        f"{rss['after_reload']:.0f} MB (ratio {rss['after_reload'] / rss['before_reload']:.2f}; "
        f"a second copy left behind would add ~{model_mb:.0f} MB); peak during the reload "
        f"{rss['peak_after_reload']:.0f} MB"
    )
    print("\nWhere a request's time goes, ms (medians; the stages from Server-Timing):\n")
    stages = ("read", "decode", "queue", "forward", "encode")
    print(f"| batch | round trip | {' | '.join(stages)} | HTTP + framework |")
    print("| ---: | ---: |" + " ---: |" * (len(stages) + 1))
    for size in (32, 1):
        total = median[f"post{size}"]
        parts = [median[f"{stage}{size}"] for stage in stages]
        cells = " | ".join(f"{p * 1000:.2f}" for p in (*parts, total - sum(parts)))
        print(f"| {size} | {total * 1000:.2f} | {cells} |")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n(in-process forward: 32 samples {median['inproc32'] * 1000:.2f} ms, "
          f"1 sample {median['inproc1'] * 1000:.2f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
