"""Recognising what a weights file is, from its bytes and never by running any of it."""

from __future__ import annotations

import json
import pickletools
import zipfile
from pathlib import Path

# Modules a plain state dict's pickle may name; a whole pickled nn.Module names its classes.
_STATE_DICT_MODULES = {"collections", "torch", "torch._utils", "torch._tensor"}
_STATE_DICT_BUILTINS = {"dict", "list", "tuple", "set", "int", "float", "bool", "str"}
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
#: a state dict's pickle names tensors (their bytes are other entries): a larger one is
#: not read into memory, whatever the archive claims
_STATE_DICT_MAX_PICKLE = 64 * 1024 * 1024


def _is_state_dict_pickle(data: bytes) -> bool:
    """True when every global the pickle names is one a tensor dictionary needs.

    ``pickletools.genops`` only walks the opcodes; nothing in the pickle is executed.
    """
    strings: list[str] = []
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if isinstance(argument, str):
                strings.append(argument)
            if opcode.name == "GLOBAL":
                module, _, name = str(argument).partition(" ")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                module, name = strings[-2], strings[-1]
            else:
                continue
            if module in ("builtins", "__builtin__") and name in _STATE_DICT_BUILTINS:
                continue
            if module not in _STATE_DICT_MODULES:
                return False
    except (ValueError, EOFError, UnicodeDecodeError):
        return False
    return True


def _zip_format(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/archive_format") for n in names):
            return "torch_export"
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if (
            len(pickles) == 1
            and archive.getinfo(pickles[0]).file_size <= _STATE_DICT_MAX_PICKLE
            and _is_state_dict_pickle(archive.read(pickles[0]))
        ):
            return "state_dict"
    return "unknown"


def _is_safetensors(head: bytes, size: int, path: Path) -> bool:
    if len(head) < 10:
        return False
    header_size = int.from_bytes(head[:8], "little")
    if not 2 <= header_size <= min(_SAFETENSORS_MAX_HEADER, size - 8) or head[8:9] != b"{":
        return False
    with open(path, "rb") as handle:
        handle.seek(8)
        try:
            header = json.loads(handle.read(header_size))
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past any header
            return False
    return isinstance(header, dict)


def detect_format(path: Path) -> str:
    """One of ``torchscript``, ``torch_export``, ``state_dict``, ``safetensors``, ``unknown``."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        try:
            return _zip_format(path)
        except (zipfile.BadZipFile, OSError, KeyError):
            return "unknown"
    if _is_safetensors(head, size, path):
        return "safetensors"
    return "unknown"
