"""Serving benchmark: the batching proxy against the model server it fronts, on loopback.

One run on this machine: a model server (``python -m model_server``), the proxy
(``python -m proxy``) and a load generator in a process of its own (aiohttp, bodies
encoded once up front, so the client is not the bottleneck), all on 127.0.0.1. The
model is ``model_server.demo``'s MLP: ``--size big`` is 1024 -> 4 x 4096 -> 16, about
285 MB of fp32 weights (a state_dict served through ``NEXUS_MODEL_FACTORY=
model_server.demo:build_mlp``), where inference dominates; ``--size small`` (width 512)
is for smoke runs. Measured in the same run, before and after the servers run:

    t1, t32   in-process forward time of a batch of 1 and of 32 (median)

Figures (medians of ``--runs``):

    throughput via proxy, C clients  ÷  same C clients, one sample per request straight
                                        to /predict/batch          goal >= 0.7 x 32·t1/t32
    throughput via proxy, C clients  ÷  model ceiling 32/t32       goal >= 0.7
    p50 lone client via proxy − p50 lone client straight to the server     goal <= 5 ms
    p99 at C clients via proxy, with the batch-size distribution   (reported)

    python bench/serving.py                    # big model, 64 clients, 3 runs of 10 s
    python bench/serving.py --quick            # small model, 2 runs of 3 s: a smoke check
    python bench/serving.py --profile out.txt  # also py-spy the proxy under load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEATURES = 1024
FACTORIES = {"big": "model_server.demo:build_mlp", "small": "model_server.demo:build_small_mlp"}


# -- load generator (runs in its own process) ------------------------------------------


async def _load(url: str, route: str, clients: int, seconds: float, warmup: float) -> dict:
    import aiohttp
    import numpy as np

    rng = np.random.default_rng(0)
    samples = rng.normal(size=(64, FEATURES)).astype(np.float32).round(4).tolist()
    key = "inputs" if route == "/predict/batch" else "input"
    bodies = [json.dumps({key: [s] if key == "inputs" else s}).encode() for s in samples]
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    errors = total = 0
    cpu_begin = time.process_time()
    connector = aiohttp.TCPConnector(limit=clients + 4)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        begin = time.perf_counter()
        start_counting = begin + warmup
        stop = start_counting + seconds

        async def client(index: int) -> None:
            nonlocal errors, total
            i = index
            while True:
                sent = time.perf_counter()
                if sent >= stop:
                    return
                async with session.post(
                    url + route, data=bodies[i % len(bodies)], headers=headers
                ) as response:
                    await response.read()
                    ok = response.status == 200
                done = time.perf_counter()
                total += 1
                if sent >= start_counting:
                    if ok:
                        latencies.append(done - sent)
                    else:
                        errors += 1
                i += clients

        await asyncio.gather(*(client(i) for i in range(clients)))
    latencies.sort()
    count = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(count - 1, int(p * count))] if count else float("nan")

    return {
        "requests": count,
        "total_requests": total,
        "client_cpu_ms": (time.process_time() - cpu_begin) / max(total, 1) * 1000,
        "errors": errors,
        "throughput": count / seconds,
        "p50_ms": pct(0.5) * 1000,
        "p99_ms": pct(0.99) * 1000,
    }


def run_loadgen(url: str, route: str, clients: int, seconds: float, warmup: float) -> dict:
    """The load generator as its own process (its own core time, its own event loop)."""
    done = subprocess.run(
        [sys.executable, __file__, "--loadgen", url, route, str(clients), str(seconds),
         str(warmup)],
        capture_output=True, text=True, timeout=seconds + warmup + 180, cwd=ROOT,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# -- model, servers --------------------------------------------------------------------


def forward_times(size: str, repeats: int, model=None) -> tuple[float, float, object]:
    """Median in-process forward time of a batch of 1 and of 32; the model."""
    import torch
    from model_server.demo import build_mlp, build_small_mlp

    if model is None:
        torch.manual_seed(0)
        model = (build_mlp() if size == "big" else build_small_mlp()).eval()
    inputs = {n: torch.randn(n, FEATURES) for n in (1, 32)}
    times: dict[int, list[float]] = {1: [], 32: []}
    with torch.inference_mode():
        for _ in range(3):  # warm up both sizes
            model(inputs[1])
            model(inputs[32])
        for _ in range(repeats):  # interleaved, so a noisy neighbour hits both alike
            for n, x in inputs.items():
                begin = time.perf_counter()
                model(x)
                times[n].append(time.perf_counter() - begin)
    return statistics.median(times[1]), statistics.median(times[32]), model


def publish(model, workdir: Path) -> Path:
    """A git repo with the model's state_dict stored (local store) and committed."""
    from model_server.demo import save
    from nexus_cli.api import Project

    repo = workdir / "project"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("config", "user.name", "Bench")
    git("config", "user.email", "bench@example.com")
    git("config", "commit.gpgsign", "false")
    (repo / ".gitignore").write_text("out/\n.nexus_store/\n")
    (repo / "train.py").write_text("# benchmark model\n")
    git("add", "-A")
    git("commit", "-q", "-m", "bench")
    # a state_dict served through the same factory: the server runs the very module that
    # the in-process t1/t32 are measured on (a traced TorchScript copy runs differently)
    weights = save(model, repo / "out" / "mlp.pt", "state_dict")
    signature = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 16]}],
    }
    Project(repo / ".nexus_meta.json").store(weights, "bench_mlp", signature=signature)
    return repo


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "AWS_"))}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1", **extra})
    return env


