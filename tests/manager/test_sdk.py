"""The SDK against a real manager and real process nodes: sessions, streamed commands, Python with
plots, files and typed errors, sync and async alike."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ManagerProcess, terminal_transcript, wait_until
from toolserver.client import (
    AsyncToolServerClient,
    BadArgumentsError,
    CapacityExceededError,
    NodeNotReadyError,
    NotFoundError,
    Session,
    SessionNotFoundError,
    StreamBrokenError,
    ToolFailedError,
    ToolNotFoundError,
    ToolServerClient,
)


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    """One manager for the module (node starts are what costs); nothing may be left running."""
    started = ManagerProcess(tmp_path_factory.mktemp("sdk"), node={"max_nodes": 3}).start()
    yield started
    leftovers = started.cleanup()
    assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture(scope="module")
def client(manager: ManagerProcess) -> Iterator[ToolServerClient]:
    with ToolServerClient(manager.url) as c:
        yield c


@pytest.fixture(scope="module")
def session(client: ToolServerClient) -> Iterator[Session]:
    with client.create_session(labels={"suite": "sdk"}) as s:
        yield s


def test_sessions_are_created_listed_connected_and_released(
    client: ToolServerClient, session: Session, manager: ManagerProcess
) -> None:
    listed = {s.session_id: s for s in client.list_sessions()}
    assert session.session_id in listed
    info = listed[session.session_id]
    assert info.status == "running" and info.health == "healthy"
    assert info.labels == {"suite": "sdk"}  # stored with the session, listed with it
    assert [s.session_id for s in client.list_sessions({"suite": "sdk"})] == [session.session_id]
    assert client.list_sessions({"suite": "other"}) == []
    assert info.short_id == manager.node(session.session_id)["short_id"]
    # another client (another process, say) picks the session up by its id
    with ToolServerClient(manager.url) as other:
        assert other.connect(session.session_id).run("echo same node").stdout == "same node\n"
    with client.create_session() as temporary:
        assert manager.node(temporary.session_id) is not None
    assert manager.node(temporary.session_id) is None  # released on leaving the block
    with pytest.raises(BadArgumentsError) as bad:
        client.list_sessions({"": "x"})
    assert "is not key=value" in str(bad.value)


def test_run_streams_stdout_and_stderr_as_printed(session: Session) -> None:
    # the command waits for input after printing "ready": the callback sees it while it runs, and
    # writes that input from another connection
    seen: list[tuple[str, str]] = []

    def on_stdout(text: str) -> None:
        seen.append(("stdout", text))
        if "ready" in text:
            (command,) = [
                c for c in session.commands.list() if c.status == "running" and "ready" in c.command
            ]
            session.commands.connect(command.id).send_stdin("otter\n")

    result = session.run(
        "echo ready; read name; echo warn >&2; echo hello $name; exit 3",
        on_stdout=on_stdout,
        on_stderr=lambda text: seen.append(("stderr", text)),
        stdin=True,
    )
    assert (result.stdout, result.stderr, result.exit_code, result.status) == (
        "ready\nhello otter\n",
        "warn\n",
        3,
        "exited",
    )
    assert seen[0] == ("stdout", "ready\n") and ("stderr", "warn\n") in seen
    assert not result.ok
    timed_out = session.run("sleep 30", timeout=0.5)
    assert timed_out.status == "timeout" and timed_out.exit_code is not None


def test_background_commands_give_a_handle(session: Session) -> None:
    handle = session.run("echo started; read; echo finished", background=True, stdin=True)
    so_far = wait_until(lambda: (out := handle.output()).stdout and out, what="the first line")
    assert so_far.status == "running" and so_far.stdout == "started\n" and so_far.exit_code is None
    handle.send_stdin("\n", eof=True)
    done = handle.wait()
    assert done.stdout == "started\nfinished\n" and done.ok
    sleeper = session.run("sleep 600", background=True)
    assert sleeper.id in [c.id for c in session.commands.list()]
    assert sleeper.kill().status == "killed"
    assert sleeper.wait().status == "killed"


def test_python_returns_text_and_images(session: Session) -> None:
    first = session.python("x = 6 * 7\nprint('x is', x)")
    assert first.text == "x is 42\n" and first.images == [] and first.error is None
    plot = session.python(
        "import matplotlib.pyplot as plt, numpy as np, pandas as pd\n"
        "print(pd.Series(np.arange(4)).sum())\n"
        "plt.plot([1, 2, 3], [x, 0, x])"
    )
    assert "6" in plot.text
    (image,) = plot.images
    assert image.media_type == "image/png" and image.data.startswith(b"\x89PNG\r\n\x1a\n")
    failed = session.python("1 / 0")
    assert failed.error is not None and "ZeroDivisionError" in failed.error and failed.text == ""


def test_files(session: Session, tmp_path: Path) -> None:
    files = session.files
    assert files.write("notes/a.txt", "hello") == "notes/a.txt"
    assert files.read_text("notes/a.txt") == "hello"
    assert files.exists("notes/a.txt") and not files.exists("notes/b.txt")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 8192)  # 2 MiB, streamed both ways
    assert files.upload(big, "notes/big.bin") == "notes/big.bin"
    back = files.download("notes/big.bin", tmp_path / "back.bin")
    assert back.read_bytes() == big.read_bytes()
    assert [(f.name, f.type, f.size) for f in files.list("notes")] == [
        ("a.txt", "file", 5),
        ("big.bin", "file", 2 * 1024 * 1024),
    ]
    files.remove("notes", recursive=True)
    assert not files.exists("notes")
    with pytest.raises(NotFoundError):
        files.read("notes/a.txt")


def test_typed_errors(client: ToolServerClient, session: Session, manager: ManagerProcess) -> None:
    with pytest.raises(SessionNotFoundError):
        client.connect("no-such-session").run("true")
    with pytest.raises(ToolNotFoundError):
        session.execute_tool("no_such_tool")
    with pytest.raises(BadArgumentsError) as bad:
        session.execute_tool("calculator", {"expression": 5})
    assert bad.value.field == "expression"
    with pytest.raises(BadArgumentsError) as bad_path:
        session.files.list("../..")
    assert bad_path.value.status_code == 400
    with pytest.raises(ToolFailedError) as failed:
        session.execute_tool("shell_command_executor", {"shell_id": 99999})
    assert "no shell with shell_id=99999" in str(failed.value)

    # max_nodes is 3: the shared session and two more fill the manager
    extra = [client.create_session(), client.create_session()]
    try:
        with pytest.raises(CapacityExceededError) as full:
            client.create_session()
        assert full.value.retry_after == 5
        # a node that goes away mid-stream: the stream's end is reported, not a protocol error
        cut: list[BaseException] = []

        def follow() -> None:
            try:
                extra[0].run("echo started; sleep 60")
            except BaseException as exc:
                cut.append(exc)

        follower = threading.Thread(target=follow)
        follower.start()
        wait_until(lambda: [c for c in extra[0].commands.list() if c.status == "running"], what="the command")
        extra[0].close()
        follower.join(30)
        assert len(cut) == 1 and isinstance(cut[0], StreamBrokenError), cut
        with pytest.raises(NodeNotReadyError) as stopped:
            extra[0].run("true")
        assert "node is not running" in str(stopped.value)
    finally:
        for s in extra:
            s.release()


async def test_the_async_client(manager: ManagerProcess, session: Session) -> None:
    lines: list[str] = []

    async def collect(text: str) -> None:
        lines.append(text)

    async with AsyncToolServerClient(manager.url) as client:
        assert session.session_id in [s.session_id for s in await client.list_sessions()]
        async with await client.create_session(labels={"kind": "async"}) as s:
            result = await s.run("for i in 1 2 3; do echo $i; done; echo e >&2", on_stdout=collect)
            assert "".join(lines) == "1\n2\n3\n" and result.stderr == "e\n" and result.ok
            handle = await s.run("sleep 0.2; echo late", background=True)
            assert (await handle.wait()).stdout == "late\n"
            assert (await s.python("print(2 ** 10)")).text == "1024\n"
            await s.files.write("f.txt", b"bytes")
            assert await s.files.read("f.txt") == b"bytes"
            assert [f.name for f in await s.files.list()] == ["f.txt", "notebook.ipynb"]
            with pytest.raises(ToolNotFoundError):
                await s.execute_tool("nope")
        with pytest.raises(SessionNotFoundError):
            await s.run("true")  # released when the block ended


def test_a_command_stops_when_its_client_goes(manager: ManagerProcess, session: Session) -> None:
    """Through the manager too: the proxy stops the node's stream when the client disconnects."""
    body = {"command": "sleep 4901", "background": False}
    with httpx.stream(
        "POST", manager.url + "/commands", json=body, headers={"Cookie": f"node_id={session.session_id}"}
    ) as response:
        lines = response.iter_lines()  # (dropped, the generator would close the response)
        assert next(lines).startswith('{"type":"start"')
        wait_until(lambda: any(c.command == "sleep 4901" for c in session.commands.list()))
    wait_until(
        lambda: not any(c.command == "sleep 4901" for c in session.commands.list()),
        timeout=15,
        what="the command to be killed",
    )


