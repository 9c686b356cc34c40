"""gRPC behind Turnout, with grpcio servers as upstreams: health checks by
grpc.health.v1.Health/Check."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from conftest import HOST, ProxyFactory, proxy_config, wait_for

from proxy.config import ConfigError, parse_config

SERVING, NOT_SERVING = b"\x08\x01", b"\x08\x02"


class GrpcUpstream:
    """A grpcio server; raw bytes in and out (no generated code)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health = SERVING
        self.health_requests: list[bytes] = []
        self.server = grpc.aio.server()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def check(self, request: bytes, context: Any) -> bytes:
        self.health_requests.append(request)
        return self.health

    async def start(self) -> None:
        handlers = {
            "Check": grpc.unary_unary_rpc_method_handler(self.check),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("grpc.health.v1.Health", handlers),)
        )
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        await self.server.start()


GrpcFactory = Callable[[str], Awaitable[GrpcUpstream]]


@pytest.fixture
async def grpc_upstream() -> AsyncIterator[GrpcFactory]:
    started: list[GrpcUpstream] = []

    async def make(name: str) -> GrpcUpstream:
        upstream = GrpcUpstream(name)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.server.stop(0)


def grpc_config(blue: str, green: str, **overrides: Any) -> dict[str, Any]:
    data = proxy_config([blue], [green], **overrides)
    for pool in ("blue", "green"):
        data["pools"][pool]["protocol"] = "h2c"
    return data


async def test_grpc_health_checks_follow_the_serving_status(
    grpc_upstream: GrpcFactory, make_proxy: ProxyFactory
) -> None:
    blue, green = await grpc_upstream("blue"), await grpc_upstream("green")
    green.health = NOT_SERVING
    checks = {
        "grpc": True,
        "service": "shop",
        "interval": "100ms",
        "healthy_after": 1,
        "unhealthy_after": 1,
    }
    proxy = await make_proxy(grpc_config(blue.url, green.url, health_check=checks))
    b, g = proxy.router.pools["blue"][0], proxy.router.pools["green"][0]
    await wait_for(lambda: b.healthy and bool(green.health_requests), timeout=10)
    assert not g.healthy
    # HealthCheckRequest{service: "shop"}.
    assert blue.health_requests[0] == b"\x0a\x04shop"
    green.health = SERVING
    await wait_for(lambda: g.healthy, timeout=10)


def test_grpc_health_checks_need_http2_pools() -> None:
    data = proxy_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    data["health_check"] = {"grpc": True}
    with pytest.raises(ConfigError, match=r"pools\.blue\.protocol: health_check\.grpc needs"):
        parse_config(data)
