"""Object stores, one module per provider, chosen by name; SDKs are imported only when used."""

from __future__ import annotations

import importlib
from pathlib import Path

from nexus_cli.config import StorageConfig
from nexus_cli.errors import ConfigError
from nexus_cli.storage.base import Leftover, ObjectInfo, ObjectStore

# provider -> ("module:Class", the extra that installs its SDK)
BACKENDS: dict[str, tuple[str, str | None]] = {
    "local": ("nexus_cli.storage.local:LocalStore", None),
    "s3": ("nexus_cli.storage.s3:S3Store", "s3"),
    "minio": ("nexus_cli.storage.s3:S3Store", "s3"),
    "gcs": ("nexus_cli.storage.gcs:GCSStore", "gcs"),
}

__all__ = ["BACKENDS", "Leftover", "ObjectInfo", "ObjectStore", "open_store"]


def open_store(config: StorageConfig, base_dir: Path) -> ObjectStore:
    """The store ``config`` names; ``base_dir`` anchors relative local paths."""
    try:
        target, extra = BACKENDS[config.provider]
    except KeyError:
        raise ConfigError(f"storage provider {config.provider!r} is not available") from None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"the {config.provider} backend needs a package that is not installed ({exc.name})",
            hint=f"pip install 'nexusml[{extra}]'",
        ) from exc
    return getattr(module, class_name).from_config(config, base_dir)