def test_the_readme_agent_loop(manager: ManagerProcess) -> None:
    """The README's agent loop, as printed there, driven by a scripted model."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    code = readme[readme.index("def agent(") :]
    code = code[: code.index("```")].replace("http://127.0.0.1:8080", manager.url)
    namespace: dict[str, object] = {}
    exec(compile("from toolserver.client import ToolServerClient\n" + code, "README.md", "exec"), namespace)
    steps = iter(
        [{"run": "echo 6 7 > n.txt"}, {"python": "print(sum(map(int, open('n.txt').read().split())))"}]
    )
    history_seen: list[list[dict[str, str]]] = []

    def ask_llm(history: list[dict[str, str]]) -> dict[str, str]:
        history_seen.append(list(history))
        return next(steps, {"answer": history[-1]["content"].split()[0]})

    assert namespace["agent"]("add the numbers", ask_llm) == "13"  # type: ignore[operator]
    assert history_seen[1][-1]["content"].startswith("exit 0")


async def test_api_keys_own_their_sessions_and_terminals(tmp_path: Path) -> None:
    """With API keys: each key lists only its own sessions (an admin all of them), and another
    key's session is refused over HTTP and over the terminal's WebSocket alike."""
    import aiohttp

    from toolserver.client import AccessDeniedError

    manager = ManagerProcess(tmp_path / "keys", auth="api_keys").start()
    try:
        alice_key, bob_key = manager.create_key("alice", "user"), manager.create_key("bob", "user")
        admin_key = manager.create_key("ops", "admin")
        with (
            ToolServerClient(manager.url, api_key=alice_key) as alice,
            ToolServerClient(manager.url, api_key=bob_key) as bob,
            ToolServerClient(manager.url, api_key=admin_key) as admin,
        ):
            with pytest.raises(AccessDeniedError) as no_key:
                ToolServerClient(manager.url, api_key="").list_sessions()
            assert no_key.value.status_code == 401
            with alice.create_session(labels={"who": "alice"}) as mine:
                assert [s.labels for s in alice.list_sessions()] == [{"who": "alice"}]
                assert bob.list_sessions() == [] and bob.list_sessions({"who": "alice"}) == []
                assert [s.session_id for s in admin.list_sessions({"who": "alice"})] == [mine.session_id]
                assert mine.run("echo mine").stdout == "mine\n"
                with pytest.raises(AccessDeniedError):
                    bob.connect(mine.session_id).run("echo theirs")
                url = manager.url.replace("http", "ws") + "/terminal"
                cookie = {"Cookie": f"node_id={mine.session_id}"}
                async with aiohttp.ClientSession() as http:
                    for key in (bob_key, None):
                        headers = {**cookie, **({"Authorization": f"Bearer {key}"} if key else {})}
                        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                            await http.ws_connect(url, headers=headers)
                        assert refused.value.status == 403
                    async with http.ws_connect(
                        url, headers={**cookie, "Authorization": f"Bearer {alice_key}"}
                    ) as ws:
                        text, control = await terminal_transcript(ws, b"echo $((2*21)); exit\r")
                assert "42" in text and control == {"type": "exit", "exit_code": 0}
    finally:
        leftovers = manager.cleanup()
    assert not leftovers
