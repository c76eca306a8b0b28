"""Every path a tool or endpoint takes stays inside the workspace (400 WorkspacePathError otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import Node

SECRET_TEXT = "outside-secret-content"


@pytest.fixture(scope="module")
def jail(node: Node, node_tmp: Path) -> dict[str, Path]:
    """An outside file and directory, plus symlinks in the workspace that point at them."""
    outside = node_tmp / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text(SECRET_TEXT)
    ws = node.workspace
    (ws / "links" / "deeper").mkdir(parents=True, exist_ok=True)
    for name, target in [
        ("links/to_secret.txt", outside / "secret.txt"),
        ("links/to_outside_dir", outside),
        ("links/deeper/to_root", Path("/")),
        ("links/relative_escape", Path("../../../outside/secret.txt")),
        ("links/dangling_out", outside / "not_yet.txt"),
    ]:
        link = ws / name
        if not link.is_symlink():
            link.symlink_to(target)
    (ws / "inside.txt").write_text("inside\n")
    return {"outside": outside, "secret": outside / "secret.txt"}


TRAVERSALS = [
    "/etc/passwd",
    "../outside/secret.txt",
    "../../../../../../etc/passwd",
    "sub/../../outside/secret.txt",
    "./../outside/secret.txt",
    "..\\outside\\secret.txt",
    "sub\\..\\..\\outside\\secret.txt",
    "~/.bashrc",
    "~root/.profile",
    "inside.txt\x00.png",
    "links/to_secret.txt",
    "links/to_outside_dir/secret.txt",
    "links/deeper/to_root/etc/passwd",
    "links/relative_escape",
    "links/to_outside_dir/../outside/secret.txt",
    "links/dangling_out",
    "//etc/passwd",
    "/tmp",
    " ../outside/secret.txt",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_read_refuses_paths_leaving_the_workspace(node: Node, jail: dict[str, Path], path: str) -> None:
    response = node.run("FileSystemEnv_read_from_file", filepath=path)
    assert response.status_code == 400, response.text
    assert "workspace" in response.json()["detail"]
    assert SECRET_TEXT not in response.text


@pytest.mark.parametrize("path", TRAVERSALS)
def test_download_refuses_paths_leaving_the_workspace(node: Node, jail: dict[str, Path], path: str) -> None:
    response = node.post("/download_file", json={"file_path": path})
    assert response.status_code == 400, response.text
    assert SECRET_TEXT not in response.text


@pytest.mark.parametrize(
    "path", ["../outside/new.txt", "links/to_outside_dir/new.txt", "links/dangling_out", "/tmp/evil.txt"]
)
def test_write_refuses_paths_leaving_the_workspace(node: Node, jail: dict[str, Path], path: str) -> None:
    response = node.run("FileSystemEnv_write_to_file", filepath=path, content="pwned")
    assert response.status_code == 400, response.text
    assert not (jail["outside"] / "new.txt").exists()
    assert not (jail["outside"] / "not_yet.txt").exists()
    assert not Path("/tmp/evil.txt").exists()
    assert jail["secret"].read_text() == SECRET_TEXT


def test_encoded_dots_are_plain_names_inside_the_workspace(node: Node, jail: dict[str, Path]) -> None:
    # percent-encoding is not decoded: '%2e%2e' is an ordinary (odd) file name in the workspace
    written = node.run(
        "FileSystemEnv_write_to_file", filepath="%2e%2e/%2e%2e/enc.txt", content="x", truncating=True
    )
    assert written.status_code == 200
    assert (node.workspace / "%2e%2e" / "%2e%2e" / "enc.txt").is_file()
    missing = node.run("FileSystemEnv_read_from_file", filepath="%2e%2e%2foutside%2fsecret.txt")
    assert missing.status_code == 500 and "not found" in missing.json()["detail"]


def test_paths_inside_the_workspace_work_in_every_spelling(node: Node, jail: dict[str, Path]) -> None:
    absolute = str(node.workspace.resolve() / "inside.txt")
    for path in ["inside.txt", "./inside.txt", "links/../inside.txt", "links\\..\\inside.txt", absolute]:
        response = node.run("FileSystemEnv_read_from_file", filepath=path)
        assert response.status_code == 200, (path, response.text)
        assert "inside" in response.json()


def test_upload_target_path_cannot_escape(node: Node, jail: dict[str, Path]) -> None:
    for target in ["../outside/", "links/to_outside_dir/", "/etc/"]:
        response = node.post("/upload_file", files={"file": ("a.txt", b"pwned")}, data={"path": target})
        assert response.status_code == 400, (target, response.text)
    assert sorted(os.listdir(jail["outside"])) == ["secret.txt"]
