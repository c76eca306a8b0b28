"""/files/list, /files/stat and /files/remove: entries of a directory, whether a path exists, removal."""

from __future__ import annotations

import os

from .conftest import Node


def test_list_stat_and_remove(node: Node) -> None:
    root = node.workspace / "tree"
    (root / "sub" / "deep").mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("hello")
    (root / "sub" / "deep" / "b.txt").write_text("x")
    (node.workspace / "kept.txt").write_text("kept")
    if not (root / "link").is_symlink():
        os.symlink("../kept.txt", root / "link")

    listed = node.post("/files/list", json={"path": "tree"}).json()
    assert listed["path"] == "tree"
    assert [(e["name"], e["type"], e["size"]) for e in listed["entries"]] == [
        ("sub", "directory", None),
        ("a.txt", "file", 5),
        ("link", "symlink", None),
    ]
    assert node.post("/files/stat", json={"path": "tree/a.txt"}).json()["exists"] is True
    assert node.post("/files/stat", json={"path": "tree/nope"}).json() == {
        "path": "tree/nope",
        "exists": False,
    }

    assert node.post("/files/remove", json={"path": "tree/link"}).status_code == 200
    assert (node.workspace / "kept.txt").read_text() == "kept"  # a symlink goes, not what it points to
    refused = node.post("/files/remove", json={"path": "tree/sub"})
    assert refused.status_code == 409 and "recursive=true" in refused.json()["detail"]
    assert node.post("/files/remove", json={"path": "tree/sub", "recursive": True}).status_code == 200
    assert not (root / "sub").exists()
    assert node.post("/files/remove", json={"path": "tree/sub"}).status_code == 404


def test_paths_stay_in_the_workspace(node: Node) -> None:
    for path in ("..", "../..", "/etc"):
        for route in ("/files/list", "/files/stat"):
            response = node.post(route, json={"path": path})
            assert response.status_code == 400 and "outside the workspace" in response.json()["detail"]
    for path in (".", "", "../x", "/etc/passwd"):
        assert node.post("/files/remove", json={"path": path}).status_code == 400, path
    assert node.post("/files/list", json={"path": "nowhere"}).status_code == 404
    assert node.post("/files/list", json={"path": "x", "extra": 1}).status_code == 422
