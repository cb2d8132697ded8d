"""NexusML control plane: version model weights against git commits in object storage.

The names below are imported on first use, so that ``import nexus_cli.errors`` or
``import nexus_cli.serving`` (what the proxy needs) does not load the whole control plane.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "LoadResult": "nexus_cli.api",
    "Project": "nexus_cli.api",
    "RollbackResult": "nexus_cli.api",
    "StoreResult": "nexus_cli.api",
    "VerifyResult": "nexus_cli.api",
    "init_project": "nexus_cli.api",
    "NexusError": "nexus_cli.errors",
    "Metadata": "nexus_cli.metadata",
    "VersionRecord": "nexus_cli.metadata",
}

__all__ = [
    "LoadResult",
    "Metadata",
    "NexusError",
    "Project",
    "RollbackResult",
    "StoreResult",
    "VerifyResult",
    "VersionRecord",
    "__version__",
    "init_project",
]

if TYPE_CHECKING:
    from nexus_cli.api import (
        LoadResult,
        Project,
        RollbackResult,
        StoreResult,
        VerifyResult,
        init_project,
    )
    from nexus_cli.errors import NexusError
    from nexus_cli.metadata import Metadata, VersionRecord


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nexus_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
