"""The tracked top-level .nexus_meta.json, the registry the compose stack serves from,
stays a valid registry that nexus can read and extend (it runs on every OS, without the
deploy tools)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from nexus_cli.metadata import Metadata

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / ".nexus_meta.json"


def test_top_level_registry_is_tracked() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", ".nexus_meta.json"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert tracked.returncode == 0, ".nexus_meta.json must be tracked in git"


def test_top_level_registry_is_valid_and_written_as_nexus_writes_it(tmp_path: Path) -> None:
    metadata = Metadata.read(REGISTRY)  # raises MetadataError with the reason when invalid
    rewritten = tmp_path / ".nexus_meta.json"
    metadata.write(rewritten)
    assert REGISTRY.read_text(encoding="utf-8") == rewritten.read_text(encoding="utf-8"), (
        "keep .nexus_meta.json as nexus writes it (pretty-printed, stable key order)"
    )
    for versions in metadata.models.values():
        assert sum(v.is_latest for v in versions) == 1
    json.loads(REGISTRY.read_text(encoding="utf-8"))
