"""The inspection station (`serve --data-dir`): stored inspections and their history, reviews,
model versions learned from the reviews and rolled back, the drift watch, /metrics, tokens with
roles, and `anomalens reviews export`."""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app as cli
from anomalens.data.mvtec import test_samples, training_images
from anomalens.data.synthetic import make_category
from anomalens.deploy.serve import Settings, create_app, serve
from anomalens.errors import ParameterError

ADMIN, REVIEWER, INSPECTOR = (
    "admin-token-0123456789",
    "review-token-0123456789",
    "inspect-token-01234",
)


@contextlib.contextmanager
def station(model: Path, data_dir: Path, **settings) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(str(model), data_dir=str(data_dir), **settings))) as c:
        yield c


def upload(client: TestClient, *paths: Path, headers=None) -> list[dict]:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]
    answer = client.post("/v1/predict", files=files, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_file(fitted_patchcore, tmp_path_factory) -> Path:
    return fitted_patchcore.save(tmp_path_factory.mktemp("station_model") / "model.safetensors")


@pytest.fixture(scope="module")
def goods(brick) -> list[Path]:
    return sorted((brick / "test" / "good").glob("*.png"))


@pytest.fixture(scope="module")
def defects(brick) -> list[Path]:
    return [s.path for s in test_samples(brick) if s.label == 1]


def test_inspections_are_stored_listed_and_kept_across_restarts(
    model_file, goods, defects, tmp_path
) -> None:
    data = tmp_path / "station"
    with station(model_file, data) as client:
        first = upload(client, goods[0], goods[1], defects[0])
        second = upload(client, defects[1])
        ids = [r["inspection_id"] for r in first + second]
        assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 4
        assert {r["model_version"] for r in first + second} == {1}
        page = client.get("/v1/inspections").json()
        assert page["total"] == 4 and page["items"][0]["id"] == ids[-1]
        anomalous = client.get("/v1/inspections", params={"label": "anomalous"}).json()
        assert {i["id"] for i in anomalous["items"]} == {
            r["inspection_id"] for r in first + second if r["anomalous"]
        }
        assert anomalous["total"] >= 2  # both defects
        paged = client.get("/v1/inspections", params={"limit": 2, "offset": 2}).json()
        assert [i["id"] for i in paged["items"]] == [ids[1], ids[0]]
        one = client.get(f"/v1/inspections/{ids[2]}").json()
        assert one["filename"] == defects[0].name and one["score"] == first[2]["score"]
        assert one["regions"] and one["review"] is None and one["created_at"].endswith("Z")
        image = client.get(one["image_url"])
        assert image.content == defects[0].read_bytes()
        assert image.headers["content-type"] == "image/png"
        heatmap = Image.open(io.BytesIO(client.get(one["heatmap_url"]).content))
        assert heatmap.mode == "RGBA" and heatmap.size == (128, 128)
        since = one["created_at"]
        later = client.get("/v1/inspections", params={"since": since}).json()
        assert {i["id"] for i in later["items"]} == set(ids[2:])
        assert client.get("/v1/inspections/" + "0" * 32).status_code == 404
        assert client.get("/v1/inspections", params={"label": "odd"}).status_code == 422
        # the same image twice is kept once on disk
        upload(client, goods[0])
    stored = list((data / "images").rglob("*"))
    assert len([p for p in stored if p.is_file()]) == 4
    with station(model_file, data) as client:  # a restart keeps the history
        assert client.get("/v1/inspections").json()["total"] == 5
        assert client.get("/v1/models").json()["active"] == 1
        assert client.get("/healthz").json()["model_version"] == 1


def test_reviews_update_the_model_and_a_version_rolls_back(
    model_file, goods, defects, tmp_path
) -> None:
    data = tmp_path / "station"
    with station(model_file, data) as client:
        normal = upload(client, *goods[:4])
        defect = upload(client, defects[0])[0]
        for result in normal[:3]:
            answer = client.post(
                f"/v1/inspections/{result['inspection_id']}/review",
                json={"verdict": "false_alarm", "note": "scratch on the glass"},
            )
            assert answer.status_code == 200
            assert answer.json()["review"]["verdict"] == "false_alarm"
            assert answer.json()["review"]["reviewer"] == "operator"
        client.post(f"/v1/inspections/{defect['inspection_id']}/review", json={"verdict": "defect"})
        bad = client.post(
            f"/v1/inspections/{defect['inspection_id']}/review", json={"verdict": "maybe"}
        )
        assert bad.status_code == 422
        missing = client.post("/v1/inspections/" + "f" * 32 + "/review", json={"verdict": "defect"})
        assert missing.status_code == 404
        unreviewed = client.get("/v1/inspections", params={"review": "unreviewed"}).json()
        assert unreviewed["total"] == 1
        assert client.get("/v1/inspections", params={"review": "false_alarm"}).json()["total"] == 3

        update = client.post("/v1/models/update")
        assert update.status_code == 201, update.text
        version = update.json()
        assert (version["version"], version["parent"], version["active"]) == (2, 1, True)
        assert version["source"] == "reviews"
        assert version["validation"]["reviewed_normals"] == 3
        assert version["validation"]["reviewed_defects"] == 1
        assert (
            version["n_train_images"]
            > client.get("/v1/models").json()["versions"][0]["n_train_images"]
        )
        again = upload(client, *goods[:3])
        for before, after in zip(normal[:3], again, strict=True):
            assert after["model_version"] == 2
            assert after["score"] < before["score"]  # learned: its own patches are in the bank
        nothing = client.post("/v1/models/update")
        assert nothing.status_code == 409 and "at least 2" in nothing.json()["detail"]

        rolled = client.post("/v1/models/1/activate")
        assert rolled.status_code == 200 and rolled.json()["active"]
        back = upload(client, goods[0])[0]
        assert back["model_version"] == 1 and back["score"] == pytest.approx(normal[0]["score"])
        listed = client.get("/v1/models").json()
        assert listed["active"] == 1 and [v["version"] for v in listed["versions"]] == [1, 2]
        assert client.post("/v1/models/9/activate").status_code == 404
        stored = client.get("/v1/inspections", params={"model_version": 2}).json()
        assert stored["total"] == 3


def test_tokens_roles_and_unguessable_image_urls(model_file, goods, tmp_path, caplog) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(
        f"# name role token\nada admin {ADMIN}\nrob review {REVIEWER}\nian inspect {INSPECTOR}\n"
    )
    from anomalens.deploy.access import read_tokens

    granted = tuple(read_tokens(None, tokens))
    assert all(ADMIN not in entry for entry in granted)  # only digests are kept
    with station(model_file, tmp_path / "station", tokens=granted) as client:
        as_admin = {"Authorization": f"Bearer {ADMIN}"}
        result = upload(client, goods[0], headers=as_admin)[0]
        item = f"/v1/inspections/{result['inspection_id']}"
        probes = {
            ("GET", "/"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
            ("GET", "/metrics"),
            ("GET", "/v1/model"),
            ("GET", "/nowhere"),
        }
        for route in client.app.routes:
            for method in getattr(route, "methods", ()) or ():
                path = route.path.replace("{inspection_id}", result["inspection_id"])
                probes.add((method, path.replace("{version}", "1")))
        for method, path in sorted(probes):
            answer = client.request(method, path)
            expected = 200 if path == "/healthz" else 401
            assert answer.status_code == expected, (method, path)
        wrong = client.get(f"{item}/image", headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401
        assert client.get(f"{item}/image", headers=as_admin).content == goods[0].read_bytes()

        as_inspector = {"Authorization": f"Bearer {INSPECTOR}"}
        as_reviewer = {"Authorization": f"Bearer {REVIEWER}"}
        upload(client, goods[1], headers=as_inspector)
        review = {"verdict": "false_alarm"}
        denied = client.post(f"{item}/review", json=review, headers=as_inspector)
        assert denied.status_code == 403 and "review role" in denied.json()["detail"]
        reviewed = client.post(f"{item}/review", json=review, headers=as_reviewer)
        assert reviewed.status_code == 200 and reviewed.json()["review"]["reviewer"] == "rob"
        assert client.post("/v1/models/1/activate", headers=as_reviewer).status_code == 403
        assert client.post("/v1/models/update", headers=as_reviewer).status_code == 403
        assert client.post("/v1/models/1/activate", headers=as_admin).status_code == 200

        page = client.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 401 and 'name="token"' in page.text
        refused = client.post("/login", data={"token": "guess"}, follow_redirects=False)
        assert refused.status_code == 401
        login = client.post("/login", data={"token": REVIEWER}, follow_redirects=False)
        assert login.status_code == 303
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert client.get("/").status_code == 200  # the cookie
        assert client.get(f"{item}/image").status_code == 200
        client.cookies.clear()
        assert client.get(f"{item}/image").status_code == 401
    for secret in (ADMIN, REVIEWER, INSPECTOR):
        assert secret not in caplog.text


def test_bad_tokens_and_open_network_are_refused(model_file, tmp_path) -> None:
    with pytest.raises(ParameterError, match="without a token"):
        serve(model_file, host="0.0.0.0")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("ada boss abcdefghijklmnopqrstuvwxyz\n")
    with pytest.raises(ParameterError, match="line 1: role must be one of"):
        serve(model_file, tokens_file=tokens)
    with pytest.raises(ParameterError, match="at least 16 characters"):
        serve(model_file, token="short")
    result = CliRunner().invoke(cli, ["serve", str(model_file), "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "without a token" in str(result.exception)


@pytest.fixture(scope="module")
def drift_case(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A PatchCore fitted on 40 normal brick images (96 px), and 85 further normal images."""
    folder = tmp_path_factory.mktemp("drift")
    root = make_category(folder, seed=5, n_train=40, n_test_good=85, n_test_defect=0)
    model = anomalens.create("patchcore", image_size=96, coreset_ratio=0.25)
    model.fit(training_images(root)).save(folder / "model.safetensors")
    images = [np.asarray(Image.open(p)) for p in sorted((root / "test" / "good").glob("*.png"))]
    return folder / "model.safetensors", images


@pytest.mark.parametrize("shifted", [False, True])
def test_drift_warning_on_brighter_images_only(drift_case, tmp_path, shifted) -> None:
    model_file, more_normal = drift_case
    window = 30
    with station(model_file, tmp_path / "station", drift_window=window) as client:

        def send(images: list[np.ndarray]) -> None:
            files = [("file", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(images)]
            for start in range(0, len(files), 16):
                answer = client.post("/v1/predict", files=files[start : start + 16])
                assert answer.status_code == 200

        send(more_normal[:35])
        waiting = client.get("/v1/drift").json()
        later = more_normal[35:]
        if shifted:
            later = [np.clip(a.astype(int) + 40, 0, 255).astype(np.uint8) for a in later]
        send(later)
        time.sleep(2.1)  # the drift figure is cached for 2 s
        drift = client.get("/v1/drift").json()
        metrics = client.get("/metrics").text
    assert waiting["reason"] is None or waiting["statistic"] is None
    assert drift["reason"] is None, drift
    assert drift["n_reference"] == window and drift["n_recent"] >= drift["min_samples"]
    assert drift["warning"] is shifted, drift
    assert f"anomalens_drift_warning {1.0 if shifted else 0.0}" in metrics
    assert len(drift["series"]) == 85 and drift["threshold"] > 0


def test_metrics_count_requests_images_and_version(model_file, goods, defects, tmp_path) -> None:
    with station(model_file, tmp_path / "station") as client:
        upload(client, goods[0], defects[0])
        client.get("/v1/inspections")
        text = client.get("/metrics").text
    assert 'anomalens_requests_total{route="/v1/predict",status="200"} 1.0' in text
    assert 'anomalens_request_seconds_bucket{le="+Inf",route="/v1/predict"} 1.0' in text
    assert 'anomalens_images_total{label="anomalous"} 1.0' in text
    assert 'anomalens_images_total{label="normal"} 1.0' in text
    assert "anomalens_model_version 1.0" in text
    assert "anomalens_anomalous_rate 0.5" in text


def test_without_a_data_dir_the_store_routes_say_how_to_get_one(model_file, goods) -> None:
    with TestClient(create_app(Settings(str(model_file)))) as client:
        assert upload(client, goods[0])[0]["inspection_id"] is None
        answer = client.get("/v1/inspections")
        assert answer.status_code == 404 and "--data-dir" in answer.json()["detail"]


def test_reviews_export_writes_an_mvtec_test_folder(model_file, goods, defects, tmp_path) -> None:
    data = tmp_path / "station"
    with station(model_file, data) as client:
        results = upload(client, goods[0], goods[1], defects[0], defects[1])
        verdicts = ["false_alarm", "normal", "defect", None]
        for result, verdict in zip(results, verdicts, strict=True):
            if verdict:
                item = f"/v1/inspections/{result['inspection_id']}/review"
                client.post(item, json={"verdict": verdict})
    out = tmp_path / "reviewed"
    runner = CliRunner()
    done = runner.invoke(cli, ["reviews", "export", str(out), "--data-dir", str(data)])
    assert done.exit_code == 0, done.output
    samples = test_samples(out)
    assert sorted(s.label for s in samples) == [0, 0, 1]
    assert {s.path.read_bytes() for s in samples if s.label == 0} == {
        goods[0].read_bytes(),
        goods[1].read_bytes(),
    }
    nowhere = runner.invoke(cli, ["reviews", "export", str(out), "--data-dir", str(tmp_path / "x")])
    assert nowhere.exit_code != 0 and "not a station's data directory" in str(nowhere.exception)


def test_requests_during_update_and_rollback_are_all_answered(model_file, goods, tmp_path) -> None:
    data = tmp_path / "station"
    with station(model_file, data) as client:
        for result in upload(client, *goods[:3]):
            item = f"/v1/inspections/{result['inspection_id']}/review"
            client.post(item, json={"verdict": "normal"})
        stop = threading.Event()
        answers: list[int] = []
        versions: set[int] = set()

        def keep_inspecting() -> None:
            body = goods[4].read_bytes()
            while not stop.is_set():
                answer = client.post("/v1/predict", files={"file": ("g.png", body, "image/png")})
                answers.append(answer.status_code)
                if answer.status_code == 200:
                    versions.add(answer.json()["results"][0]["model_version"])

        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(keep_inspecting) for _ in range(2)]
            time.sleep(0.5)
            assert client.post("/v1/models/update").status_code == 201
            time.sleep(0.5)
            assert client.post("/v1/models/1/activate").status_code == 200
            time.sleep(0.5)
            stop.set()
            for future in running:
                future.result()
        total = client.get("/v1/inspections").json()["total"]
    assert answers and set(answers) == {200}
    assert versions == {1, 2}
    assert total == 3 + len(answers)  # every answered request is stored, once


def test_serve_checks_the_drift_reference(model_file) -> None:
    with pytest.raises(ParameterError, match="drift_reference must be one of baseline"):
        serve(model_file, drift_reference="yesterday")
