"""Who is calling: API keys, their verification, and the caller every route and the proxy read.

A key is ``tsk_<id>_<secret>``: ``id`` (8 hex digits) is its visible prefix and primary key, the
secret 256 random bits. The database keeps only the SHA-256 of the whole key. A plain, fast hash
is enough here: with 256 random bits no guess gets anywhere near a preimage, so the slow,
salted hashes that passwords need (bcrypt, argon2) would only add cost to every first use.

:class:`KeyRing` checks a key once and keeps the result for ``key_cache_seconds``: a request
with a known key costs a dictionary lookup, no hashing and no database read. So a revoked or
expired key keeps working for at most that long, in every manager process sharing the database.
While the database cannot be read, a key accepted before the outage keeps working for
``database_outage_grace_seconds`` after it was last checked, as the routes of known sessions do
(never past the key's own expiry); any other key gets the outage's 503.

The caller is authenticated once per request, in the ASGI layer in front of the routes and the
proxy (:meth:`toolserver.manager.app.ManagerApp.__call__`), and stored in the ASGI scope under
:data:`SCOPE_KEY`; routes read it with :func:`current_caller` (a FastAPI dependency), the proxy
from the scope. With ``auth: none`` every request has the :data:`ANONYMOUS` caller, who may do
everything (as anyone reaching a loopback port could before keys existed).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from starlette.requests import Request

from toolserver.errors import DatabaseUnavailable, NotAuthenticated, NotYourSession
from toolserver.manager.lookups import shared_lookup
from toolserver.manager.models import ApiKey, utcnow
from toolserver.manager.settings import Settings
from toolserver.manager.store import KeyQuota, Store

Scope = Literal["user", "admin"]
#: Where the caller of a request lives in its ASGI scope.
SCOPE_KEY = "toolserver.caller"
TOKEN_PREFIX = "tsk_"
_TOKEN = re.compile(r"^tsk_([0-9a-f]{8})_[A-Za-z0-9_-]{43}$")
#: Verified (and refused) keys kept at most; past it expired entries go, then all.
CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Caller:
    """The identity of one request: an API key (id, name, scope, quotas) or the anonymous caller."""

    key_id: str | None
    name: str
    scope: Scope
    quota: KeyQuota | None = None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    def may_act_on(self, owner: str | None) -> bool:
        """Whether this caller may use a session owned by key ``owner`` (None: opened without a key)."""
        return self.is_admin or (owner is not None and owner == self.key_id)

    def check_owner(self, owner: str | None) -> None:
        """NotYourSession unless :meth:`may_act_on` ``owner``."""
        if not self.may_act_on(owner):
            raise NotYourSession("this session belongs to another API key")

    @property
    def owner_filter(self) -> str | None:
        """The owner to filter a listing by: None (everything) for an admin, else this key's id."""
        return None if self.is_admin else self.key_id


#: The caller of every request with ``auth: none``.
ANONYMOUS = Caller(None, "anonymous", "admin")


def current_caller(request: Request) -> Caller:
    """FastAPI dependency: the caller the ASGI layer authenticated for this request."""
    return request.scope.get(SCOPE_KEY, ANONYMOUS)


# ---- keys -------------------------------------------------------------------------------------------


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh ``(key_id, token)``."""
    key_id = secrets.token_hex(4)
    return key_id, f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(token: str) -> str | None:
    """The id inside a well-formed key, else None."""
    match = _TOKEN.match(token)
    return match.group(1) if match else None


def key_state(key: ApiKey, now: datetime | None = None) -> str:
    """``active``, ``revoked`` or ``expired``."""
    now = now or utcnow()
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def credentials(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The API key of a request: ``Authorization: Bearer``, ``X-API-Key`` or HTTP Basic credentials.

    With Basic (``http://key:<KEY>@host``), the password is the key; a key given as the user name
    with an empty password works too.
    """
    for name, value in headers:
        if name == b"authorization":
            scheme, _, rest = value.strip().partition(b" ")
            scheme = scheme.lower()
            if scheme == b"bearer":
                return rest.strip().decode("latin-1")
            if scheme == b"basic":
                try:
                    user, _, password = base64.b64decode(rest.strip(), validate=True).partition(b":")
                except (binascii.Error, ValueError):
                    return ""
                return (password or user).decode("latin-1")
            return ""
        if name == b"x-api-key":
            return value.strip().decode("latin-1")
    return None


