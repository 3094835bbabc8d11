"""Inputs of a batch command: files, folders, trees, @lists; relative paths; nothing dropped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from anomalens.data.inputs import collect_inputs


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    return path


def test_two_folders_with_the_same_names_stay_apart(tmp_path: Path) -> None:
    for folder in ("good", "broken"):
        for name in ("000.png", "001.png"):
            _image(tmp_path / "test" / folder / name)
    found = collect_inputs([tmp_path / "test" / "good", tmp_path / "test" / "broken"])
    assert [i.relative for i in found.images] == [
        "good/000.png",
        "good/001.png",
        "broken/000.png",
        "broken/001.png",
    ]
    assert found.skipped == []
    alone = collect_inputs([tmp_path / "test" / "good"])
    assert [i.relative for i in alone.images] == ["000.png", "001.png"]


def test_recursive_trees_lists_and_duplicates(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "line"
    a = _image(root / "2026-12-01" / "cam1" / "a.png")
    b = _image(root / "2026-12-01" / "cam2" / "b.jpg")
    top = _image(root / "top.png")
    (root / "notes.txt").write_text("not an image")
    _image(root / ".hidden" / "x.png")
    flat = collect_inputs([root])
    assert [i.path for i in flat.images] == [top]
    tree = collect_inputs([root], recursive=True)
    assert [i.relative for i in tree.images] == [
        "top.png",
        "2026-12-01/cam1/a.png",
        "2026-12-01/cam2/b.jpg",
    ]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# inspected today\n{a}\n\n{b}\n{a}\n")
    monkeypatch.chdir(tmp_path)
    listed = collect_inputs(["@list.txt", str(a)])
    assert [i.path for i in listed.images] == [a, b], "an image listed twice is scored once"
    assert [i.relative for i in listed.images] == ["cam1/a.png", "cam2/b.jpg"]


def test_dangling_links_missing_and_empty_inputs_are_reported(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    _image(folder / "ok.png")
    os.symlink(tmp_path / "gone.png", folder / "link.png")
    (tmp_path / "empty").mkdir()
    found = collect_inputs([folder, tmp_path / "empty", tmp_path / "missing.png"])
    assert [i.relative for i in found.images] == ["images/ok.png"]
    reasons = {s.relative: s.reason for s in found.skipped}
    assert reasons["images/link.png"].startswith("dangling link to ")
    assert "no images" in reasons["empty"] and "--recursive" in reasons["empty"]
    assert reasons["missing.png"] == "file not found"


def test_linked_folder_loops_are_followed_once(tmp_path: Path) -> None:
    _image(tmp_path / "root" / "sub" / "a.png")
    os.symlink(tmp_path / "root", tmp_path / "root" / "sub" / "loop")
    found = collect_inputs([tmp_path / "root"], recursive=True)
    assert [i.relative for i in found.images] == ["sub/a.png"]
