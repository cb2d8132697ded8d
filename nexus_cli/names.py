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
#: characters that must never reach a terminal raw: C0 and C1 controls, DEL, and the
#: invisible bidirectional overrides that reorder what a person reads ("Trojan Source")
CONTROL_CHAR_RE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def shown(value: str, limit: int = 40) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters: an error is one
    line for a person, and the argument it quotes may be any length."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def refuse_control_chars(value: str, what: str) -> str:
    """Return ``value`` when it holds no control character, else raise ``UsageError``."""
    found = CONTROL_CHAR_RE.search(value)
    if found:
        raise UsageError(
            f"{what} contains a control character ({ascii(found.group())} at position "
            f"{found.start()}); use printable text on one line"
        )
    return value


def validate_model_name(name: str) -> str:
    """Return ``name`` when it is a valid model name, else raise ``InvalidNameError``."""
    if not MODEL_NAME_RE.fullmatch(name or ""):
        raise InvalidNameError(
            f"invalid model name {shown(name or '')}: use 1 to 128 characters from "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


def validate_commit_prefix(prefix: str) -> str:
    """Return the lower-cased prefix when it looks like (part of) a commit hash."""
    lowered = prefix.strip().lower()
    if not COMMIT_PREFIX_RE.fullmatch(lowered):
        raise UsageError(
            f"invalid commit {shown(prefix)}: give 4 to 40 hexadecimal characters of a commit hash"
        )
    return lowered


def file_extension(filename: str) -> str:
    """The extension a stored object keeps: the file's last suffix, lower-cased, or ''."""
    suffix = PurePosixPath(filename).suffix.lower()
    return suffix if EXTENSION_RE.fullmatch(suffix) else ""


def storage_key(model_name: str, commit_hash: str, extension: str) -> str:
    """The object key of one version, relative to the store root."""
    return f"{model_name}/{commit_hash}{extension}"


def is_version_key(key: str) -> bool:
    """Whether ``key`` has the shape of a key ``storage_key`` makes (``model/<40 hex>.ext``).

    Nexus writes no other key, so in a bucket shared with other applications this tells
    its own uploads from theirs.
    """
    model, _, rest = key.partition("/")
    commit, extension = rest[:40], rest[40:]
    return bool(
        MODEL_NAME_RE.fullmatch(model)
        and COMMIT_RE.fullmatch(commit)
        and (not extension or EXTENSION_RE.fullmatch(extension))
    )


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
        raise UsageError(f"invalid object key {shown(key, 200)}")
    return key
