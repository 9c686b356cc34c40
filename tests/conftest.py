"""Shared fixtures: real sample upstreams and the real proxy, all on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web

from proxy.config import parse_config
from proxy.runtime import Proxy
from proxy.tools.sample import SampleSettings, start

HOST = "127.0.0.1"

# The helpers shared by test modules (tests/helpers/) report a failed assert as the tests' own
# do; this must come before any of them is imported.
pytest.register_assert_rewrite("helpers")

# Fixtures that live with their helpers, for every test module: `h2_server`
# (helpers/h2server.py), `turnout` (helpers/processes.py), `raw_upstream` and `clients`
# (helpers/raw_http.py). Named here rather than imported: those modules import from this one.
pytest_plugins = ["helpers.h2server", "helpers.processes", "helpers.raw_http"]


@dataclass
class Sample:
    """A running sample upstream."""

    settings: SampleSettings
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass
class Stack:
    """Blue and green sample upstreams behind a running proxy."""

    proxy: Proxy
    blue: list[Sample]
    green: list[Sample]
    session: aiohttp.ClientSession
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.proxy.port}"


class SampleFactory(Protocol):
    """Starts a sample upstream named `name`; keyword arguments are its SampleSettings."""

    def __call__(self, name: str, **settings: Any) -> Awaitable[Sample]: ...


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def sample() -> AsyncIterator[SampleFactory]:
    runners: list[web.AppRunner] = []

    async def make(name: str, **kwargs: Any) -> Sample:
        settings = SampleSettings(name=name, **kwargs)
        runner, port = await start(settings, HOST, 0)
        runners.append(runner)
        return Sample(settings, port, runner)

    yield make
    for runner in runners:
        await runner.cleanup()


def proxy_config(blue: list[str], green: list[str], **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": {"host": HOST, "port": 0},
        "pools": {
            "blue": {"upstreams": [{"url": u} for u in blue]},
            "green": {"upstreams": [{"url": u} for u in green]},
        },
    }
    data.update(overrides)
    return data


# A teardown step that has not ended after this long is a hang: see bounded().
TEARDOWN_BOUND = 20.0


async def bounded(step: Awaitable[None], what: str) -> None:
    """Await a teardown step that must end; one that has not after TEARDOWN_BOUND prints where
    every task of the loop waits (stderr, shown with the failure), then fails the test."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=TEARDOWN_BOUND)
    if not done:
        for waiting in asyncio.all_tasks():
            if waiting is not asyncio.current_task():
                waiting.print_stack(file=sys.stderr)
        task.cancel()
        raise AssertionError(f"{what} did not end within {TEARDOWN_BOUND:g}s (tasks above)")
    task.result()


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    proxies: list[Proxy] = []

    async def make(
        data: dict[str, Any], seed: int = 1, clock: Callable[[], float] | None = None
    ) -> Proxy:
        proxy = Proxy(parse_config(data), rng=random.Random(seed), clock=clock)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await bounded(proxy.shutdown(timeout=1.0), f"the shutdown of {proxy!r}")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


@pytest.fixture
async def stack(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> Stack:
    """One blue and one green upstream, split 0 (all blue)."""
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(proxy_config([blue.url], [green.url]))
    return Stack(proxy, [blue], [green], session)


@pytest.fixture
def dead_url() -> Iterator[Callable[[], str]]:
    """URLs where connecting is refused. The one place a test takes a port without serving on
    it: the socket is bound (so nobody else gets the port while the test runs) but never
    listens, and Linux refuses connections to a bound socket that does not listen."""
    sockets: list[socket.socket] = []

    def make() -> str:
        sock = socket.socket()
        sockets.append(sock)
        sock.bind((HOST, 0))
        return f"http://{HOST}:{sock.getsockname()[1]}"

    yield make
    for sock in sockets:
        sock.close()


async def raw_request(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes to the proxy and read until it closes the connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(read_timeout):
            return await reader.read(-1)
    finally:
        writer.close()


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `predicate()` holds, checking on every loop turn; fail after `timeout`."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
