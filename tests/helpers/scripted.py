"""A hand-written upstream on asyncio streams that runs a script per connection
(`RawUpstream`, sending exactly the bytes a test needs), and a strict parse of a response."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools
from conftest import HOST

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class RawUpstream:
    """A hand-written upstream: a connection whose first request is not a health probe runs
    `script(reader, writer, i)` once that request's head has been read; `i` counts them."""

    script: Script
    server: asyncio.Server | None = None
    connections: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{HOST}:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            async with asyncio.timeout(10):
                head = await read_head(reader)
                if head.startswith(b"GET /healthz "):
                    # Probes from the proxy's health checks are answered, not counted.
                    writer.write(HEALTHY)
                    return
                index = self.connections
                self.connections += 1
                await self.script(reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the proxy gave up on this connection; that is its right
        finally:
            writer.close()
            self.tasks.discard(task)


HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@dataclass
class Parsed:
    """A response as a strict HTTP/1.1 client sees it."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False
    error: str = ""


def parse_response(data: bytes) -> Parsed:
    parsed = Parsed()

    class Callbacks:
        def on_header(self, name: bytes, value: bytes) -> None:
            parsed.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

        def on_headers_complete(self) -> None:
            parsed.status = parser.get_status_code()

        def on_body(self, body: bytes) -> None:
            parsed.body += body

        def on_message_complete(self) -> None:
            parsed.complete = True

    parser = httptools.HttpResponseParser(Callbacks())
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as exc:
        parsed.error = str(exc)
    return parsed