def start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as sink:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready in {timeout} s:\n{log.read_text()[-3000:]}")


def batch_histogram(proxy_url: str) -> dict[str, float]:
    """Cumulative ``nexus_proxy_batch_size`` buckets from the proxy's /metrics."""
    with urllib.request.urlopen(proxy_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    buckets = {}
    for line in text.splitlines():
        if line.startswith("nexus_proxy_batch_size_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
    return buckets


def distribution(before: dict[str, float], after: dict[str, float]) -> str:
    """Batches per size range between two scrapes, e.g. '<=16: 12%, <=32: 88%'."""
    previous = 0.0
    parts = []
    total = after.get("+Inf", 0) - before.get("+Inf", 0)
    for le in sorted((k for k in after if k != "+Inf"), key=float):
        cumulative = after[le] - before.get(le, 0)
        count = cumulative - previous
        previous = cumulative
        if count and total:
            parts.append(f"<={float(le):g}: {100 * count / total:.0f}%")
    return ", ".join(parts)


@dataclass
class Row:
    figure: str
    value: float
    goal: str
    note: str = ""


def profile_proxy(pid: int, seconds: float, out: Path) -> str:
    """py-spy the proxy for ``seconds``; its top frames by own time (if py-spy runs)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return "py-spy is not installed (pip install py-spy)"
    done = subprocess.run(
        [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "raw",
         "--output", str(out), "--nonblocking"],
        capture_output=True, text=True, timeout=seconds + 60,
    )  # fmt: skip
    if done.returncode != 0:
        return f"py-spy failed: {done.stderr.strip()[-300:]}"
    return f"py-spy samples written to {out}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("big", "small"), default="big")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small model, 2 runs of 3 s")
    parser.add_argument("--profile", type=Path, help="py-spy the proxy into this file")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--loadgen", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        url, route, clients, seconds, warmup = args.loadgen
        result = asyncio.run(_load(url, route, int(clients), float(seconds), float(warmup)))
        print(json.dumps(result))
        return
    if args.quick:
        args.size, args.seconds, args.runs = "small", 3.0, 2

    t1, t32, model = forward_times(args.size, repeats=20 if args.size == "big" else 50)
    print(f"model: demo MLP ({args.size}), in-process t1 = {t1 * 1000:.2f} ms, "
          f"t32 = {t32 * 1000:.2f} ms (before the load)", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="nexus-bench-serving-") as tmp:
        work = Path(tmp)
        repo = publish(model, work)
        server_port, proxy_port = free_port(), free_port()
        server_url = f"http://127.0.0.1:{server_port}"
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        server = start(
            [sys.executable, "-m", "model_server"],
            clean_env(
                {
                    "NEXUS_PORT": str(server_port),
                    "NEXUS_CACHE_DIR": str(work / "cache"),
                    "NEXUS_MODEL_FACTORY": FACTORIES[args.size],
                }
            ),
            repo,
            work / "server.log",
        )
        proxy = start(
            [sys.executable, "-m", "proxy"],
            clean_env(
                {
                    "NEXUS_PORT": str(proxy_port),
                    "NEXUS_MODEL_SERVER_URL": server_url,
                    "NEXUS_LOG_LEVEL": "warning",
                }
            ),
            ROOT,
            work / "proxy.log",
        )
        try:
            wait_ready(server_url, server, work / "server.log")
            wait_ready(proxy_url, proxy, work / "proxy.log")
            results, histogram = measure(args, server_url, proxy_url, proxy.pid, server.pid)
        finally:
            for process in (proxy, server):
                process.terminate()
            for process in (proxy, server):
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
    # again on a quiet machine: a neighbour's load inflates a forward pass, never shrinks it
    again = forward_times(args.size, repeats=20 if args.size == "big" else 50, model=model)
    t1, t32 = min(t1, again[0]), min(t32, again[1])
    print(f"in-process t1 = {t1 * 1000:.2f} ms, t32 = {t32 * 1000:.2f} ms "
          f"(the lower of before and after), 32·t1/t32 = {32 * t1 / t32:.2f}")  # fmt: skip
    rows = table(args.clients, t1, t32, results, histogram)
    print()
    print(f"{'figure':<64} {'value':>9}  goal")
    for row in rows:
        print(f"{row.figure:<64} {row.value:>9.2f}  {row.goal}")
        if row.note:
            print(f"    {row.note}")
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=2))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args, server_url: str, proxy_url: str, proxy_pid: int, server_pid: int):
    """Each phase ``--runs`` times; the results by phase and the last batch-size spread."""
    c, seconds, warmup = args.clients, args.seconds, min(2.0, args.seconds / 3)
    results: dict[str, list[dict]] = {}
    histograms = []
    for run in range(args.runs):
        for name, url, route, clients in (
            ("direct_many", server_url, "/predict/batch", c),
            ("proxy_many", proxy_url, "/predict", c),
            ("direct_lone", server_url, "/predict/batch", 1),
            ("proxy_lone", proxy_url, "/predict", 1),
        ):
            before = batch_histogram(proxy_url) if name == "proxy_many" else None
            cpu = cpu_seconds(proxy_pid), cpu_seconds(server_pid)
            result = run_loadgen(url, route, clients, seconds, warmup)
            total = result["total_requests"] or 1
            result["proxy_cpu_ms"] = (cpu_seconds(proxy_pid) - cpu[0]) / total * 1000
            result["server_cpu_ms"] = (cpu_seconds(server_pid) - cpu[1]) / total * 1000
            if before is not None:
                histograms.append(distribution(before, batch_histogram(proxy_url)))
            results.setdefault(name, []).append(result)
            print(f"run {run + 1}: {name:<12} {result['throughput']:8.1f} req/s  "
                  f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
                  f"errors {result['errors']}  CPU/request: proxy {result['proxy_cpu_ms']:.2f} ms, "
                  f"server {result['server_cpu_ms']:.2f} ms, "
                  f"load generator {result['client_cpu_ms']:.2f} ms", flush=True)  # fmt: skip
    if args.profile:
        print("profiling the proxy under load ...", flush=True)
        import threading

        holder: dict = {}
        thread = threading.Thread(
            target=lambda: holder.update(r=run_loadgen(proxy_url, "/predict", c, seconds + 2, 1.0))
        )
        thread.start()
        time.sleep(1.5)
        print(profile_proxy(proxy_pid, seconds, args.profile), flush=True)
        thread.join()

    return results, histograms[-1]


def table(c: int, t1: float, t32: float, results: dict[str, list[dict]], histogram: str):
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    bound = 32 * t1 / t32
    ceiling = 32 / t32
    via_proxy = med("proxy_many", "throughput")
    direct = med("direct_many", "throughput")
    return [
        Row(
            f"throughput via proxy ÷ direct one-per-request, {c} clients",
            via_proxy / direct,
            f">= {0.7 * bound:.2f} (0.7 x 32·t1/t32 = 0.7 x {bound:.2f})",
            f"proxy {via_proxy:.1f} req/s, direct {direct:.1f} req/s",
        ),
        Row(
            "throughput via proxy ÷ model ceiling 32/t32",
            via_proxy / ceiling,
            ">= 0.7",
            f"ceiling {ceiling:.1f} samples/s (t32 = {t32 * 1000:.1f} ms); CPU per sample via "
            f"proxy: model server {med('proxy_many', 'server_cpu_ms'):.2f} ms, proxy "
            f"{med('proxy_many', 'proxy_cpu_ms'):.2f} ms, load generator "
            f"{med('proxy_many', 'client_cpu_ms'):.2f} ms",
        ),
        Row(
            "p50 lone client: via proxy − straight to server (ms)",
            med("proxy_lone", "p50_ms") - med("direct_lone", "p50_ms"),
            "<= 5",
            f"proxy {med('proxy_lone', 'p50_ms'):.2f} ms, "
            f"direct {med('direct_lone', 'p50_ms'):.2f} ms",
        ),
        Row(
            f"p99 latency via proxy, {c} clients (ms)",
            med("proxy_many", "p99_ms"),
            "reported",
            f"p50 {med('proxy_many', 'p50_ms'):.1f} ms; batch sizes: {histogram}",
        ),
    ]


if __name__ == "__main__":
    main()
