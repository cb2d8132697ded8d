"""Service registration in etcd, so that a gateway on another host can find this proxy.

With ``NEXUS_ETCD_ENDPOINTS`` set, the proxy writes::

    /nexus/services/nexus-proxy/<instance id> = {"url": NEXUS_ADVERTISE_URL, "metadata": {...}}

under a lease of ``NEXUS_ETCD_TTL_S`` seconds that it keeps alive while it runs and revokes
on shutdown. A proxy that dies without a shutdown (SIGKILL, a lost host) disappears from the
registry by itself once the lease expires: that is what the lease is for.

It speaks etcd's v3 JSON gateway (``POST /v3/...``, keys and values base64) over plain HTTP,
so the proxy needs no gRPC stack; etcd 3.4 and later serve the gateway on the client port.
Several endpoints may be given: each call goes to the one that answered last and fails over
to the next on a connection error or a 5xx.

Registration never stops the proxy from serving. When etcd cannot be reached at start, the
failure is logged and a background task keeps trying (with a capped backoff); when the
lease is lost (etcd restarted, a long network partition), the key is written again under a
new lease.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Mapping
from typing import Any

import httpx

__all__ = [
    "SERVICE_PREFIX",
    "Registration",
    "RegistrationError",
    "registration_from_env",
    "service_key",
]

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/nexus/services/nexus-proxy/"
DEFAULT_TTL_S = 10.0
#: a shorter lease would leave no room for a keepalive (etcd itself raises a TTL of 1 s
#: to its minimum, 1.5 election timeouts: about 2 s with the default settings)
MIN_TTL_S = 1.0
_REQUEST_TIMEOUT_S = 3.0
_STOP_TIMEOUT_S = 2.0
_FIRST_TRY_TIMEOUT_S = 5.0
_MAX_RETRY_DELAY_S = 10.0
_INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RegistrationError(Exception):
    """etcd could not be reached or refused a request; or the settings are invalid."""


def service_key(instance_id: str) -> str:
    return SERVICE_PREFIX + instance_id


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _normalise_endpoint(endpoint: str) -> str:
    endpoint = endpoint.strip().rstrip("/")
    if not endpoint:
        raise RegistrationError("an etcd endpoint is empty")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    scheme = endpoint.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise RegistrationError(f"etcd endpoint {endpoint!r}: use http:// or https://")
    return endpoint


def default_instance_id() -> str:
    """Host name, process id and a random suffix: unique even for two proxies in one pod."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Registration:
    """Keeps ``/nexus/services/nexus-proxy/<instance id>`` alive in etcd while the proxy runs.

    ``await start(metadata)`` tries to register once and then leaves a background task that
    keeps the lease alive (or keeps trying to register, when the first try failed);
    ``await stop()`` ends the task and revokes the lease, so the key disappears at once.
    """

    def __init__(
        self,
        endpoints: list[str],
        advertise_url: str,
        ttl_s: float,
        instance_id: str | None = None,
    ) -> None:
        if not endpoints:
            raise RegistrationError("no etcd endpoints given")
        if not advertise_url.startswith(("http://", "https://")):
            raise RegistrationError(
                f"advertise URL {advertise_url!r} must start with http:// or https://"
            )
        if not ttl_s >= MIN_TTL_S:  # also refuses NaN
            raise RegistrationError(f"lease TTL must be at least {MIN_TTL_S:g} s, got {ttl_s}")
        self.endpoints = [_normalise_endpoint(e) for e in endpoints]
        self.advertise_url = advertise_url.rstrip("/")
        self.ttl_s = float(ttl_s)
        self.instance_id = instance_id or default_instance_id()
        if not _INSTANCE_ID_RE.fullmatch(self.instance_id):
            raise RegistrationError(
                f"instance id {self.instance_id!r}: use letters, digits, '.', '_' and '-' only"
            )
        self.key = service_key(self.instance_id)
        self._metadata: dict[str, Any] = {}
        self._lease_id: str | None = None
        self._current = 0  # index of the endpoint that answered last
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def lease_id(self) -> str | None:
        """The lease the key is held under, or None while not registered."""
        return self._lease_id

    # lifecycle ------------------------------------------------------------------------

    async def start(self, metadata: dict) -> None:
        """Register (one try, bounded in time) and start keeping the registration alive."""
        if self._task is not None:
            raise RuntimeError("registration already started")
        self._metadata = dict(metadata)
        # trust_env=False: a proxy variable in the environment must not reroute etcd traffic
        self._client = httpx.AsyncClient(timeout=_REQUEST_TIMEOUT_S, trust_env=False)
        try:
            # bounded: a black-holed endpoint list must not hold up the proxy's start
            async with asyncio.timeout(_FIRST_TRY_TIMEOUT_S):
                await self._register()
        except (RegistrationError, TimeoutError) as exc:
            reason = exc if str(exc) else f"no answer within {_FIRST_TRY_TIMEOUT_S:g} s"
            log.warning(
                "etcd registration of %s failed, retrying in the background: %s", self.key, reason
            )
        self._task = asyncio.create_task(self._maintain(), name="nexus-etcd-registration")

    async def update(self, metadata: dict) -> None:
        """Publish new metadata (a reload changed the model) under the same lease."""
        self._metadata = dict(metadata)
        if self._lease_id is None:
            return  # the background task writes the new value when it registers
        try:
            await self._put(self._lease_id)
        except RegistrationError as exc:
            log.warning("etcd: could not update %s: %s", self.key, exc)

    async def stop(self) -> None:
        """Stop the keepalive and revoke the lease (best effort, at most a couple of seconds)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is None:
            return
        lease, self._lease_id = self._lease_id, None
        try:
            if lease is not None:
                async with asyncio.timeout(_STOP_TIMEOUT_S):
                    await self._call("/v3/lease/revoke", {"ID": lease})
                log.info("etcd: deregistered %s", self.key)
        except (RegistrationError, TimeoutError) as exc:
            log.warning("etcd: could not revoke the lease of %s (it expires by itself): %s",
                        self.key, exc)  # fmt: skip
        finally:
            await self._client.aclose()
            self._client = None

    # the background task ---------------------------------------------------------------

    async def _maintain(self) -> None:
        """Keep the lease alive every TTL/3; register again whenever the lease is gone."""
        interval = self.ttl_s / 3
        retry_delay = min(1.0, interval)
        while True:
            try:
                if self._lease_id is None:
                    await self._register()
                elif not await self._keepalive(self._lease_id):
                    log.warning("etcd: the lease of %s expired; registering again", self.key)
                    self._lease_id = None
                    continue
                retry_delay = min(1.0, interval)
                await asyncio.sleep(interval)
            except RegistrationError as exc:
                log.warning("etcd: %s; retrying in %.1f s", exc, retry_delay)
                await asyncio.sleep(retry_delay)
                retry_delay = min(retry_delay * 2, _MAX_RETRY_DELAY_S)

    async def _register(self) -> None:
        granted = await self._call("/v3/lease/grant", {"TTL": str(max(1, round(self.ttl_s)))})
        lease = granted.get("ID")
        if not lease:
            raise RegistrationError(f"etcd granted no lease: {granted}")
        await self._put(str(lease))
        self._lease_id = str(lease)
        log.info("etcd: registered %s -> %s (lease %s, TTL %g s)",
                 self.key, self.advertise_url, lease, self.ttl_s)  # fmt: skip

    async def _put(self, lease: str) -> None:
        value = json.dumps({"url": self.advertise_url, "metadata": self._metadata})
        await self._call(
            "/v3/kv/put", {"key": _b64(self.key), "value": _b64(value), "lease": lease}
        )

    async def _keepalive(self, lease: str) -> bool:
        """Refresh the lease; False when etcd no longer knows it (TTL 0 or absent)."""
        answer = await self._call("/v3/lease/keepalive", {"ID": lease})
        # the gateway streams: one {"result": {...}} line per request sent
        result = answer.get("result", answer)
        return int(result.get("TTL", 0) or 0) > 0

    # HTTP with failover ---------------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the first endpoint that answers, starting with the last good one."""
        assert self._client is not None, "start() opens the client"
        failures = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._current + step) % count
            url = self.endpoints[index] + path
            try:
                response = await self._client.post(url, json=body)
            except httpx.HTTPError as exc:
                failures.append(f"{self.endpoints[index]}: {type(exc).__name__}: {exc}".rstrip())
                continue
            if response.status_code >= 500:
                failures.append(f"{self.endpoints[index]}: HTTP {response.status_code}")
                continue
            self._current = index
            return _decode(response, path)
        raise RegistrationError(f"no etcd endpoint answered {path}: " + "; ".join(failures))


