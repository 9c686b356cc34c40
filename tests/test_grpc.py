"""gRPC behind Turnout, with grpcio servers as upstreams and a grpcio client: every kind of
call passes with its metadata and trailers, a call's outcome is its grpc-status, Turnout's own
errors are gRPC answers, a split applies per call on one channel, a failing candidate is
shielded and rolled back, and health checks use grpc.health.v1.Health/Check."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import HOST, ProxyFactory, bounded, proxy_config, wait_for
from helpers.takeover import LISTENING, TOOK_OVER, Process, first_process

from proxy.config import ConfigError, parse_config
from proxy.logic import grpcstatus

SERVING, NOT_SERVING = b"\x08\x01", b"\x08\x02"
SERVICE = "test.Echo"


class GrpcUpstream:
    """A grpcio server with raw-bytes methods (no generated code): Unary echoes and names the
    server, Split streams a reply per byte asked for, Sum adds up a client stream, Chat
    echoes each message of a bidirectional stream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health = SERVING
        self.health_requests: list[bytes] = []
        self.fail: grpc.StatusCode | None = None  # every call ends with this code when set
        self.delay = 0.0  # seconds every call waits before it answers
        self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self.server = grpc.aio.server()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def check(self, request: bytes, context: Any) -> bytes:
        self.health_requests.append(request)
        return self.health

    async def _begin(self, context: Any) -> None:
        self.calls += 1
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        context.set_trailing_metadata((("x-served-by", self.name),))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            await context.abort(self.fail, f"{self.name} fails")

    async def unary(self, request: bytes, context: Any) -> bytes:
        await self._begin(context)
        return self.name.encode() + b":" + request

    async def split(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        await self._begin(context)
        for i in range(len(request)):
            yield bytes([request[i]]) * (i + 1)

    async def sum(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        await self._begin(context)
        total = 0
        async for message in requests:
            total += len(message)
        return str(total).encode()

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        await self._begin(context)
        async for message in requests:
            yield message.upper()

    async def start(self) -> None:
        echo = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Split": grpc.unary_stream_rpc_method_handler(self.split),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }
        health = {"Check": grpc.unary_unary_rpc_method_handler(self.check)}
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(SERVICE, echo),
                grpc.method_handlers_generic_handler("grpc.health.v1.Health", health),
            )
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
        await bounded(upstream.server.stop(0), f"the stop of the gRPC upstream {upstream.name}")


def grpc_config(blue: str, green: str, **overrides: Any) -> dict[str, Any]:
    data = proxy_config([blue], [green], **overrides)
    for pool in ("blue", "green"):
        data["pools"][pool]["protocol"] = "h2c"
    data.setdefault("health_check", {}).update({"grpc": True, "interval": "200ms"})
    return data


class Channel:
    """A grpcio client channel through the proxy, calling the test service with raw bytes."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"{HOST}:{port}")
        self.unary = self.channel.unary_unary(f"/{SERVICE}/Unary")
        self.split = self.channel.unary_stream(f"/{SERVICE}/Split")
        self.sum = self.channel.stream_unary(f"/{SERVICE}/Sum")
        self.chat = self.channel.stream_stream(f"/{SERVICE}/Chat")

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()


async def ready(proxy: Any) -> None:
    await wait_for(lambda: all(u.healthy for u in proxy.router.upstreams()), timeout=10)


async def test_every_kind_of_call_passes_with_metadata_and_trailers(
    grpc_upstream: GrpcFactory, make_proxy: ProxyFactory
) -> None:
    blue, green = await grpc_upstream("blue"), await grpc_upstream("green")
    proxy = await make_proxy(grpc_config(blue.url, green.url))
    await ready(proxy)
    async with Channel(proxy.port) as ch:
        call = ch.unary(b"hello", metadata=(("x-tenant", "acme"),), timeout=10)
        assert await call == b"blue:hello"
        assert dict(await call.trailing_metadata())["x-served-by"] == "blue"
        assert await call.code() == grpc.StatusCode.OK
        assert blue.metadata[-1]["x-tenant"] == "acme"
        assert [m async for m in ch.split(b"abc", timeout=10)] == [b"a", b"bb", b"ccc"]

        async def messages() -> AsyncIterator[bytes]:
            for size in (1, 10, 100, 1000):
                yield b"x" * size

        assert await ch.sum(messages(), timeout=10) == b"1111"
        chat = ch.chat(timeout=10)
        replies = []
        for word in (b"one", b"two", b"three"):
            await chat.write(word)
            replies.append(await chat.read())
        await chat.done_writing()
        assert replies == [b"ONE", b"TWO", b"THREE"]
        assert await chat.code() == grpc.StatusCode.OK
        big = bytes(range(256)) * 8192  # 2 MiB each way
        assert await ch.unary(big, timeout=20) == b"blue:" + big


async def test_a_calls_outcome_is_its_grpc_status(
    grpc_upstream: GrpcFactory, make_proxy: ProxyFactory
) -> None:
    blue, green = await grpc_upstream("blue"), await grpc_upstream("green")
    blue.fail = grpc.StatusCode.INTERNAL
    proxy = await make_proxy(grpc_config(blue.url, green.url, retries={"attempts": 0}))
    await ready(proxy)
    async with Channel(proxy.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await ch.unary(b"x", timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert failed.value.details() == "blue fails"
        blue.fail = grpc.StatusCode.NOT_FOUND  # an application answer, not a failure
        with pytest.raises(grpc.aio.AioRpcError) as answered:
            await ch.unary(b"x", timeout=10)
        assert answered.value.code() == grpc.StatusCode.NOT_FOUND
    window = proxy.observed.windows["blue"].figures(proxy.loop.time())
    assert (window.requests, window.errors) == (2, 1)


async def test_turnouts_own_errors_are_grpc_answers(
    grpc_upstream: GrpcFactory, make_proxy: ProxyFactory
) -> None:
    blue, green = await grpc_upstream("blue"), await grpc_upstream("green")
    proxy = await make_proxy(grpc_config(blue.url, green.url))
    await ready(proxy)
    await green.server.stop(0)
    await wait_for(lambda: not proxy.router.pools["green"][0].healthy, timeout=10)
    async with Channel(proxy.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as forced:
            await ch.unary(b"x", metadata=(("x-turnout-pool", "green"),), timeout=10)
        # A forced pool that is down: UNAVAILABLE, never the other pool's answer.
        assert forced.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "green" in (forced.value.details() or "")
        slow = await make_proxy(
            grpc_config(blue.url, blue.url, timeouts={"response_headers": "100ms"})
        )
        await ready(slow)

    blue.delay = 2.0
    async with Channel(slow.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await ch.unary(b"x", timeout=10)
    # No answer within timeouts.response_headers: DEADLINE_EXCEEDED, as Envoy now says too
    # (UNAVAILABLE made clients retry calls that had timed out).
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "upstream_timeout" in (late.value.details() or "")


async def test_a_split_applies_per_call_on_one_channel(
    grpc_upstream: GrpcFactory, make_proxy: ProxyFactory
) -> None:
    blue, green = await grpc_upstream("blue"), await grpc_upstream("green")
    proxy = await make_proxy(grpc_config(blue.url, green.url, split=30))
    await ready(proxy)
    seen: Counter[bytes] = Counter()
    async with Channel(proxy.port) as ch:
        for _ in range(20):
            answers = await asyncio.gather(*(ch.unary(b"", timeout=10) for _ in range(50)))
            seen.update(a.split(b":")[0] for a in answers)
    assert sum(seen.values()) == 1000
    assert abs(seen[b"green"] / 10 - 30) <= 1.5, seen


async def test_a_green_answering_internal_is_rolled_back_with_no_failed_call(
    grpc_upstream: GrpcFactory, make_proxy: ProxyFactory
) -> None:
    blue, green = await grpc_upstream("blue"), await grpc_upstream("green")
    green.fail = grpc.StatusCode.INTERNAL
    rollout = {
        "strategy": "adaptive",
        "steps": [10, 50, 100],
        "interval": "2s",
        "threshold": {"min_requests": 20},
    }
    proxy = await make_proxy(grpc_config(blue.url, green.url, rollout=rollout))
    await ready(proxy)
    failed: list[grpc.StatusCode] = []
    async with Channel(proxy.port) as ch:
        proxy.rollout.start("adaptive", by="test")
        for _ in range(60):
            answers = await asyncio.gather(
                *(ch.unary(b"x", timeout=10) for _ in range(10)), return_exceptions=True
            )
            failed += [a.code() for a in answers if isinstance(a, grpc.aio.AioRpcError)]
            if proxy.rollout.snapshot().state == "rolled_back":
                break
    assert proxy.rollout.snapshot().state == "rolled_back"
    assert failed == []
    assert green.calls > 0
    assert proxy.observed.rescued == green.calls


class CallLoad:
    """Unary calls on one channel from `clients` loops until stopped (at most `budget`), each
    outcome counted by its status code's name; a call is only ever started before `stop`."""

    def __init__(self, port: int, clients: int = 6, budget: int = 20_000) -> None:
        self.channel = Channel(port)
        self.clients = clients
        self.budget = budget
        self.results: Counter[str] = Counter()
        self.in_flight = 0
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        while not self.stopping.is_set() and self.budget > 0:
            self.budget -= 1
            self.in_flight += 1
            try:
                await self.channel.unary(b"x", timeout=10)
                self.results["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                self.results[exc.code().name] += 1
            finally:
                self.in_flight -= 1

    async def __aenter__(self) -> CallLoad:
        self.tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self.channel.channel.close()

    @property
    def done(self) -> int:
        return sum(self.results.values())

    async def more(self, count: int) -> None:
        """Wait for `count` more calls to end."""
        target = self.done + count
        await wait_for(lambda: self.done >= target, timeout=15)

    async def stop(self) -> None:
        self.stopping.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*self.tasks)


async def test_no_call_fails_through_split_changes_drains_and_reloads(
    grpc_upstream: GrpcFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    blue, green = await grpc_upstream("blue"), await grpc_upstream("green")
    data = grpc_config(blue.url, green.url, drain={"timeout": "5s"})
    proxy = await make_proxy(data)
    await ready(proxy)
    path = tmp_path / "turnout.yaml"
    proxy.config_path = str(path)
    control = proxy.control
    async with CallLoad(proxy.port) as load:
        await load.more(100)
        control.set_split(50, by="test")
        await load.more(100)
        control.set_split(100, 1.0, by="test")  # a ramp
        await wait_for(lambda: proxy.spreader.split == 100.0)
        await load.more(100)
        control.drain("blue", 0, by="test")  # no longer taking traffic: allowed
        await load.more(100)
        control.undrain("blue", 0, by="test")
        path.write_text(yaml.safe_dump({**data, "split": 100, "retries": {"attempts": 3}}))
        await control.reload(by="test")
        await load.more(100)
        control.set_split(0, by="test")
        control.drain("green", 0, by="test")
        await load.more(100)
    assert load.results == {"OK": load.done}, load.results
    assert blue.calls > 0
    assert green.calls > 0


async def test_no_call_fails_through_takeovers_and_sigterm(
    grpc_upstream: GrpcFactory, tmp_path: Path
) -> None:
    """Two hot restarts (`turnout run --takeover`) under gRPC load, then a SIGTERM with calls in
    flight: every call ends OK. Calls are slowed a little so that some are always in flight."""
    blue, green = await grpc_upstream("blue"), await grpc_upstream("green")
    blue.delay = green.delay = 0.05
    config = grpc_config(
        blue.url,
        green.url,
        admin={"host": HOST, "port": 0},
        split=30,
        drain={"timeout": "5s"},
    )
    path, handover, running = await first_process(config, tmp_path)
    processes = [running]
    try:
        port = await running.port(LISTENING)
        async with CallLoad(port) as load:
            await wait_for(lambda: load.results["OK"] >= 50, timeout=20)
            for _ in range(2):
                new = await Process.start(
                    "-c", str(path), "--takeover-socket", handover, "--takeover"
                )
                processes.append(new)
                await new.wait_line(TOOK_OVER)
                async with asyncio.timeout(15):
                    assert await running.proc.wait() == 0
                running = new
                await load.more(100)
            # SIGTERM: no call starts after it; those in flight finish.
            load.stopping.set()
            assert load.in_flight > 0
            running.proc.terminate()
            await load.stop()
            async with asyncio.timeout(15):
                assert await running.proc.wait() == 0
        assert load.results == {"OK": load.done}, load.results
        assert blue.calls > 0
        assert green.calls > 0
    finally:
        for process in processes:
            process.kill()


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


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"200m", 0.2),
        (b"5S", 5.0),
        (b"2M", 120.0),
        (b"1H", 3600.0),
        (b"99999999u", 99.999999),
        (b"1500000n", 0.0015),
        (b" 3S ", 3.0),
        (b"123456789m", 0.0),  # more than 8 digits
        (b"10x", 0.0),
        (b"m", 0.0),
        (b"", 0.0),
        (b"-5S", 0.0),
        (b"\xd9\xa3S", 0.0),  # digits of another script
    ],
)
def test_grpc_timeout_values(value: bytes, seconds: float) -> None:
    assert grpcstatus.parse_timeout(value) == pytest.approx(seconds)
