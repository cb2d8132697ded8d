"""`.nexusrc`: where the weights live. TOML, tracked in git, never holds credentials."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

from nexus_cli.errors import ConfigError
from nexus_cli.files import read_regular_file

PROVIDERS = ("local", "s3", "minio", "gcs")
DEFAULT_LOCAL_PATH = ".nexus/store"
#: a `.nexusrc` is a few lines; a larger one is not one
MAX_CONFIG_BYTES = 64 * 1024

# Keys that look like they hold a secret. Credentials come from each provider's own chain.
SECRET_KEY_RE = re.compile(
    r"secret|password|passwd|token|credential|private|access[_-]?key|session|api[_-]?key",
    re.IGNORECASE,
)

# S3 and GCS naming rules (the common part): 3-63 characters, lower-case letters, digits,
# dots and hyphens (GCS also underscores), starting and ending with a letter or digit.
BUCKET_RE = {
    "s3": re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),
    "gcs": re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]"),
}
IP_ADDRESS_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")

ENV_OVERRIDES = {
    "provider": "NEXUS_PROVIDER",
    "bucket": "NEXUS_BUCKET",
    "prefix": "NEXUS_PREFIX",
    "endpoint_url": "NEXUS_ENDPOINT_URL",
    "region": "NEXUS_REGION",
    "path": "NEXUS_STORE_PATH",
}


@dataclass(frozen=True)
class StorageConfig:
    """The `[storage]` table after defaults and environment overrides."""

    provider: str = "local"
    path: str = DEFAULT_LOCAL_PATH
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str = ""
    region: str = ""

    def describe(self) -> str:
        """Where objects go, in words fit for a message."""
        if self.provider == "local":
            return f"local store {self.path}"
        where = f"{self.provider}://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where


def _find_secret_keys(table: Mapping[str, object], trail: str = "") -> list[str]:
    found = []
    for key, value in table.items():
        dotted = f"{trail}{key}"
        if SECRET_KEY_RE.search(key):
            found.append(dotted)
        if isinstance(value, Mapping):
            found.extend(_find_secret_keys(value, dotted + "."))
    return found


def validate_bucket_name(provider: str, bucket: str) -> str:
    """Return ``bucket`` when the provider would accept the name, else ``ConfigError``."""
    rule = BUCKET_RE["gcs" if provider == "gcs" else "s3"]
    if not rule.fullmatch(bucket) or ".." in bucket or IP_ADDRESS_RE.fullmatch(bucket):
        allowed = "lower-case letters, digits, dots, hyphens" + (
            ", underscores" if provider == "gcs" else ""
        )
        raise ConfigError(
            f"invalid bucket name {bucket!r}: use 3 to 63 characters ({allowed}), "
            "starting and ending with a letter or digit"
        )
    return bucket


def parse_config(text: str, source: str = ".nexusrc") -> dict[str, str]:
    """Parse the TOML text of a `.nexusrc` and return its `[storage]` table, checked."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    secrets = _find_secret_keys(document)
    if secrets:
        raise ConfigError(
            f"{source} holds a secret-looking key ({', '.join(secrets)}); it is tracked in git, "
            "so remove it and let the provider's own credential chain supply credentials "
            "(AWS_* variables or profiles, GOOGLE_APPLICATION_CREDENTIALS)"
        )
    unknown_tables = sorted(set(document) - {"storage"})
    if unknown_tables:
        raise ConfigError(f"{source}: unknown table(s) {unknown_tables}; only [storage] exists")
    storage = document.get("storage", {})
    if not isinstance(storage, dict):
        raise ConfigError(f"{source}: 'storage' must be a table")
    known = {f.name for f in fields(StorageConfig)}
    unknown = sorted(set(storage) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {unknown} in [storage]; known keys: {sorted(known)}"
        )
    for key, value in storage.items():
        if not isinstance(value, str):
            raise ConfigError(f"{source}: storage.{key} must be a string, got {value!r}")
    return dict(storage)


def resolve_config(
    file_values: Mapping[str, str], environ: Mapping[str, str] | None = None
) -> StorageConfig:
    """Merge file values with defaults and the NEXUS_* environment, then validate."""
    environ = os.environ if environ is None else environ
    values = dict(file_values)
    for key, variable in ENV_OVERRIDES.items():
        if environ.get(variable):
            values[key] = environ[variable]
    values = {key: value.strip() for key, value in values.items()}
    provider = values.get("provider") or "local"
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown storage provider {provider!r}; choose one of {list(PROVIDERS)}")
    values["provider"] = provider
    values["path"] = values.get("path") or DEFAULT_LOCAL_PATH
    values["prefix"] = values.get("prefix", "").strip("/")
    config = StorageConfig(**values)
    if provider != "local" and not config.bucket:
        raise ConfigError(
            f"provider {provider!r} needs a bucket: set storage.bucket in .nexusrc or NEXUS_BUCKET"
        )
    if provider != "local":
        validate_bucket_name(provider, config.bucket)
    if provider == "minio" and not config.endpoint_url:
        raise ConfigError(
            "provider 'minio' needs an endpoint: set storage.endpoint_url or NEXUS_ENDPOINT_URL"
        )
    if config.endpoint_url:
        endpoint = urlsplit(config.endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.hostname:
            raise ConfigError(
                f"endpoint_url {config.endpoint_url!r} must be an http:// or https:// URL"
            )
        if endpoint.username or endpoint.password:
            raise ConfigError(
                "endpoint_url must not hold credentials; they come from the provider's chain"
            )
    if any(part == ".." for part in config.prefix.split("/")):
        raise ConfigError(f"prefix {config.prefix!r} must not contain '..'")
    return config


def load_config(
    path: Path, environ: Mapping[str, str] | None = None, *, must_exist: bool = False
) -> StorageConfig:
    """Read `.nexusrc` at ``path`` and apply the environment.

    A missing file means all defaults, unless ``must_exist`` (a path the user named).
    """
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"config file {path} does not exist") from None
        data = b""
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; that is not a .nexusrc"
        )
    try:
        text = data.decode("utf-8-sig")  # a BOM, as Windows editors write, is read past
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    return resolve_config(parse_config(text, str(path)), environ)


def render_config(config: StorageConfig) -> str:
    """The TOML text `nexus init` writes, keeping only what differs from the defaults."""
    lines = ["[storage]", f"provider = {json.dumps(config.provider)}"]
    if config.provider == "local":
        lines.append(f"path = {json.dumps(config.path)}")
    for key in ("bucket", "prefix", "endpoint_url", "region"):
        value = getattr(config, key)
        if value:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
