"""`.nexus_meta.json`: which bytes belong to which commit. Read strictly, written atomically."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from nexus_cli.errors import (
    AmbiguousCommitError,
    ConflictError,
    MetadataError,
    NotFoundError,
    UsageError,
)
from nexus_cli.files import atomic_write_text, exclusive_lock, read_regular_file
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
TOP_LEVEL_KEYS = ("schema_version", "models")
#: a registry of thousands of versions is a few MiB; anything far larger is not one
MAX_METADATA_BYTES = 64 * 1024 * 1024
#: the longest integer a record holds is a size in bytes (int64: 19 digits)
MAX_INT_DIGITS = 20
TIMESTAMP_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
REPAIR_HINT = "run `nexus rollback {model} --to SHA` to choose the latest"


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


def _is_real_time(text: str) -> bool:
    try:
        datetime.strptime(text, TIMESTAMP_FORMAT)
    except ValueError:
        return False
    return True


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
    if not TIMESTAMP_RE.fullmatch(raw["created_at"]) or not _is_real_time(raw["created_at"]):
        raise MetadataError(
            f"{where}.created_at: expected a UTC timestamp like 2026-11-23T18:00:00Z, "
            f"got {json.dumps(raw['created_at'])}"
        )
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
    def from_dict(
        cls, document: Any, source: str = ".nexus_meta.json", *, lenient_latest: bool = False
    ) -> Metadata:
        """Validate a parsed document. ``lenient_latest`` lets a model have several latest
        versions (or none), as a merge of two branches leaves it, so that it can be repaired.
        """
        if not isinstance(document, dict):
            raise MetadataError(f"{source}: the top level must be an object")
        unknown = sorted(set(document) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise MetadataError(
                f"{source}: unknown top-level key(s) {unknown}; this nexus knows "
                f"{list(TOP_LEVEL_KEYS)} (upgrade nexus if the file is newer)"
            )
        version = document.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
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
                raise MetadataError(f"{source}: models.{json.dumps(name)}: invalid model name")
            if not isinstance(entry, dict) or not isinstance(entry.get("versions"), list):
                raise MetadataError(f"{where}: expected an object with a 'versions' list")
            if set(entry) != {"versions"}:
                raise MetadataError(f"{where}: unknown key(s) {sorted(set(entry) - {'versions'})}")
            if not entry["versions"]:
                raise MetadataError(f"{where}: a model must have at least one version")
            versions = [
                _check_version(raw, name, f"{where}.versions[{index}]")
                for index, raw in enumerate(entry["versions"])
            ]
            latest = [v for v in versions if v.is_latest]
            if len(latest) != 1 and not lenient_latest:
                raise MetadataError(
                    f"{where}: exactly one version must have is_latest true, found {len(latest)}",
                    hint=REPAIR_HINT.format(model=name),
                )
            commits = [v.commit_hash for v in versions]
            if len(set(commits)) != len(commits):
                raise MetadataError(f"{where}: a commit is listed twice")
            parsed[name] = versions
        return cls(parsed)

    @classmethod
    def read(cls, path: Path, *, lenient_latest: bool = False) -> Metadata:
        """Read and validate ``path``; a missing file is an empty registry.

        The file arrives by pull request, so it is parsed as hostile input: bounded in
        size, nesting and number length, and duplicate keys are refused (a JSON object
        that says two things at once).
        """
        try:
            data = read_regular_file(path, MAX_METADATA_BYTES)
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise MetadataError(f"cannot read {path}: {exc.strerror}") from exc
        if len(data) > MAX_METADATA_BYTES:
            raise MetadataError(
                f"{path} is larger than {MAX_METADATA_BYTES // (1024 * 1024)} MiB; "
                "that is not a registry nexus wrote"
            )
        return cls.from_dict(parse_json(data, str(path)), str(path), lenient_latest=lenient_latest)

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
        """The latest version; on a file read leniently, the newest of several claimants."""
        claimants = [v for v in self.versions(model) if v.is_latest]
        if not claimants:
            raise MetadataError(
                f"{model!r} has no latest version", hint=REPAIR_HINT.format(model=model)
            )
        return max(claimants, key=newest_first_key)

    def find(self, model: str, commit_prefix: str) -> VersionRecord:
        """The version whose commit starts with ``commit_prefix`` (4 to 40 hex characters)."""
        prefix = validate_commit_prefix(commit_prefix)
        matches = [v for v in self.versions(model) if v.commit_hash.startswith(prefix)]
        if not matches:
            raise NotFoundError(f"model {model!r} has no version at commit {prefix}")
        if len(matches) > 1:
            raise AmbiguousCommitError(
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


def newest_first_key(record: VersionRecord) -> tuple[str, str]:
    """Orders versions by ``created_at``, ties broken by commit hash: the larger is newer."""
    return (record.created_at, record.commit_hash)


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise MetadataError(f"the key {json.dumps(twice)} appears twice in one object")
    return document


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise MetadataError(f"a number with {len(text)} digits is longer than any nexus writes")
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise MetadataError(f"{name} is not a number JSON allows")


def parse_json(data: bytes, source: str) -> Any:
    """Parse untrusted JSON bytes; every way it can be wrong is a ``MetadataError``."""
    try:
        return json.loads(
            data.decode("utf-8-sig"),  # a BOM, as Windows editors write, is read past
            object_pairs_hook=_refuse_duplicate_keys,
            parse_int=_parse_int,
            parse_constant=_refuse_constant,
        )
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{source}: not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise MetadataError(
            f"{source}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except MetadataError as exc:
        raise MetadataError(f"{source}: {exc.message}") from exc
    except RecursionError as exc:
        raise MetadataError(f"{source}: nested too deeply to be a registry") from exc
    except ValueError as exc:  # e.g. a float literal too long to convert
        raise MetadataError(f"{source}: {exc}") from exc


def lock_path(meta_path: Path) -> Path:
    """The lock that serialises edits of ``meta_path``, in a git-ignored `.nexus` beside it."""
    return meta_path.parent / ".nexus" / "meta.lock"


@contextmanager
def edit_metadata(
    path: Path,
    *,
    lenient_latest: bool = False,
    on_wait: Callable[[Path], None] | None = None,
) -> Iterator[Metadata]:
    """Read, change and write the metadata under an exclusive lock (no lost updates).

    ``on_wait`` is told when another nexus process holds the lock for more than a second.
    """
    with exclusive_lock(lock_path(path), on_wait=on_wait):
        metadata = Metadata.read(path, lenient_latest=lenient_latest)
        yield metadata
        metadata.write(path)


# merging two branches -----------------------------------------------------------------


def _latest_or_none(metadata: Metadata, model: str) -> VersionRecord | None:
    if not metadata.models.get(model):
        return None
    claimants = [v for v in metadata.models[model] if v.is_latest]
    return max(claimants, key=newest_first_key) if claimants else None


def _same_content(a: VersionRecord, b: VersionRecord) -> bool:
    return (a.storage_uri, a.sha256, a.size_bytes) == (b.storage_uri, b.sha256, b.size_bytes)


def _unchanged(record: VersionRecord, base: VersionRecord | None) -> bool:
    return base is not None and replace(record, is_latest=False) == replace(base, is_latest=False)


def _merged_latest(
    base: VersionRecord | None, ours: VersionRecord | None, theirs: VersionRecord | None
) -> str:
    """The commit that is latest after a merge (see ``merge_metadata``)."""
    if ours is None or theirs is None:
        chosen = ours or theirs
        assert chosen is not None
        return chosen.commit_hash
    base_commit = base.commit_hash if base else None
    if ours.commit_hash == theirs.commit_hash or theirs.commit_hash == base_commit:
        return ours.commit_hash
    if ours.commit_hash == base_commit:
        return theirs.commit_hash
    return max(ours, theirs, key=newest_first_key).commit_hash


def merge_metadata(base: Metadata, ours: Metadata, theirs: Metadata) -> Metadata:
    """Merge two branches' registries the way `nexus merge-driver` does.

    Versions: the union. Ours come first in their order, then theirs that ours lacks,
    in theirs' order. A commit on both sides must name the same object (key, sha256,
    size), else ``ConflictError``; when only one side edited such a record (its message,
    say) relative to ``base``, that side's edit is kept, else ours.

    Latest, per model: when one side left the latest as it was in ``base``, the other
    side's choice wins (a store or a rollback on one branch survives the merge); when
    both changed it, the version with the newest ``created_at`` wins, ties broken by the
    larger commit hash.
    """
    merged: dict[str, list[VersionRecord]] = {}
    for model in sorted(set(ours.models) | set(theirs.models)):
        our_versions = ours.models.get(model, [])
        their_versions = {v.commit_hash: v for v in theirs.models.get(model, [])}
        base_versions = {v.commit_hash: v for v in base.models.get(model, [])}
        result: list[VersionRecord] = []
        for record in our_versions:
            other = their_versions.pop(record.commit_hash, None)
            if other is not None and not _same_content(record, other):
                raise ConflictError(
                    f"{model}@{record.short_commit} names different objects on the two "
                    f"branches ({record.storage_uri} sha256 {record.sha256[:12]} and "
                    f"{other.storage_uri} sha256 {other.sha256[:12]}); resolve it by hand"
                )
            keep_theirs = other is not None and _unchanged(record, base_versions.get(
                record.commit_hash))  # fmt: skip
            result.append(replace(other if keep_theirs else record))
        result.extend(replace(v) for v in their_versions.values())
        latest = _merged_latest(
            _latest_or_none(base, model), _latest_or_none(ours, model),
            _latest_or_none(theirs, model),
        )  # fmt: skip
        for record in result:
            record.is_latest = record.commit_hash == latest
        merged[model] = result
    return Metadata(merged)
