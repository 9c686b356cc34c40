"""A real HTTP/2 server (hypercorn) as an upstream: `H2Server`, and the `h2_server` fixture
that starts them (cleartext h2c, or h2 over TLS with a CA written to tmp_path/ca.pem)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import HOST, wait_for
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from helpers.tls import write_pair


@dataclass
class H2Server:
    """A hypercorn server; every request's HTTP version and client port is recorded."""

    name: str
    port: int = 0
    tls: bool = False
    versions: list[str] = field(default_factory=list)
    peers: set[int] = field(default_factory=set)
    probes: list[str] = field(default_factory=list)  # HTTP versions of the health checks
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/healthz":
            self.probes.append(scope["http_version"])
        else:
            self.versions.append(scope["http_version"])
            self.peers.add(scope["client"][1])
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, payload = 200, b""
        if path == "/echo":
            payload = body
        elif path.startswith("/bytes/"):
            payload = bytes(i % 256 for i in range(int(path.rsplit("/", 1)[1])))
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
        elif path.startswith("/delay/"):
            await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000)
        elif path != "/healthz":
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            payload = json.dumps({"upstream": self.name, "path": path, "headers": headers}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"x-upstream", self.name.encode()),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


H2Factory = Callable[..., Awaitable[H2Server]]


@pytest.fixture
async def h2_server(tmp_path: Path) -> AsyncIterator[H2Factory]:
    servers: list[H2Server] = []
    ca = trustme.CA()

    async def make(name: str, *, tls: bool = False) -> H2Server:
        server = H2Server(name, tls=tls)
        sock = socket.socket()
        sock.bind((HOST, 0))
        server.port = sock.getsockname()[1]
        config = HypercornConfig()
        config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here
        config.accesslog = None
        config.errorlog = None
        if tls:
            cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, name)
            config.certfile, config.keyfile = cert, key
            ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        server.task = asyncio.create_task(
            serve(server.app, config, shutdown_trigger=server.stop.wait)  # type: ignore[arg-type]
        )
        servers.append(server)
        await wait_for(lambda: _listening(server.port), timeout=10)
        return server

    yield make
    for server in servers:
        await server.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), 0.2).close()
        return True
    except OSError:
        return False
