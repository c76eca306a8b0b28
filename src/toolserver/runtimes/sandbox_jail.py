"""The command line that confines a node, and the host uid each node runs as.

A node runs under two nested bubblewrap sandboxes:

1. an **outer** ``bwrap``, run as root, makes the PID, IPC, UTS, network (unless pasta made one)
   and mount namespaces and the filesystem the node sees: read-only ``/usr`` and a few files of
   ``/etc``, the Python it runs on and the installed package, ``/workspace`` and ``/state``
   read-write, nothing else of the host (no ``data_dir``, database, config, other nodes, ``/root``,
   home directories);
2. ``setpriv`` drops to the node's own unprivileged host uid (no groups, no capabilities);
3. an **inner**, unprivileged ``bwrap --unshare-user --disable-userns`` maps that uid to 10001 in
   a user namespace of its own, gives the node a private ``/tmp``, and forbids further user
   namespaces.

Nothing the node writes is read back: it serves on a Unix socket the runtime binds and hands it as
an inherited descriptor (``--fd``), so the socket file lives in the node's directory, where only
root can write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import toolserver

#: uid and gid of the node inside its user namespace (the image's user in the Docker tier too)
INNER_UID = 10001
WORKSPACE = "/workspace"
STATE = "/state"
NODE_CONFIG = "/etc/toolserver/node.yml"
#: what of the host's /etc a node sees (read-only): libraries, certificates, names, time zone
ETC_FILES = (
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "fonts",
    "gai.conf",
    "host.conf",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "magic",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "profile",
    "protocols",
    "resolv.conf",
    "services",
    "ssl",
    "terminfo",
    "timezone",
)
#: top-level host entries shown read-only (or as the symlinks they are)
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def python_paths() -> list[str]:
    """What the node's interpreter needs: its prefix, the venv, and the ``toolserver`` package."""
    package = str(Path(toolserver.__file__).resolve().parent)
    paths = []
    for path in (sys.base_prefix, sys.prefix, package):
        resolved = str(Path(path).resolve())
        if not any(resolved == p or resolved.startswith(p + "/") for p in paths):
            paths.append(resolved)
    return paths


def _parents(paths: Iterable[str]) -> list[str]:
    """Every ancestor directory of ``paths`` below ``/``, outermost first. The outer bwrap makes
    them 0711 (but a ``sys.path`` entry, which the import system lists): the node's uid may pass
    through them to its interpreter but not list them, so ``/root`` (where pyenv keeps Python)
    shows the node nothing."""
    found: list[str] = []
    for path in paths:
        for parent in reversed(Path(path).parents):
            text = str(parent)
            if text != "/" and text not in found and text.split("/")[1] not in SYSTEM_DIRS:
                found.append(text)
    return found


def outer_args(
    *,
    workspace: Path,
    state: Path,
    etc: Path,
    node_config: Path | None,
    own_netns: bool,
) -> list[str]:
    """The outer bwrap's options (run as root): namespaces and the node's view of the filesystem."""
    args = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if own_netns:
        args.append("--unshare-net")
    args += ["--hostname", "toolserver-node", "--proc", "/proc", "--dev", "/dev"]
    args += ["--dir", "/tmp", "--perms", "0755", "--dir", "/etc"]
    for name in SYSTEM_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            args += ["--ro-bind", str(host), str(host)]
    for name in ETC_FILES:
        if (Path("/etc") / name).exists():
            args += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    args += ["--ro-bind", str(etc / "passwd"), "/etc/passwd", "--ro-bind", str(etc / "group"), "/etc/group"]
    pythons = python_paths()
    importable = set(sys.path)
    for parent in _parents(pythons):
        # listable only where Python must list it (a sys.path entry: the editable install's src/)
        args += ["--perms", "0755" if parent in importable else "0711", "--dir", parent]
    for path in pythons:
        args += ["--ro-bind", path, path]
    if node_config is not None:
        args += ["--ro-bind", str(node_config), NODE_CONFIG]
    args += ["--bind", str(workspace), WORKSPACE, "--bind", str(state), STATE]
    args += ["--chdir", WORKSPACE]
    return args


def inner_args() -> list[str]:
    """The inner, unprivileged bwrap's options: a user namespace of its own and a private /tmp
    (which keeps the interpreter's paths that lie under /tmp, a checkout there say)."""
    uid = str(INNER_UID)
    under_tmp = [p for p in python_paths() if p.startswith("/tmp/")]
    keep = [arg for p in under_tmp for arg in ("--ro-bind", p, p)]
    return [
        "--unshare-user",
        "--disable-userns",
        "--uid",
        uid,
        "--gid",
        uid,
        "--dev-bind",
        "/",
        "/",
        "--tmpfs",
        "/tmp",
        *keep,
        "--tmpfs",
        "/dev/shm",
        "--new-session",
        "--die-with-parent",
        "--chdir",
        WORKSPACE,
    ]


def node_env(extra: dict[str, str]) -> dict[str, str]:
    """The node's whole environment: nothing of the manager's own (it may hold credentials)."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {
        "PATH": f"{venv_bin}:{PATH}",
        "HOME": "/tmp",
        "USER": "node",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "TERM": "xterm-256color",
        "TOOLSERVER_NODE_STATE_DIR": STATE,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra)
    return env


def write_etc(etc: Path) -> None:
    """The node's ``/etc/passwd`` and ``/etc/group``: only root, the node's user and nobody."""
    etc.mkdir(parents=True, exist_ok=True)
    passwd = f"root:x:0:0:root:/root:/bin/bash\nnode:x:{INNER_UID}:{INNER_UID}:node:/tmp:/bin/bash\n"
    passwd += "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    group = f"root:x:0:\nnode:x:{INNER_UID}:\nnogroup:x:65534:\n"
    for name, text in (("passwd", passwd), ("group", group)):
        path = etc / name
        if not path.exists() or path.read_text() != text:
            # a name of its own: creates of other threads and worker processes write it too
            fd, tmp = tempfile.mkstemp(dir=etc, prefix=f".{name}.")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)


class UidClaims:
    """Host uids handed to nodes, one per node, machine-wide: a claim is a file
    ``<dir>/<uid>`` naming the node directory that holds it (made with O_EXCL, so two managers
    never get the same uid). A claim whose node directory is gone is stale and taken over."""

    def __init__(self, directory: Path, base: int, count: int) -> None:
        self.dir = directory
        self.base = base
        self.count = count

    def claim(self, node_dir: Path) -> int:
        """A free uid, now held by ``node_dir``; OSError when the range is used up."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # one claimer at a time, machine-wide: two taking over the same stale claim would each
        # unlink what the other had just made and both hold its uid
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._claim(node_dir)

    def _claim(self, node_dir: Path) -> int:
        for uid in range(self.base, self.base + self.count):
            path = self.dir / str(uid)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if self._stale(path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    with contextlib.suppress(FileExistsError):
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        break
                continue
            break
        else:
            raise OSError(errno.EUSERS, f"all {self.count} node uids from {self.base} are in use (uid_count)")
        with os.fdopen(fd, "w") as f:
            f.write(str(node_dir))
        return uid

    def release(self, uid: int, node_dir: Path) -> None:
        """Give ``uid`` back if ``node_dir`` holds it."""
        path = self.dir / str(uid)
        with contextlib.suppress(OSError):
            if path.read_text() == str(node_dir):
                path.unlink()

    @staticmethod
    def _stale(path: Path) -> bool:
        try:
            holder = path.read_text()
        except OSError:
            return False
        return bool(holder) and not Path(holder).is_dir()
