"""Paths are walked beneath the workspace by descriptors: no symlink out, no hard link in, no race.

The race test runs a real process that keeps swapping a workspace directory for a symlink to an
outside directory while the node's file tools and download read through it; not one answer may
carry the outside file's content or names.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from .conftest import Node

OUTSIDE = "outside-only-content"
INSIDE = "inside-content"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside every workspace, with a file whose content must never be served."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text(OUTSIDE)
    (path / "only-outside-name.txt").write_text(OUTSIDE)
    return path


def test_a_symlink_out_is_refused_by_every_file_route(node: Node, outside: Path) -> None:
    ws = node.workspace / "beneath-links"
    ws.mkdir(exist_ok=True)
    for name in ("dir_out", "file_out"):
        (ws / name).unlink(missing_ok=True)
    (ws / "dir_out").symlink_to(outside)
    (ws / "file_out").symlink_to(outside / "secret.txt")
    answers = [
        node.run("FileSystemEnv_read_from_file", filepath="beneath-links/file_out"),
        node.run("FileSystemEnv_read_from_file", filepath="beneath-links/dir_out/secret.txt"),
        node.run("FileSystemEnv_write_to_file", filepath="beneath-links/file_out", content="x"),
        node.run("FileSystemEnv_write_to_file", filepath="beneath-links/dir_out/new.txt", content="x"),
        node.post("/download_file", json={"file_path": "beneath-links/file_out"}),
        node.post("/download_file", json={"file_path": "beneath-links/dir_out/secret.txt"}),
        node.post("/files/list", json={"path": "beneath-links/dir_out"}),
        node.post("/files/stat", json={"path": "beneath-links/dir_out/secret.txt"}),
        node.post("/upload_file", files={"file": ("up.txt", b"x")}, data={"path": "beneath-links/dir_out/"}),
        node.post("/upload_file", files={"file": ("up.txt", b"x")}, data={"path": "beneath-links/file_out"}),
    ]
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert "outside the workspace" in answer.json()["detail"]
        assert OUTSIDE not in answer.text and "only-outside-name" not in answer.text
    assert sorted(os.listdir(outside)) == ["only-outside-name.txt", "secret.txt"]
    assert (outside / "secret.txt").read_text() == OUTSIDE

    tree = node.post("/get_workspace_structure").text
    struct = node.ok("FileSystemEnv_print_filesys_struture")
    archive = zipfile.ZipFile(io.BytesIO(node.post("/download_workspace").content))
    assert not any(n.startswith("beneath-links/") and "out" in n for n in archive.namelist())
    for shown in (tree, struct):
        assert "only-outside-name" not in shown
    # the link itself goes, not what it points to
    assert node.post("/files/remove", json={"path": "beneath-links/dir_out"}).status_code == 200
    assert sorted(os.listdir(outside)) == ["only-outside-name.txt", "secret.txt"]


def test_symlinks_that_stay_inside_still_work(node: Node) -> None:
    ws = node.workspace / "beneath-inside"
    (ws / "real").mkdir(parents=True, exist_ok=True)
    (ws / "real" / "f.txt").write_text(INSIDE)
    for name, target in (("alias", "real"), ("abs_alias", str(ws / "real")), ("f_link", "real/f.txt")):
        if not (ws / name).is_symlink():
            (ws / name).symlink_to(target)
    for path in ("beneath-inside/alias/f.txt", "beneath-inside/abs_alias/f.txt", "beneath-inside/f_link"):
        assert INSIDE in node.ok("FileSystemEnv_read_from_file", filepath=path)
        assert node.post("/download_file", json={"file_path": path}).content == INSIDE.encode()
    listed = node.post("/files/list", json={"path": "beneath-inside/alias"}).json()
    assert [e["name"] for e in listed["entries"]] == ["f.txt"]


def test_a_hard_link_to_a_host_file_is_refused(node: Node, outside: Path) -> None:
    link = node.workspace / "hardlink.txt"
    link.unlink(missing_ok=True)
    os.link(outside / "secret.txt", link)
    for answer in (
        node.run("FileSystemEnv_read_from_file", filepath="hardlink.txt"),
        node.run("FileSystemEnv_write_to_file", filepath="hardlink.txt", content="appended"),
        node.post("/download_file", json={"file_path": "hardlink.txt"}),
    ):
        assert answer.status_code == 400, answer.text
        assert "hard links" in answer.json()["detail"]
        assert OUTSIDE not in answer.text
    archive = zipfile.ZipFile(io.BytesIO(node.post("/download_workspace").content))
    assert "hardlink.txt" not in archive.namelist()
    # replacing it whole (truncating) writes a new file: the host file is untouched
    node.ok("FileSystemEnv_write_to_file", filepath="hardlink.txt", content="mine", truncating=True)
    assert (outside / "secret.txt").read_text() == OUTSIDE
    assert link.read_text() == "mine\n"


SWAPPER = textwrap.dedent(
    """
    import os, sys
    base, outside = sys.argv[1], sys.argv[2]
    d, hidden = os.path.join(base, "d"), os.path.join(base, "d.real")
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    while True:
        os.rename(d, hidden)
        os.symlink(outside, d)
        os.unlink(d)
        os.rename(hidden, d)
    """
)


def test_a_directory_swapped_for_a_symlink_mid_request_leaks_nothing(node: Node, outside: Path) -> None:
    base = node.workspace / "race"
    (base / "d").mkdir(parents=True, exist_ok=True)
    (base / "d" / "secret.txt").write_text(INSIDE)
    (base / "d" / "inside-name.txt").write_text(INSIDE)
    swapper = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(base), str(outside)], stdout=subprocess.PIPE, text=True
    )
    leaks, served = [], 0
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == "ready\n"
        for i in range(800):
            kind = i % 4
            if kind == 0:
                answer = node.run("FileSystemEnv_read_from_file", filepath="race/d/secret.txt")
            elif kind == 1:
                answer = node.post("/download_file", json={"file_path": "race/d/secret.txt"})
            elif kind == 2:
                answer = node.post("/files/list", json={"path": "race/d"})
            else:
                answer = node.post("/files/stat", json={"path": "race/d/only-outside-name.txt"})
            served += answer.status_code == 200
            leaked = OUTSIDE in answer.text or '"exists":true' in answer.text.replace(" ", "")
            if leaked or (kind == 2 and "only-outside-name" in answer.text):
                leaks.append((i, answer.status_code, answer.text[:200]))
        assert swapper.poll() is None, "the swapping process died: the race did not run"
    finally:
        swapper.kill()
        swapper.wait()
    assert (outside / "secret.txt").read_text() == OUTSIDE
    assert sorted(os.listdir(outside)) == ["only-outside-name.txt", "secret.txt"]
    assert served > 0  # the directory was there often enough for reads to succeed
    assert leaks == [], f"{len(leaks)} leaks in 800 tries: {leaks[:3]}"
