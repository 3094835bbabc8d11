"""Output paths checked before the long work starts, and files completed atomically.

A command that would fit for minutes and then fail to save its result checks first
(`check_writable_file`, `check_writable_folder`), so a mistake costs one line, not the run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from anomalens.errors import AnomalensError


class OutputError(AnomalensError, OSError):
    """An output file or folder cannot be written."""


def check_writable_folder(folder: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create `folder` if needed and prove a file can be written in it; else `OutputError`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write the {what} {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".anomalens-write-check-"):
            pass
    except OSError as error:
        raise OutputError(f"cannot write the {what} {folder}: {_reason(error)}") from error
    return folder


def check_writable_file(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """Prove `path` can be written (its folder is created if needed) without touching an
    existing file there; else `OutputError`."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write the {what} {path}: it is a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write the {what} {path}: permission denied")
    check_writable_folder(path.parent, f"folder of the {what}")
    return path


def replace_atomically(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename,
    so `path` is either the old file or the whole new one, never a torn write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__
