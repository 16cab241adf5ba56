"""The explorer reads nothing outside its runs, whatever a request says, and a missing or
damaged file is an error on that view while the server goes on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import registries

SECRET = "explorer-secret-outside-the-run"


@pytest.fixture
def outside(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    return path


@pytest.fixture
def private_run(explorer_run, tmp_path) -> Path:
    return Path(shutil.copytree(explorer_run, tmp_path / "run"))


def make_client(*runs):
    from starlette.testclient import TestClient

    from explainkit.serve import build_app

    return TestClient(build_app(list(runs), registries(), "cpu"), raise_server_exceptions=False)


@pytest.mark.parametrize(
    "url",
    [
        "/runs/0/../../../../etc/passwd",
        "/img/0/..%2F..%2F..%2Fetc%2Fpasswd",
        "/map/0/1/..%2f..%2fpredictions.h5",
        "/map/0/1/..%2f..%2f..%2fconfig.json",
        "/static/..%2fapp.py",
        "/static/../runs.py",
        "/runs/0/explore/..%2f..%2fconfig.json",
        "/api/runs/..%2f0/images",
    ],
)
def test_path_traversal_is_refused(client, url):
    r = client.get(url, follow_redirects=False)
    assert r.status_code in (302, 400, 404), (url, r.status_code)
    assert "root:" not in r.text and '"arch"' not in r.text and "import" not in r.text


@pytest.mark.parametrize(
    "url, status",
    [
        ("/img/0/-1.png", 404),
        ("/img/0/64.png", 404),
        ("/img/0/1e3.png", 404),
        ("/img/0/0x10.png", 404),
        ("/img/0/%EF%BC%91.png", 404),  # a full-width digit one
        ("/img/0/99999999999999999999999.png", 404),
        ("/img/2/1.png", 404),
        ("/img/00000001/1.png", 404),
        ("/api/runs/0/images/ 1", 404),
        ("/api/runs/0/images?true=-1", 400),
        ("/api/runs/0/images?true=999", 400),
        ("/api/runs/0/images?ids=1,2,64", 400),
        ("/api/runs/0/images?ids=1,../2", 400),
        ("/api/runs/0/images?page=1e9", 400),
        ("/api/runs/0/images?per_page=100000", 400),
        ("/api/runs/0/images?conf_min=nan", 400),
        ("/api/runs/0/images?sort=__class__", 400),
        ("/api/runs/0/images?vs=0&outcome=x", 400),
        ("/map/0/1/nosuchmethod.png", 404),
        ("/map/0/1/epoch/-1.png", 404),
    ],
)
def test_crafted_values_are_refused_with_a_sentence(client, url, status):
    r = client.get(url)
    assert r.status_code == status, (url, r.text)
    body = r.json()["error"] if url.startswith("/api/") else r.text
    assert body and "Traceback" not in body


def test_ids_filter_accepts_exact_images(client):
    r = client.get("/api/runs/0/images?ids=3,1,3").json()
    assert sorted(x["index"] for x in r["items"]) == [1, 3]


def test_symlinks_out_of_the_run_are_not_served(private_run, outside):
    (private_run / "report.html").unlink(missing_ok=True)
    (private_run / "report.html").symlink_to(outside)
    attributions = private_run / "analyses/gradcam/attributions.h5"
    attributions.unlink()
    attributions.symlink_to(outside)
    c = make_client(private_run)
    assert c.get("/runs/0/report.html").status_code == 404
    r = c.get("/map/0/1/gradcam.png")
    assert r.status_code == 404 and SECRET not in r.text
    methods = [m["key"] for m in c.get("/api/runs/0/images/1").json()["methods"]]
    assert "gradcam" not in methods and "live-gradcam" in methods  # computed instead


def test_damaged_files_fail_their_view_only(private_run):
    c = make_client(private_run)
    assert c.get("/map/0/2/gradcam.png").status_code == 200
    attributions = private_run / "analyses/gradcam/attributions.h5"
    data = bytearray(attributions.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4096] = b"\xff" * 4096
    attributions.write_bytes(bytes(data))
    broken = [c.get(f"/map/0/{i}/gradcam.png") for i in range(0, 64, 4)]
    assert any(r.status_code == 500 for r in broken)
    assert all(r.status_code in (200, 500) for r in broken)
    assert all("attributions.h5" in r.text for r in broken if r.status_code == 500)
    attributions.unlink()
    r = c.get("/map/0/2/gradcam.png")
    assert r.status_code == 500 and "missing" in r.text
    for epoch_file in (private_run / "checkpoints").glob("epoch_001.pt"):
        epoch_file.write_bytes(b"not a checkpoint")
    r = c.get("/map/0/2/epoch/1.png")
    assert r.status_code == 500 and "cannot be computed" in r.text
    # the server still answers every other view
    assert c.get("/api/runs/0/images").status_code == 200
    assert c.get("/img/0/2.png").status_code == 200
    assert c.get("/runs/0/images/2").status_code == 200


def test_a_folder_that_is_not_a_run_is_one_sentence(tmp_path):
    from explainkit.errors import RunError
    from explainkit.serve import build_app

    with pytest.raises(RunError, match="no predictions.h5"):
        build_app([tmp_path], registries())
