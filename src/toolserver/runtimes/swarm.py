"""The Swarm runtime: every node is a one-replica Docker Swarm service (``isolation: swarm``).

A node is a service ``toolserver-node-<node_id>`` whose task runs the node image with the Docker
tier's hardening, limits and labels (compiled by :class:`~toolserver.runtimes.docker_config.NodeTemplate`
and turned into a service spec here), and a volume ``toolserver-node-<node_id>-workspace`` at
``/workspace`` made by the engine the task lands on (``volume_driver`` / ``volume_options``
choose where the data lives). Swarm places the task by the operator's ``constraints`` and
``placement_preferences``; the manager talks only to a swarm manager engine.

Reaching nodes: the node port is published in **host mode** (``PublishMode: host``, a port the
engine picks) on the host the task runs on, and the node is reported at that host's swarm address
(``Status.Addr`` of its swarm node) and that port. A route is then a plain address every replica
can reach, with no overlay network on the managers' side; the routing mesh (ingress ports) is not
used: it did not answer on the machine this was built on, and it would add a hop and hide which
host serves. ``network`` optionally attaches the nodes to an overlay network as well.

The engine never looks for a registry: the image is pinned to its local image id
(``pin_image_id``), which a worker skips pulling; load the image on every engine with ``docker
save | docker load``, which keeps the id. The image's HEALTHCHECK is turned off in the service
(Swarm holds a task in ``starting`` until the first probe, 30 s after the start with the image's
timing); health is the runtime's GET /health on the node's address instead.

Status: a service scaled to 0 with no task is ``created``; otherwise its newest task decides:
``running`` (``exited`` once its host is down, with the reason), the states before it
``created``, the others (complete, shutdown, failed, rejected, orphaned) ``exited``. ``list``
costs three calls per tick whatever the number of nodes: the manager's services, their tasks,
and the swarm's nodes (for addresses and hosts that died). Stop scales to 0, start and restart
scale to 1 and force a new task (the restart policy is ``none``: the manager restarts nodes), so
a node whose host died is placed again, elsewhere if the constraints allow, by reconnect.

What the Docker tier has and a Swarm service cannot express on Engine API 1.41 (Docker 20.10):
``no-new-privileges`` (the node image sets it on itself instead: its entrypoint is ``setpriv
--no-new-privs``, so the node and all it starts run with it; an image of your own must do the
same), an OCI runtime per service (for gVisor, make ``runsc``
the default runtime of the worker engines and constrain placement to them with a node label),
devices and device requests. ``creation_kwargs`` keys that would need them are refused at load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Literal

import aiodocker
from aiodocker.exceptions import DockerError
from pydantic import Field, ValidationInfo, model_validator

from toolserver.errors import ConfigError, NodeNotFound, RuntimeBackendError, RuntimeUnavailable
from toolserver.runtimes.base import (
    CREATED,
    EXITED,
    HEALTHY,
    LABEL_MANAGER,
    LABEL_NODE,
    RUNNING,
    STARTING,
    UNHEALTHY,
    NodeInfo,
    NodeSpec,
    RuntimeConfig,
    RuntimeContext,
)
from toolserver.runtimes.docker import CALL_TIMEOUT, DockerRuntime
from toolserver.runtimes.docker_config import (
    IMAGE_PORT,
    LABEL_ROLE,
    ROLE_NODE,
    WORKSPACE,
    DockerConfig,
    check_node_id,
    container_name,
    parse_size,
    translate_creation_kwargs,
    volume_name,
)
from toolserver.runtimes.health import ProbePacer, node_healthy

__all__ = ["SwarmConfig", "SwarmRuntime"]

log = logging.getLogger(__name__)

#: Task states before ``running`` (reported ``created``: the node is on its way).
_BEFORE_RUNNING = {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"}
#: HostConfig keys of the Docker template that a service spec expresses, and where.
_HOST_TO_SPEC = {
    "CapDrop": "CapabilityDrop",
    "CapAdd": "CapabilityAdd",
    "Init": "Init",
    "ReadonlyRootfs": "ReadOnly",
    "Sysctls": "Sysctls",
    "Dns": None,
    "DnsSearch": None,
    "DnsOptions": None,
    "ExtraHosts": "Hosts",
    "Ulimits": "Ulimits",
    "Memory": None,
    "MemorySwap": None,
    "NanoCpus": None,
    "PidsLimit": None,
    "Tmpfs": None,
    "Binds": None,
    "LogConfig": None,
    "Privileged": None,
    "SecurityOpt": None,
    # the runtime publishes the port itself, and joins runtime_config.network
    "PortBindings": None,
    "NetworkMode": None,
}
#: creation_kwargs a service cannot express (see the module docstring).
_NOT_IN_SERVICES = {
    "devices": "a swarm service cannot map devices",
    "device_requests": "a swarm service cannot request devices on Engine API 1.41",
    "runtime": "a swarm service cannot choose an OCI runtime; make it the engines' default runtime",
    "network_mode": "a swarm service joins networks by name: use runtime_config.network",
    "network": "a swarm service joins networks by name: use runtime_config.network",
    "security_opt": "a swarm service takes no security options on Engine API 1.41",
}


class SwarmConfig(RuntimeConfig):
    """The Swarm runtime's own keys (``isolation: swarm``)."""

    type: Literal["swarm"] = "swarm"
    image: str = "toolserver-node:latest"
    docker_url: str | None = Field(
        None, description="a swarm manager engine; default $DOCKER_HOST or the socket"
    )
    port: int = Field(IMAGE_PORT, ge=1, le=65535, description="port the node listens on inside its task")
    read_only_rootfs: bool = False
    creation_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="docker-py options a service takes"
    )
    constraints: list[str] = Field(
        default_factory=list, description="placement constraints, e.g. node.role==worker"
    )
    placement_preferences: list[str] = Field(
        default_factory=list,
        description="spread descriptors, e.g. node.labels.zone (spread tasks over its values)",
    )
    volume_driver: str | None = Field(None, description="the workspace volume's driver (default: local)")
    volume_options: dict[str, str] = Field(default_factory=dict, description="the volume driver's options")
    network: str | None = Field(None, description="an overlay network the nodes join as well")
    pin_image_id: bool = Field(
        True, description="run the image by its local id, so no engine looks for a registry"
    )

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> SwarmConfig:
        where = self.key_path(info, "creation_kwargs")
        for key, why in _NOT_IN_SERVICES.items():
            if key in self.creation_kwargs:
                raise ConfigError(f"'{where}.{key}' is not accepted by isolation: swarm: {why}")
        self.docker_config(where)  # the Docker tier's own checks (privileged, the socket, ...)
        return self

    def docker_config(self, where: str = "runtime_config.creation_kwargs") -> DockerConfig:
        """The Docker tier's config for the same node (its hardening and limits are reused)."""
        translate_creation_kwargs(dict(self.creation_kwargs), set(), where)
        return DockerConfig(
            image=self.image,
            docker_url=self.docker_url,
            port=self.port,
            read_only_rootfs=self.read_only_rootfs,
            creation_kwargs=dict(self.creation_kwargs),
        )


