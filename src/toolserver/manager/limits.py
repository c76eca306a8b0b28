"""What one HTTP request may cost the manager, enforced by the server that actually parses it.

uvicorn runs httptools here, and its ``h11_max_incomplete_event_size`` only reaches the h11
parser; httptools itself keeps a header's bytes until the header ends, however long it gets.
:class:`LimitedHttpToolsProtocol` (a small subclass of uvicorn's httptools protocol) counts every
byte of a request head as it arrives and refuses, then closes the connection:

* a head (request line and headers) over ``limits.header_bytes``: 431, at most one read (256
  KiB) past the limit is ever held;
* more than ``limits.headers`` header fields: 431; a request line over ``limits.request_line_bytes``: 414;
* a head not complete within ``limits.head_timeout_seconds`` of its first byte, or a connection
  that sends nothing for that long (slowloris): 408;
* no byte for ``limits.idle_timeout_seconds`` while a request body is still due: 408 (or the
  connection is closed when the answer has started).

Switching to h11 would bound headers too, at a large cost in proxy throughput. Body sizes of
the manager's own routes are checked in the ASGI layer (:func:`limited_body`).
"""

from __future__ import annotations

import json
from asyncio import TimerHandle
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from toolserver.manager.settings import RequestLimits


class Refused(Exception):
    """A request over a limit: the status and message of the answer it gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded heads and timeouts for slow clients."""

    def __init__(self, *args: Any, limits: RequestLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._in_head = False
        self._head_bytes = 0
        self._header_count = 0
        self._deadline: TimerHandle | None = None
        self._idle: TimerHandle | None = None
        self._closed = False

    # ---- connection ---------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms no timer before the first request: a silent connection would stay forever
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, Refused):
                return self._refuse(exc.__context__.status, exc.__context__.message)
            return self._bad_request()
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            return self._bad_request()
        if self._in_head:
            # every byte of this read belongs to the unfinished head (its first byte came with it or before)
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.header_bytes:
                return self._refuse(431, self._too_large())
        elif self.cycle is not None and self.cycle.more_body and not self.cycle.response_complete:
            self._arm_idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel_idle()

    # ---- parser callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._arm_deadline()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.request_line_bytes:
            raise Refused(414, f"request line longer than {self.limits.request_line_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.headers:
            raise Refused(431, f"more than {self.limits.headers} header fields")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.header_bytes:
            raise Refused(431, self._too_large())
        self._in_head = False
        self._cancel_deadline()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body:
            self._arm_idle()

    def on_message_complete(self) -> None:
        self._cancel_idle()
        super().on_message_complete()

    # ---- answers and timers -------------------------------------------------------------------------

    def _too_large(self) -> str:
        return f"request head (request line and headers) larger than {self.limits.header_bytes} bytes"

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON detail and close, unless an answer is already under way."""
        self._closed = True
        self._cancel_timers()
        if self.transport.is_closing():
            return
        self.logger.info("refused a request from %s: %s", self.client[0] if self.client else "?", message)
        answering = self.cycle is not None and not self.cycle.response_complete and not self._in_head
        if not (answering and self.cycle.response_started):
            body = json.dumps({"detail": message}).encode()
            head = [STATUS_LINE[status]]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
            self.transport.write(b"".join(head) + body)
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _bad_request(self) -> None:
        self.logger.warning("Invalid HTTP request received.")
        self._refuse(400, "invalid HTTP request")

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self.limits.head_timeout_seconds, self._head_late)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_late(self) -> None:
        self._deadline = None
        if self._in_head or self.cycle is None:  # mid-head, or a connection that never sent a request
            seconds = self.limits.head_timeout_seconds
            self._refuse(408, f"request head not received within {seconds:g} s")

    def _arm_idle(self) -> None:
        self._cancel_idle()
        self._idle = self.loop.call_later(self.limits.idle_timeout_seconds, self._idle_late)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idle_late(self) -> None:
        self._idle = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or cycle.response_complete:
            return
        if self.flow.read_paused:  # the app is not reading yet: the client is not the slow one
            return self._arm_idle()
        seconds = self.limits.idle_timeout_seconds
        self._refuse(408, f"no request body data for {seconds:g} s")

    def _cancel_timers(self) -> None:
        self._cancel_deadline()
        self._cancel_idle()


async def limited_body(receive: Any, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it grows past ``limit`` bytes.

    ConnectionResetError when the client goes away before the body is complete.
    """
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("the client went away before its request body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands out ``body`` once, then defers to the original (for disconnects)."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again
