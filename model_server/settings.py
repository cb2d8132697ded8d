"""Every NEXUS_* variable the model server reads, validated once at start.

A bad value is a ``SettingsError`` that names the variable and says what it takes; the
console script prints it as one line and exits 2. Importing this module loads neither
torch nor FastAPI, so a bad setting is reported in a fraction of a second.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nexus_cli.cache import default_cache_dir
from nexus_cli.config import load_config
from nexus_cli.errors import ConfigError
from nexus_cli.names import MODEL_NAME_RE
from nexus_cli.serving import SettingsError, env_number

META_DEFAULT = ".nexus_meta.json"
_DEVICE_RE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")
_FACTORY_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Settings:
    meta_path: Path
    config_path: Path | None
    model: str | None
    device: str
    cache_dir: Path
    factory: str | None
    max_batch: int
    queue_size: int
    concurrency: int
    max_body_bytes: int
    body_timeout_s: float
    api_token: str | None = field(repr=False)  # never in a log line
    host: str
    port: int
    environ: Mapping[str, str] = field(repr=False)  # holds credentials

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Settings:
        env = dict(os.environ if environ is None else environ)
        cwd = cwd or Path.cwd()
        meta_path = cwd / (env.get("NEXUS_META") or META_DEFAULT)
        if meta_path.is_dir():
            raise SettingsError(f"NEXUS_META={meta_path} is a folder; give the metadata file")
        config_path = cwd / env["NEXUS_CONFIG"] if env.get("NEXUS_CONFIG") else None
        if config_path is not None and not config_path.is_file():
            raise SettingsError(f"NEXUS_CONFIG={config_path}: no such file")
        try:  # the storage overrides (NEXUS_PROVIDER, NEXUS_BUCKET, ...) and .nexusrc
            load_config(config_path or meta_path.parent / ".nexusrc", env)
        except ConfigError as exc:
            raise SettingsError(f"storage settings: {exc}") from exc

        model = env.get("NEXUS_MODEL") or None
        if model is not None and not MODEL_NAME_RE.fullmatch(model):
            raise SettingsError(
                f"NEXUS_MODEL={model!r} is not a model name ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})"
            )
        device = (env.get("NEXUS_DEVICE") or "auto").strip().lower()
        if not _DEVICE_RE.fullmatch(device):
            raise SettingsError(
                f"NEXUS_DEVICE={device!r}: use auto, cpu, cuda, cuda:N (or mps, xpu:N)"
            )
        factory = env.get("NEXUS_MODEL_FACTORY") or None
        if factory is not None and not _FACTORY_RE.fullmatch(factory):
            raise SettingsError(
                f"NEXUS_MODEL_FACTORY={factory!r}: use module:callable, "
                "like my_package.models:build_model"
            )
        api_token = env.get("NEXUS_API_TOKEN") or None
        if api_token is not None and not _TOKEN_RE.fullmatch(api_token):
            # a space or a non-ASCII character could never arrive intact in the header
            raise SettingsError(
                "NEXUS_API_TOKEN holds a space or a character outside printable ASCII; "
                "no client could send it as a bearer token"
            )
        host = env.get("NEXUS_HOST") or "127.0.0.1"
        return cls(
            meta_path=meta_path,
            config_path=config_path,
            model=model,
            device=device,
            cache_dir=default_cache_dir(env),
            factory=factory,
            max_batch=_int(env, "NEXUS_SERVER_MAX_BATCH", 1024, minimum=1),
            queue_size=_int(env, "NEXUS_SERVER_QUEUE", 256, minimum=1),
            concurrency=_int(env, "NEXUS_SERVER_CONCURRENCY", 2, minimum=1),
            max_body_bytes=_int(env, "NEXUS_MAX_BODY_BYTES", 64 * 1024 * 1024, minimum=1024),
            body_timeout_s=_seconds(env, "NEXUS_BODY_TIMEOUT_S", 60.0),
            api_token=api_token,
            host=host,
            port=_int(env, "NEXUS_PORT", 8000, minimum=0, maximum=65535),
            environ=env,
        )


def _int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int = 1 << 40
) -> int:
    return env_number(env, name, default, int, low=minimum, high=maximum)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    return env_number(env, name, default, float, low=0.001, high=86_400)
