"""Progress bars nest: a library bar inside a CLI bar adds a row instead of failing."""

from __future__ import annotations

from anomalens import progress
from anomalens.progress import make_progress, track


def test_nested_bars_share_one_display(monkeypatch) -> None:
    monkeypatch.setattr(progress, "_forced", True)
    seen = []
    with make_progress() as outer:
        outer_task = outer.add_task("outer", total=3, info="")
        for _ in track(range(3), "inner"):
            seen.append(len(outer.tasks))
        outer.advance(outer_task)
        assert len(outer.tasks) == 1, "the nested row is removed when it finishes"
    assert seen == [2, 2, 2]