@dataclass(frozen=True, slots=True)
class _Entry:
    caller: Caller | None  # None: refused, ``reason`` says why
    reason: str
    until: float  # trusted until then (clock time)
    checked: float = 0.0  # when the database said so
    ends: float = float("inf")  # when the key itself expires (clock time)


class KeyRing:
    """Verifies API keys against the database, keeping results for ``settings.key_cache_seconds``."""

    def __init__(self, store: Store, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.settings = settings
        self.ttl = settings.key_cache_seconds
        self.clock = clock
        self._cache: dict[str, _Entry] = {}
        self._lookups: dict[str, asyncio.Future[_Entry]] = {}
        self._names: dict[str, str] = {}

    async def verify(self, token: str | None) -> Caller:
        """The caller holding ``token``; NotAuthenticated saying what is wrong with it."""
        if token is None:
            raise NotAuthenticated(
                "this manager needs an API key: send 'Authorization: Bearer <key>', 'X-API-Key: <key>' "
                "or HTTP Basic credentials (http://key:<key>@host)"
            )
        entry = self._cache.get(token)
        now = self.clock()
        if entry is None or entry.until < now:
            try:
                entry = await shared_lookup(self._lookups, token, lambda: self._load(token))
            except DatabaseUnavailable:
                grace = self.settings.database_outage_grace_seconds
                if entry is None or entry.caller is None or now - entry.checked > grace or now >= entry.ends:
                    raise
        if entry.caller is None:
            raise NotAuthenticated(entry.reason)
        return entry.caller

    async def _load(self, token: str) -> _Entry:
        now = self.clock()
        until = now + self.ttl
        key_id = key_id_of(token)
        key = await self.store.get_key(key_id) if key_id else None
        if key is None or not hmac.compare_digest(key.secret_hash, hash_key(token)):
            entry = _Entry(None, "unknown API key", until)
        elif (state := key_state(key)) != "active":
            entry = _Entry(None, f"API key {key.id} ({key.name}) is {state}", until)
        else:
            ends = float("inf")
            if key.expires_at is not None:  # trusted no longer than the key is valid
                ends = now + (key.expires_at - utcnow()).total_seconds()
                until = min(until, ends)
            self._names[key.id] = key.name
            caller = Caller(key.id, key.name, key.scope, self.quota_of(key))  # type: ignore[arg-type]
            entry = _Entry(caller, "", until, now, ends)
        self._remember(token, entry, now)
        return entry

    def _remember(self, token: str, entry: _Entry, now: float) -> None:
        if len(self._cache) >= CACHE_MAX:
            grace = self.settings.database_outage_grace_seconds
            self._cache = {t: e for t, e in self._cache.items() if e.until >= now or now - e.checked <= grace}
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
        self._cache[token] = entry

    def quota_of(self, key: ApiKey) -> KeyQuota:
        """The key's own quotas, the manager's defaults where it has none; 0 means no limit."""
        defaults = self.settings.quotas

        def pick(own: int | None, default: int | None) -> int | None:
            value = default if own is None else own
            return value or None

        return KeyQuota(
            key.id,
            pick(key.max_sessions, defaults.max_sessions),
            pick(key.starts_per_minute, defaults.starts_per_minute),
        )

    async def names(self, key_ids: Iterable[str | None]) -> dict[str, str]:
        """Key id to name for ``key_ids`` (names never change; cached)."""
        missing = {k for k in key_ids if k and k not in self._names}
        if missing:
            for key in await self.store.list_keys():
                self._names[key.id] = key.name
        return self._names

    def name_of(self, key_id: str | None) -> str:
        """A known key's name, else its id; ``-`` for no key."""
        if key_id is None:
            return "-"
        return self._names.get(key_id, key_id)


def describe(key: ApiKey, now: datetime | None = None) -> dict[str, Any]:
    """What may be shown of a key: everything but its hash."""
    return {
        "id": key.id,
        "name": key.name,
        "scope": key.scope,
        "state": key_state(key, now),
        "created_at": key.created_at.isoformat() + "Z",
        "expires_at": key.expires_at.isoformat() + "Z" if key.expires_at else None,
        "revoked_at": key.revoked_at.isoformat() + "Z" if key.revoked_at else None,
        "max_sessions": key.max_sessions,
        "starts_per_minute": key.starts_per_minute,
    }
