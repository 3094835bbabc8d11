"""What a batch command inspects: images, folders, `--recursive` folder trees and `@list.txt`
files of paths, expanded into one list of images, each scored once.

Every image keeps its path relative to the common folder of the inputs (`relative`), so results
and overlays named by it cannot collide even when two folders hold files of the same name. What
cannot be inspected (a missing input, a dangling link, an unreadable or empty folder) is reported
as a `Skipped` entry, never dropped in silence.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from anomalens.data.io import IMAGE_EXTENSIONS, dangling_link
from anomalens.errors import DataError

LIST_PREFIX = "@"
"""An input starting with this names a text file of paths, one per line (`#` starts a comment)."""


@dataclass(frozen=True)
class InputImage:
    """An image to inspect: its path as found, and that path relative to the inputs' common
    folder (POSIX separators)."""

    path: Path
    relative: str


@dataclass(frozen=True)
class Skipped:
    """An input, or an entry of a folder, that cannot be inspected, and why."""

    path: Path
    relative: str
    reason: str


@dataclass(frozen=True)
class Inputs:
    images: list[InputImage]
    skipped: list[Skipped]


def collect_inputs(inputs: Sequence[str | os.PathLike[str]], recursive: bool = False) -> Inputs:
    """Expand `inputs` (image files, folders, `@list.txt`) into the images to inspect, in input
    order (each folder's images sorted by path); an image reached twice is kept once."""
    found: list[tuple[Path, Path]] = []  # (path, the folder its relative path starts from)
    problems: list[tuple[Path, Path, str]] = []
    for item in _expand_lists(inputs):
        if item.is_dir():
            before = len(found) + len(problems)
            for path, reason in _walk(item, recursive):
                if reason is None:
                    found.append((path, item))
                else:
                    problems.append((path, item, reason))
            if len(found) + len(problems) == before:
                which = "in the tree under" if recursive else "in"
                hint = "" if recursive else " (use --recursive for subfolders)"
                problems.append((item, item, f"no images {which} this folder{hint}"))
        elif item.is_file():
            found.append((item, item.parent))
        elif item.is_symlink():
            problems.append((item, item.parent, dangling_link(item)))
        else:
            problems.append((item, item.parent, "file not found"))
    base = _common_folder([root for _, root in found] + [root for _, root, _ in problems])
    images: list[InputImage] = []
    seen: set[str] = set()
    for path, _ in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            images.append(InputImage(path, _relative(path, base)))
    skipped = [Skipped(path, _relative(path, base), reason) for path, _, reason in problems]
    return Inputs(images, skipped)


def _expand_lists(inputs: Sequence[str | os.PathLike[str]]) -> Iterator[Path]:
    """The inputs with each `@file` replaced by the paths it lists (relative ones are taken from
    the current folder, as if typed on the command line)."""
    for item in inputs:
        text = os.fspath(item)
        if not text.startswith(LIST_PREFIX):
            yield Path(text)
            continue
        listing = Path(text[len(LIST_PREFIX) :])
        try:
            lines = listing.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read the list of inputs {listing}: {error}") from error
        for line in lines:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield Path(entry)


def _walk(folder: Path, recursive: bool) -> Iterator[tuple[Path, str | None]]:
    """Image files under `folder` (each folder's files by name, then its subfolders; hidden names
    skipped) with None, and problems (dangling links, unreadable folders) with their reason.
    Linked folders are followed, each once."""
    visited: set[str] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        real = os.path.realpath(current)
        if real in visited:
            continue
        visited.add(real)
        try:
            entries = sorted(os.scandir(current), key=lambda entry: entry.name, reverse=True)
        except OSError as error:
            yield current, f"cannot read this folder: {error.strerror or error}"
            continue
        files = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir():
                if recursive:
                    pending.append(path)
            elif entry.is_file():
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(path)
            elif entry.is_symlink():
                files.append(path)
        for path in reversed(files):
            yield path, None if path.exists() else dangling_link(path)


def _common_folder(roots: list[Path]) -> Path:
    if not roots:
        return Path.cwd()
    return Path(os.path.commonpath([os.path.abspath(root) for root in roots]))


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(path), base)).as_posix()
