"""Command line: ``toolserver manager | node | checker``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolserver import __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolserver", description="A sandboxed tool server per agent session."
    )
    parser.add_argument("--version", action="version", version=f"toolserver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    manager = sub.add_parser("manager", help="run the manager (sessions, routing, checker)")
    manager.add_argument("--config", type=Path, help="YAML config file (see config/manager.yml)")
    manager.add_argument("--host", help="address to bind (default 127.0.0.1)")
    manager.add_argument("--port", type=int, help="port to bind (default 8080)")
    manager.add_argument("--log-level", default="info", help="uvicorn log level (default info)")

    node = sub.add_parser("node", help="run one node (the tool server of a session)")
    node.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    node.add_argument("--port", type=int, default=31942, help="port to bind (default 31942)")
    node.add_argument(
        "--workspace", type=Path, default=Path("workspace"), help="the only directory it writes"
    )
    node.add_argument(
        "--fd",
        type=int,
        help="serve on this inherited, already bound socket instead of binding --host/--port",
    )
    node.add_argument("--config", type=Path, help="YAML node config file")
    node.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")

    checker = sub.add_parser("checker", help="run the node checker loop on its own")
    checker.add_argument("--config", type=Path, help="YAML config file of the manager it checks for")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "node":
        from toolserver.node.server import serve

        serve(
            host=args.host,
            port=args.port,
            fd=args.fd,
            workspace=args.workspace,
            config=args.config,
            log_level=args.log_level,
        )
        return 0

    from toolserver.errors import ConfigError
    from toolserver.manager.settings import load_settings

    overrides = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None):
        overrides["port"] = args.port
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"toolserver: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "manager":
        from toolserver.manager.server import serve_manager

        serve_manager(settings, log_level=args.log_level)
    else:
        from toolserver.manager.checker import run_standalone

        return run_standalone(settings)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
