"""`anomalens demo` (what `make demo` runs): data, fit, metrics table, overlays and HTML page."""

from __future__ import annotations

import sys

import pytest

from anomalens.cli import main


def test_demo_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", ["anomalens", "demo", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
        sys.exit(0)
    assert exit_info.value.code in (0, None)
    stdout = capsys.readouterr().out
    assert "brick" in stdout and "grass" in stdout and "gravel" in stdout
    assert str((out / "index.html").resolve()) in stdout.replace("\n", "")
    for texture in ("brick", "grass", "gravel"):
        assert (out / texture / "index.html").is_file()
        assert len(list((out / texture / "overlays").glob("*/*.png"))) == 24
        assert (out / "models" / f"{texture}.safetensors").is_file()
