"""NexusML control plane: version model weights against git commits in object storage."""

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

__version__ = "0.1.0"

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
