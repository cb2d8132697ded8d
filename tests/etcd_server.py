"""A real etcd on 127.0.0.1 for the registration tests, as pytest fixtures.

Test modules build their own fixture on ``run_etcd``. etcd comes from the
system (Debian/Ubuntu: ``apt-get install etcd-server``; macOS: ``brew install etcd``). On a
developer's machine without it the tests are skipped with that hint; in CI (``CI=true``) a
missing etcd fails them, so a broken CI image cannot turn them green by skipping.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cloud_servers import free_port, wait_for_http

INSTALL_HINT = (
    "etcd is not installed: `sudo apt-get install etcd-server` (Debian/Ubuntu) or "
    "`brew install etcd` (macOS)"
)
#: where Debian's package puts it, for a PATH that lacks /usr/bin
FALLBACK_PATHS = (Path("/usr/bin/etcd"),)


def etcd_binary() -> str:
    """The etcd binary, or skip (fail under CI=true) with the install hint."""
    found = shutil.which("etcd") or next((str(p) for p in FALLBACK_PATHS if p.exists()), None)
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {INSTALL_HINT}; .ci/run installs it", pytrace=False)
    pytest.skip(INSTALL_HINT)


@dataclass
class Etcd:
    """A running etcd and the few v3 gateway calls the tests need to look inside it."""

    url: str

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def get(self, key: str) -> dict[str, Any] | None:
        """The key's kv record (value decoded to text, lease as a string), or None."""
        answer = self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        return {
            "value": base64.b64decode(kv.get("value", "")).decode(),
            "lease": kv.get("lease", "0"),
        }

    def keys(self, prefix: str) -> list[str]:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        answer = self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
        return [base64.b64decode(kv["key"]).decode() for kv in answer.get("kvs") or []]

    def lease_ttl(self, lease: str) -> int:
        """Seconds left on ``lease``; -1 when etcd does not know it (expired or revoked)."""
        answer = self.call("/v3/lease/timetolive", {"ID": lease})
        return int(answer.get("TTL", -1))

    def revoke(self, lease: str) -> None:
        self.call("/v3/lease/revoke", {"ID": lease})


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@contextmanager
def run_etcd(data_dir: Path, client_port: int | None = None) -> Iterator[Etcd]:
    """Start etcd on free 127.0.0.1 ports with its data in ``data_dir``; stop it afterwards."""
    binary = etcd_binary()
    client = client_port or free_port()
    peer = free_port()
    url = f"http://127.0.0.1:{client}"
    args = [binary, "--name", "nexus-test", "--data-dir", str(data_dir / "data"),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"nexus-test=http://127.0.0.1:{peer}",
            "--log-level", "warn"]  # fmt: skip
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "etcd.log", "wb") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_http(f"{url}/health", timeout=30)
        except OSError as exc:
            log = (data_dir / "etcd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"etcd did not start on {url}:\n{log}") from exc
        yield Etcd(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` (an upper bound for hangs)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)
