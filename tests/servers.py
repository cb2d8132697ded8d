"""The model server as a real process on 127.0.0.1, for tests (and the proxy's tests).

    with ModelServerProcess({"NEXUS_META": str(meta)}, cwd=repo_path) as server:
        server.wait_ready()
        httpx.post(f"{server.url}/predict/batch", json={"inputs": [[0.0] * 8]})

The process is ``python -m model_server`` (uvicorn inside) on a free port. Its
environment is this process's, minus anything that could leak a real setup (AWS_*,
NEXUS_*, GOOGLE_*, proxies), plus ``env``. Its output goes to ``.log`` (a file, never a
pipe nobody reads); a failure to start raises with the log's tail.

Stable API (other test modules import it): ``ModelServerProcess(env, cwd, *, port=None,
log=None)``, ``.start()``, ``.wait_ready()``, ``.readiness()``, ``.url``, ``.port``,
``.log``, ``.log_text()``, ``.send_signal()``, ``.stop()``, ``.kill()``, context manager;
and the ``model_server_process`` fixture, a factory whose servers stop after the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_LEAKY_PREFIXES = ("AWS_", "NEXUS_", "GOOGLE_", "STORAGE_EMULATOR_HOST")
_LEAKY_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def s3_storage(bucket: str, endpoint: str) -> dict[str, str]:
    """The storage overrides that point nexus at ``bucket`` on an S3 server (moto)."""
    return {
        "NEXUS_PROVIDER": "s3",
        "NEXUS_BUCKET": bucket,
        "NEXUS_ENDPOINT_URL": endpoint,
        "NEXUS_REGION": "us-east-1",
    }


def clean_environ() -> dict[str, str]:
    """This process's environment without credentials, proxies or NEXUS_* settings."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_LEAKY_PREFIXES) and name not in _LEAKY_NAMES
    }
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def get_json(url: str, timeout: float = 10) -> tuple[int, dict]:
    """``(status, document)`` of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"{}")


class ModelServerProcess:
    """``python -m model_server`` on ``127.0.0.1:port``; start, wait, stop, kill."""

    def __init__(
        self,
        env: Mapping[str, str],
        cwd: Path,
        *,
        port: int | None = None,
        log: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = Path(cwd)
        if log is None:
            handle, name = tempfile.mkstemp(prefix="model-server-", suffix=".log")
            os.close(handle)
            log = Path(name)
        self.log = Path(log)
        self.env = {
            **clean_environ(),
            "NEXUS_HOST": "127.0.0.1",
            **dict(env),
            "NEXUS_PORT": str(self.port),
        }
        self.process: subprocess.Popen | None = None

    # life cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> ModelServerProcess:
        """Start the process and wait until ``/health`` answers (not until it is ready)."""
        with open(self.log, "ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "model_server"],
                cwd=self.cwd,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the model server exited with {self.process.returncode}:\n{self.log_text()}"
                )
            try:
                if get_json(f"{self.url}/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"no /health after {timeout} s:\n{self.log_text()}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 120) -> dict:
        """Wait for ``/readyz`` to say ready; its document. Raises with the reason if not."""
        deadline = time.monotonic() + timeout
        while True:
            status, document = self.readiness()
            if status == 200:
                return document
            if document.get("status") == "failed":
                raise AssertionError(f"the start-up load failed: {document}\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout} s: {document}\n{self.log_text()}")
            time.sleep(0.05)

    def wait_failed(self, timeout: float = 120) -> dict:
        """Wait until the start-up load has failed (503, no longer loading); the document."""
        deadline = time.monotonic() + timeout
        while True:
            status, document = self.readiness()
            if status == 503 and document.get("status") == "failed":
                return document
            if status == 200 or time.monotonic() > deadline:
                raise AssertionError(f"expected a failed start, got {status}: {document}")
            time.sleep(0.05)

    def readiness(self) -> tuple[int, dict]:
        return get_json(f"{self.url}/readyz")

    def send_signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def __enter__(self) -> ModelServerProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class ServerPool:
    """Starts servers with logs in ``log_dir``; stops them all when the block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.started: list[ModelServerProcess] = []

    def start(self, env: Mapping[str, str], cwd: Path, **kwargs: Any) -> ModelServerProcess:
        kwargs.setdefault("log", self.log_dir / f"model-server-{len(self.started)}.log")
        server = ModelServerProcess(env, cwd, **kwargs)
        self.started.append(server)
        return server.start()

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def model_server_process(tmp_path: Path) -> Iterator:
    """A factory: ``model_server_process(env, cwd)`` starts a server stopped after the test
    (opt in with ``pytest_plugins = ["tests.servers"]``, or use ``ServerPool``)."""
    with ServerPool(tmp_path) as pool:
        yield pool.start