def service_name(node_id: str) -> str:
    return container_name(node_id)


class SwarmRuntime(DockerRuntime):
    """Nodes as one-replica Swarm services (see the module docstring)."""

    name = "swarm"
    config_model = SwarmConfig  # type: ignore[assignment]
    capabilities = frozenset()

    def __init__(self, config: SwarmConfig, context: RuntimeContext) -> None:
        super().__init__(config.docker_config(), context)
        self.config = config
        self.swarm = config
        self._image_ref: str | None = None
        self._healthy_once: set[str] = set()
        self._pacer = ProbePacer(context.health_probe_seconds)

    # ---- the service spec ---------------------------------------------------------------------------

    async def _image(self) -> str:
        """The image reference tasks run: the local image id when pinned (no registry lookup)."""
        if not self.swarm.pin_image_id:
            return self.template.image
        if self._image_ref is None:
            image = self.template.image

            async def inspect(docker: aiodocker.Docker) -> dict[str, Any]:
                return await docker.images.inspect(image)

            try:
                data = await self._api("image inspect", inspect, missing=True)
            except NodeNotFound:
                raise RuntimeBackendError(
                    f"node image {image!r} is not on the manager's engine; build it (make node-image) and "
                    "load it on every engine (docker save | docker load), or set "
                    "runtime_config.pin_image_id: false"
                ) from None
            self._image_ref = str((data or {})["Id"])
        return self._image_ref

    def service_spec(self, spec: NodeSpec, image: str) -> dict[str, Any]:
        """The ``POST /services/create`` body of one node, from the Docker tier's container body."""
        body = self.template.container_body(spec)
        host = body.pop("HostConfig")
        labels = dict(body["Labels"])
        container: dict[str, Any] = {
            "Image": image,
            "Labels": labels,
            "Env": body["Env"],
            "User": body["User"],
            "HealthCheck": {"Test": ["NONE"]},
            "StopGracePeriod": int(self.template.stop_grace * 1e9),
        }
        for key in ("Cmd", "Entrypoint", "WorkingDir", "Hostname"):
            if key in body:
                container[{"Cmd": "Args", "Entrypoint": "Command"}.get(key, key)] = body[key]
        for key, value in host.items():
            if key not in _HOST_TO_SPEC:
                raise RuntimeBackendError(f"a swarm service cannot express HostConfig.{key}")
            target = _HOST_TO_SPEC[key]
            if target == "Ulimits":
                value = [{"Name": u.get("Name"), "Soft": u.get("Soft"), "Hard": u.get("Hard")} for u in value]
            if target:
                container[target] = value
        if host.get("Dns") or host.get("DnsSearch") or host.get("DnsOptions"):
            container["DNSConfig"] = {
                "Nameservers": host.get("Dns") or [],
                "Search": host.get("DnsSearch") or [],
                "Options": host.get("DnsOptions") or [],
            }
        mounts: list[dict[str, Any]] = []
        for bind in host.get("Binds") or []:
            source, target, *mode = bind.split(":")
            read_only = bool(mode) and mode[0] == "ro"
            if source == volume_name(spec.node_id):
                options: dict[str, Any] = {"Labels": labels}
                if self.swarm.volume_driver or self.swarm.volume_options:
                    driver = self.swarm.volume_driver or "local"
                    options["DriverConfig"] = {"Name": driver, "Options": dict(self.swarm.volume_options)}
                mounts.append(
                    {"Type": "volume", "Source": source, "Target": WORKSPACE, "VolumeOptions": options}
                )
            else:
                kind = "bind" if source.startswith("/") else "volume"
                mounts.append({"Type": kind, "Source": source, "Target": target, "ReadOnly": read_only})
        for path, opts in (host.get("Tmpfs") or {}).items():
            mounts.append({"Type": "tmpfs", "Target": path, "TmpfsOptions": _tmpfs_options(opts)})
        container["Mounts"] = mounts
        limits: dict[str, Any] = {}
        if host.get("Memory"):
            limits["MemoryBytes"] = host["Memory"]
        if host.get("NanoCpus"):
            limits["NanoCPUs"] = host["NanoCpus"]
        if host.get("PidsLimit"):
            limits["Pids"] = host["PidsLimit"]
        placement: dict[str, Any] = {"Constraints": list(self.swarm.constraints)}
        if self.swarm.placement_preferences:
            placement["Preferences"] = [
                {"Spread": {"SpreadDescriptor": p.removeprefix("spread=")}}
                for p in self.swarm.placement_preferences
            ]
        task: dict[str, Any] = {
            "ContainerSpec": container,
            "Resources": {"Limits": limits},
            "RestartPolicy": {"Condition": "none"},
            "Placement": placement,
            "ForceUpdate": 0,
        }
        if "LogConfig" in host:
            task["LogDriver"] = {
                "Name": host["LogConfig"]["Type"],
                "Options": host["LogConfig"].get("Config", {}),
            }
        if self.swarm.network:
            task["Networks"] = [{"Target": self.swarm.network}]
        return {
            "Name": service_name(spec.node_id),
            "Labels": labels,
            "TaskTemplate": task,
            "Mode": {"Replicated": {"Replicas": 0}},
            "EndpointSpec": {
                "Ports": [{"Protocol": "tcp", "TargetPort": self.template.port, "PublishMode": "host"}],
            },
        }

    # ---- reading services and tasks -----------------------------------------------------------------

    @staticmethod
    def _sref(state: dict[str, Any]) -> str:
        ref = state.get("service_id") or state.get("service")
        if not ref and state.get("node_id"):
            ref = service_name(str(state["node_id"]))
        if not ref:
            raise NodeNotFound("runtime state names no service")
        return str(ref)

    async def _service(self, ref: str) -> dict[str, Any]:
        async def show(docker: aiodocker.Docker) -> dict[str, Any]:
            return await docker._query_json(f"services/{ref}")

        data = await self._api("service inspect", show, missing=True)
        assert data is not None
        return data

    async def _tasks(self, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        async def tasks(docker: aiodocker.Docker) -> list[dict[str, Any]]:
            return await docker.tasks.list(filters=filters)

        return await self._api("task ls", tasks) or []

    async def _nodes(self) -> dict[str, dict[str, Any]]:
        async def nodes(docker: aiodocker.Docker) -> list[dict[str, Any]]:
            return await docker.nodes.list()

        return {n["ID"]: n for n in await self._api("node ls", nodes) or []}

    def _node_info(
        self, service: dict[str, Any], tasks: list[dict[str, Any]], nodes: dict[str, Any]
    ) -> NodeInfo:
        labels = (service.get("Spec") or {}).get("Labels") or {}
        node_id = labels.get(LABEL_NODE, "")
        state = {
            "service_id": service["ID"],
            "service": service["Spec"]["Name"],
            "volume": volume_name(node_id) if node_id else "",
            "node_id": node_id,
            "manager_id": labels.get(LABEL_MANAGER, ""),
        }
        info = NodeInfo(node_id=node_id, manager_id=state["manager_id"], status=CREATED, state=state)
        mine = [t for t in tasks if t.get("ServiceID") == service["ID"]]
        if not mine:
            return info  # never started, or stopped long enough for its tasks to be pruned
        task = max(mine, key=lambda t: (t.get("Version") or {}).get("Index", 0))
        status = task.get("Status") or {}
        word = str(status.get("State", ""))
        host = nodes.get(task.get("NodeID", "")) or {}
        hostname = (host.get("Description") or {}).get("Hostname") or task.get("NodeID", "?")
        state["task_id"] = task.get("ID")
        if word in _BEFORE_RUNNING | {"running"} and (host.get("Status") or {}).get("State") == "down":
            # Swarm may already have changed the task's desired state: the host is the reason
            info.status, info.health = EXITED, UNHEALTHY
            info.detail = f"its host {hostname} is down (swarm node {task.get('NodeID')})"
            return info
        if task.get("DesiredState") == "running" and word == "running":
            ports = (status.get("PortStatus") or {}).get("Ports") or []
            published = [
                p for p in ports if p.get("TargetPort") == self.template.port and p.get("PublishedPort")
            ]
            info.status, info.health = RUNNING, STARTING
            info.host = (host.get("Status") or {}).get("Addr") or "0.0.0.0"
            info.port = int(published[0]["PublishedPort"]) if published else 0
            state["host"] = hostname
            return info
        if task.get("DesiredState") == "running" and word in _BEFORE_RUNNING:
            info.detail = status.get("Message") or None
            if status.get("Err"):
                info.detail = f"{word}: {status['Err']}"
            return info
        info.status, info.health = EXITED, UNHEALTHY
        code = (status.get("ContainerStatus") or {}).get("ExitCode")
        parts = [f"task {word}"] + ([f"exit code {code}"] if code not in (None, 0) else [])
        if status.get("Err"):
            parts.append(str(status["Err"]))
        info.detail = "; ".join(parts)
        return info

    async def _probe_all(self, infos: list[NodeInfo], paced: bool = False) -> None:
        """Health of running nodes: GET /health on the reported address (the HEALTHCHECK is off);
        ``paced`` (a list): only those whose probe is due (see ProbePacer)."""
        running = [i for i in infos if i.running and i.port]
        if paced:
            running = self._pacer.due(running, self._healthy_once)
        if not running:
            return

        async def probe(info: NodeInfo) -> None:
            if await node_healthy(info.host, info.port):
                self._healthy_once.add(info.node_id)
                info.health = HEALTHY
            else:
                info.health = UNHEALTHY if info.node_id in self._healthy_once else STARTING

        await asyncio.gather(*(probe(i) for i in running))
        self._pacer.asked(running)

    # ---- contract -----------------------------------------------------------------------------------

    async def preflight(self) -> None:
        try:
            info = await self._api("info", lambda docker: docker.system.info())
        except RuntimeUnavailable as exc:
            raise ConfigError(f"isolation: swarm: {exc}") from None
        swarm = (info or {}).get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise ConfigError(
                f"isolation: swarm: the Docker Engine at {self.url} is not a swarm manager (swarm state "
                f"{swarm.get('LocalNodeState') or 'unknown'}); run 'docker swarm init' there or point "
                "runtime_config.docker_url at a manager engine; on a single engine isolation: docker works"
            )

    async def create(self, spec: NodeSpec) -> NodeInfo:
        check_node_id(spec.node_id)
        body = self.service_spec(spec, await self._image())

        async def create(docker: aiodocker.Docker) -> dict[str, Any]:
            try:
                made = await docker._query_json("services/create", method="POST", data=body)
            except DockerError as exc:
                if exc.status != 409:
                    raise
                old = await docker._query_json(f"services/{body['Name']}")
                if (old["Spec"].get("Labels") or {}).get(LABEL_MANAGER) != spec.manager_id:
                    raise RuntimeBackendError(
                        f"a service named {body['Name']} exists and is not this manager's"
                    ) from None
                log.warning("replacing leftover service %s", body["Name"])
                await docker.services.delete(old["ID"])
                made = await docker._query_json("services/create", method="POST", data=body)
            return await docker._query_json(f"services/{made['ID']}")

        service = await self._api("service create", create)
        assert service is not None
        return self._node_info(service, [], {})

    async def _update(
        self, state: dict[str, Any], action: str, replicas: int, *, force: bool, grace: float | None = None
    ) -> dict[str, Any]:
        """Scale the node's service to ``replicas`` (with ``force`` a new task however it stands)."""
        ref = self._sref(state)

        async def update(docker: aiodocker.Docker) -> dict[str, Any]:
            for attempt in range(5):
                service = await docker._query_json(f"services/{ref}")
                spec = service["Spec"]
                spec["Mode"] = {"Replicated": {"Replicas": replicas}}
                task = spec["TaskTemplate"]
                if force:
                    task["ForceUpdate"] = int(task.get("ForceUpdate") or 0) + 1
                if grace is not None:
                    task["ContainerSpec"]["StopGracePeriod"] = int(grace * 1e9)
                try:
                    await docker._query_json(
                        f"services/{service['ID']}/update",
                        method="POST",
                        params={"version": service["Version"]["Index"]},
                        data=spec,
                    )
                    return service
                except DockerError as exc:  # "update out of sequence": someone updated it meanwhile
                    if "out of sequence" not in exc.message or attempt == 4:
                        raise
            raise AssertionError("unreachable")

        service = await self._api(action, update, missing=True)
        assert service is not None
        return service

    async def _wait_stopped(self, service_id: str, limit: float) -> None:
        """Until the service's tasks no longer run (its node is down), at most ``limit`` seconds."""
        deadline = asyncio.get_running_loop().time() + limit
        while asyncio.get_running_loop().time() < deadline:
            tasks = await self._tasks({"service": [service_id]})
            live = [t for t in tasks if (t.get("Status") or {}).get("State") in _BEFORE_RUNNING | {"running"}]
            if live:  # a task on a host that is down never reports its end: it is stopped for us
                nodes = await self._nodes()
                live = [
                    t
                    for t in live
                    if (nodes.get(t.get("NodeID", "")) or {}).get("Status", {}).get("State") != "down"
                ]
            if not live:
                return
            await asyncio.sleep(0.1)

    async def start(self, state: dict[str, Any]) -> NodeInfo:
        current = await self.inspect(state)
        if current.status == RUNNING:
            return current
        service = await self._update(state, "start", 1, force=True)
        return await self.inspect({**state, "service_id": service["ID"]})

    async def stop(self, state: dict[str, Any], grace: float = 5.0) -> None:
        try:
            service = await self._update(state, "stop", 0, force=False, grace=grace)
        except NodeNotFound:
            return
        await self._wait_stopped(service["ID"], grace + CALL_TIMEOUT)

    async def restart(self, state: dict[str, Any], grace: float = 5.0) -> NodeInfo:
        await self.stop(state, grace)
        return await self.start(state)

    async def kill(self, state: dict[str, Any]) -> None:
        await self.stop(state, 0)

    async def remove(self, state: dict[str, Any]) -> None:
        ref = self._sref(state)
        node_id = str(state.get("node_id") or "")
        volume = state.get("volume") or (volume_name(node_id) if node_id else None)

        async def rm(docker: aiodocker.Docker) -> None:
            await docker.services.delete(ref)

        await self._api("service rm", rm, ok=(404,))
        if node_id:
            self._pacer.forget(node_id)
            await self._remove_containers(node_id)
        if volume:  # the workspace on this engine (a volume on another host stays with it)
            await self._api("volume rm", lambda docker: self._remove_volume(docker, str(volume)))

    async def _remove_containers(self, node_id: str) -> None:
        """Remove the node's task containers on this engine (the engine removes them a moment after
        the service, and the volume cannot go before they have)."""
        filters = {"label": [f"{LABEL_NODE}={node_id}", f"{LABEL_ROLE}={ROLE_NODE}"]}

        async def rm(docker: aiodocker.Docker) -> None:
            for container in await docker.containers.list(all=True, filters=filters):
                with contextlib.suppress(DockerError):
                    await container.delete(force=True, v=False)

        await self._api("rm", rm)

    async def inspect(self, state: dict[str, Any]) -> NodeInfo:
        service = await self._service(self._sref(state))
        tasks = await self._tasks({"service": [service["ID"]]})
        nodes = await self._nodes() if tasks else {}
        info = self._node_info(service, tasks, nodes)
        await self._probe_all([info])
        return info

    async def list(self, manager_id: str) -> list[NodeInfo]:
        """All of ``manager_id``'s nodes: its services, their tasks and the swarm's nodes, one call each."""
        filters = {"label": [f"{LABEL_MANAGER}={manager_id}", f"{LABEL_ROLE}={ROLE_NODE}"]}

        async def services(docker: aiodocker.Docker) -> list[dict[str, Any]]:
            return await docker.services.list(filters=filters)

        found = await self._api("service ls", services) or []
        if not found:
            return []
        tasks, nodes = await asyncio.gather(self._tasks(filters), self._nodes())
        infos = [self._node_info(s, tasks, nodes) for s in found]
        await self._probe_all(infos, paced=True)
        return infos


def _tmpfs_options(opts: str) -> dict[str, Any]:
    """Docker's tmpfs option string (``rw,size=64m,mode=0700``) as a service mount's TmpfsOptions."""
    out: dict[str, Any] = {}
    for opt in opts.split(","):
        key, _, value = opt.partition("=")
        if key == "size":
            out["SizeBytes"] = parse_size(value, "tmpfs size")
        elif key == "mode":
            out["Mode"] = int(value, 8)
    if "uid=" in opts:  # a service's tmpfs has no owner: let the node's user write it
        out["Mode"] = 0o1777
    return out
