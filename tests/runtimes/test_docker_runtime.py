"""The Docker runtime against a real Docker Engine: lifecycle, list, orphans, an unreachable Engine.

Nodes are reached only through ports published on 127.0.0.1.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import aiodocker
import httpx
import pytest

from toolserver.errors import NodeNotFound, RuntimeUnavailable
from toolserver.runtimes.base import LABEL_MANAGER, LABEL_NODE, NodeInfo, NodeSpec, RuntimeContext
from toolserver.runtimes.docker import DockerConfig, DockerRuntime

from .conftest import IMAGE, SESSION, TEST_LABEL, exec_in, wait_for

pytestmark = pytest.mark.docker

MakeRuntime = Callable[..., DockerRuntime]


def spec(manager_id: str) -> NodeSpec:
    return NodeSpec(node_id=f"t{uuid.uuid4().hex[:8]}", manager_id=manager_id, secret=uuid.uuid4().hex)


async def health_200(info: NodeInfo) -> bool:
    assert info.host == "127.0.0.1", "tests only talk to loopback"
    async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
        try:
            return (await client.get(f"http://127.0.0.1:{info.port}/health")).status_code == 200
        except httpx.HTTPError:
            return False


async def test_lifecycle_keeps_the_workspace(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    rt = make_runtime()
    s = spec(manager_id)
    created = await rt.create(s)
    assert created.status == "created" and created.node_id == s.node_id
    state = created.state

    info = await rt.start(state)
    assert info.status == "running"
    seen = [info.health]

    async def healthy() -> NodeInfo | None:
        current = await rt.inspect(state)
        seen.append(current.health)
        return current if current.health == "healthy" else None

    info = await wait_for(healthy, what="docker health 'healthy'")
    assert seen[0] == "starting" and seen[-1] == "healthy" and "unhealthy" not in seen
    assert info.host == "127.0.0.1" and info.port > 0
    raw = await docker.containers.container(state["container_id"]).show()
    assert raw["NetworkSettings"]["Ports"]["31942/tcp"][0]["HostIp"] == "127.0.0.1"
    assert await health_200(info)

    code, _ = await exec_in(docker, state["container_id"], ["sh", "-c", "echo kept > /workspace/note.txt"])
    assert code == 0

    await rt.stop(state, grace=2)
    stopped = await rt.inspect(state)
    assert stopped.status == "exited" and stopped.port == 0
    await rt.stop(state, grace=2)  # stopping a stopped node is a no-op

    info = await rt.start(state)
    assert info.status == "running"
    code, out = await exec_in(docker, state["container_id"], ["cat", "/workspace/note.txt"])
    assert (code, out.strip()) == (0, "kept")

    info = await rt.restart(state, grace=2)
    assert info.status == "running" and info.port > 0
    code, out = await exec_in(docker, state["container_id"], ["cat", "/workspace/note.txt"])
    assert (code, out.strip()) == (0, "kept")

    await rt.kill(state)
    killed = await rt.inspect(state)
    assert killed.status == "exited" and killed.detail and "137" in killed.detail
    await rt.kill(state)  # killing a stopped node is a no-op

    await rt.remove(state)
    await rt.remove(state)  # removed twice is fine
    with pytest.raises(NodeNotFound):
        await rt.inspect(state)
    await rt.stop(state)  # gone counts as done
    await rt.kill(state)
    assert (await docker.volumes.list(filters={"name": [state["volume"]]})).get("Volumes") in (None, [])
    assert await rt.list(manager_id) == []


async def docker_health(docker: aiodocker.Docker, cid: str) -> tuple[str, str]:
    """(State.Health.Status of inspect, Status text of the list) as Docker itself says them."""
    raw = await docker.containers.container(cid).show()
    listed = await docker.containers.list(all=True, filters={"id": [cid]})
    return raw["State"]["Health"]["Status"], listed[0]["Status"]


async def test_the_image_healthcheck_makes_docker_say_healthy(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    """The image's own probe command, run every 0.5 s instead of 30 s to keep the test short."""
    test = (await docker.images.inspect(IMAGE))["Config"]["Healthcheck"]["Test"]
    check = {"test": test, "interval": 5 * 10**8, "timeout": 3 * 10**9, "retries": 3}
    rt = make_runtime(creation_kwargs={"healthcheck": check})
    info = await rt.start((await rt.create(spec(manager_id))).state)
    cid = info.state["container_id"]

    async def docker_says_healthy() -> bool:
        return (await docker_health(docker, cid))[0] == "healthy"

    await wait_for(docker_says_healthy, what="Docker's own health 'healthy'")
    assert "(healthy)" in (await docker_health(docker, cid))[1]
    assert [n.health for n in await rt.list(manager_id)] == ["healthy"]
    assert (await rt.inspect(info.state)).health == "healthy"


