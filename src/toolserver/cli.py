"""Command line of ToolServer.

Servers: ``toolserver manager | node | checker``. Operator: ``toolserver nodes`` lists the node
records of the manager's database, ``toolserver keys`` manages its API keys. Client commands talk
to a manager through the SDK (``--url``, default ``$TOOLSERVER_URL`` or http://127.0.0.1:8080;
``--api-key``, default ``$TOOLSERVER_API_KEY``): ``session new | reconnect | close | release``,
``sessions``, ``tools``, ``exec``, ``run`` (streamed output), ``shell`` (an interactive terminal),
``upload``, ``download``, ``download-workspace``; ``mcp`` serves a session's tools to an MCP
client on stdio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from toolserver import __version__

#: Subcommands served by :mod:`toolserver.client_cli`.
CLIENT_COMMANDS = frozenset(
    {"session", "sessions", "tools", "exec", "run", "shell", "upload", "download", "download-workspace"}
)
URL_HELP = "manager URL (default: $TOOLSERVER_URL, else http://127.0.0.1:8080)"


def _tool_arguments(item: str) -> dict[str, Any]:
    """One ARGS item: a JSON object, or ``key=value`` with the value parsed as JSON when it parses."""
    if item.lstrip().startswith("{"):
        try:
            return json.loads(item)  # text starting with "{" parses to an object or not at all
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{item!r} is not a valid JSON object: {exc}") from None
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{item!r} is neither a JSON object nor key=value")
    try:
        return {key.strip(): json.loads(raw)}
    except ValueError:
        return {key.strip(): raw}


def _label(item: str) -> dict[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
    return {key: value}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolserver", description="A sandboxed tool server per agent session."
    )
    parser.add_argument("--version", action="version", version=f"toolserver {__version__}")
    parser.add_argument("--url", help=URL_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = argparse.ArgumentParser(add_help=False)  # options of every client command
    client.add_argument("--url", default=argparse.SUPPRESS, help=URL_HELP)
    client.add_argument(
        "--api-key", default=argparse.SUPPRESS, metavar="KEY", help="API key (default: $TOOLSERVER_API_KEY)"
    )

    def command(
        name: str, text: str, parents: list[argparse.ArgumentParser] | None = None, group: Any = sub
    ) -> argparse.ArgumentParser:
        return group.add_parser(name, help=text, description=text, parents=parents or [])

    manager = command("manager", "run the manager (sessions, routing, checker)")
    manager.add_argument("--config", type=Path, help="YAML config file (see config/manager.yml)")
    manager.add_argument("--host", help="address to bind (default 127.0.0.1)")
    manager.add_argument("--port", type=int, help="port to bind (default 8080)")
    manager.add_argument("--log-level", default="info", help="uvicorn log level (default info)")

    node = command("node", "run one node (the tool server of a session)")
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
    # the sandbox tier's template process (toolserver.runtimes.sandbox_template), run by the runtime
    node.add_argument("--template-fd", type=int, help=argparse.SUPPRESS)

    checker = command("checker", "run the node checker loop on its own")
    checker.add_argument("--config", type=Path, help="YAML config file of the manager it checks for")

    nodes = command("nodes", "list the node records of the manager's database (ids redacted)")
    nodes.add_argument("--config", type=Path, help="the manager's YAML config file")
    nodes.add_argument("--all", action="store_true", help="the nodes of every manager in the database")
    nodes.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    keys = command("keys", "create, list, revoke or expire API keys (in the manager's database)")
    keys.add_argument("--config", type=Path, help="the manager's YAML config file")
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command("create", "create a key and print it (shown only this once)", group=key_actions)
    create.add_argument("name", metavar="NAME", help="who the key is for, e.g. alice or ci")
    create.add_argument("--scope", choices=("user", "admin"), default="user", help="user (default) or admin")
    create.add_argument("--max-sessions", type=int, metavar="N", help="live sessions (0: no limit)")
    create.add_argument(
        "--starts-per-minute", type=int, metavar="N", help="new sessions a minute (0: no limit)"
    )
    create.add_argument("--expires", metavar="WHEN", help="e.g. 30d, 12h or 2030-01-31 (default: never)")
    listing = command("list", "list the keys (never their secrets)", group=key_actions)
    listing.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    revoke = command(
        "revoke", "revoke a key (managers refuse it within key_cache_seconds)", group=key_actions
    )
    revoke.add_argument("key", metavar="KEY", help="id or name")
    expire = command("expire", "set when a key expires", group=key_actions)
    expire.add_argument("key", metavar="KEY", help="id or name")
    expire.add_argument("when", metavar="WHEN", help="now, a duration (12h, 30d) or an ISO date")

    session = command("session", "start, reconnect, close or release a session", [client])
    actions = session.add_subparsers(dest="action", required=True, metavar="ACTION")
    command("new", "start a session and print its node_id", [client], actions)
    for name, text in (
        ("reconnect", "restart the session's node (workspace kept)"),
        ("close", "stop the session's node; reconnect starts it again"),
        ("release", "kill and remove the session's node for good"),
    ):
        command(name, text, [client], actions).add_argument("node_id", metavar="NODE_ID")

    sessions = command("sessions", "list your sessions (ids, status, labels)", [client])
    sessions.add_argument(
        "--label", action="append", default=[], type=_label, metavar="KEY=VALUE", help="only those with it"
    )
    sessions.add_argument("--json", action="store_true", help="print a JSON list")

    run = command(
        "run",
        "run a shell command in a session, its stdout and stderr streamed here as it prints "
        "(exits with its exit status)",
        [client],
    )
    run.add_argument("--session", metavar="NODE_ID", help="session to use (default: a temporary one)")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="kill the command after this long")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND", help="the bash command line")

    shell = command(
        "shell",
        "an interactive terminal in a session, like docker exec -it (exit or Ctrl-D leaves it)",
        [client],
    )
    shell.add_argument("node_id", metavar="SESSION", help="the session id (node_id)")

    tools = command("tools", "list a node's tools with the first line of their descriptions", [client])
    tools.add_argument("--session", metavar="NODE_ID", help="session to ask (default: a temporary one)")
    tools.add_argument("--search", metavar="QUESTION", help="only the tools that best match QUESTION")
    tools.add_argument("--top-k", type=int, default=5, metavar="N", help="with --search: how many (5)")
    tools.add_argument("--json", action="store_true", help="print the raw JSON answer")

    exec_ = command("exec", "run a tool and print its result", [client])
    exec_.add_argument("--session", metavar="NODE_ID", help="session to use (default: a temporary one)")
    exec_.add_argument(
        "--out", type=Path, metavar="PATH", help="file for a binary result (default: its name here)"
    )
    exec_.add_argument("tool", metavar="TOOL", help="tool name, e.g. calculator")
    exec_.add_argument(
        "args",
        nargs="*",
        type=_tool_arguments,
        metavar="ARGS",
        help="""a JSON object ('{"expression": "6*7"}') or key=value pairs (values parsed as JSON
        when they parse, else kept as strings)""",
    )

    upload = command("upload", "upload a local file into a session's workspace", [client])
    upload.add_argument("node_id", metavar="NODE_ID")
    upload.add_argument("file", type=Path, metavar="FILE")
    upload.add_argument("--as", dest="name", metavar="NAME", help="name in the workspace")

    download = command("download", "download a file from a session's workspace", [client])
    download.add_argument("node_id", metavar="NODE_ID")
    download.add_argument("path", metavar="PATH", help="path in the workspace")
    download.add_argument("dest", nargs="?", type=Path, metavar="DEST", help="default: PATH's basename")

    mcp = command("mcp", "serve a session's tools to an MCP client on stdin/stdout", [client])
    mcp.add_argument(
        "--session",
        metavar="NODE_ID",
        help="attach to this session (left running on exit); default: a new one, released on exit",
    )
    mcp.add_argument(
        "--resource-max-bytes",
        type=int,
        default=10 * 1024 * 1024,
        metavar="N",
        help="largest workspace file served as a resource (default 10 MiB)",
    )

    workspace = command("download-workspace", "download a session's workspace as a zip file", [client])
    workspace.add_argument("node_id", metavar="NODE_ID")
    workspace.add_argument("dest", type=Path, metavar="DEST.zip")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        from toolserver.client_cli import run

        return run(args)
    if args.command == "mcp":
        from toolserver.client_cli import resolve_url
        from toolserver.mcp_server.stdio import run as run_mcp

        return run_mcp(
            resolve_url(args.url), args.session, args.resource_max_bytes, getattr(args, "api_key", None)
        )
    if args.command == "node" and args.template_fd is not None:
        from toolserver.runtimes.sandbox_template import main as template_main

        return template_main(args.template_fd)
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

    from toolserver.errors import ConfigError, DatabaseUnavailable
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

        try:
            serve_manager(settings, log_level=args.log_level)
        except (ConfigError, DatabaseUnavailable) as exc:
            print(f"toolserver: cannot start the manager: {exc}", file=sys.stderr)
            return 2
    elif args.command == "nodes":
        from toolserver.manager.listing import print_nodes

        return print_nodes(settings, every=args.all, as_json=args.json)
    elif args.command == "keys":
        from toolserver.manager.keycli import run_keys

        return run_keys(settings, args)
    else:
        from toolserver.manager.checker import run_standalone

        return run_standalone(settings)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
