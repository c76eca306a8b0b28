"""Benchmark 3: a 1 GiB upload and a 1 GiB download through the manager, and its peak RSS growth.

One real manager subprocess (process runtime) and one session. A 1 GiB file of varied bytes is
written to the scratch dir first (so it is in the page cache), then:

* reference, the node directly (its port and secret): ``POST /upload_file`` (multipart, field
  ``file``), then ``POST /download_file``;
* through the manager (session cookie): the same upload under another name, then its download.

The client is curl, a separate process (so the client's CPU is not the manager's, and costs
little): the upload is a streamed multipart form (``-F file=@...``, no ``Expect: 100-continue``),
the download goes to /dev/null and its byte count is checked. MB/s is
10^6 bytes per second of wall time from the request's start to the end of its answer. A thread
samples the manager's RSS every 5 ms (psutil); the growth is the peak during the transfer minus
the RSS just before it, after a warm-up transfer of 16 MiB each way.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx

from bench import profiling
from bench.common import GIB, MIB, Context, Figure, Outcome, at_least, at_most, node_address
from bench.procs import Manager
from bench.rss import PeakRss
from toolserver.testing.tiers import SANDBOX

NAME = "streaming"
TITLE = "Streaming"
MBPS_TARGET = 200.0
RSS_TARGET_MIB = 64.0


def write_file(path: Path, size: int) -> None:
    """``size`` bytes: a 1 MiB pseudo-random block, each copy stamped with its index."""
    import random

    block = random.Random(5).randbytes(MIB)
    with path.open("wb") as out:
        for i in range(size // MIB):
            out.write(i.to_bytes(8, "big") + block[8:])
        out.write(block[: size % MIB])


def _direct(record: Any) -> tuple[str, dict[str, str], str | None]:
    base_url, unix_socket = node_address(record)
    return base_url, {"X-ToolServer-Node-Secret": record["secret"]}, unix_socket


class Target:
    """Where uploads and downloads go (the node directly or the manager), driven by curl."""

    def __init__(self, base_url: str, headers: dict[str, str], unix_socket: str | None = None) -> None:
        self.base_url = base_url
        self.headers = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
        if unix_socket is not None:
            self.headers += ["--unix-socket", unix_socket]

    def _curl(self, path: str, args: list[str]) -> dict[str, Any]:
        fmt = (
            '{"code": %{http_code}, "seconds": %{time_total}, "down": %{size_download}, "up": %{size_upload}}'
        )
        argv = ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", fmt, *self.headers, "-H", "Expect:"]
        done = subprocess.run(
            [*argv, *args, self.base_url + path], capture_output=True, text=True, timeout=900, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"curl {path} failed: {done.stderr.strip()}")
        result: dict[str, Any] = json.loads(done.stdout)
        if result["code"] != 200:
            raise RuntimeError(f"{path} answered {result['code']}")
        return result

    def upload(self, path: Path, name: str) -> float:
        form = f"file=@{path};filename={name};type=application/octet-stream"
        return float(self._curl("/upload_file", ["-F", form])["seconds"])

    def download(self, name: str, expected: int) -> float:
        body = json.dumps({"file_path": name})
        result = self._curl("/download_file", ["-H", "Content-Type: application/json", "-d", body])
        if result["down"] != expected:
            raise RuntimeError(f"downloaded {result['down']} bytes, expected {expected}")
        return float(result["seconds"])


def _transfer(
    target: Target, src: Path, name: str, size: int, pid: int | None, ctx: Context, profile: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for way in ("upload", "download"):
        with PeakRss(pid) if pid else _Null() as rss:
            if profile:
                with profiling.attach(pid or 0, ctx.results_dir / f"streaming-{way}.pyspy.txt") as info:
                    seconds = target.upload(src, name) if way == "upload" else target.download(name, size)
                out[f"{way}_profile"] = info
            else:
                seconds = target.upload(src, name) if way == "upload" else target.download(name, size)
        out[way] = {"seconds": seconds, "mb_per_s": size / 1e6 / seconds}
        if isinstance(rss, PeakRss):
            out[way].update(rss_baseline=rss.baseline, rss_peak=rss.peak, rss_growth_mib=rss.growth / MIB)
    return out


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    size = GIB if not ctx.quick else 256 * MIB
    root = ctx.workdir / "streaming"
    root.mkdir(parents=True, exist_ok=True)
    src, warm = root / "payload.bin", root / "warm.bin"
    write_file(src, size)
    write_file(warm, 16 * MIB)
    # the default tier's workspace is a 1 GiB image: room for the 1 GiB files both ways
    tier = {"isolation": "sandbox", "runtime_config": {**SANDBOX.runtime_config, "workspace_size": "4g"}}
    with Manager(root / "manager", **tier) as manager:
        with httpx.Client(base_url=manager.url, trust_env=False, timeout=120) as http:
            cookie = http.post("/get_cookie").cookies["node_id"]
        record = manager.node(cookie)
        direct = Target(*_direct(record))
        via = Target(manager.url, {"Cookie": f"node_id={cookie}"})
        try:
            _transfer(via, warm, "warm.bin", 16 * MIB, None, ctx)
            ref = _transfer(direct, src, "direct.bin", size, None, ctx)
            workspace = manager.data_dir / "nodes" / record["short_id"] / "workspace"
            (workspace / "direct.bin").unlink(missing_ok=True)  # disk space: one copy at a time
            got = _transfer(via, src, "via-manager.bin", size, manager.pid, ctx)
            (workspace / "via-manager.bin").unlink(missing_ok=True)
            missed = any(
                (got[w]["mb_per_s"] < MBPS_TARGET or got[w]["rss_growth_mib"] > RSS_TARGET_MIB)
                for w in ("upload", "download")
            )
            if ctx.profile or missed:
                prof = _transfer(via, src, "profiled.bin", size, manager.pid, ctx, profile=True)
                outcome.raw["profiled_run"] = prof
                for way in ("upload", "download"):
                    info = prof.get(f"{way}_profile", {})
                    if "summary" in info:
                        outcome.notes.append(
                            f"py-spy, manager during the {way}:\n" + profiling.describe(info["summary"])
                        )
        finally:
            src.unlink(missing_ok=True)
    outcome.raw.update(size_bytes=size, direct=ref, manager=got)
    label = "1 GiB" if size == GIB else f"{size // MIB} MiB"
    for way in ("upload", "download"):
        outcome.add(
            Figure(
                NAME,
                f"{label} {way} through the manager",
                got[way]["mb_per_s"],
                "MB/s",
                f"node directly {ref[way]['mb_per_s']:.0f} MB/s",
                f"≥ {MBPS_TARGET:g} MB/s",
                at_least(got[way]["mb_per_s"], MBPS_TARGET),
            ),
            Figure(
                NAME,
                f"{label} {way}: manager peak RSS growth",
                got[way]["rss_growth_mib"],
                "MiB",
                f"manager RSS before {got[way]['rss_baseline'] / MIB:.0f} MiB",
                f"≤ {RSS_TARGET_MIB:g} MiB",
                at_most(got[way]["rss_growth_mib"], RSS_TARGET_MIB),
            ),
        )
    if size != GIB:
        outcome.notes.append(f"--quick: {label} instead of 1 GiB.")
    return outcome