# a registry to serve from ----------------------------------------------------------------

SIGNATURE_8_IN = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1]}],
}


@dataclass(frozen=True)
class Published:
    """A stored version and the local file it was stored from."""

    record: Any  # nexus_cli.metadata.VersionRecord
    weights: Path
    fmt: str

    @property
    def commit(self) -> str:
        return self.record.commit_hash


def _git(path: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=path, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_model_repo(path: Path) -> Path:
    """A git repository with an empty ``.nexus_meta.json`` (local store), committed."""
    from nexus_cli.metadata import Metadata

    path.mkdir(parents=True, exist_ok=True)
    _git(path, "init", "-q", "-b", "main")
    _git(path, "config", "user.name", "Ada Lovelace")
    _git(path, "config", "user.email", "ada@example.com")
    _git(path, "config", "commit.gpgsign", "false")
    (path / ".gitignore").write_text("out/\n")
    Metadata().write(path / ".nexus_meta.json")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "initial")
    return path


def publish(
    path: Path,
    weights: Path,
    *,
    model: str = "demo",
    signature: dict | None = None,
    environ: dict | None = None,
):
    """Commit a code change, store ``weights`` as ``model`` at that commit, commit the
    metadata; the ``VersionRecord``. ``environ``: the storage overrides (NEXUS_*)."""
    from nexus_cli.api import Project

    with open(path / "code.py", "a", encoding="utf-8") as handle:
        handle.write(f"# {weights.name} {time.time_ns()}\n")
    _git(path, "add", "code.py")
    _git(path, "commit", "-q", "-m", f"train {weights.name}")
    # hermetic: only the overrides given, never a developer's NEXUS_* variables
    project = Project(path / ".nexus_meta.json", environ=dict(environ or {}))
    record = project.store(weights, model, signature=signature).record
    _git(path, "add", ".nexus_meta.json")
    _git(path, "commit", "-q", "-m", f"nexus: store {model}")
    return record


def publish_demo(
    path: Path,
    *,
    seed: int = 1,
    fmt: str = "torchscript",
    model: str = "demo",
    signature: dict | None = SIGNATURE_8_IN,
    environ: dict | None = None,
) -> Published:
    """Build the tiny demo classifier (seeded), save it as ``fmt`` and ``publish`` it."""
    import torch

    from model_server.demo import EXTENSIONS, build_model, save

    torch.manual_seed(seed)
    weights = save(build_model(), path / "out" / f"{model}-{seed}{EXTENSIONS[fmt]}", fmt)
    record = publish(path, weights, model=model, signature=signature, environ=environ)
    return Published(record, weights, fmt)


def reference_outputs(weights: Path, fmt: str, inputs) -> object:
    """What the same weights give run directly in torch (a numpy array)."""
    import numpy as np
    import torch

    from model_server.demo import build_model

    batch = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            module = torch.jit.load(str(weights))
    elif fmt == "torch_export":
        module = torch.export.load(str(weights)).module()
    elif fmt == "state_dict":
        module = build_model()
        module.load_state_dict(torch.load(weights, weights_only=True))
    else:
        from safetensors.torch import load_file

        module = build_model()
        module.load_state_dict(load_file(str(weights)))
    with torch.inference_mode():
        return module(batch).numpy()
