"""The gVisor runtime: Docker nodes whose container runtime is gVisor's ``runsc``.

Everything of the Docker runtime holds (hardening, the manager's own node network with
inter-container traffic off, published ports on 127.0.0.1, ``workspace_size``); in addition the
node's system calls are served by gVisor's user-space kernel (the Sentry) rather than the host's,
so a kernel bug reachable from a node is gVisor's, not the host's. ``uname`` inside shows gVisor's
kernel.

dockerd must know the runtime: ``scripts/ensure-docker.sh`` registers Debian's ``runsc`` as
``runtimes.runsc`` in ``/etc/docker/daemon.json`` with the runtime argument ``--network=host``
(gVisor then uses the network namespace Docker made for the container instead of its own network
stack, which this machine needs) and reloads dockerd with SIGHUP. :meth:`GVisorRuntime.preflight`
refuses to start a manager whose dockerd lacks it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import aiodocker
from pydantic import Field, ValidationInfo, model_validator

from toolserver.errors import ConfigError, NodeNotFound, RuntimeBackendError
from toolserver.runtimes.base import PAUSED, RuntimeContext
from toolserver.runtimes.docker import DockerRuntime
from toolserver.runtimes.docker_config import DockerConfig, translate_creation_kwargs

__all__ = ["GVisorConfig", "GVisorRuntime"]


class GVisorConfig(DockerConfig):
    """The gVisor runtime's keys: Docker's, plus the name dockerd knows runsc by."""

    type: Literal["gvisor"] = "gvisor"  # type: ignore[assignment]
    runsc_runtime: str = Field("runsc", description="name of the runsc runtime in dockerd's config")

    @model_validator(mode="after")
    def _one_runtime(self, info: ValidationInfo) -> GVisorConfig:
        """A ``creation_kwargs.runtime`` other than runsc would leave gVisor out: refused."""
        given = translate_creation_kwargs(dict(self.creation_kwargs), set()).host.get("Runtime")
        if given is not None and given != self.runsc_runtime:
            raise ConfigError(
                f"'{self.key_path(info, 'creation_kwargs')}.runtime' is {given!r}: the gvisor tier always "
                f"runs {self.runsc_runtime!r} (use isolation: docker for another container runtime)"
            )
        return self


class GVisorRuntime(DockerRuntime):
    """Docker nodes under gVisor (see the module docstring)."""

    name = "gvisor"
    config_model = GVisorConfig

    def __init__(self, config: GVisorConfig, context: RuntimeContext) -> None:
        super().__init__(config, context)
        self.runsc = config.runsc_runtime
        self.template.host_config["Runtime"] = self.runsc

    async def preflight(self) -> None:
        """Refuse (ConfigError) when dockerd has no runsc runtime; a dockerd that does not answer
        yet is not refused (its nodes wait for it, as the docker tier's do)."""
        await super().preflight()
        try:
            info = await self._api("info", lambda docker: docker.system.info())
        except RuntimeBackendError:  # unreachable: told again, with the reason, at the first create
            return
        runtimes = sorted((info or {}).get("Runtimes") or {})
        if self.runsc not in runtimes:
            raise ConfigError(
                f"isolation gvisor needs a {self.runsc!r} runtime in dockerd, which has only "
                f"{', '.join(runtimes) or 'none'}: install Debian's runsc and run scripts/ensure-docker.sh "
                "(it registers runsc in /etc/docker/daemon.json and reloads dockerd), "
                "or choose isolation: docker, which works with this dockerd"
            )

    # runsc cannot signal a frozen sandbox: Docker's kill, stop and removal of a paused gVisor
    # container fail ("PID … is zombie and can not be killed"), so a paused node is thawed first.

    async def _thaw(self, state: dict[str, Any]) -> None:
        ref = self._ref(state)

        async def thaw(docker: aiodocker.Docker) -> None:
            container = docker.containers.container(ref)
            if ((await container.show()).get("State") or {}).get("Status") == PAUSED:
                await container.unpause()

        with contextlib.suppress(NodeNotFound):
            await self._api("unpause", thaw, ok=(404,))

    async def stop(self, state: dict[str, Any], grace: float = 5.0) -> None:
        await self._thaw(state)
        await super().stop(state, grace)

    async def kill(self, state: dict[str, Any]) -> None:
        await self._thaw(state)
        await super().kill(state)

    async def remove(self, state: dict[str, Any]) -> None:
        await self._thaw(state)
        await super().remove(state)
