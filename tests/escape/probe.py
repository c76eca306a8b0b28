"""What a malicious agent runs inside its node (copied into its workspace by the escape suite).

``python3 probe.py CHECK ARGS...`` prints one JSON object: what the agent managed to do. It uses
only the standard library, so it runs on the Python of every tier. Every walk is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys

MAX_FILES = 20000
MAX_BYTES = 4 << 20


def read(paths: list[str]) -> dict:
    """Which paths could be read (a file's first bytes, a directory's names)."""
    got = {}
    for path in paths:
        try:
            if os.path.isdir(path):
                got[path] = sorted(os.listdir(path))[:20]
            else:
                with open(path, "rb") as fh:
                    got[path] = fh.read(64).decode(errors="replace")
        except OSError:
            got[path] = None  # refused, missing: not readable
    return {"readable": {p: v for p, v in got.items() if v is not None}}


def grep(needles: list[str], roots: list[str]) -> dict:
    """Files under ``roots`` (and /proc/*/environ, cmdline) holding one of ``needles``."""
    wanted = [n.encode() for n in needles]
    found, seen = [], 0

    def look(path: str) -> None:
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_BYTES)
        except OSError:
            return
        if any(w in data for w in wanted):
            found.append(path)

    for root in roots:
        for top, _dirs, files in os.walk(root):
            for name in files:
                seen += 1
                if seen > MAX_FILES:
                    break
                look(os.path.join(top, name))
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            look(f"/proc/{pid}/environ")
            look(f"/proc/{pid}/cmdline")
    return {"found": found}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def procs(markers: list[str]) -> dict:
    """Visible processes whose command line holds a marker (the manager's config, another node)."""
    hits = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            line = _cmdline(int(pid))
            if "probe.py" not in line and any(m in line for m in markers):  # not this probe, its shell
                hits.append(f"{pid}: {line[:200]}")
    return {"visible": hits}


def signal(pids: list[str]) -> dict:
    """Host pids (the manager's, the other node's) that accept a signal 0 from here."""
    hits = []
    for pid in map(int, pids):
        try:
            os.kill(pid, 0)
        except OSError:
            continue
        hits.append(f"{pid}: {_cmdline(pid)[:200]}")
    return {"signalled": hits}


def connect(targets: list[str]) -> dict:
    """Addresses (host:port or unix:path) that accept a connection from here."""
    opened = []
    for target in targets:
        if target.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX)
            address: object = target[5:]
        else:
            host, _, port = target.rpartition(":")
            sock, address = socket.socket(), (host, int(port))
        sock.settimeout(2)
        try:
            sock.connect(address)
            opened.append(target)
        except OSError:
            pass
        finally:
            sock.close()
    return {"opened": opened}


def gateway() -> dict:
    """The default route's gateway (the host as this node's network sees it), if any."""
    try:
        with open("/proc/net/route") as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[1] == "00000000" and int(fields[3], 16) & 2:
                    raw = bytes.fromhex(fields[2])[::-1]
                    return {"gateway": socket.inet_ntoa(raw)}
    except OSError:
        pass
    return {"gateway": None}


def privileges() -> dict:
    """What this process could gain: its no_new_privs flag (the kernel's own answer, prctl), its
    effective uid and capability sets, and the setuid-root programs it could run."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    no_new_privs = libc.prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
    caps = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("CapPrm", "CapEff"):
                caps[name] = int(value.strip(), 16)
    setuid = []
    for top in ("/bin", "/usr/bin", "/sbin", "/usr/sbin"):
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for name in names:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(top, name))
                if st.st_mode & 0o4000 and st.st_uid == 0:
                    setuid.append(os.path.join(top, name))
    return {"no_new_privs": no_new_privs, "euid": os.geteuid(), "caps": caps, "setuid_root": setuid[:10]}


def main() -> None:
    check, args = sys.argv[1], sys.argv[2:]
    if check == "grep":
        split = args.index("--")
        answer = grep(args[:split], args[split + 1 :])
    elif check == "gateway":
        answer = gateway()
    elif check == "privileges":
        answer = privileges()
    else:
        answer = {"read": read, "procs": procs, "signal": signal, "connect": connect}[check](args)
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
