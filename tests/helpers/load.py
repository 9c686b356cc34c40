"""Steady client load through the proxy (`Load`), with every request's outcome recorded, and
bursts of fresh connections (`fresh_connections`)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from conftest import wait_for

TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Result:
    """One client request: the order it was started in, and what came back."""

    seq: int
    status: int
    upstream: str | None
    error: str | None = None


class Load:
    """`clients` keep-alive clients looping GETs through the proxy until stopped; bounded by
    `limit` requests in all, so a stuck test ends."""

    def __init__(self, url: str, *, clients: int = 10, limit: int = 20_000, path: str = "/load"):
        self.url = url + path
        self.clients = clients
        self.limit = limit
        self.started = 0
        self.done: list[Result] = []
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        connector = aiohttp.TCPConnector(limit=self.clients)
        self._session = aiohttp.ClientSession(connector=connector)
        self._tasks = [
            asyncio.create_task(self._client(self._session)) for _ in range(self.clients)
        ]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.finish()

    async def finish(self) -> None:
        """Stop starting requests and wait for those under way."""
        self.stop.set()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*self._tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self.stop.is_set() and self.started < self.limit:
            seq = self.started
            self.started += 1
            try:
                async with session.get(self.url) as resp:
                    await resp.read()
                    result = Result(seq, resp.status, resp.headers.get("X-Upstream"))
            except aiohttp.ClientError as exc:
                result = Result(seq, 0, None, f"{type(exc).__name__}: {exc}")
            self.done.append(result)

    async def until(self, count: int) -> None:
        """Wait until `count` requests have completed."""
        assert count <= self.limit
        await wait_for(lambda: len(self.done) >= count, TIMEOUT)

    async def more(self, count: int) -> None:
        await self.until(len(self.done) + count)

    def failures(self) -> list[Result]:
        return [r for r in self.done if r.status != 200 or r.error is not None]

    def went(self, *, first: int = 0, done: int | None = None) -> Counter[str | None]:
        """Where requests went, by X-Upstream: those started as number `first` or later, among
        the first `done` to complete (all when None). A request that completed before a change
        was made was routed before it; one started after the change was answered, after it."""
        return Counter(r.upstream for r in self.done[:done] if r.seq >= first)


async def fresh_connections(url: str, count: int, path: str = "/x") -> Counter[tuple[int, str]]:
    """`count` GETs, each on a connection of its own (so the workers share them out); how many
    got each (status, X-Upstream)."""
    results: Counter[tuple[int, str]] = Counter()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.get(url + path) as resp:
                await resp.read()
                results[resp.status, resp.headers.get("X-Upstream", "")] += 1

        for _ in range(count // 4):
            await asyncio.gather(*(one() for _ in range(4)))
    return results
