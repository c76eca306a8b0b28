"""Upload, download, workspace zip and workspace structure endpoints."""

from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import pytest

from .conftest import Node


@pytest.fixture
def ws(make_node) -> Node:  # type: ignore[no-untyped-def]
    """A node of its own, for tests that look at the whole workspace."""
    return make_node()


def test_upload_the_way_xagent_does(node: Node, tmp_path: Path) -> None:
    local = tmp_path / "report.csv"
    local.write_bytes(b"a,b\n1,2\n")
    # XAgent: files={'file': open(path, 'rb'), 'filename': basename} -> 'filename' arrives as a file part
    with local.open("rb") as fh:
        response = node.post("/upload_file", files={"file": fh, "filename": "report.csv"})
    assert response.status_code == 200, response.text
    assert response.json()["file_path"] == "report.csv"
    assert (node.workspace / "report.csv").read_bytes() == b"a,b\n1,2\n"


def test_upload_filename_as_form_field_and_target_path(node: Node) -> None:
    response = node.post(
        "/upload_file",
        files={"file": ("ignored.bin", b"\x00\x01")},
        data={"filename": "data.bin", "path": "in/sub/"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Upload Success!", "file_path": "in/sub/data.bin", "size": 2}
    assert (node.workspace / "in/sub/data.bin").read_bytes() == b"\x00\x01"
    renamed = node.post("/upload_file", files={"file": ("x.txt", b"hi")}, data={"path": "in/renamed.txt"})
    assert renamed.json()["file_path"] == "in/renamed.txt"


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("../../evil.txt", "evil.txt"),
        ("/etc/cron.d/job", "job"),
        ("..\\..\\win.txt", "win.txt"),
        ("bad\x07name?.txt", "badname.txt"),
    ],
)
def test_uploaded_names_are_sanitised(node: Node, given: str, stored: str) -> None:
    response = node.post("/upload_file", files={"file": ("x", b"data")}, data={"filename": given})
    assert response.status_code == 200, response.text
    assert response.json()["file_path"] == stored
    assert (node.workspace / stored).read_bytes() == b"data"


def test_upload_refuses_bad_names_and_bodies(node: Node) -> None:
    for name in ["..", ".", ""]:
        response = node.post("/upload_file", files={"file": ("x", b"data")}, data={"filename": name})
        if name == "":  # falls back to the part's own file name
            assert response.status_code == 200
        else:
            assert response.status_code == 400, name
    assert node.post("/upload_file", data={"filename": "a.txt"}).status_code == 400  # no file part
    assert node.post("/upload_file", json={"file": "x"}).status_code == 400  # not multipart
    garbage = node.post(
        "/upload_file",
        data=b"--xyz\r\ngarbage",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert garbage.status_code == 400


def test_upload_size_limit_gives_413_and_leaves_nothing_behind(node: Node) -> None:
    big = os.urandom(1_200_000)
    response = node.post("/upload_file", files={"file": ("big.bin", big)})
    assert response.status_code == 413
    assert not (node.workspace / "big.bin").exists()

    def chunks():  # chunked upload: no Content-Length to refuse it early
        yield b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="c.bin"\r\n\r\n'
        for _ in range(20):
            yield bytes(100_000)
        yield b"\r\n--bnd--\r\n"

    chunked = node.post(
        "/upload_file", data=chunks(), headers={"Content-Type": "multipart/form-data; boundary=bnd"}
    )
    assert chunked.status_code == 413
    leftovers = [
        p for p in os.listdir(node.workspace) if p in ("big.bin", "c.bin") or p.startswith(".toolserver")
    ]
    assert leftovers == []
    ok = node.post("/upload_file", files={"file": ("fits.bin", bytes(900_000))})
    assert ok.status_code == 200 and ok.json()["size"] == 900_000


def test_download_roundtrip_and_errors(node: Node) -> None:
    payload = os.urandom(300_000)
    (node.workspace / "dir").mkdir(exist_ok=True)
    (node.workspace / "dir" / "blob.bin").write_bytes(payload)
    response = node.post("/download_file", json={"file_path": "dir/blob.bin"})
    assert response.status_code == 200
    assert response.content == payload
    assert "blob.bin" in response.headers["content-disposition"]
    assert node.post("/download_file", json={"file_path": "nope.txt"}).status_code == 404
    assert node.post("/download_file", json={"file_path": "dir"}).status_code == 400


def test_download_workspace_is_a_zip_without_outside_files(ws: Node, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("do not ship me")
    (ws.workspace / "a").mkdir()
    (ws.workspace / "a" / "one.txt").write_text("one")
    (ws.workspace / "empty").mkdir()
    (ws.workspace / "two.bin").write_bytes(bytes(range(256)))
    (ws.workspace / "out_link").symlink_to(outside)
    (ws.workspace / "in_link").symlink_to(ws.workspace / "a" / "one.txt")
    response = ws.post("/download_workspace")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = set(archive.namelist())
    assert names == {"a/one.txt", "empty/", "two.bin", "in_link"}
    assert archive.read("two.bin") == bytes(range(256))
    assert archive.read("in_link") == b"one"
    # the temporary zip (built outside the workspace) is removed once sent
    tmp_dir = ws.workspace.parent / f"{ws.workspace.name}.state" / "tmp"
    deadline = time.monotonic() + 3
    while any(tmp_dir.glob("*.zip")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(tmp_dir.glob("*.zip"))


def test_workspace_structure_is_a_tree(ws: Node) -> None:
    (ws.workspace / "src" / "pkg").mkdir(parents=True)
    (ws.workspace / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (ws.workspace / "README").write_text("hello")
    tree = ws.post("/get_workspace_structure").json()
    assert tree["type"] == "directory" and tree["name"] == ws.workspace.name
    by_name = {c["name"]: c for c in tree["children"]}
    assert by_name["README"] == {"name": "README", "type": "file", "path": "README", "size": 5}
    pkg = by_name["src"]["children"][0]
    assert pkg["name"] == "pkg" and pkg["children"][0]["path"] == "src/pkg/mod.py"
