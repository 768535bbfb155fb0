"""Atomic writes whose files get the mode the umask gives (not mkstemp's 0600), and side-effect-free path checks."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from memory_test.cli_common.errors import ToolError


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it is synced, given the umask's mode and renamed
    over ``path``, on any error (Ctrl-C included) removed. Readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_safe(obj):
    """NaN and ±inf are not JSON: null (the writer says why in a field beside it)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> Path:
    """``obj`` as strict JSON (non-finite floats as null), written atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")


def output_path_problem(path: str | os.PathLike) -> str | None:
    """Why no file can be written at ``path`` ("is a directory", "<folder> is a file, not a folder", ...), or None.

    Creates nothing: missing folders are made only when the file is written.
    """
    path = Path(path)
    if path.is_dir():
        return "is a directory"
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot write into {ancestor} (permission denied)"
    return None


def check_output_path(path: str | os.PathLike, flag: str) -> None:
    """ToolError naming ``flag`` if ``path`` cannot receive a file."""
    why = output_path_problem(path)
    if why:
        raise ToolError(f"{flag} {path}: {why}", "choose a writable file path")
