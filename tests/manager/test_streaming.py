"""Bodies stream through the manager: a 200 MB upload and download without the manager holding them."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import ManagerProcess
from toolserver.client import ToolServerClient

SIZE = 200 * 1024 * 1024


class PeakRss:
    """Samples a process's RSS in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB, varied bytes
    with path.open("wb") as fh:
        for i in range(size // len(block)):
            chunk = i.to_bytes(8, "big") + block[8:]
            digest.update(chunk)
            fh.write(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_200mb_upload_and_download_stream_through_the_manager(
    manager: ManagerProcess, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    expected = _write_random(src, SIZE)
    with ToolServerClient(manager.url) as client, client.session() as session:
        session.get_available_tools()  # warm up pools before measuring
        baseline = psutil.Process(manager.proc.pid).memory_info().rss
        with PeakRss(manager.proc.pid) as rss:
            session.upload_file(src)
            back = session.download_file("big.bin", tmp_path / "back.bin")
        growth = rss.peak - baseline
        assert _sha256(back) == expected
        assert growth < 64 * 1024 * 1024, f"manager RSS grew by {growth / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    ("size", "chunked"),
    [(1, False), (60 * 1024, False), (70 * 1024, False), (5, True), (300 * 1024, True)],
    ids=["tiny", "under-64k", "over-64k", "chunked-tiny", "chunked-300k"],
)
def test_every_body_framing_arrives_intact(manager: ManagerProcess, size: int, chunked: bool) -> None:
    """Small bodies go out in one piece, large or chunked ones stream: the node gets the same bytes."""
    data = random.Random(size).randbytes(size)
    boundary = "toolserver-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="blob.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    # a generator has no length: httpx sends it with Transfer-Encoding: chunked
    content = (body[i : i + 4096] for i in range(0, len(body), 4096)) if chunked else body
    with ToolServerClient(manager.url) as client, client.session() as session:
        cookie = {"Cookie": f"node_id={session.node_id}"}
        with httpx.Client(base_url=manager.url, headers=cookie, trust_env=False, timeout=60) as http:
            up = http.post(
                "/upload_file",
                content=content,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            assert up.status_code == 200, up.text
            assert up.json()["size"] == size
            down = http.post("/download_file", json={"file_path": "blob.bin"})
            assert down.status_code == 200
            assert down.content == data
