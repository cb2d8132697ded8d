"""The exceptions of the control plane, one tree, each with its CLI exit code.

    NexusError                      exit 1  anything we did not foresee
    ├── UsageError                  exit 2  bad arguments, names, config or metadata
    │   ├── InvalidNameError
    │   ├── ConfigError
    │   ├── MetadataError
    │   └── AmbiguousCommitError    a commit prefix that matches several versions
    ├── GitError                    exit 3  not a repository, dirty tree, no commit
    ├── NotFoundError               exit 4  model, version or object missing
    ├── ConflictError               exit 5  other bytes already stored for this model and commit
    ├── StorageError                exit 6  bucket missing, access denied, endpoint unreachable
    └── IntegrityError              exit 7  size or sha256 does not match the record

Errors of the layers below (git, boto3, google-cloud-storage, the file system)
are translated into these where they enter, always ``raise ... from exc``, so the
CLI can map every failure to one line and one exit code.
"""

from __future__ import annotations


class NexusError(Exception):
    """Base of every error NexusML raises on purpose."""

    exit_code = 1
    code = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(NexusError):
    exit_code = 2
    code = "usage_error"


class InvalidNameError(UsageError):
    code = "invalid_name"


class ConfigError(UsageError):
    code = "config_error"


class MetadataError(UsageError):
    code = "metadata_error"


class AmbiguousCommitError(UsageError):
    """A commit prefix that names more than one version: the file is fine, the prefix is short."""

    code = "ambiguous_commit"


class GitError(NexusError):
    exit_code = 3
    code = "git_error"


class NotFoundError(NexusError):
    exit_code = 4
    code = "not_found"


class ConflictError(NexusError):
    exit_code = 5
    code = "conflict"


class StorageError(NexusError):
    exit_code = 6
    code = "storage_error"


class IntegrityError(NexusError):
    exit_code = 7
    code = "integrity_error"


class ObjectExistsError(ConflictError):
    """A create-only write found the key taken. The caller decides whether that is a conflict.

    ``digest`` holds the sha256 and size of the bytes that were refused, computed while
    they were sent, so the caller can compare them with what won without a second read.
    """

    code = "object_exists"

    def __init__(self, message: str, *, digest: object = None) -> None:
        super().__init__(message)
        self.digest = digest
