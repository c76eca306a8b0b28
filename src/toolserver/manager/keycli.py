"""``toolserver keys create | list | revoke | expire``: API keys in the manager's database.

``create`` prints the new key on stdout, once (``KEY=$(toolserver keys create alice)``); the
database keeps only its hash. Keys are named by id (their visible prefix) or by name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from toolserver.manager.auth import describe, hash_key, key_state, new_key
from toolserver.manager.models import ApiKey, utcnow
from toolserver.manager.settings import Settings
from toolserver.manager.store import Store, open_store

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class KeyCommandError(Exception):
    """A key command cannot be carried out; the message says why."""


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``now``, a duration from now (``90m``, ``12h``, ``30d``, ``2w``) or an ISO date/time (UTC)."""
    now = now or utcnow()
    text = text.strip()
    if text == "now":
        return now
    match = _DURATION.match(text)
    if match:
        return now + timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        when = datetime.fromisoformat(text.removesuffix("Z"))
    except ValueError:
        raise KeyCommandError(
            f"cannot read {text!r} as a time: use 'now', a duration such as 12h, 30d or 2w, "
            "or an ISO date such as 2030-01-31"
        ) from None
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo is not None else when


async def _find(store: Store, ref: str) -> ApiKey:
    key = await store.get_key(ref)
    if key is not None:
        return key
    active = [k for k in await store.list_keys() if k.name == ref and key_state(k) == "active"]
    if not active:
        raise KeyCommandError(f"no active key with id or name {ref!r} (see: toolserver keys list)")
    if len(active) > 1:
        ids = ", ".join(k.id for k in active)
        raise KeyCommandError(f"several active keys are named {ref!r} ({ids}): name one by its id")
    return active[0]


async def _create(store: Store, args: argparse.Namespace) -> str:
    for option in ("max_sessions", "starts_per_minute"):
        value = getattr(args, option)
        if value is not None and value < 0:
            raise KeyCommandError(f"--{option.replace('_', '-')} must be 0 (no limit) or more")
    if not args.name.strip() or len(args.name) > 128:
        raise KeyCommandError("NAME must be 1 to 128 characters")
    if any(k.name == args.name and key_state(k) == "active" for k in await store.list_keys()):
        raise KeyCommandError(
            f"an active key is already named {args.name!r}; revoke it or choose another name"
        )
    expires = parse_when(args.expires) if args.expires else None
    key_id, token = new_key()
    while await store.get_key(key_id) is not None:
        key_id, token = new_key()
    await store.add_key(
        ApiKey(
            id=key_id,
            name=args.name,
            scope=args.scope,
            secret_hash=hash_key(token),
            created_at=utcnow(),
            expires_at=expires,
            max_sessions=args.max_sessions,
            starts_per_minute=args.starts_per_minute,
        )
    )
    until = f", expires {expires.isoformat(timespec='seconds')}Z" if expires else ""
    print(
        f"toolserver: key {key_id} for {args.name!r} ({args.scope}{until}); it is shown only now",
        file=sys.stderr,
    )
    return token


def _table(keys: list[dict[str, Any]]) -> str:
    header = ["ID", "NAME", "SCOPE", "STATE", "MAX_SESSIONS", "STARTS/MIN", "CREATED", "EXPIRES"]
    rows = [header]
    for k in keys:
        quota = [
            "default" if k[q] is None else ("none" if k[q] == 0 else str(k[q]))
            for q in ("max_sessions", "starts_per_minute")
        ]
        created = k["created_at"][:19].replace("T", " ")
        expires = (k["expires_at"] or "never")[:19].replace("T", " ")
        rows.append([k["id"], k["name"], k["scope"], k["state"], *quota, created, expires])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


async def _run(settings: Settings, args: argparse.Namespace) -> None:
    store = await open_store(settings.database_url)
    try:
        if args.action == "create":
            print(await _create(store, args))
        elif args.action == "list":
            now = utcnow()
            keys = [describe(k, now) for k in await store.list_keys()]
            print(json.dumps(keys, indent=2) if args.json else _table(keys))
        elif args.action == "revoke":
            key = await _find(store, args.key)
            await store.update_key(key.id, revoked_at=utcnow())
            wait = settings.key_cache_seconds
            print(f"revoked key {key.id} ({key.name}); managers refuse it within {wait:g} s")
        else:
            key = await _find(store, args.key)
            when = parse_when(args.when)
            await store.update_key(key.id, expires_at=when)
            print(f"key {key.id} ({key.name}) expires {when.isoformat(timespec='seconds')}Z")
    finally:
        await store.aclose()


def run_keys(settings: Settings, args: argparse.Namespace) -> int:
    """Run one ``keys`` action; returns the exit status."""
    from toolserver.errors import DatabaseUnavailable

    try:
        asyncio.run(_run(settings, args))
    except (KeyCommandError, DatabaseUnavailable) as exc:
        print(f"toolserver: {exc}", file=sys.stderr)
        return 1
    return 0
