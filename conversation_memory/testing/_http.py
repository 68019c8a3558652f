"""The sockets under :class:`~conversation_memory.testing.ChatServer`: when bytes go out.

A :class:`~http.server.ThreadingHTTPServer` in a background thread, HTTP/1.1
with keep-alive, ``Content-Length`` bodies and chunked SSE streams. What to
answer is decided elsewhere (the server's ``respond`` callable returns a
:class:`Response`); this module only sends it, as slowly, as cut or as
abruptly as the response says, and closes every connection on shutdown
(sleeping faults wake up through the ``closing`` event).
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["HTTPServer", "Respond", "Response"]

_MAX_BODY = 64 * 1024 * 1024

Respond = Callable[[str, str, dict[str, str], bytes], "Response"]
"""What the server answers: (method, path with query, lower-cased headers, raw body) to a
:class:`Response`."""


@dataclass(slots=True)
class Response:
    """What to send, and how badly."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    events: list[bytes] | None = None
    """SSE events (each a complete ``data: ...\\n\\n``): sent chunked when not None."""
    first_byte_delay: float = 0.0
    chunk_delay: float = 0.0
    chunk_bytes: int = 0
    finish_index: int = 0
    """Index of the stream event carrying finish_reason (a cut stops before it)."""
    close_after: int | None = None
    """Close the socket after this many events (streams) or half the body (-1: at once)."""


class HTTPServer(ThreadingHTTPServer):
    """Serves ``respond``'s answers on ``address``; tracks open connections so that
    closing can wake and end every handler.

    ``closing`` is set when the server shuts down: delays end at once.
    ``on_error`` receives the traceback of any error that is not a client hanging up.
    """

    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        respond: Respond,
        closing: threading.Event,
        on_error: Callable[[str], None],
    ) -> None:
        self.respond = respond
        self.closing = closing
        self.on_error = on_error
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up (or going quiet) are expected; anything else is recorded."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        self.on_error(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HTTPServer
    timeout = 60

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle's
        # algorithm meets the client's delayed ACK and each reply waits ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def _serve(self) -> None:
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(min(length, _MAX_BODY)) if length > 0 else b""
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        response = self.server.respond(self.command, self.path, headers, raw)
        try:
            self._send(response)
        except OSError:
            self.close_connection = True

    def _wait(self, seconds: float) -> bool:
        """Sleep unless the server closes first; False when it did."""
        return not (seconds > 0 and self.server.closing.wait(seconds))

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, response: Response) -> None:
        if not self._wait(response.first_byte_delay) or response.close_after == -1:
            self._hang_up()
            return
        self.send_response(response.status)
        self.send_header("content-type", response.content_type)
        for name, value in response.headers:
            self.send_header(name, value)
        if response.events is None:
            self._send_body(response)
        else:
            self._send_events(response)

    def _send_body(self, response: Response) -> None:
        body = response.body
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if response.close_after is not None:
            self.wfile.write(body[: len(body) // 2])
            self._hang_up()
            return
        size = response.chunk_bytes or len(body) or 1
        for offset in range(0, len(body), size):
            if offset and not self._wait(response.chunk_delay):
                self._hang_up()
                return
            self.wfile.write(body[offset : offset + size])

    def _send_events(self, response: Response) -> None:
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i, event in enumerate(response.events or ()):
            if response.close_after is not None and i >= response.close_after:
                self._hang_up()
                return
            if i and not self._wait(response.chunk_delay):
                self._hang_up()
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        if response.close_after is not None:
            self._hang_up()
            return
        self.wfile.write(b"0\r\n\r\n")
