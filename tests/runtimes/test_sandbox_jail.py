"""What the sandbox's creates share between threads and worker processes: the uid claims (one
uid per node, machine-wide) and the nodes' /etc files. Many creates at once, from threads and
from processes, as a manager's workers make them."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from toolserver.runtimes.sandbox_jail import UidClaims, write_etc
from toolserver.runtimes.sandbox_limits import make_disk, unmount_disk
from toolserver.testing.tiers import SANDBOX

BASE, COUNT = 300_000, 64


def _claim_some(claims_dir: str, nodes_dir: str, worker: int, n: int) -> list[int]:
    claims = UidClaims(Path(claims_dir), BASE, COUNT)
    uids = []
    for i in range(n):
        node_dir = Path(nodes_dir) / f"w{worker}-{i}"
        node_dir.mkdir()
        uids.append(claims.claim(node_dir))
    return uids


def test_concurrent_claims_over_stale_ones_never_share_a_uid(tmp_path: Path) -> None:
    claims_dir, nodes = tmp_path / "claims", tmp_path / "nodes"
    nodes.mkdir()
    claims_dir.mkdir()
    for uid in range(BASE, BASE + 24):  # stale: their node directories are gone
        (claims_dir / str(uid)).write_text(str(tmp_path / "gone" / str(uid)))
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = [pool.apply_async(_claim_some, (str(claims_dir), str(nodes), w, 8)) for w in range(4)]
        uids = [uid for r in results for uid in r.get(timeout=120)]
    assert len(uids) == 32 and len(set(uids)) == 32, sorted(uids)
    holders = {int(p.name): p.read_text() for p in claims_dir.iterdir() if p.name.isdigit()}
    assert all(holders[uid].startswith(str(nodes)) for uid in uids), "a claim names another node"


def test_concurrent_creates_write_the_nodes_etc_without_failing(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    with ThreadPoolExecutor(8) as pool:
        for _ in range(100):  # a fresh data directory each round: every create writes the files
            for name in ("passwd", "group"):
                (etc / name).unlink(missing_ok=True)
            list(pool.map(lambda _: write_etc(etc), range(8)))  # raised FileNotFoundError at times
    assert "node:x:" in (etc / "passwd").read_text()
    assert sorted(p.name for p in etc.iterdir()) == ["group", "passwd"]


def _make_disk(root: str, i: int, at: float) -> bool:
    node = Path(root) / f"node{i}"
    node.mkdir()
    time.sleep(max(0.0, at - time.time()))  # all at once
    make_disk(node / "workspace.img", node / "disk", 16 << 20, Path(root) / "etc")
    return os.path.ismount(node / "disk")


def test_creates_in_several_processes_share_one_workspace_template(tmp_path: Path) -> None:
    """Worker processes or replicas sharing a data directory make the empty workspace image at
    the same moment (one of them failed: 'mkfs.ext4 failed: the file … .tmp does not exist')."""
    if SANDBOX.unavailable():
        pytest.skip(f"tier sandbox: {SANDBOX.unavailable()}")
    (tmp_path / "etc").mkdir()
    context = multiprocessing.get_context("spawn")
    try:
        with context.Pool(4) as pool:
            at = time.time() + 3  # past the workers' start-up
            mounted = pool.starmap(_make_disk, [(str(tmp_path), i, at) for i in range(4)])
        assert mounted == [True] * 4
        assert sorted(p.name for p in (tmp_path / "etc").iterdir() if not p.name.startswith(".")) == [
            f"workspace-{16 << 20}.img"
        ]
    finally:
        for i in range(4):
            unmount_disk(tmp_path / f"node{i}" / "disk")