async def test_docker_unhealthy_is_reported_even_if_health_answers(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    # start_period 0 would inherit the image's 60 s, during which failures do not count
    check = {
        "test": ["CMD", "false"],
        "interval": 5 * 10**8,
        "timeout": 10**9,
        "retries": 1,
        "start_period": 10**6,
    }
    rt = make_runtime(creation_kwargs={"healthcheck": check})
    info = await rt.start((await rt.create(spec(manager_id))).state)

    async def unhealthy() -> bool:
        return (await docker_health(docker, info.state["container_id"]))[0] == "unhealthy"

    await wait_for(unhealthy, what="Docker's health 'unhealthy'")
    await wait_for(lambda: health_200(info), what="the node's /health")
    assert (await rt.inspect(info.state)).health == "unhealthy"
    assert [n.health for n in await rt.list(manager_id)] == ["unhealthy"]


async def test_docker_kill_shows_exited_in_one_list_call(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = make_runtime()
    a = await rt.create(spec(manager_id))
    b = await rt.create(spec(manager_id))
    await rt.start(a.state)
    await rt.start(b.state)
    await docker.containers.container(a.state["container_id"]).kill()  # docker kill, behind our back

    calls: list[str] = []
    real_list = aiodocker.containers.DockerContainers.list
    real_show = aiodocker.containers.DockerContainer.show

    async def counted_list(self: object, **kw: object) -> object:
        calls.append("list")
        return await real_list(self, **kw)  # type: ignore[arg-type]

    async def counted_show(self: object, **kw: object) -> object:
        calls.append("show")
        return await real_show(self, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(aiodocker.containers.DockerContainers, "list", counted_list)
    monkeypatch.setattr(aiodocker.containers.DockerContainer, "show", counted_show)
    nodes = {n.node_id: n for n in await rt.list(manager_id)}
    assert calls == ["list"]
    assert nodes[a.node_id].status == "exited" and "137" in (nodes[a.node_id].detail or "")
    assert nodes[b.node_id].status == "running" and nodes[b.node_id].port > 0


async def test_orphan_is_listed_and_removed_by_label(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    rt = make_runtime()
    node_id = f"orphan{uuid.uuid4().hex[:6]}"
    labels = {LABEL_MANAGER: manager_id, LABEL_NODE: node_id, "toolserver.role": "node", TEST_LABEL: SESSION}
    # a container left behind by an earlier manager run (made by hand, not through the runtime)
    await docker.containers.create(
        {"Image": IMAGE, "Labels": labels, "Entrypoint": ["sleep", "300"], "User": "10001:10001"},
        name=f"toolserver-node-{node_id}",
    )
    other = make_runtime()  # the same manager id seen by a "restarted" manager
    found = [n for n in await other.list(manager_id) if n.node_id == node_id]
    assert len(found) == 1 and found[0].status == "created"
    await other.remove(found[0].state)
    assert [n for n in await rt.list(manager_id) if n.node_id == node_id] == []
    # a workspace volume whose container went away behind our back
    await docker.volumes.create({"Name": f"toolserver-node-{node_id}-workspace", "Labels": labels})
    assert await other.prune_volumes(manager_id) == [f"toolserver-node-{node_id}-workspace"]
    assert await other.prune_volumes(manager_id) == []


async def test_create_fails_clearly_for_a_missing_image(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    rt = make_runtime(image="toolserver-node-does-not-exist:0")
    with pytest.raises(Exception, match="make node-image") as err:
        await rt.create(spec(manager_id))
    assert not isinstance(err.value, RuntimeUnavailable)
    assert await rt.list(manager_id) == []
    volumes = await docker.volumes.list(filters={"label": [f"{LABEL_MANAGER}={manager_id}"]})
    assert not volumes.get("Volumes")  # the workspace volume made for it is gone again


async def test_network_address_mode_reports_the_container_address(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    net_name = f"{manager_id}-net"
    labels = {LABEL_MANAGER: manager_id, TEST_LABEL: SESSION}
    await docker.networks.create({"Name": net_name, "Labels": labels})
    rt = make_runtime(address_mode="network", network=net_name)
    info = await rt.start((await rt.create(spec(manager_id))).state)
    # only read, never connected to: the address is on a bridge, not loopback
    assert info.port == 31942 and info.host not in ("127.0.0.1", "", "0.0.0.0")
    raw = await docker.containers.container(info.state["container_id"]).show()
    assert raw["HostConfig"]["PortBindings"] in (None, {})
    assert info.host == raw["NetworkSettings"]["Networks"][net_name]["IPAddress"]
    listed = await rt.list(manager_id)
    assert [(n.host, n.port) for n in listed] == [(info.host, 31942)]


async def test_recovers_when_the_engine_comes_back(
    manager_id: str, tmp_path: Path, docker_available: None
) -> None:
    """A socket that is missing, then appears: the next call works without a new runtime."""
    real = (os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock").removeprefix("unix://")
    link = tmp_path / "docker.sock"
    rt = DockerRuntime(DockerConfig(docker_url=f"unix://{link}"), RuntimeContext(tmp_path, manager_id))
    with pytest.raises(RuntimeUnavailable):
        await rt.list(manager_id)
    with pytest.raises(RuntimeUnavailable):
        await rt.ping()
    link.symlink_to(real)  # "Docker is back"
    assert await rt.list(manager_id) == []
    assert (await rt.ping())["ApiVersion"]
    await rt.aclose()
