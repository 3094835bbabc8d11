"""Progress bars nest (a library bar inside a CLI bar adds a row) and show images/s."""

from __future__ import annotations

from anomalens import progress
from anomalens.progress import RateColumn, make_progress


def test_nested_bars_share_one_display(monkeypatch) -> None:
    monkeypatch.setattr(progress, "_forced", True)
    seen = []
    with make_progress() as outer:
        outer_task = outer.add_task("outer", total=3, info="")
        with make_progress() as inner:
            task = inner.add_task("inner", total=3, info="")
            for _ in range(3):
                seen.append(len(outer.tasks))
                inner.advance(task)
        outer.advance(outer_task)
        assert len(outer.tasks) == 1, "the nested row is removed when it finishes"
    assert seen == [2, 2, 2]


def test_rate_column_shows_images_per_second() -> None:
    with make_progress() as bar:
        images = bar.add_task("inspecting", total=100, info="", unit="img")
        epochs = bar.add_task("training", total=100, info="")
        bar.advance(images, 10)
        bar.advance(images, 10)
        column = RateColumn()
        rendered = column.render(bar.tasks[images]).plain
        assert rendered.endswith(" img/s") and float(rendered.split()[0]) > 0
        assert column.render(bar.tasks[epochs]).plain == ""
