"""Pause, resume and fork of Docker nodes (the :class:`DockerRuntime` methods of the same names).

Pause is Docker's (``POST /containers/{id}/pause``, the cgroup freezer): processes and memory
stay. A fork commits the source container's filesystem changes (what the agent installed outside
the workspace) to an image ``toolserver-fork:<new node id>`` without pausing the source, creates
the new node's volume and container from that image, and streams the source's ``/workspace`` into
the new volume through the Engine's archive API (no helper container; the tar never touches the
manager's disk). The image goes with the forked node (:meth:`DockerRuntime.remove`). The image
keeps no secret: the source's node secret is blanked in it, and the new node gets its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import aiodocker

from toolserver.errors import NodeNotFound, RuntimeBackendError
from toolserver.protocol import SECRET_ENV
from toolserver.runtimes.base import HEALTHY, LABEL_MANAGER, LABEL_NODE, PAUSED, STARTING, NodeInfo, NodeSpec
from toolserver.runtimes.docker_config import WORKSPACE

if TYPE_CHECKING:
    from toolserver.runtimes.docker import DockerRuntime

#: Repository of the images forks start from; the tag is the forked node's id.
FORK_REPOSITORY = "toolserver-fork"
#: Longest a commit or a workspace copy may take.
FORK_TIMEOUT = 600.0
ARCHIVE_CHUNK = 256 * 1024
#: How long a resume waits for the node's GET /health to answer.
RESUME_PROBE_SECONDS = 10.0


def fork_image(node_id: str) -> str:
    return f"{FORK_REPOSITORY}:{node_id}"


async def pause(runtime: DockerRuntime, state: dict[str, Any]) -> NodeInfo:
    ref = runtime._ref(state)

    async def do(docker: aiodocker.Docker) -> dict[str, Any]:
        container = docker.containers.container(ref)
        data = await container.show()
        if (data.get("State") or {}).get("Status") != PAUSED:
            await container.pause()
            data = await container.show()
        return data

    return runtime._info(await runtime._api("pause", do, missing=True))


async def resume(runtime: DockerRuntime, state: dict[str, Any]) -> NodeInfo:
    ref = runtime._ref(state)

    async def do(docker: aiodocker.Docker) -> dict[str, Any]:
        container = docker.containers.container(ref)
        if ((await container.show()).get("State") or {}).get("Status") == PAUSED:
            await container.unpause()
        return await container.show()

    info = runtime._info(await runtime._api("unpause", do, missing=True))
    await _answering(runtime, info)
    return info


async def _answering(runtime: DockerRuntime, info: NodeInfo) -> None:
    """Report a just-unpaused node healthy once its GET /health answers 200. Docker's own probe
    failed while the container was frozen and says "unhealthy" until its next run (30 s later)."""
    if info.health == HEALTHY or not (info.host and info.port):
        return
    saved, info.health = info.health, STARTING
    deadline = time.monotonic() + RESUME_PROBE_SECONDS
    while True:
        await runtime._confirm_ready([info])
        if info.health == HEALTHY:
            return
        if time.monotonic() > deadline:
            info.health = saved
            return
        await asyncio.sleep(0.02)


async def fork(runtime: DockerRuntime, state: dict[str, Any], spec: NodeSpec) -> NodeInfo:
    ref = runtime._ref(state)
    image = fork_image(spec.node_id)
    changes = [
        f"ENV {SECRET_ENV}=",
        f"LABEL {LABEL_MANAGER}={spec.manager_id} {LABEL_NODE}={spec.node_id}",
    ]

    async def commit(docker: aiodocker.Docker) -> None:
        await docker.containers.container(ref).commit(
            repository=FORK_REPOSITORY, tag=spec.node_id, changes=changes, pause=False
        )

    await runtime._api("commit", commit, limit=FORK_TIMEOUT, missing=True)
    try:
        info = await runtime._create(spec, image=image)
    except BaseException:
        await remove_image(runtime, spec.node_id)
        raise
    try:
        await copy_workspace(runtime, ref, runtime._ref(info.state))
    except BaseException:
        await runtime.remove(info.state)
        raise
    return info


async def copy_workspace(runtime: DockerRuntime, source: str, target: str) -> None:
    """Stream the source container's workspace into the target's (a created container)."""

    async def copy(docker: aiodocker.Docker) -> None:
        params = {"path": f"{WORKSPACE}/."}
        async with docker._query(f"containers/{source}/archive", params=params) as tar:

            async def chunks() -> Any:
                async for chunk in tar.content.iter_chunked(ARCHIVE_CHUNK):
                    yield chunk

            put = {"path": WORKSPACE, "noOverwriteDirNonDir": "true"}
            headers = {"Content-Type": "application/x-tar"}
            async with docker._query(
                f"containers/{target}/archive", method="PUT", params=put, data=chunks(), headers=headers
            ):
                pass

    try:
        await runtime._api("copy workspace", copy, limit=FORK_TIMEOUT, missing=True)
    except NodeNotFound as exc:
        raise RuntimeBackendError(f"cannot copy the workspace of the forked node: {exc}") from None


async def remove_image(runtime: DockerRuntime, node_id: str) -> None:
    """Delete a forked node's image; none (404) or still used by a fork of it (409) is fine."""

    async def rm(docker: aiodocker.Docker) -> None:
        await docker.images.delete(fork_image(node_id), force=False)

    await runtime._api("image rm", rm, ok=(404, 409))
