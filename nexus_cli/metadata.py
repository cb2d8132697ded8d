"""`.nexus_meta.json`: which bytes belong to which commit. Read strictly, written atomically."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nexus_cli.errors import MetadataError, NotFoundError, UsageError
from nexus_cli.files import atomic_write_text, exclusive_lock
from nexus_cli.names import (
    COMMIT_RE,
    EXTENSION_RE,
    MODEL_NAME_RE,
    SHA256_RE,
    validate_commit_prefix,
    validate_model_name,
)
from nexus_cli.signature import validate_signature

SCHEMA_VERSION = 1
FORMATS = ("torchscript", "torch_export", "state_dict", "safetensors", "unknown")


@dataclass
class VersionRecord:
    """One stored version of a model. Field order is the order written to disk."""

    commit_hash: str
    model_name: str
    storage_uri: str
    sha256: str
    size_bytes: int
    format: str = "unknown"
    signature: dict | None = None
    created_at: str = ""
    created_by: str = "unknown"
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    is_latest: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def short_commit(self) -> str:
        return self.commit_hash[:7]


_FIELD_TYPES = {
    "commit_hash": str,
    "model_name": str,
    "storage_uri": str,
    "sha256": str,
    "size_bytes": int,
    "format": str,
    "created_at": str,
    "created_by": str,
    "message": str,
    "metrics": dict,
    "is_latest": bool,
}


def _check_version(raw: Any, model: str, where: str) -> VersionRecord:
    if not isinstance(raw, dict):
        raise MetadataError(f"{where}: expected an object, got {type(raw).__name__}")
    missing = [f.name for f in fields(VersionRecord) if f.name not in raw]
    if missing:
        raise MetadataError(f"{where}: missing field(s) {missing}")
    unknown = sorted(set(raw) - {f.name for f in fields(VersionRecord)})
    if unknown:
        raise MetadataError(f"{where}: unknown field(s) {unknown}")
    for name, expected in _FIELD_TYPES.items():
        value = raw[name]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise MetadataError(
                f"{where}.{name}: expected {expected.__name__}, got {json.dumps(value)}"
            )
    if raw["model_name"] != model:
        raise MetadataError(f"{where}.model_name: {raw['model_name']!r} is listed under {model!r}")
    if not COMMIT_RE.fullmatch(raw["commit_hash"]):
        raise MetadataError(f"{where}.commit_hash: expected 40 lower-case hex characters")
    if not SHA256_RE.fullmatch(raw["sha256"]):
        raise MetadataError(f"{where}.sha256: expected 64 lower-case hex characters")
    if raw["size_bytes"] < 0:
        raise MetadataError(f"{where}.size_bytes: must not be negative")
    if raw["format"] not in FORMATS:
        raise MetadataError(f"{where}.format: {raw['format']!r} is not one of {list(FORMATS)}")
    uri = raw["storage_uri"]
    stem = f"{model}/{raw['commit_hash']}"
    extension = uri[len(stem) :]
    if not uri.startswith(stem) or (extension and not EXTENSION_RE.fullmatch(extension)):
        raise MetadataError(f"{where}.storage_uri: expected '{stem}.<ext>', got {uri!r}")
    for metric, value in raw["metrics"].items():
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise MetadataError(f"{where}.metrics.{metric}: expected a finite number")
    if raw["signature"] is not None:
        try:
            validate_signature(raw["signature"])
        except UsageError as exc:
            raise MetadataError(f"{where}.signature: {exc}") from exc
    return VersionRecord(**raw)


class Metadata:
    """Every model's versions, in the order they were stored."""

    def __init__(self, models: dict[str, list[VersionRecord]] | None = None) -> None:
        self.models: dict[str, list[VersionRecord]] = models or {}

    # reading and writing -------------------------------------------------------------

    @classmethod
    def from_dict(cls, document: Any, source: str = ".nexus_meta.json") -> Metadata:
        if not isinstance(document, dict):
            raise MetadataError(f"{source}: the top level must be an object")
        version = document.get("schema_version")
        if version != SCHEMA_VERSION:
            raise MetadataError(
                f"{source}: schema_version is {json.dumps(version)}; this nexus reads "
                f"{SCHEMA_VERSION} (upgrade nexus if the file is newer)"
            )
        models = document.get("models")
        if not isinstance(models, dict):
            raise MetadataError(f"{source}: 'models' must be an object")
        parsed: dict[str, list[VersionRecord]] = {}
        for name, entry in models.items():
            where = f"{source}: models.{name}"
            if not MODEL_NAME_RE.fullmatch(name):
                raise MetadataError(f"{where}: invalid model name")
            if not isinstance(entry, dict) or not isinstance(entry.get("versions"), list):
                raise MetadataError(f"{where}: expected an object with a 'versions' list")
            versions = [
                _check_version(raw, name, f"{where}.versions[{index}]")
                for index, raw in enumerate(entry["versions"])
            ]
            latest = [v for v in versions if v.is_latest]
            if versions and len(latest) != 1:
                raise MetadataError(
                    f"{where}: exactly one version must have is_latest true, found {len(latest)}"
                )
            commits = [v.commit_hash for v in versions]
            if len(set(commits)) != len(commits):
                raise MetadataError(f"{where}: a commit is listed twice")
            parsed[name] = versions
        return cls(parsed)

    @classmethod
    def read(cls, path: Path) -> Metadata:
        """Read and validate ``path``; a missing file is an empty registry."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as exc:
            raise MetadataError(f"cannot read {path}: {exc}") from exc
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MetadataError(
                f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from exc
        return cls.from_dict(document, str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "models": {
                name: {"versions": [v.to_dict() for v in versions]}
                for name, versions in sorted(self.models.items())
            },
        }

    def write(self, path: Path) -> None:
        """Write atomically, pretty-printed with a stable key order so git diffs stay small."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    # queries ----------------------------------------------------------------------------

    def versions(self, model: str) -> list[VersionRecord]:
        validate_model_name(model)
        if model not in self.models or not self.models[model]:
            known = ", ".join(sorted(self.models)) or "none yet"
            raise NotFoundError(f"no model named {model!r} (known models: {known})")
        return self.models[model]

    def latest(self, model: str) -> VersionRecord:
        return next(v for v in self.versions(model) if v.is_latest)

    def find(self, model: str, commit_prefix: str) -> VersionRecord:
        """The version whose commit starts with ``commit_prefix`` (4 to 40 hex characters)."""
        prefix = validate_commit_prefix(commit_prefix)
        matches = [v for v in self.versions(model) if v.commit_hash.startswith(prefix)]
        if not matches:
            raise NotFoundError(f"model {model!r} has no version at commit {prefix}")
        if len(matches) > 1:
            raise MetadataError(
                f"commit prefix {prefix} matches {len(matches)} versions of {model!r}; "
                "give more characters"
            )
        return matches[0]

    def get(self, model: str, commit_hash: str) -> VersionRecord | None:
        return next((v for v in self.models.get(model, []) if v.commit_hash == commit_hash), None)

    # changes ------------------------------------------------------------------------------

    def set_latest(self, model: str, commit_hash: str) -> None:
        for version in self.versions(model):
            version.is_latest = version.commit_hash == commit_hash

    def put(self, record: VersionRecord, *, make_latest: bool) -> None:
        """Add ``record`` (or replace the one at its commit, keeping its place)."""
        versions = self.models.setdefault(record.model_name, [])
        for index, existing in enumerate(versions):
            if existing.commit_hash == record.commit_hash:
                record.is_latest = existing.is_latest
                versions[index] = record
                break
        else:
            record.is_latest = False
            versions.append(record)
        if make_latest or not any(v.is_latest for v in versions):
            self.set_latest(record.model_name, record.commit_hash)


@contextmanager
def edit_metadata(path: Path) -> Iterator[Metadata]:
    """Read, change and write the metadata under an exclusive lock (no lost updates)."""
    lock_path = path.parent / ".nexus" / "meta.lock"
    with exclusive_lock(lock_path):
        metadata = Metadata.read(path)
        yield metadata
        metadata.write(path)
