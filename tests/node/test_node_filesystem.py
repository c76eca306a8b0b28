"""FileSystemEnv against real files: tree, numbered reads, writes and edits."""

from __future__ import annotations

from .conftest import Node

FS = "FileSystemEnv_"


def lines_of(node: Node, path: str) -> list[str]:
    return (node.workspace / path).read_text().splitlines()


def test_tree_lists_folders_and_files_ignoring_noise(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node({"max_entries_per_level": 5})
    base = node.workspace / "tree_demo"
    (base / "pkg").mkdir(parents=True)
    (base / "pkg" / "mod.py").write_text("x = 1\n")
    (base / ".git").mkdir()
    (base / ".git" / "HEAD").write_text("ref")
    (base / "__pycache__").mkdir()
    many = base / "many"
    many.mkdir()
    for i in range(12):
        (many / f"f{i:02}.txt").write_text("")
    tree = node.ok(FS + "print_filesys_struture")
    assert tree.startswith("- ./\n    - tree_demo/\n")
    assert "        - pkg/\n            - mod.py" in tree
    assert ".git" not in tree and "__pycache__" not in tree
    # at most 5 entries per folder, then a note
    assert "f04.txt" in tree and "f05.txt" not in tree
    assert "... 7 more entries" in tree
    rooted = node.ok(FS + "print_filesys_struture", return_root=True)
    assert str(node.workspace.resolve()) in rooted.splitlines()[0]


def test_read_numbers_lines_and_starts_where_asked(node: Node) -> None:
    (node.workspace / "poem.txt").write_text("one\ntwo\nthree\nfour\n")
    assert (
        node.ok(FS + "read_from_file", filepath="poem.txt")
        == "    1: one\n    2: two\n    3: three\n    4: four\n"
    )
    assert node.ok(FS + "read_from_file", filepath="poem.txt", line_number=3) == "    3: three\n    4: four\n"
    assert node.ok(FS + "read_from_file", filepath="poem.txt", line_number=-1) == "    4: four\n"
    past = node.run(FS + "read_from_file", filepath="poem.txt", line_number=9)
    assert past.status_code == 422 and "4 lines" in past.json()["detail"]
    missing = node.run(FS + "read_from_file", filepath="no_such.txt")
    assert missing.status_code == 500 and "not found" in missing.json()["detail"]


def test_read_cuts_long_files_and_says_where_to_go_on(node: Node) -> None:
    (node.workspace / "long.txt").write_text("".join(f"line {i} " + "x" * 60 + "\n" for i in range(1, 500)))
    text = node.ok(FS + "read_from_file", filepath="long.txt")
    assert len(text) <= 4000 + 200
    last_shown = int(text.splitlines()[-2].split(":")[0])
    assert f"line_number={last_shown + 1}" in text.splitlines()[-1]


def test_read_refuses_binary_files(node: Node) -> None:
    (node.workspace / "img.bin").write_bytes(b"\x89PNG\x00\x00\x01")
    response = node.run(FS + "read_from_file", filepath="img.bin")
    assert response.status_code == 500 and "binary" in response.json()["detail"]


def test_write_creates_appends_inserts_replaces_and_truncates(node: Node) -> None:
    path = "edit/deep/notes.txt"
    created = node.ok(FS + "write_to_file", filepath=path, content="a\nb\nc", truncating=True)
    assert created == "    1: a\n    2: b\n    3: c\n"
    node.ok(FS + "write_to_file", filepath=path, content="d")
    assert lines_of(node, path) == ["a", "b", "c", "d"]
    node.ok(FS + "write_to_file", filepath=path, content="inserted", line_number=2)
    assert lines_of(node, path) == ["a", "inserted", "b", "c", "d"]
    node.ok(FS + "write_to_file", filepath=path, content="B\nC", line_number=3, overwrite=True)
    assert lines_of(node, path) == ["a", "inserted", "B", "C", "d"]
    node.ok(FS + "write_to_file", filepath=path, content="middle", line_number=2, end_line=4)
    assert lines_of(node, path) == ["a", "middle", "d"]
    node.ok(FS + "write_to_file", filepath=path, content="fresh", truncating=True)
    assert lines_of(node, path) == ["fresh"]
    bad = node.run(FS + "write_to_file", filepath=path, content="x", line_number=7)
    assert bad.status_code == 422 and "out of range" in bad.json()["detail"]
    bad_range = node.run(FS + "write_to_file", filepath=path, content="x", line_number=1, end_line=5)
    assert bad_range.status_code == 422
    on_dir = node.run(FS + "write_to_file", filepath="edit", content="x")
    assert on_dir.status_code == 500 and "not a file" in on_dir.json()["detail"]
