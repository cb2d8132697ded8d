"""A small model server the proxy tests control: SPEC section 6's routes, a doubling model.

    python -m tests.fake_backend --port 8123

``POST /predict/batch`` doubles every number of every sample. Negative numbers are a
"value the model rejects" (422 naming the sample); ``POST /control`` changes its
behaviour at run time (delay per batch, readiness, limits, commit, signature, a forced
status, any field of its metadata document), and ``GET /stats`` says what it saw (batch
sizes, request ids, batches running now and the most at once). It runs in its own process,
so tests can kill and restart it.

The module also starts processes for the proxy tests: ``start_fake_backend``,
``start_proxy`` (``python -m proxy``), and small HTTP helpers on urllib.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tests.cloud_servers import free_port

ROOT = Path(__file__).resolve().parent.parent

SIGNATURE = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 4]}],
}


def error(status: int, message: str, type_: str, code: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type_, "code": code}}, status=status
    )


class FakeModelServer:
    def __init__(self, token: str | None) -> None:
        self.token = token
        self.delay = 0.0
        self.ready = True
        self.limits = {"max_batch_size": 1024, "max_concurrency": 2, "max_body_bytes": 1 << 26}
        self.model = {
            "name": "doubler",
            "commit_hash": "a" * 40,
            "sha256": "b" * 64,
            "format": "torchscript",
            "device": "cpu",
            "signature": SIGNATURE,
        }
        self.force_status: int | None = None
        self.metadata_override: dict = {}  # top-level fields of /v1/metadata, replaced
        self.batch_sizes: list[int] = []
        self.request_ids: list[str] = []
        self.running = 0
        self.most_running = 0

    def authorized(self, request: web.Request) -> bool:
        return self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.json_response({"status": "ready", "checks": {"model": "loaded"}})
        return web.json_response(
            {"status": "not ready", "checks": {"model": "told not to be ready"}}, status=503
        )

    async def metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "schema_version": "v1",
                "service": {"name": "fake-model-server", "version": "0"},
                "capabilities": {},
                "endpoints": [],
                "model": self.model,
                "limits": self.limits,
                **self.metadata_override,
            }
        )

    async def predict_batch(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return error(401, "missing or wrong token", "authentication_error", "invalid_api_key")
        if not self.ready:
            return error(503, "not ready", "service_unavailable", "unavailable")
        self.request_ids.append(request.headers.get("X-Request-ID", ""))
        body = await request.json()
        inputs = body["inputs"]
        if len(inputs) > self.limits["max_batch_size"]:
            return error(413, "batch too large", "invalid_request_error", "batch_too_large")
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.running -= 1
        self.batch_sizes.append(len(inputs))
        if self.force_status is not None:
            return error(self.force_status, "forced failure", "server_error", "forced")
        for index, sample in enumerate(inputs):
            if any(x < 0 for x in _flat(sample)):
                return error(
                    422,
                    f"inputs[{index}]: the model refuses negative values",
                    "invalid_request_error",
                    "invalid_input",
                )
        outputs = [_double(sample) for sample in inputs]
        model = {"name": self.model["name"], "commit_hash": self.model["commit_hash"]}
        return web.json_response({"outputs": outputs, "model": model})

    async def control(self, request: web.Request) -> web.Response:
        change = await request.json()
        self.delay = float(change.get("delay", self.delay))
        self.ready = bool(change.get("ready", self.ready))
        self.limits.update(change.get("limits", {}))
        self.model.update(change.get("model", {}))
        if "force_status" in change:
            self.force_status = change["force_status"]
        if "metadata" in change:
            self.metadata_override = change["metadata"]
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "batch_sizes": self.batch_sizes,
                "request_ids": self.request_ids,
                "running": self.running,
                "most_running": self.most_running,
            }
        )


def _flat(sample):
    if isinstance(sample, list):
        for item in sample:
            yield from _flat(item)
    else:
        yield sample


def _double(sample):
    if isinstance(sample, list):
        return [_double(item) for item in sample]
    return 2 * sample


# processes for tests ------------------------------------------------------------------


@dataclass
class Process:
    url: str
    port: int
    popen: subprocess.Popen
    log: Path

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def http(
    method: str,
    url: str,
    body: bytes | dict | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib: (status, headers, body); HTTP errors are answers too."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if isinstance(body, dict):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_until(check, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout} s")


def _start(args: list[str], env: dict[str, str], log: Path, port: int, probe: str) -> Process:
    handle = open(log, "ab")  # noqa: SIM115 - closed with the process's lifetime
    popen = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT
    )
    handle.close()
    process = Process(f"http://127.0.0.1:{port}", port, popen, log)

    def up() -> bool:
        if popen.poll() is not None:
            raise RuntimeError(f"{args} exited {popen.returncode}:\n{process.output()}")
        return http("GET", process.url + probe, timeout=2)[0] in (200, 503)

    try:
        wait_until(up, 30, f"{args[2]} on port {port}")
    except BaseException:
        process.kill()
        raise
    return process


def start_fake_backend(tmp: Path, port: int | None = None, **options: str) -> Process:
    port = port or free_port()
    args = [sys.executable, "-m", "tests.fake_backend", "--port", str(port)]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    return _start(args, {}, tmp / f"backend-{port}.log", port, "/health")


def start_proxy(tmp: Path, env: dict[str, str], *, ready: bool = False) -> Process:
    """``python -m proxy`` with ``env``; with ``ready``, returned once ``/readyz`` is 200."""
    port = free_port()
    full = {"NEXUS_PORT": str(port), "NEXUS_HEALTH_INTERVAL_S": "0.2", **env}
    process = _start(
        [sys.executable, "-m", "proxy"], full, tmp / f"proxy-{port}.log", port, "/health"
    )
    if ready:
        try:
            wait_until(lambda: http("GET", process.url + "/readyz")[0] == 200, what="proxy ready")
        except BaseException:
            process.kill()
            raise
    return process


def control(backend: Process, **change) -> None:
    """Change a running fake backend (``POST /control``): delay, ready, limits, model..."""
    status, _, body = http("POST", backend.url + "/control", change)
    assert status == 200, body


def stats(backend: Process) -> dict:
    """What a running fake backend saw (``GET /stats``)."""
    return json.loads(http("GET", backend.url + "/stats")[2])


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            process.kill()


def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


_TRITON_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.http as th
args = json.loads(sys.argv[1])
client = th.InferenceServerClient(args["host"])
headers = args["headers"]
report = {
    "live": client.is_server_live(headers=headers),
    "ready": client.is_server_ready(headers=headers),
    "model_ready": client.is_model_ready(args["model"], headers=headers),
    "metadata": client.get_model_metadata(args["model"], headers=headers),
}
rows = np.asarray(args["rows"], dtype=np.float32)
tensor = th.InferInput(args["input"], list(rows.shape), "FP32")
outputs = None
if args["binary"]:
    tensor.set_data_from_numpy(rows)  # the client's default: binary tensors both ways
else:
    tensor.set_data_from_numpy(rows, binary_data=False)
    outputs = [th.InferRequestedOutput(args["output"], binary_data=False)]
result = client.infer(
    args["model"], [tensor], outputs=outputs, model_version=args["version"],
    request_id="triton-1", headers=headers,
)
report["output"] = result.as_numpy(args["output"]).tolist()
report["response"] = result.get_response()
client.close()
print(json.dumps(report))
"""


def tritonclient_call(
    url: str,
    model: str,
    rows: list,
    *,
    input_name: str,
    output_name: str,
    binary: bool = True,
    version: str = "",
    headers: dict | None = None,
) -> dict:
    """Ask a v2 server with tritonclient's HTTP client, in a process of its own (gevent
    stays out of the test process); what it saw, as JSON."""
    args = {
        "host": url.removeprefix("http://"), "model": model, "rows": rows, "binary": binary,
        "input": input_name, "output": output_name, "version": version, "headers": headers or {},
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT, json.dumps(args)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"tritonclient failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default=None)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeModelServer(args.token)
    server.delay = args.delay
    app = web.Application(client_max_size=1 << 26)
    app.router.add_get("/readyz", server.readyz)
    app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
    app.router.add_get("/v1/metadata", server.metadata)
    app.router.add_post("/predict/batch", server.predict_batch)
    app.router.add_post("/control", server.control)
    app.router.add_get("/stats", server.stats)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