def _decode(response: httpx.Response, path: str) -> dict[str, Any]:
    # a streaming answer (keepalive) may hold several JSON lines; the first one is ours
    text = response.text.strip().split("\n", 1)[0]
    try:
        answer = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise RegistrationError(f"etcd answered {path} with something that is not JSON") from exc
    if not isinstance(answer, dict):
        raise RegistrationError(f"etcd answered {path} with {answer!r}")
    if response.status_code >= 400 or "error" in answer:
        detail = answer.get("error") or answer.get("message") or response.reason_phrase
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        raise RegistrationError(f"etcd refused {path}: HTTP {response.status_code}: {detail}")
    return answer


def registration_from_env(environ: Mapping[str, str] | None = None) -> Registration | None:
    """The registration the environment asks for, or None when ``NEXUS_ETCD_ENDPOINTS`` is unset.

    ``NEXUS_ETCD_ENDPOINTS``: comma-separated etcd client URLs (``http://host:2379``);
    ``NEXUS_ADVERTISE_URL``: the base URL other hosts reach this proxy at (required with it);
    ``NEXUS_ETCD_TTL_S``: the lease TTL in seconds (default 10);
    ``NEXUS_INSTANCE_ID``: the key's last segment (default: host name, pid, random suffix).
    Raises RegistrationError with a message that names the variable when one is invalid.
    """
    env = os.environ if environ is None else environ
    raw = env.get("NEXUS_ETCD_ENDPOINTS", "").strip()
    if not raw:
        return None
    endpoints = [part for part in raw.split(",") if part.strip()]
    advertise = env.get("NEXUS_ADVERTISE_URL", "").strip()
    if not advertise:
        raise RegistrationError(
            "NEXUS_ADVERTISE_URL is required with NEXUS_ETCD_ENDPOINTS: the base URL other "
            "hosts reach this proxy at, e.g. http://10.0.0.5:8080"
        )
    ttl_text = env.get("NEXUS_ETCD_TTL_S", "").strip() or str(DEFAULT_TTL_S)
    try:
        ttl = float(ttl_text)
    except ValueError as exc:
        raise RegistrationError(f"NEXUS_ETCD_TTL_S must be a number, got {ttl_text!r}") from exc
    instance = env.get("NEXUS_INSTANCE_ID", "").strip() or None
    try:
        return Registration(endpoints, advertise, ttl, instance)
    except RegistrationError as exc:
        raise RegistrationError(f"NEXUS_ETCD_* / NEXUS_ADVERTISE_URL: {exc}") from exc
