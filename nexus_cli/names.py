"""Validation of everything a user types that later becomes a path or an object key."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from nexus_cli.errors import InvalidNameError, UsageError

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
COMMIT_PREFIX_RE = re.compile(r"[0-9a-f]{4,40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
EXTENSION_RE = re.compile(r"\.[a-z0-9_]{1,16}")
SHORT_SHA_LENGTH = 7


def validate_model_name(name: str) -> str:
    """Return ``name`` when it is a valid model name, else raise ``InvalidNameError``."""
    if not MODEL_NAME_RE.fullmatch(name or ""):
        shown = repr(name) if len(name or "") <= 40 else repr(name[:40] + "...")
        raise InvalidNameError(
            f"invalid model name {shown}: use 1 to 128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def validate_commit_prefix(prefix: str) -> str:
    """Return the lower-cased prefix when it looks like (part of) a commit hash."""
    lowered = prefix.strip().lower()
    if not COMMIT_PREFIX_RE.fullmatch(lowered):
        raise UsageError(
            f"invalid commit {prefix!r}: give 4 to 40 hexadecimal characters of a commit hash"
        )
    return lowered


def file_extension(filename: str) -> str:
    """The extension a stored object keeps: the file's last suffix, lower-cased, or ''."""
    suffix = PurePosixPath(filename).suffix.lower()
    return suffix if EXTENSION_RE.fullmatch(suffix) else ""


def storage_key(model_name: str, commit_hash: str, extension: str) -> str:
    """The object key of one version, relative to the store root."""
    return f"{model_name}/{commit_hash}{extension}"


def validate_storage_key(key: str) -> str:
    """Refuse keys that could escape the store root once joined to a path."""
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\0" in key
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise UsageError(f"invalid object key {key!r}")
    return key
