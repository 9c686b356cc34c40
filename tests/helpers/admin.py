"""A proxy with its admin API in this process (`Admin`), started by `start_admin_stack`, and a
reader of the admin API's server-sent events."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from conftest import HOST, ProxyFactory, Sample, SampleFactory, proxy_config
from prometheus_client.parser import text_string_to_metric_families

from proxy.runtime import Proxy

TIMEOUT = 10.0
ADMIN = {"host": HOST, "port": 0}


@dataclass
class Admin:
    """A running proxy with its admin API, and the upstreams behind it."""

    proxy: Proxy
    session: aiohttp.ClientSession
    blue: list[Sample]
    green: list[Sample]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.proxy.admin_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://{HOST}:{self.proxy.port}"

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One admin request; the status and the decoded JSON answer."""
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if raw is not None:
            kwargs["data"] = raw
            kwargs["headers"].setdefault("Content-Type", "application/json")
        elif body is not None:
            kwargs["json"] = body
        async with asyncio.timeout(TIMEOUT):
            async with self.session.request(method, self.url + path, **kwargs) as resp:
                text = await resp.text()
                assert resp.content_type == "application/json", text
                return resp.status, json.loads(text)

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = await self.call(method, path, body)
        assert 200 <= status < 300, (status, answer)
        return answer

    async def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self.ok("GET", "/status")
        return answer

    async def get(self, path: str, **headers: str) -> aiohttp.ClientResponse:
        """A GET through the proxy, body read."""
        async with asyncio.timeout(TIMEOUT):
            async with self.session.get(self.proxy_url + path, headers=headers) as resp:
                await resp.read()
                return resp

    async def metrics(self) -> Metrics:
        async with asyncio.timeout(TIMEOUT):
            async with self.session.get(self.url + "/metrics") as resp:
                assert resp.status == 200
                assert resp.content_type == "text/plain"
                return Metrics(await resp.text())


class Metrics:
    """A parsed /metrics scrape: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


async def start_admin_stack(
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    blues: int = 1,
    greens: int = 1,
    **overrides: Any,
) -> Admin:
    """Sample upstreams named blue0.., green0.. behind a proxy with its admin API on
    127.0.0.1 port 0; keyword arguments are config overrides."""
    blue = [await sample(f"blue{i}") for i in range(blues)]
    green = [await sample(f"green{i}") for i in range(greens)]
    overrides.setdefault("admin", ADMIN)
    data = proxy_config([s.url for s in blue], [s.url for s in green], **overrides)
    proxy = await make_proxy(data)
    await proxy.start_admin()
    return Admin(proxy, session, blue, green)


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[tuple[str, dict[str, Any]]]:
    """`count` server-sent events (comments skipped): (event name, decoded data)."""
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    data: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while len(events) < count:
            raw = await resp.content.readline()
            assert raw, "the event stream ended"
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data.append(line.removeprefix("data: "))
            elif line == "" and data:
                events.append((kind, json.loads("\n".join(data))))
                kind, data = "", []
    return events
