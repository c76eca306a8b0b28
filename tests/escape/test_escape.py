"""The escape suite: a malicious agent holding one session of two tries to get out, on every tier.

Everything goes through the manager's API, as the agent would: it runs ``probe.py`` in its own
node (shell) and calls its file tools. Each check must hold on every confining tier; on
``process`` (no confinement, by design) it is an expected failure, reported as such (strict: a pass
there would mean the check checks nothing). See ``conftest.py`` for what the harness tells the
probe.
"""

from __future__ import annotations

import contextlib
import zipfile

import httpx
import pytest

from toolserver.errors import ClientError
from toolserver.testing import wait_until

from .conftest import World, escape_params, record

WORLD = {"argnames": "world", "argvalues": escape_params(), "indirect": True}


@pytest.mark.parametrize(**WORLD)
def test_no_read_of_the_other_sessions_workspace(world: World) -> None:
    found = world.probe("grep", world.victim.canary, "--", *world.victim.roots)["found"]
    assert found == [], f"the attacker read the victim's workspace: {found}"


@pytest.mark.parametrize(**WORLD)
def test_no_read_of_the_other_sessions_cookie_or_secret(world: World) -> None:
    v = world.victim
    found = world.probe("grep", v.cookie, v.secret, "--", *v.roots)["found"]
    assert found == [], f"the victim's cookie or node secret is readable at {found}"


@pytest.mark.parametrize(**WORLD)
def test_no_read_of_the_database_config_or_data_dir(world: World) -> None:
    m = world.manager
    paths = [str(m.db_path), str(m.config_path), str(m.data_dir), str(m.log_path)]
    assert world.probe("read", *paths)["readable"] == {}


@pytest.mark.parametrize(**WORLD)
def test_no_read_of_host_secrets_or_homes(world: World) -> None:
    readable = world.probe("read", "/etc/shadow", "/root", "/root/.bashrc", "/etc/sudoers")["readable"]
    assert readable == {}, f"readable: {sorted(readable)}"


@pytest.mark.parametrize(**WORLD)
def test_no_view_of_the_managers_or_the_other_nodes_processes(world: World) -> None:
    v = world.victim
    markers = [str(world.manager.config_path), v.short_id, str(v.state.get("dir") or "")]
    visible = world.probe("procs", *[m for m in markers if m])["visible"]
    assert visible == [], f"the attacker sees {visible}"


@pytest.mark.parametrize(**WORLD)
def test_no_signal_to_the_manager_or_the_other_node(world: World) -> None:
    targets = [world.manager.pid, *world.victim.pids]
    signalled = world.probe("signal", *map(str, targets))["signalled"]
    assert signalled == [], f"the attacker may signal {signalled}"


@pytest.mark.parametrize(**WORLD)
def test_no_way_to_gain_privileges(world: World) -> None:
    # no_new_privs: a setuid-root program (su, mount, passwd in an image) runs with the caller's
    # uid; and the node's processes hold no capability, whatever uid they show
    got = world.probe("privileges")
    assert got["no_new_privs"] == 1, f"no_new_privs is off; setuid-root programs here: {got['setuid_root']}"
    assert got["caps"] == {"CapPrm": 0, "CapEff": 0}, got


@pytest.mark.parametrize("world", escape_params(check="connect"), indirect=True)
def test_no_connection_to_the_manager_or_the_other_node(world: World) -> None:
    gateway = world.probe("gateway")["gateway"]
    port = world.manager.port
    targets = [f"127.0.0.1:{port}", *world.victim.address]
    if gateway:
        targets += [f"{gateway}:{port}"] + [
            f"{gateway}:{a.rsplit(':', 1)[1]}" for a in world.victim.address if not a.startswith("unix:")
        ]
    opened = world.probe("connect", *targets)["opened"]
    assert opened == [], f"the attacker connects to {opened}"


# -- resources: each hog runs in a session of its own, so that its node may die of it -------------


def _run_hog(world: World, command: str) -> str:
    """What the user sees of the hog: its command's result, or the node's record if it died of it."""
    session = world.client.create_session()
    try:
        try:
            result = session.run(command, timeout=120)
            seen = f"exit {result.exit_code} {result.status} {result.stdout[-300:]}"
        except ClientError as exc:  # the node died of it: the manager's checker reports why
            seen = f"{exc} {_reported_death(world, session.session_id)}"
        world.still_fine()
        return seen
    finally:
        with contextlib.suppress(ClientError):
            session.release()


