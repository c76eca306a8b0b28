"""Docker nodes are alone on their network and their workspace has a size: real containers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import aiodocker
import pytest
from aiodocker.exceptions import DockerError

from toolserver.errors import RuntimeBackendError
from toolserver.runtimes.docker import DockerRuntime
from toolserver.runtimes.docker_config import NO_ICC, nodes_network_name

from .conftest import SESSION, TEST_LABEL, exec_in
from .test_docker_hardening import spec, started_healthy
from .test_docker_runtime import health_200

pytestmark = pytest.mark.docker

MakeRuntime = Callable[..., DockerRuntime]

#: connect to host:port from inside a node; prints "open" or the error
CONNECT = (
    "import socket, sys\n"
    "s = socket.socket(); s.settimeout(3)\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\n"
    "except OSError as exc:\n"
    "    print('refused', exc)\n"
)


async def _networks(docker: aiodocker.Docker, name: str) -> list[dict]:
    return [n for n in await docker.networks.list(filters={"name": [name]}) if n["Name"] == name]


async def test_nodes_cannot_reach_each_other(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    rt = make_runtime()
    a = await started_healthy(rt, manager_id)
    b = await started_healthy(rt, manager_id)
    raw_b = await docker.containers.container(b.state["container_id"]).show()
    [b_net] = raw_b["NetworkSettings"]["Networks"].values()
    cid_a = a.state["container_id"]
    for host, port in ((b_net["IPAddress"], 31942), (b_net["Gateway"], b.port), ("127.0.0.1", b.port)):
        code, out = await exec_in(docker, cid_a, ["python3", "-c", CONNECT, host, str(port)])
        assert code == 0 and out.startswith("refused"), (host, port, out)
    name = nodes_network_name(manager_id)
    assert raw_b["HostConfig"]["NetworkMode"] == name
    [net] = await _networks(docker, name)
    assert net["Options"][NO_ICC] == "false"
    # published ports stay on the host's loopback, where the manager reaches them
    assert all(p["HostIp"] == "127.0.0.1" for p in raw_b["NetworkSettings"]["Ports"]["31942/tcp"])
    assert await health_200(a) and await health_200(b)


async def test_the_node_network_goes_with_the_last_node(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    rt = make_runtime()
    name = nodes_network_name(manager_id)
    first = await rt.create(spec(manager_id))
    second = await started_healthy(rt, manager_id)
    await rt.remove(first.state)
    assert await _networks(docker, name), "removed while a node still uses it"
    await rt.remove(second.state)
    assert await _networks(docker, name) == []
    again = await started_healthy(rt, manager_id)  # made again on the next create
    assert await health_200(again)
    await rt.remove(again.state)
    assert await _networks(docker, name) == []


async def test_a_foreign_network_of_that_name_is_not_joined(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    name = nodes_network_name(manager_id)
    net = await docker.networks.create({"Name": name, "Labels": {TEST_LABEL: SESSION}})
    try:
        with pytest.raises(RuntimeBackendError, match="not this manager's node network"):
            await make_runtime().create(spec(manager_id))
    finally:
        await net.delete()


@pytest.mark.skipif(os.geteuid() != 0, reason="workspace images are mounted by root")
async def test_the_workspace_has_a_size_and_keeps_it_across_restarts(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    rt = make_runtime(workspace_size="32m")
    await rt.preflight()
    info = await started_healthy(rt, manager_id)
    cid = info.state["container_id"]
    code, out = await exec_in(docker, cid, ["sh", "-c", "echo kept > /workspace/marker; df -k /workspace"])
    assert code == 0, out
    size_kib = int(out.strip().splitlines()[-1].split()[1])
    assert 16 * 1024 < size_kib <= 32 * 1024, out
    code, out = await exec_in(
        docker, cid, ["sh", "-c", "dd if=/dev/zero of=/workspace/fill bs=1M count=64 2>&1; echo rc=$?"]
    )
    assert "No space left on device" in out and "rc=0" not in out, out
    assert await health_200(info)  # the node itself keeps answering
    restarted = await rt.restart(info.state, grace=1)
    assert (await exec_in(docker, cid, ["cat", "/workspace/marker"]))[1].strip() == "kept"
    assert restarted.node_id == info.node_id
    images = rt.images
    assert images is not None
    await rt.remove(info.state)
    point, image = images.mountpoint(info.node_id), images.image(info.node_id)
    assert not await asyncio.to_thread(os.path.ismount, point)
    assert not await asyncio.to_thread(image.exists) and not await asyncio.to_thread(point.exists)
    with pytest.raises(DockerError):
        await docker.containers.container(cid).show()
