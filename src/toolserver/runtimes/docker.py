"""The Docker runtime: every node is a hardened container, driven through the Engine API (aiodocker).

A node is a container ``toolserver-node-<node_id>`` plus a named volume
``toolserver-node-<node_id>-workspace`` mounted at ``/workspace``; both carry the labels
``toolserver.manager_id`` and ``toolserver.node_id``, by which :meth:`DockerRuntime.list` finds
them (one labelled ``GET /containers/json`` call) and orphans are cleaned up. ``restart`` keeps
the volume, ``remove`` deletes container and volume.

Its config is :class:`DockerConfig` (``runtime_config`` of ``isolation: docker``).

Address modes (``runtime_config.address_mode``): ``published`` publishes the node port on 127.0.0.1 with a
random host port, reported as ``127.0.0.1:<port>``; ``network`` reports the container's address on
``runtime_config.network`` and the node's own port, for a manager that runs in a container on that network.

Status and health are Docker's (``State.Status``, ``State.Health.Status``; in ``list`` the Status
text), except that a node Docker still calls "starting" is reported healthy once its GET /health
answers 200: Docker 20.10 probes only every healthcheck interval (30 s in the image, as exec probes
are costly), and the manager should not wait that long for a ready node.

The client connects lazily and is dropped whenever the Engine cannot be reached, so the runtime
recovers by itself when Docker comes back; until then every call raises RuntimeUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiodocker
import aiohttp
import httpx
from aiodocker.exceptions import DockerError
from aiodocker.networks import DockerNetwork
from aiodocker.volumes import DockerVolume

from toolserver.errors import ConfigError, NodeNotFound, RuntimeBackendError, RuntimeUnavailable
from toolserver.runtimes import docker_fork
from toolserver.runtimes.base import (
    HEALTHY,
    LABEL_MANAGER,
    LABEL_NODE,
    RUNNING,
    STARTING,
    NodeInfo,
    NodeSpec,
    Runtime,
    RuntimeContext,
)
from toolserver.runtimes.docker_config import (
    LABEL_ROLE,
    NO_ICC,
    NODE_USER,
    ROLE_NETWORK,
    ROLE_NODE,
    DockerConfig,
    NodeTemplate,
    check_node_id,
    container_name,
    parse_size,
    volume_name,
)
from toolserver.runtimes.docker_state import from_inspect, from_list_entry
from toolserver.runtimes.workspace_image import WorkspaceImages

__all__ = ["DockerConfig", "DockerRuntime"]

log = logging.getLogger(__name__)

DEFAULT_URL = "unix:///var/run/docker.sock"
#: Longest wait for one Engine API call (stop/restart add their grace period).
CALL_TIMEOUT = 30.0
PULL_TIMEOUT = 600.0
#: Timeout of the runtime's own GET /health while Docker still says "starting".
PROBE_TIMEOUT = 1.0
#: aiodocker reports a failed connection as status 900.
_UNREACHABLE = 900
#: Engine errors that mean the Engine cannot do anything right now (it is shutting down, or lost
#: containerd), as opposed to a request it refuses.
_OUTAGE_WORDS = (
    "shutting down",
    "connection refused",
    "transport is closing",
    "error reading from server",
    "context canceled",
    "containerd",
)
#: Fields of a ``GET /containers/json`` item that NodeInfo is made from.
_LIST_KEYS = ("Id", "Names", "State", "Status", "Labels", "Ports", "NetworkSettings")
T = TypeVar("T")


def _says_outage(message: str) -> bool:
    text = message.lower()
    return any(word in text for word in _OUTAGE_WORDS)


class DockerRuntime(Runtime):
    """Nodes as Docker containers (see the module docstring)."""

    name = "docker"
    #: create (with a pull of a missing image) and start
    start_budget = PULL_TIMEOUT + 2 * CALL_TIMEOUT
    config_model = DockerConfig

    def __init__(self, config: DockerConfig, context: RuntimeContext) -> None:
        super().__init__(config, context)
        self.template = NodeTemplate.from_config(config, context)
        self.url = config.engine_url() or DEFAULT_URL
        version = os.environ.get("DOCKER_API_VERSION", "").strip()
        self.api_version = f"v{version.lstrip('v')}" if version else "auto"
        self._client: aiodocker.Docker | None = None
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: creates in flight: the node network is not removed while one may be about to join it
        self._creating = 0
        #: one network check/create at a time: concurrent creates of a missing network can make two
        #: of the same name (the Engine's duplicate check is best effort), which nodes then fail to join
        self._network_lock = asyncio.Lock()
        self.images: WorkspaceImages | None = None
        if config.workspace_size is not None:
            size = parse_size(config.workspace_size, "runtime_config.workspace_size")
            self.images = WorkspaceImages(context.data_dir / "docker-workspaces", size, NODE_USER)

    # ---- the client ---------------------------------------------------------------------------------

    def _docker(self) -> aiodocker.Docker:
        """The client, (re)made on first use, after a failure, or on another event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._client = self._http = None  # bound to a loop that is gone
        if self._client is None:
            try:
                self._client = aiodocker.Docker(
                    url=self.url,
                    api_version=self.api_version,
                    timeout=aiohttp.ClientTimeout(total=None, connect=10),
                )
            except (ValueError, AssertionError) as exc:
                raise RuntimeUnavailable(f"cannot use Docker Engine address {self.url!r}: {exc}") from exc
            self._loop = loop
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            with contextlib.suppress(Exception):
                await client.close()

    async def _confirm_ready(self, infos: list[NodeInfo]) -> None:
        """Docker's first probe comes one healthcheck interval after the start (20.10 has no
        start interval): while it says "starting", a 200 from GET /health on the node's address
        (one cheap HTTP request, no exec) reports the node healthy. Never overrides "unhealthy"."""
        waiting = [i for i in infos if i.status == RUNNING and i.health == STARTING and i.port and i.host]
        if not waiting:
            return
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=PROBE_TIMEOUT, trust_env=False)
        http = self._http

        async def probe(info: NodeInfo) -> None:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://{info.host}:{info.port}/health")).status_code == 200:
                    info.health = HEALTHY

        await asyncio.gather(*(probe(i) for i in waiting))

    def _unavailable(self, reason: object) -> RuntimeUnavailable:
        return RuntimeUnavailable(
            f"Docker Engine unreachable at {self.url}: {reason} "
            "(start it with scripts/ensure-docker.sh, or set runtime_config.docker_url)"
        )

    async def _api(
        self,
        action: str,
        fn: Callable[[aiodocker.Docker], Awaitable[T]],
        *,
        limit: float = CALL_TIMEOUT,
        ok: tuple[int, ...] = (),
        missing: bool = False,
    ) -> T | None:
        """Run ``fn(client)`` and map failures: statuses in ``ok`` count as done (None), 404 raises
        NodeNotFound when ``missing``, an unreachable or hung Engine raises RuntimeUnavailable,
        any other Engine error RuntimeBackendError."""
        docker = self._docker()
        try:
            async with asyncio.timeout(limit):
                return await fn(docker)
        except DockerError as exc:
            if exc.status == _UNREACHABLE:
                await self._drop_client()
                raise self._unavailable(exc.message) from None
            if exc.status == 503 or (exc.status >= 500 and _says_outage(exc.message)):
                raise self._unavailable(f"{action}: {exc.message}") from None
            if exc.status in ok:
                return None
            if missing and exc.status == 404:
                raise NodeNotFound(f"docker {action}: {exc.message}") from None
            raise RuntimeBackendError(f"docker {action} failed: {exc.message} (HTTP {exc.status})") from None
        except TimeoutError:
            await self._drop_client()
            raise self._unavailable(f"no answer to {action} within {limit:.0f}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            await self._drop_client()
            raise self._unavailable(exc) from None

    @staticmethod
    def _ref(state: dict[str, Any]) -> str:
        ref = state.get("container_id") or state.get("container")
        if not ref and state.get("node_id"):
            ref = container_name(str(state["node_id"]))
        if not ref:
            raise NodeNotFound("runtime state names no container")
        return str(ref)

    def _info(self, data: dict[str, Any]) -> NodeInfo:
        t = self.template
        return from_inspect(data, address_mode=t.address_mode, network=t.network, port=t.port)

    # ---- contract -----------------------------------------------------------------------------------

    async def create(self, spec: NodeSpec) -> NodeInfo:
        return await self._create(spec)

    async def _create(self, spec: NodeSpec, image: str | None = None) -> NodeInfo:
        """Create the node's volume and container (from ``image`` instead of the node image: a fork)."""
        check_node_id(spec.node_id)
        workspace = None
        if self.images is not None:
            workspace = str(self.images.mountpoint(spec.node_id))
        body = self.template.container_body(spec, workspace)
        if image is not None:
            body["Image"] = image
        name = container_name(spec.node_id)
        volume = volume_name(spec.node_id)
        made_volume = False

        async def create(docker: aiodocker.Docker) -> dict[str, Any] | None:
            """The new container's inspect data; None when the image is missing."""
            nonlocal made_volume
            await self._ensure_network(docker, spec.manager_id)
            if self.images is None:  # else the workspace is the image mounted before
                try:
                    await docker.volumes.get(volume)
                except DockerError as exc:
                    if exc.status != 404:
                        raise
                    await docker.volumes.create(self.template.volume_body(spec))
                    made_volume = True
            try:
                container = await docker.containers.create(body, name=name)
            except DockerError as exc:
                if exc.status == 404 and "network" in exc.message.lower():
                    # removed by another process of this manager as its last node went: make it again
                    await self._ensure_network(docker, spec.manager_id)
                    container = await docker.containers.create(body, name=name)
                    return await container.show()
                if exc.status == 404 and "image" in exc.message.lower():
                    return None
                if exc.status != 409:
                    raise
                await self._replace_stale(docker, name, spec)
                container = await docker.containers.create(body, name=name)
            return await container.show()

        self._creating += 1
        made_image = False
        try:
            if self.images is not None:
                made_image = not await asyncio.to_thread(self.images.image(spec.node_id).exists)
                await (self.images.make(spec.node_id) if made_image else self.images.mount(spec.node_id))
            data = await self._api("create", create)
            if data is None:
                await self._pull(str(body["Image"]))
                data = await self._api("create", create)
            if data is None:
                raise RuntimeBackendError(f"node image {body['Image']!r} is still missing after a pull")
        except BaseException:
            if made_volume:
                with contextlib.suppress(Exception):
                    await self._api("volume rm", lambda docker: self._remove_volume(docker, volume))
            if made_image and self.images is not None:
                with contextlib.suppress(Exception):
                    await self.images.remove(spec.node_id)
            raise
        finally:
            self._creating -= 1
        return self._info(data)

    async def _ensure_network(self, docker: aiodocker.Docker, manager_id: str) -> None:
        """Make the manager's node network (a bridge with inter-container traffic off) if missing.

        One network per manager rather than one per node: every node is alone on it all the same
        (the bridge drops node-to-node packets), and Docker's default address pools hold only
        about 30 networks, fewer than ``node.max_nodes``. A network of that name that is not this
        manager's or lets containers talk to each other is refused, never joined.
        """
        if self.template.network:
            return  # the operator's network (or none): used as configured
        async with self._network_lock:
            await self._ensure_network_once(docker, manager_id)

    async def _ensure_network_once(self, docker: aiodocker.Docker, manager_id: str) -> None:
        name = self.template.node_network(manager_id)
        assert name is not None
        try:
            net = await docker.networks.get(name)
            data = await net.show()
        except DockerError as exc:
            if exc.status != 404:
                raise
            try:
                await docker.networks.create(self.template.network_body(manager_id))
                log.info("created node network %s (inter-container traffic off)", name)
                return
            except DockerError as again:
                if again.status != 409:
                    raise
                data = await (await docker.networks.get(name)).show()
        labels = data.get("Labels") or {}
        if labels.get(LABEL_MANAGER) != manager_id or (data.get("Options") or {}).get(NO_ICC) != "false":
            raise RuntimeBackendError(
                f"a Docker network named {name} exists that is not this manager's node network "
                f"(with {NO_ICC}=false); remove it or give the manager another manager_id"
            )

    async def _drop_network_if_unused(self, manager_id: str) -> None:
        """Remove the manager's node network once no container of the manager is left."""
        if self.template.network or self._creating:
            return
        name = self.template.node_network(manager_id)
        filters = {"label": [f"{LABEL_MANAGER}={manager_id}", f"{LABEL_ROLE}={ROLE_NODE}"]}

        async def drop(docker: aiodocker.Docker) -> None:
            if await docker.containers.list(all=True, filters=filters) or self._creating:
                return
            nets = await docker.networks.list(
                filters={"name": [name], "label": [f"{LABEL_ROLE}={ROLE_NETWORK}"]}
            )
            for net in nets:
                if net.get("Name") == name and (net.get("Labels") or {}).get(LABEL_MANAGER) == manager_id:
                    await DockerNetwork(docker, net["Id"]).delete()

        # 403/409: a container joined meanwhile (it is in use); 404: gone already
        async with self._network_lock:
            await self._api("network rm", drop, ok=(403, 404, 409))

    async def _pull(self, image: str) -> None:
        log.info("node image %s is missing: pulling it", image)

        async def pull(docker: aiodocker.Docker) -> None:
            try:
                async with asyncio.timeout(PULL_TIMEOUT):
                    await docker.images.pull(image)
            except TimeoutError:
                raise RuntimeBackendError(f"pulling {image!r} took more than {PULL_TIMEOUT:.0f}s") from None

        try:
            await self._api("pull", pull, limit=PULL_TIMEOUT + CALL_TIMEOUT)
        except RuntimeUnavailable:
            raise
        except RuntimeBackendError as exc:
            raise RuntimeBackendError(
                f"node image {image!r} is missing and cannot be pulled ({exc}); "
                "build it with 'make node-image' (scripts/build-node-image.sh) or set runtime_config.image"
            ) from None

    async def _replace_stale(self, docker: aiodocker.Docker, name: str, spec: NodeSpec) -> None:
        """A container of that name exists: replace it if it is a leftover of the same manager."""
        old = await docker.containers.get(name)
        labels = old["Config"].get("Labels") or {}
        if labels.get(LABEL_MANAGER) != spec.manager_id:
            raise RuntimeBackendError(f"a container named {name} exists and is not this manager's")
        log.warning("replacing leftover container %s", name)
        await old.delete(force=True, v=True)

    async def preflight(self) -> None:
        """With ``workspace_size``, the host must be able to mount workspace images (root, mkfs.ext4)."""
        if self.images is not None and (why := WorkspaceImages.missing()):
            raise ConfigError(
                f"runtime_config.workspace_size is set but {why}; run the manager as root on the "
                "Docker host, or leave workspace_size unset (Docker volumes, no size limit)"
            )

    async def _mount_workspace(self, state: dict[str, Any]) -> None:
        """Mount a size-limited workspace again where it is not (after a host reboot)."""
        node_id = str(state.get("node_id") or "")
        if self.images is not None and node_id:
            check_node_id(node_id)
            await self.images.mount(node_id)

    async def start(self, state: dict[str, Any]) -> NodeInfo:
        ref = self._ref(state)
        await self._mount_workspace(state)

        async def start(docker: aiodocker.Docker) -> dict[str, Any]:
            await docker.containers.container(ref).start()  # 304 (already running) is no error
            return await docker.containers.container(ref).show()

        return self._info(await self._api("start", start, missing=True))

    async def stop(self, state: dict[str, Any], grace: float = 5.0) -> None:
        ref = self._ref(state)
        t = max(0, round(grace))

        async def stop(docker: aiodocker.Docker) -> None:
            await docker.containers.container(ref).stop(t=t)

        # 304 already stopped, 404 gone, 409 being removed: all count as done
        await self._api("stop", stop, limit=CALL_TIMEOUT + t, ok=(304, 404, 409))

    async def restart(self, state: dict[str, Any], grace: float = 5.0) -> NodeInfo:
        ref = self._ref(state)
        await self._mount_workspace(state)
        t = max(0, round(grace))

        async def restart(docker: aiodocker.Docker) -> dict[str, Any]:
            await docker.containers.container(ref).restart(t=t)
            return await docker.containers.container(ref).show()

        return self._info(await self._api("restart", restart, limit=CALL_TIMEOUT + t, missing=True))

    async def kill(self, state: dict[str, Any]) -> None:
        ref = self._ref(state)

        async def kill(docker: aiodocker.Docker) -> None:
            await docker.containers.container(ref).kill()

        await self._api("kill", kill, ok=(404, 409))  # gone / not running

    async def remove(self, state: dict[str, Any]) -> None:
        ref = self._ref(state)
        volume = state.get("volume") or (volume_name(state["node_id"]) if state.get("node_id") else None)

        async def rm(docker: aiodocker.Docker) -> None:
            await docker.containers.container(ref).delete(force=True, v=True)

        await self._api("rm", rm, ok=(404, 409))  # gone / removal already in progress
        if volume:
            await self._api("volume rm", lambda docker: self._remove_volume(docker, str(volume)))
        node_id = str(state.get("node_id") or "")
        if self.images is not None and node_id:
            check_node_id(node_id)
            await self.images.remove(node_id)
        if node_id:  # a forked node's image (none for others: 404)
            await self._remove_fork_image(node_id)
        await self._drop_network_if_unused(str(state.get("manager_id") or self.context.manager_id))

    async def _remove_volume(self, docker: aiodocker.Docker, name: str) -> None:
        """Delete a volume; gone is fine, in use is retried while its container goes away."""
        for attempt in range(100):
            try:
                await DockerVolume(docker, name).delete()
                return
            except DockerError as exc:
                if exc.status == 404:
                    return
                if exc.status != 409 or attempt == 99:
                    raise
            await asyncio.sleep(0.1)

    async def inspect(self, state: dict[str, Any]) -> NodeInfo:
        ref = self._ref(state)
        data = await self._api(
            "inspect", lambda docker: docker.containers.container(ref).show(), missing=True
        )
        info = self._info(data)
        await self._confirm_ready([info])
        return info

    async def list(self, manager_id: str) -> list[NodeInfo]:
        """All of ``manager_id``'s containers, exited ones included, from ONE labelled list call."""
        t = self.template
        filters = {"label": [f"{LABEL_MANAGER}={manager_id}", f"{LABEL_ROLE}={ROLE_NODE}"]}
        containers = await self._api("ps", lambda docker: docker.containers.list(all=True, filters=filters))
        infos = [
            from_list_entry(
                {k: c[k] for k in _LIST_KEYS if k in c},
                address_mode=t.address_mode,
                network=t.network,
                port=t.port,
            )
            for c in containers or []
        ]
        await self._confirm_ready(infos)
        return infos

    async def leftovers(self, manager_id: str) -> list[NodeInfo]:
        """Workspace volumes of ``manager_id`` that no container uses: what a create cut short
        between making the volume and making the container left behind (one labelled volume list)."""
        labels = [f"{LABEL_MANAGER}={manager_id}", f"{LABEL_ROLE}={ROLE_NODE}"]
        filters = {"label": labels, "dangling": ["true"]}
        answer = await self._api("volume ls", lambda docker: docker.volumes.list(filters=filters))
        found = []
        for vol in (answer or {}).get("Volumes") or []:
            node_id = (vol.get("Labels") or {}).get(LABEL_NODE, "")
            if node_id:
                state = {"node_id": node_id, "volume": vol["Name"], "manager_id": manager_id}
                found.append(NodeInfo(node_id=node_id, manager_id=manager_id, status="dead", state=state))
        if self.images is not None and self.context.manager_id == manager_id:
            found += await self._image_leftovers(manager_id)
        return found

    async def _image_leftovers(self, manager_id: str) -> list[NodeInfo]:
        """Workspace images older than a create's budget whose container is gone."""
        assert self.images is not None
        known = await self.images.known(older_than=self.start_budget)
        if not known:
            return []
        filters = {"label": [f"{LABEL_MANAGER}={manager_id}", f"{LABEL_ROLE}={ROLE_NODE}"]}
        containers = await self._api("ps", lambda docker: docker.containers.list(all=True, filters=filters))
        alive = {(c["Labels"] or {}).get(LABEL_NODE) for c in containers or []}
        return [
            NodeInfo(
                node_id=n,
                manager_id=manager_id,
                status="dead",
                state={"node_id": n, "manager_id": manager_id},
            )
            for n in known
            if n not in alive
        ]

    async def prune_volumes(self, manager_id: str) -> list[str]:
        """Remove ``manager_id``'s workspace volumes that no container uses; return their names."""
        labels = [f"{LABEL_MANAGER}={manager_id}", f"{LABEL_ROLE}={ROLE_NODE}"]
        filters = {"label": labels, "dangling": ["true"]}
        answer = await self._api("volume ls", lambda docker: docker.volumes.list(filters=filters))
        removed = []
        for vol in (answer or {}).get("Volumes") or []:
            name = vol["Name"]
            await self._api("volume rm", lambda docker, name=name: self._remove_volume(docker, name))
            removed.append(name)
        await self._drop_network_if_unused(manager_id)
        return removed

    async def ping(self) -> dict[str, Any]:
        """The Engine's version answer; RuntimeUnavailable when it cannot be reached."""
        return await self._api("version", lambda docker: docker.version()) or {}

    async def aclose(self) -> None:
        await self._drop_client()
        http, self._http = self._http, None
        if http is not None and self._loop is asyncio.get_running_loop():
            await http.aclose()

    # ---- pause and fork (docker_fork.py) ------------------------------------------------------------

    capabilities = frozenset({"pause", "fork", "resources", "network"})

    async def pause(self, state: dict[str, Any]) -> NodeInfo:
        """Docker's pause (the cgroup freezer): processes and memory kept."""
        return await docker_fork.pause(self, state)

    async def resume(self, state: dict[str, Any]) -> NodeInfo:
        return await docker_fork.resume(self, state)

    async def fork(self, state: dict[str, Any], spec: NodeSpec) -> NodeInfo:
        """Commit the source container's filesystem changes to an image, create node ``spec`` from
        it, and copy the source's workspace volume into the new node's (the source keeps running)."""
        return await docker_fork.fork(self, state, spec)

    async def _remove_fork_image(self, node_id: str) -> None:
        await docker_fork.remove_image(self, node_id)
