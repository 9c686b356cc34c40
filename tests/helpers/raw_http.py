"""Raw HTTP/1.1 on both sides of the proxy: an upstream that records exactly what reaches it
(`RawUpstream`), a raw client (`RawClient`) and a strict response reader (`read_response`),
with the `raw_upstream` and `clients` fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from conftest import HOST

# --------------------------------------------------------------------------------------------
# A raw upstream that records exactly what reaches it.


@dataclass
class Seen:
    """One complete request as the upstream received it."""

    method: bytes = b""
    target: bytes = b""
    version: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def values(self, name: bytes) -> list[bytes]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def names(self) -> list[bytes]:
        return [n.lower() for n, _ in self.headers]


Answer = Callable[[Seen], bytes | None]


def answer_ok(seen: Seen) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream: raw\r\n\r\nok"


class _Collector:
    """httptools callbacks gathering complete requests."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.current = Seen()
        self.done: list[Seen] = []

    def on_message_begin(self) -> None:
        self.current = Seen()

    def on_url(self, url: bytes) -> None:
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method()
        self.current.version = self.parser.get_http_version()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.done.append(self.current)


HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class RawUpstream:
    """A tiny HTTP/1.1 upstream on asyncio streams: counts connections, records requests and
    answers each complete request with `answer(seen)` (None: not yet, until `answer_held`; a
    reply carrying `Connection: close` closes the connection after it)."""

    def __init__(self, answer: Answer = answer_ok) -> None:
        self.answer = answer
        self.connections = 0
        self.closed = 0
        self.received = 0
        self.requests: list[Seen] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._held: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def targets(self) -> list[bytes]:
        return [s.target for s in self.requests]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        collector = _Collector()
        received = 0
        probe = False
        try:
            while data := await reader.read(65536):
                received += len(data)
                self.received += len(data)
                collector.parser.feed_data(data)
                done, collector.done = collector.done, []
                for seen in done:
                    if seen.target == b"/healthz":
                        # The proxy's health checker: answered, never counted.
                        probe = True
                        writer.write(HEALTHY)
                        return
                    self.requests.append(seen)
                    reply = self.answer(seen)
                    if reply is None:
                        self._held.append(writer)
                    else:
                        writer.write(reply)
                        if b"\r\nConnection: close\r\n" in reply:
                            return
        except (httptools.HttpParserError, ConnectionError):
            pass
        finally:
            if probe:
                self.connections -= 1
                self.received -= received
            else:
                self.closed += 1
            self._writers.discard(writer)
            writer.close()

    def answer_held(self, reply: bytes) -> int:
        """Answer every request left unanswered so far with `reply`; returns how many."""
        held, self._held = self._held, []
        for writer in held:
            if not writer.is_closing():
                writer.write(reply)
        return len(held)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            # Closing a writer ends its handler's read loop; let every handler finish.
            await asyncio.wait(self._tasks, timeout=2.0)
        if self._server is not None:
            await self._server.wait_closed()


RawUpstreamFactory = Callable[..., Awaitable[RawUpstream]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstreamFactory]:
    made: list[RawUpstream] = []

    async def make(answer: Answer = answer_ok) -> RawUpstream:
        upstream = RawUpstream(answer)
        await upstream.start()
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        await upstream.stop()


# --------------------------------------------------------------------------------------------
# A raw client and a strict response reader.


@dataclass
class Response:
    status: int
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def value(self, name: bytes) -> bytes | None:
        found = self.values(name)
        assert len(found) <= 1, f"{name!r} repeated: {found}"
        return found[0] if found else None

    def names(self) -> set[bytes]:
        return {n.lower() for n, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(
    reader: asyncio.StreamReader, *, head: bool = False, timeout: float = 5.0
) -> Response:
    """Read one response, framed strictly as RFC 9112 says (no body for HEAD, 1xx, 204, 304)."""
    async with asyncio.timeout(timeout):
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        version, status_text = lines[0].split(b" ", 2)[:2]
        status = int(status_text)
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            assert name, f"bad header line {line!r}"
            assert name == name.strip(), f"bad header line {line!r}"
            headers.append((name, value.strip()))
        resp = Response(status, version, headers, b"")
        te = resp.value(b"transfer-encoding")
        length = resp.value(b"content-length")
        if head or status in (204, 304) or 100 <= status < 200:
            return resp
        if te is not None:
            assert te.lower() == b"chunked", (te, length)
            assert length is None, (te, length)
            parts = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line[:-2].split(b";")[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            resp.body = b"".join(parts)
        elif length is not None:
            resp.body = await reader.readexactly(int(length))
        else:
            resp.body = await reader.read(-1)
        return resp


class RawClient:
    """One raw client connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head: bool = False, timeout: float = 5.0) -> Response:
        return await read_response(self.reader, head=head, timeout=timeout)

    async def request(self, data: bytes, *, head: bool = False) -> Response:
        await self.send(data)
        return await self.response(head=head)

    async def closed(self, timeout: float = 5.0) -> bytes:
        """Whatever the proxy still sends, up to its closing the connection."""
        chunks = []
        async with asyncio.timeout(timeout):
            try:
                while chunk := await self.reader.read(65536):
                    chunks.append(chunk)
            except ConnectionResetError:
                pass
        return b"".join(chunks)

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[int], Awaitable[RawClient]]]:
    opened: list[RawClient] = []

    async def open_client(port: int) -> RawClient:
        client = await RawClient.open(port)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()
        with contextlib.suppress(ConnectionError):
            await client.writer.wait_closed()


ClientFactory = Callable[[int], Awaitable[RawClient]]
