"""PythonNotebook on a real Jupyter kernel (one kernel, shared by these tests through the shared node)."""

from __future__ import annotations

import base64
import json

from .conftest import Node, unwrap

NB = "PythonNotebook_"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def test_state_persists_between_cells_and_cwd_is_the_workspace(node: Node) -> None:
    first = node.ok(NB + "execute_cell", code="import os\nanswer = 6 * 7\nprint('set')")
    assert first[0].startswith("cell_index: ")
    assert first[1] == "set\n"
    second = node.ok(NB + "execute_cell", code="answer, os.getcwd()")
    assert second[1].strip() == f"(42, {str(node.workspace.resolve())!r})"
    assert "TOOLSERVER_NODE_SECRET" not in node.ok(NB + "execute_cell", code="print(sorted(os.environ))")[1]


def test_images_come_back_as_binary(node: Node) -> None:
    code = (
        "from IPython.display import Image, display\nimport base64\n"
        f"display(Image(data=base64.b64decode('{PNG}')))"
    )
    response = node.run(NB + "execute_cell", code=code)
    assert response.status_code == 200
    body = response.json()
    assert body["type"] == "composite"
    image = body["data"][1]
    assert image["type"] == "binary" and image["media_type"] == "image/png"
    assert image["name"].endswith(".png")
    assert base64.b64decode(image["data"]) == base64.b64decode(PNG)


def test_an_exception_fails_the_call_with_its_traceback(node: Node) -> None:
    response = node.run(NB + "execute_cell", code="print('before')\n1 / 0")
    assert response.status_code == 500
    detail = response.json()["detail"]
    assert "before" in detail and "ZeroDivisionError" in detail
    assert "\x1b[" not in detail  # colour codes stripped


def test_a_long_cell_is_interrupted_and_state_is_kept(node: Node) -> None:
    node.ok(NB + "execute_cell", code="kept = 'still here'")
    response = node.run(NB + "execute_cell", code="import time\nprint('started', flush=True)\ntime.sleep(30)")
    assert response.status_code == 450
    body = response.json()
    assert "interrupted" in body["detail"]
    assert "started" in body["output"]
    assert node.ok(NB + "execute_cell", code="print(kept)")[1] == "still here\n"


def test_replace_a_cell_print_and_saved_notebook(node: Node) -> None:
    created = node.ok(NB + "execute_cell", code="marker_value = 'first version'")
    assert created.startswith("cell_index: ")  # no output: just the index
    index = int(created.split(": ")[1])
    node.ok(
        NB + "execute_cell", code="marker_value = 'second version'\nprint(marker_value)", cell_index=index
    )
    printed = node.ok(NB + "print_notebook")
    assert f"= Cell {index} =\nmarker_value = 'second version'" in printed
    assert "first version" not in printed
    saved = json.loads((node.workspace / "notebook.ipynb").read_text())
    assert saved["nbformat"] == 4
    assert saved["cells"][index]["source"].startswith("marker_value = 'second version'")
    assert saved["cells"][index]["outputs"][0]["text"] == "second version\n"
    out_of_range = node.run(NB + "execute_cell", code="1", cell_index=10_000)
    assert out_of_range.status_code == 422


def test_reset_restarts_the_kernel_and_clears_the_notebook(node: Node, make_node) -> None:  # type: ignore[no-untyped-def]
    # on a node of its own, so the shared kernel keeps its state for the other tests
    own = make_node()
    own.ok(NB + "execute_cell", code="gone = 1")
    result = own.run(NB + "execute_cell", code="'gone' in globals()", reset=True).json()
    assert unwrap(result) == ["cell_index: 0", "False\n"]
    assert own.ok(NB + "print_notebook").startswith("= Cell 0 =\n'gone' in globals()")