def _reported_death(world: World, cookie: str) -> str:
    short_id = record(world.manager.db_path, cookie)["short_id"]

    def reported() -> str | None:
        answer = httpx.get(f"{world.manager.url}/admin/sessions/{short_id}", timeout=30).json()
        return None if answer["status"] == "running" and not answer["detail"] else str(answer)

    return wait_until(reported, timeout=30, what=f"the manager to report node {short_id} dead")


MEMORY_HOG = "python3 -c \"x = bytearray(1 << 30); x[::4096] = b'x' * len(x[::4096]); print('allocated')\""
FORK_BOMB = (
    'python3 -c "\nimport os, signal, time\nkids = []\ntry:\n    while len(kids) < 2000:\n'
    "        pid = os.fork()\n        if pid == 0:\n            time.sleep(60); os._exit(0)\n"
    "        kids.append(pid)\n    print('forked', len(kids))\nexcept OSError as exc:\n"
    "    print('limit', len(kids), exc)\nfor pid in kids:\n    os.kill(pid, signal.SIGKILL)\n\""
)
DISK_FILLER = "dd if=/dev/zero of=fill bs=1M count=512 2>&1; echo rc=$?; rm -f fill"


@pytest.mark.parametrize("world", escape_params(run_on_process=False), indirect=True)
def test_a_memory_hog_is_contained(world: World) -> None:
    seen = _run_hog(world, MEMORY_HOG)
    assert "allocated" not in seen, seen
    assert any(
        word in seen for word in ("exit -9", "exit 137", "killed", "OOM", "MemoryError", "signal 9")
    ), seen


@pytest.mark.parametrize("world", escape_params(run_on_process=False), indirect=True)
def test_a_fork_bomb_is_contained(world: World) -> None:
    seen = _run_hog(world, FORK_BOMB)
    # gVisor's guest processes are not host processes: the pids limit counts the Sentry's threads,
    # and a bomb that reaches it ends its own sandbox (reported dead), nothing else
    assert "forked 2000" not in seen, seen
    assert "limit" in seen or "'kind': 'died'" in seen, seen


@pytest.mark.parametrize("world", escape_params(run_on_process=False, check="disk"), indirect=True)
def test_a_disk_filler_is_contained(world: World) -> None:
    seen = _run_hog(world, DISK_FILLER)
    assert "No space left on device" in seen and "rc=0" not in seen, seen


# -- file tools: a second wall, inside the node; it holds on every tier, process included ----------


@pytest.mark.parametrize("world", escape_params(confined_everywhere=True), indirect=True)
def test_a_symlink_out_is_refused_by_every_file_tool(world: World) -> None:
    a = world.attacker
    made = a.run("rm -rf out_file out_dir; ln -s /etc/passwd out_file; ln -s / out_dir; echo ok")
    assert made.stdout.strip() == "ok"
    attempts = {
        "read": lambda: a.files.read("out_file"),
        "read through a dir": lambda: a.files.read("out_dir/etc/passwd"),
        "list": lambda: a.files.list("out_dir/etc"),
        "stat": lambda: a.files.exists("out_dir/etc/passwd"),
        "upload": lambda: a.files.write("out_dir/tmp/planted.txt", "x"),
        "upload over": lambda: a.files.write("out_file", "x"),
        "download": lambda: a.files.download("out_file", world.manager.root / "got"),
        "read tool": lambda: a.execute_tool("FileSystemEnv_read_from_file", {"filepath": "out_file"}),
        "write tool": lambda: a.execute_tool(
            "FileSystemEnv_write_to_file", {"filepath": "out_dir/tmp/planted.txt", "content": "x"}
        ),
    }
    for what, attempt in attempts.items():
        with pytest.raises(ClientError) as refused:
            attempt()
        assert refused.value.status_code == 400 and "outside the workspace" in str(refused.value), what
    zipped = a.download_workspace(world.manager.root / "ws.zip")
    names = zipfile.ZipFile(zipped).namelist()
    assert "out_file" not in names and not [n for n in names if n.startswith("out_dir")]
