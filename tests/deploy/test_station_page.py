"""The inspection station's web page (`anomalens serve MODEL --data-dir DIR`) in Debian's Chromium
(Playwright): sign in with a token, the stored history with its filters and pages, reviews, a model
update learned from two false alarms, rolling back, and the drift plot and warning."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from anomalens.data.mvtec import training_images
from anomalens.deploy.access import digest
from anomalens.deploy.serve import Settings
from tests.deploy.test_serve import CHROMIUM, CHROMIUM_ARGS, serving

TOKEN = "station-page-token-0123456789"


def item(page, name: str, version: int | None = None):
    """The history entry for the upload `name` (scored by model `version`, when given)."""
    selector = "#inspections li.inspection"
    if version is not None:
        selector += f'[data-version="{version}"]'
    return page.locator(selector).filter(has_text=name)


def test_station_page_history_reviews_versions_and_drift(
    fitted_patchcore, brick: Path, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    expect = sync_api.expect
    model_file = fitted_patchcore.save(tmp_path / "model.safetensors")
    # The two normal test images version 1 scores highest (false alarms: it calls them
    # anomalous), and two defects, one with markup in its name (shown as text, never parsed).
    goods = sorted((brick / "test" / "good").glob("*.png"))
    scores = fitted_patchcore.decision_function(goods)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    alarm_a, alarm_b = (uploads / "alarm-a.png", uploads / "alarm-b.png")
    for target, index in zip((alarm_a, alarm_b), np.argsort(scores)[::-1][:2], strict=True):
        shutil.copyfile(goods[index], target)
    hole, scratch = uploads / "hole.png", uploads / "<b>scratch.png"
    shutil.copyfile(brick / "test" / "hole" / "000.png", hole)
    shutil.copyfile(brick / "test" / "scratch" / "001.png", scratch)
    settings = Settings(
        str(model_file),
        data_dir=str(tmp_path / "data"),
        tokens=(("alice", "admin", digest(TOKEN)),),
        drift_reference="validation",
    )
    with serving(settings) as (url, _), sync_api.sync_playwright() as playwright:
        # The shift so far: its 32 normal images, which version 1 learned (they score far below
        # the held-out images its thresholds rest on, the drift reference chosen here: the drift
        # test warns).
        with httpx.Client(
            base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as c:
            train = training_images(brick)
            for chunk in (train, train):
                files = [("file", (p.name, p.read_bytes(), "image/png")) for p in chunk]
                assert c.post("/v1/predict", files=files).status_code == 200
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            page.fill("#token", TOKEN)  # the sign-in form; the cookie carries the token from here
            page.click("input[type=submit]")
            expect(page.locator("#active-version")).to_have_text("model version 1")
            expect(page.locator("#model")).to_contain_text("version 1")
            expect(page.locator("#session")).to_be_hidden()
            expect(page.locator("#page-info")).to_have_text("1–10 of 32")
            expect(page.locator("#drift-warning")).to_be_visible()
            expect(page.locator("#drift-warning")).to_contain_text("p-value")
            expect(page.locator("#drift-summary")).to_contain_text("KS statistic")
            expect(page.locator("#drift-plot circle.point.normal")).to_have_count(32)
            expect(page.locator("#drift-threshold")).to_have_count(1)

            # Upload; after a reload the history (from the store) still has them, newest first.
            page.set_input_files("#file", [str(p) for p in (alarm_a, alarm_b, hole, scratch)])
            expect(page.locator("#page-info")).to_have_text("1–10 of 36")
            expect(page.locator("#review")).to_be_visible()
            page.reload()
            entries = page.locator("#inspections li.inspection")
            expect(entries).to_have_count(10)
            expect(entries.first).to_contain_text("<b>scratch.png")
            assert page.locator("#inspections b").count() == 0
            expect(entries.first.locator(".review-tag")).to_have_text("not reviewed")
            expect(entries.first.locator(".version")).to_contain_text("v1")
            page.wait_for_function(  # thumbnails load with the cookie
                "document.querySelector('#inspections img').naturalWidth > 0"
            )
            v1_score = float(item(page, "alarm-a.png").get_attribute("data-score"))
            assert item(page, "alarm-a.png").get_attribute("data-label") == "anomalous"

            # Filters and pages.
            page.select_option("#filter-label", "anomalous")
            expect(entries).to_have_count(4)
            page.select_option("#filter-label", "normal")
            expect(page.locator("#page-info")).to_have_text("1–10 of 32")
            page.select_option("#filter-label", "")
            page.fill("#filter-until", "2000-01-01T00:00")
            expect(page.locator("#inspections-empty")).to_be_visible()
            page.fill("#filter-until", "")
            page.fill("#filter-since", "2000-01-01T00:00")
            expect(page.locator("#page-info")).to_have_text("1–10 of 36")
            page.click("#page-next")
            expect(page.locator("#page-info")).to_have_text("11–20 of 36")
            page.fill("#page-size", "20")
            page.press("#page-size", "Enter")
            expect(page.locator("#page-info")).to_have_text("1–20 of 36")
            page.click("#page-next")
            expect(entries).to_have_count(16)
            expect(page.locator("#page-next")).to_be_disabled()
            page.click("#page-prev")
            expect(entries.first).to_contain_text("<b>scratch.png")

            # A stored inspection: its image, the heatmap over it and the defect regions boxed.
            item(page, "hole.png").click()
            expect(page.locator("#filename")).to_contain_text("hole.png")
            expect(page.locator("#verdict")).to_have_text("ANOMALOUS")
            page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")
            assert page.get_attribute("#heatmap", "src").endswith("/heatmap")
            assert page.locator("#image").bounding_box() == page.locator("#heatmap").bounding_box()
            boxes = page.locator("#boxes .region-box").count()
            assert boxes >= 1 and page.locator("#region-list li").count() == boxes

            # Reviews: one false alarm is not enough for an update (the 409 shows).
            item(page, "alarm-a.png").click()
            expect(page.locator("#review-state")).to_have_text("not reviewed")
            note = "<img src=x onerror=alert(1)> lighting"
            page.fill("#review-note", note)
            page.click("#review-false-alarm")
            expect(page.locator("#review-state")).to_contain_text("false alarm by alice")
            expect(page.locator("#review-state")).to_contain_text(note)
            assert page.locator("#review img").count() == 0
            tag = item(page, "alarm-a.png").locator(".review-tag")
            expect(tag).to_have_text("false alarm (alice)")
            page.click("#update-model")
            expect(page.locator("#models-error")).to_contain_text("an update needs at least 2")
            expect(page.locator("#active-version")).to_have_text("model version 1")
            item(page, "alarm-b.png").click()
            page.click("#review-false-alarm")
            expect(item(page, "alarm-b.png").locator(".review-tag")).to_contain_text("false alarm")
            page.select_option("#filter-review", "unreviewed")
            expect(page.locator("#page-info")).to_have_text("1–20 of 34")
            page.select_option("#filter-review", "false_alarm")
            expect(entries).to_have_count(2)
            page.select_option("#filter-review", "")

            # The update learns the two false alarms: version 2, active.
            page.click("#update-model")
            expect(page.locator("#active-version")).to_have_text("model version 2")
            expect(page.locator("#models-error")).to_be_hidden()
            expect(page.locator("#models-status")).to_contain_text("version 2")
            expect(page.locator('tr.version[data-version="2"]')).to_have_class("version active")
            expect(page.locator('tr.version[data-version="2"]')).to_contain_text("reviews")
            expect(page.locator("#models-active")).to_contain_text("from version 1")
            expect(page.locator("#drift-summary")).to_contain_text("model version 2")
            expect(page.locator("#drift-warning")).to_be_hidden()
            expect(item(page, "alarm-a.png")).to_contain_text("learned")

            # Version 2 scores the learned false alarm lower than version 1 did.
            page.set_input_files("#file", str(alarm_a))
            again = item(page, "alarm-a.png", version=2)
            expect(again).to_have_count(1)
            v2_score = float(again.get_attribute("data-score"))
            assert v2_score < v1_score, (v2_score, v1_score)
            assert float(page.text_content("#score")) < v1_score
            expect(page.locator("#drift-plot circle.point")).to_have_count(1)

            # Roll back to version 1.
            page.click('tr.version[data-version="1"] button.activate')
            expect(page.locator("#active-version")).to_have_text("model version 1")
            expect(page.locator('tr.version[data-version="1"]')).to_have_class("version active")
            roll_forward = page.locator('tr.version[data-version="2"] button.activate')
            expect(roll_forward).to_have_text("Activate")
            expect(page.locator("#drift-summary")).to_contain_text("model version 1")
            expect(page.locator("#drift-plot circle.point.anomalous")).to_have_count(4)
            expect(page.locator("#drift-warning")).to_be_visible()
            page.screenshot(path=str(tmp_path / "station.png"), full_page=True)
        finally:
            browser.close()
