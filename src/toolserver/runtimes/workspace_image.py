"""Workspaces of a fixed size for the Docker tiers: an ext4 image file, loop-mounted on the host.

Docker has no size limit for a volume or a bind mount on this kind of host: ``--storage-opt size``
needs overlay2 on XFS with project quotas (ext4 here), the local volume driver mounts only block
devices (an image file fails with "block device required", and its ``o=loop`` is not honoured),
and a tmpfs volume is gone at the next start. So the runtime keeps, per node, a sparse image file
``<data_dir>/docker-workspaces/<node_id>.ext4`` formatted ext4 (root directory owned by the
node's user, no reserved blocks) and mounts it (``nosuid,nodev``) at ``.../<node_id>/``, which the
container gets as ``/workspace``. A full workspace answers ENOSPC inside the node and nothing
else fills up; the image survives container restarts and is mounted again after a host reboot.

Every path here is made by the runtime from the node id it chose; nothing is read back from a
node. Mounting needs root (CAP_SYS_ADMIN) on the manager's host and ``mkfs.ext4``:
:meth:`WorkspaceImages.missing` says what is not there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path

from toolserver.errors import RuntimeBackendError

_TOOLS = ("mkfs.ext4", "mount", "umount")
#: smallest image ext4 formats with room to spare (its own metadata takes about 1.5 MiB)
MIN_BYTES = 8 * 1024**2


async def _run(*cmd: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeBackendError(f"{' '.join(cmd[:2])} failed: {err.decode(errors='replace').strip()}")


class WorkspaceImages:
    """The size-limited workspaces of one runtime, under ``root``."""

    def __init__(self, root: Path, size_bytes: int, owner: str) -> None:
        self.root = root.absolute()
        self.size_bytes = max(size_bytes, MIN_BYTES)
        self.owner = owner  # "uid:gid" of the node's user

    def image(self, node_id: str) -> Path:
        return self.root / f"{node_id}.ext4"

    def mountpoint(self, node_id: str) -> Path:
        return self.root / node_id

    @staticmethod
    def missing() -> str | None:
        """What this host lacks to mount workspace images, or None."""
        if os.geteuid() != 0:
            return f"mounting a workspace image needs root (the manager runs as uid {os.geteuid()})"
        absent = [tool for tool in _TOOLS if shutil.which(tool) is None]
        if absent:
            return f"{', '.join(absent)} not found (Debian's e2fsprogs and mount packages)"
        if not Path("/dev/loop-control").exists():
            return "no loop devices (/dev/loop-control is missing)"
        return None

    async def make(self, node_id: str) -> Path:
        """Create, format and mount the node's image; its mountpoint, ready for the container."""
        image = self.image(node_id)
        await asyncio.to_thread(self._new_image, image)
        try:
            await _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", f"root_owner={self.owner}", str(image))
            return await self.mount(node_id)
        except BaseException:
            await self.remove(node_id)
            raise

    def _new_image(self, image: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(image, "xb") as fh:
            fh.truncate(self.size_bytes)

    async def mount(self, node_id: str) -> Path:
        """Mount the node's image unless it is mounted (after a host reboot, say)."""
        point = self.mountpoint(node_id)
        if await asyncio.to_thread(os.path.ismount, point):
            return point
        if not await asyncio.to_thread(self.image(node_id).is_file):
            raise RuntimeBackendError(f"the workspace image of node {node_id} is gone")
        await asyncio.to_thread(point.mkdir, mode=0o755, exist_ok=True)
        await _run("mount", "-o", "loop,nosuid,nodev", str(self.image(node_id)), str(point))
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.rmdir, point / "lost+found")  # empty after mkfs: not the agent's
        return point

    async def remove(self, node_id: str) -> None:
        """Unmount and delete the node's image; what is already gone is fine."""
        point = self.mountpoint(node_id)
        if await asyncio.to_thread(os.path.ismount, point):
            try:
                await _run("umount", str(point))
            except RuntimeBackendError:
                await _run("umount", "-l", str(point))  # still busy: detach now, freed when unused
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.rmdir, point)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.image(node_id).unlink)

    async def known(self, older_than: float = 0.0) -> list[str]:
        """Node ids that have an image here, made more than ``older_than`` seconds ago."""

        def scan() -> list[str]:
            if not self.root.is_dir():
                return []
            cutoff = time.time() - older_than
            return sorted(
                p.name.removesuffix(".ext4") for p in self.root.glob("*.ext4") if p.stat().st_ctime < cutoff
            )

        return await asyncio.to_thread(scan)
