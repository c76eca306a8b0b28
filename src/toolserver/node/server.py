"""``toolserver node``: run one node under uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from toolserver.errors import ConfigError

#: seconds uvicorn waits for open requests at shutdown before cancelling them
GRACEFUL_SHUTDOWN_SECONDS = 1.5


def serve(
    host: str = "127.0.0.1",
    port: int = 31942,
    *,
    fd: int | None = None,
    workspace: str | Path = "workspace",
    config: str | Path | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the node on ``host:port`` with ``workspace`` as the only directory tools write to.

    With ``fd`` it serves on that inherited socket instead (bound by the parent, which so knows the
    port without a race for a free one).

    On SIGTERM uvicorn stops accepting requests, cancels those still running after a short grace,
    and the app's shutdown kills kernels and background shells; the process then exits with 0.
    """
    # SIGTERM before uvicorn takes over (startup), or re-raised by uvicorn after its graceful
    # shutdown: leave with status 0 rather than die from the signal
    signal.signal(signal.SIGTERM, _exit_cleanly)
    close_inherited(keep=fd)

    config_class, server_class = uvicorn_server()
    server_class = quiet_server(server_class)

    from toolserver.node.app import create_app
    from toolserver.node.settings import load_node_config

    level = log_level.upper() if isinstance(log_level, str) else log_level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        node_config = load_node_config(config, workspace=Path(workspace))
    except ConfigError as exc:
        print(f"toolserver node: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_app(node_config)
    server = server_class(
        config_class(
            app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="on",
            ws=_websocket_protocol,  # type: ignore[arg-type]
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            server_header=False,
            proxy_headers=False,  # nothing here reads the client address: skip its middleware
        )
    )
    sockets = [socket.socket(fileno=fd)] if fd is not None else None
    server.run(sockets=sockets)


def uvicorn_server() -> tuple[Any, Any]:
    """uvicorn's ``Config`` and ``Server``, without running ``uvicorn/__init__`` first.

    That file imports uvicorn's command line (click) and its reloaders (watchfiles,
    multiprocessing), which a node never uses: about 50 modules, 2 MB of every node's memory
    and a good part of its imports. The package's other names (``uvicorn.run``, say) still work:
    the first use of one runs the whole ``__init__``.
    """
    if "uvicorn" not in sys.modules:
        spec = importlib.util.find_spec("uvicorn")
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        loader = spec.loader

        def complete(name: str) -> Any:
            del package.__getattr__
            loader.exec_module(package)
            return getattr(package, name)

        package.__getattr__ = complete  # type: ignore[attr-defined]
        sys.modules["uvicorn"] = package
    from uvicorn.config import Config

    sys.modules["uvicorn"].Config = Config  # ``from uvicorn import Config`` (its lifespan does it)
    from uvicorn.server import Server

    return Config, Server


#: seconds between the server's housekeeping ticks (uvicorn's own loop wakes every 0.1 s)
TICK_SECONDS = 1.0


def quiet_server(server_class: Any) -> Any:
    """uvicorn's ``Server`` waking once a second instead of ten times, and at once on SIGTERM.

    uvicorn's main loop sleeps 0.1 s between checks of its exit flag: ten wake-ups a second of
    an idle node, about 1.3 ms of CPU a second each; a thousand idle nodes spent more than half
    of this machine's two cores on them. Here the loop waits for the exit signal with a timeout
    of :data:`TICK_SECONDS`, the period of uvicorn's own once-a-second work (the Date header).
    """

    class QuietServer(server_class):  # type: ignore[misc, valid-type]
        async def main_loop(self) -> None:
            self._woken = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            while not await self.on_tick(0):  # counter 0: the once-a-second work on every tick
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), TICK_SECONDS)

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            loop = getattr(self, "_loop", None)
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._woken.set)

    return QuietServer


def close_inherited(keep: int | None = None) -> list[int]:
    """Close the descriptors this process inherited beyond stdin, stdout and stderr, except ``keep``
    (the listening socket), which stays open but is no longer inheritable; returns those closed.

    Nothing the node holds may reach its tools' processes: a shell job that inherited the listening
    socket would keep the port open after the node died, and requests would queue there unanswered.
    Python opens every descriptor of its own non-inheritable (PEP 446), so what is inheritable here
    came from the parent (uvloop's spawn leaves copies of the child's stdio, for one).
    """
    closed = []
    for fd in _open_descriptors():
        if fd <= 2:
            continue
        try:
            if fd == keep:
                os.set_inheritable(fd, False)
            elif os.get_inheritable(fd):
                os.close(fd)
                closed.append(fd)
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
    return closed


def _open_descriptors() -> list[int]:
    for listing in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return sorted(int(name) for name in os.listdir(listing))
    return []


def _websocket_protocol(*args: Any, **kwargs: Any) -> Any:
    """uvicorn's WebSocket protocol, imported on the first upgrade (/terminal) rather than at start-up.

    The import costs ~20 ms, which every cold node would otherwise pay before it serves.
    """
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    return WebSocketsSansIOProtocol(*args, **kwargs)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
