"""The sandbox tier's ``network`` setting: ``egress`` reaches the outside (a listener in a network
namespace this test makes, never an outside address) but not the host's loopback; ``none`` has only
loopback, and the web tools then say which setting to change."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ManagerProcess, wait_until
from toolserver.client import ToolServerClient
from toolserver.errors import ClientError
from toolserver.testing.tiers import SANDBOX

pytestmark = pytest.mark.skipif(bool(SANDBOX.unavailable()), reason=f"tier sandbox: {SANDBOX.unavailable()}")
PAGE = "hello from outside the sandbox"


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://ADDR:PORT/`` of a web server in a network namespace of its own, joined to the host by
    a veth pair."""
    tag = secrets.token_hex(3)
    ns, veth, subnet = (
        f"ts-egress-{tag}",
        f"tse{tag}",
        f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}",
    )
    root = tmp_path_factory.mktemp("outside")
    (root / "index.html").write_text(f"<html><body><p>{PAGE}</p></body></html>")
    ip = ["ip"]
    for argv in (
        [*ip, "netns", "add", ns],
        [*ip, "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p"],
        [*ip, "link", "set", f"{veth}p", "netns", ns],
        [*ip, "addr", "add", f"{subnet}.1/30", "dev", veth],
        [*ip, "link", "set", veth, "up"],
        [*ip, "netns", "exec", ns, "ip", "addr", "add", f"{subnet}.2/30", "dev", f"{veth}p"],
        [*ip, "netns", "exec", ns, "ip", "link", "set", f"{veth}p", "up"],
        [*ip, "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
    server = subprocess.Popen(
        [*ip, "netns", "exec", ns, sys.executable, "-m", "http.server", "8099", "--bind", f"{subnet}.2"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{subnet}.2:8099/"
    try:
        wait_until(lambda: _get(url), timeout=20, what="the outside web server")
        yield url
    finally:
        server.kill()
        server.wait()
        subprocess.run([*ip, "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run([*ip, "link", "del", veth], capture_output=True, timeout=30)


def _get(url: str) -> bool:
    import httpx

    try:
        return PAGE in httpx.get(url, timeout=1, trust_env=False).text
    except httpx.HTTPError:
        return False


def _manager(root: Path, network: str) -> ManagerProcess:
    config = {**SANDBOX.manager_config(), "runtime_config": {"network": network, "workspace_size": None}}
    return ManagerProcess(root, **config).start()


def test_egress_reaches_the_outside_but_not_the_host(outside: str, tmp_path: Path) -> None:
    manager = _manager(tmp_path, "egress")
    try:
        with ToolServerClient(manager.url) as client, client.create_session() as s:
            page = s.execute_tool("WebEnv_browse_website", {"url": outside})
            assert PAGE in str(page), page
            probe = (
                "import socket, subprocess\n"
                "gw = subprocess.run(['ip', 'route'], capture_output=True, text=True).stdout.split()\n"
                "hosts = ['127.0.0.1'] + ([gw[gw.index('via') + 1]] if 'via' in gw else [])\n"
                "for host in hosts:\n"
                "    s = socket.socket(); s.settimeout(3)\n"
                f"    print(host, 'CONNECTED' if s.connect_ex((host, {manager.port})) == 0 else 'refused')\n"
            )
            s.files.write("probe.py", probe)
            result = s.run("python probe.py", timeout=60)
            assert result.exit_code == 0 and "refused" in result.stdout, result
            assert "CONNECTED" not in result.stdout, f"the node reached the manager: {result.stdout}"
    finally:
        manager.cleanup()


def test_network_none_has_loopback_only_and_says_so(outside: str, tmp_path: Path) -> None:
    manager = _manager(tmp_path, "none")
    try:
        with ToolServerClient(manager.url) as client, client.create_session() as s:
            with pytest.raises(ClientError) as refused:
                s.execute_tool("WebEnv_browse_website", {"url": outside})
            assert "runtime_config.network" in str(refused.value), refused.value
            result = s.run(f"python -c \"import urllib.request as u; u.urlopen('{outside}', timeout=3)\"")
            assert result.exit_code != 0
            assert s.run("ip -o link show | grep -v ' lo:' | wc -l").stdout.strip() == "0"
    finally:
        manager.cleanup()
