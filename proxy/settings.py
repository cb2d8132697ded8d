"""Every ``NEXUS_*`` variable the proxy reads, validated once at start.

A bad value stops the proxy before it listens, with a message that names the
variable, what it holds and what it should hold.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from nexus_cli.serving import SettingsError, env_number

MIB = 1024 * 1024
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Settings:
    model_server_urls: tuple[str, ...] = ("http://127.0.0.1:8000",)
    max_batch_size: int = 32
    max_wait_ms: float = 50.0
    max_queue: int = 1024
    max_queue_bytes: int = 256 * MIB
    request_timeout_s: float = 30.0
    max_body_bytes: int = 64 * MIB
    api_token: str | None = field(default=None, repr=False)
    model_server_token: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    health_interval_s: float = 1.0
    etcd_endpoints: tuple[str, ...] = ()
    advertise_url: str | None = None
    etcd_ttl_s: float = 10.0
    instance_id: str | None = None
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and check every variable; ``SettingsError`` names the first bad one."""
        env = os.environ if environ is None else environ
        urls = tuple(
            _url("NEXUS_MODEL_SERVER_URL", u)
            for u in _list(env, "NEXUS_MODEL_SERVER_URL", "http://127.0.0.1:8000")
        )
        if not urls:
            raise SettingsError("NEXUS_MODEL_SERVER_URL: give at least one model server URL")
        api_token = env.get("NEXUS_API_TOKEN") or None
        etcd = tuple(_list(env, "NEXUS_ETCD_ENDPOINTS", ""))
        advertise = env.get("NEXUS_ADVERTISE_URL") or None
        if etcd and not advertise:
            raise SettingsError(
                "NEXUS_ADVERTISE_URL is required with NEXUS_ETCD_ENDPOINTS: the base URL other "
                "hosts reach this proxy at, e.g. http://10.0.0.5:8080"
            )
        if advertise:
            advertise = _url("NEXUS_ADVERTISE_URL", advertise)
        instance_id = env.get("NEXUS_INSTANCE_ID") or None
        if instance_id is not None and not _INSTANCE_ID.fullmatch(instance_id):
            raise SettingsError(
                f"NEXUS_INSTANCE_ID={instance_id!r}: use letters, digits, '.', '_' and '-' "
                "(at most 128, starting with a letter or digit)"
            )
        level = env.get("NEXUS_LOG_LEVEL", "info").lower()
        if level not in ("critical", "error", "warning", "info", "debug"):
            raise SettingsError(
                f"NEXUS_LOG_LEVEL={level!r}: use one of critical, error, warning, info, debug"
            )
        return cls(
            model_server_urls=urls,
            max_batch_size=env_number(env, "NEXUS_MAX_BATCH_SIZE", 32, int, low=1, high=65536),
            max_wait_ms=env_number(env, "NEXUS_MAX_WAIT_MS", 50.0, float, low=0, high=60_000),
            max_queue=env_number(env, "NEXUS_MAX_QUEUE", 1024, int, low=1, high=1_000_000),
            max_queue_bytes=env_number(
                env, "NEXUS_MAX_QUEUE_BYTES", 256 * MIB, int, low=1024, high=1 << 40
            ),
            request_timeout_s=env_number(
                env, "NEXUS_REQUEST_TIMEOUT_S", 30.0, float, low=0.001, high=86_400
            ),
            max_body_bytes=env_number(
                env, "NEXUS_MAX_BODY_BYTES", 64 * MIB, int, low=1, high=1 << 40
            ),
            api_token=api_token,
            model_server_token=env.get("NEXUS_MODEL_SERVER_TOKEN") or api_token,
            host=env.get("NEXUS_HOST", "127.0.0.1") or "127.0.0.1",
            port=env_number(env, "NEXUS_PORT", 8080, int, low=0, high=65535),
            health_interval_s=env_number(
                env, "NEXUS_HEALTH_INTERVAL_S", 1.0, float, low=0.01, high=3600
            ),
            etcd_endpoints=etcd,
            advertise_url=advertise,
            etcd_ttl_s=env_number(env, "NEXUS_ETCD_TTL_S", 10.0, float, low=1, high=86_400),
            instance_id=instance_id,
            log_level=level,
        )


def _list(env: Mapping[str, str], name: str, default: str) -> list[str]:
    return [item.strip() for item in env.get(name, default).split(",") if item.strip()]


def _url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{name}: {value!r} is not an http(s) URL like http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise SettingsError(f"{name}: {value!r} has a bad port") from None
    return value.rstrip("/")
