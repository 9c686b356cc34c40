"""Active health checks: probe() over real sockets, HealthChecker's streaks, timing and tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from conftest import ProxyFactory, proxy_config, wait_for

from proxy.config import ConfigError, parse_config
from proxy.control.health import HealthChecker, HealthSnapshot, ProbeResult, probe
from proxy.http.upstream import Upstream
from proxy.tools.sample import SampleSettings, start

HOST = "127.0.0.1"
WAIT = 2.0  # bound on every wait for an event; a healthy run needs a small fraction of it

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Event], Awaitable[None]]


# helpers


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[int]:
    """A tiny TCP server on port 0 running `handler` per connection; yields the port."""
    stop = asyncio.Event()
    tasks: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            with contextlib.suppress(ConnectionError):
                await handler(reader, writer, stop)
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        stop.set()
        server.close()
        await server.wait_closed()
        async with asyncio.timeout(WAIT):
            while tasks:
                await asyncio.sleep(0.001)


def answer(raw: bytes) -> Handler:
    """A handler that reads the request head, writes `raw` and closes."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()

    return handler


async def silent(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await stop.wait()


@contextlib.asynccontextmanager
async def sample_upstream(name: str = "blue") -> AsyncIterator[tuple[SampleSettings, int]]:
    settings = SampleSettings(name=name)
    runner, port = await start(settings, HOST, 0)
    try:
        yield settings, port
    finally:
        await runner.cleanup()


def make_upstream(port: int, index: int = 0) -> Upstream:
    return Upstream("blue", index, f"http://{HOST}:{port}", HOST, port, 1)


class Prober:
    """A prober that answers from `ok` (or wraps another), records results, wakes waiters."""

    def __init__(
        self,
        inner: Callable[[Upstream], Awaitable[ProbeResult]] | None = None,
        *,
        ok: bool = True,
        script: list[bool] | None = None,
    ) -> None:
        self.inner = inner
        self.ok = ok
        self.script = list(script or [])
        self.results: list[ProbeResult] = []
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.active = 0
        self.max_active = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []

    async def __call__(self, upstream: Upstream) -> ProbeResult:
        loop = asyncio.get_running_loop()
        self.starts.append(loop.time())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.inner is not None:
                result = await self.inner(upstream)
            else:
                ok = self.script.pop(0) if self.script else self.ok
                result = ProbeResult(ok, "200" if ok else "503")
        finally:
            self.active -= 1
            self.ends.append(loop.time())
        self.results.append(result)
        for n, event in self._waiters:
            if len(self.results) >= n:
                event.set()
        return result

    @property
    def count(self) -> int:
        return len(self.results)

    async def until(self, n: int) -> None:
        """Wait until `n` probes have returned (and the checker has recorded them)."""
        if self.count >= n:
            return
        event = asyncio.Event()
        self._waiters.append((n, event))
        async with asyncio.timeout(WAIT):
            await event.wait()


class Changes:
    """Records on_change calls with the probe count at the time; wakes waiters."""

    def __init__(self, prober: Prober | None = None) -> None:
        self.prober = prober
        self.calls: list[tuple[str, bool, str, int]] = []
        self._changed = asyncio.Event()

    def __call__(self, upstream: Upstream, healthy: bool, reason: str) -> None:
        assert upstream.healthy is healthy  # the flag is set before the callback
        probes = self.prober.count if self.prober is not None else -1
        self.calls.append((upstream.key, healthy, reason, probes))
        self._changed.set()

    async def until(self, n: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.calls) < n:
                self._changed.clear()
                await self._changed.wait()


def checker(changes: Changes, prober: Any, **overrides: Any) -> HealthChecker:
    """A checker with short test timings; `prober` is a Prober or a plain async function."""
    params: dict[str, Any] = {
        "path": "/healthz",
        "interval": 0.01,
        "timeout": 0.5,
        "healthy_after": 2,
        "unhealthy_after": 3,
    }
    params.update(overrides)
    return HealthChecker(on_change=changes, prober=prober, **params)


def network_prober(path: str = "/healthz", timeout: float = 0.5) -> Prober:
    """The real probe over the network, as the checker's default prober calls it."""

    async def real(u: Upstream) -> ProbeResult:
        return await probe(u.host, u.port, path, timeout, u.host_header.decode())

    return Prober(real)


# probe()


async def test_probe_passes_on_sample_healthz() -> None:
    async with sample_upstream() as (_, port):
        assert await probe(HOST, port, "/healthz", 1.0, f"{HOST}:{port}") == ProbeResult(
            True, "200"
        )


async def test_probe_fails_on_503_and_reads_settings_live() -> None:
    async with sample_upstream() as (settings, port):
        settings.healthy = False
        assert await probe(HOST, port, "/healthz", 1.0, "x") == ProbeResult(False, "503")
        settings.healthy = True
        assert await probe(HOST, port, "/healthz", 1.0, "x") == ProbeResult(True, "200")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", ProbeResult(True, "204")),
        (
            b"HTTP/1.1 302 Found\r\nLocation: /\r\nContent-Length: 0\r\n\r\n",
            ProbeResult(True, "302"),
        ),
        (b"HTTP/1.1 399 Odd\r\nContent-Length: 0\r\n\r\n", ProbeResult(True, "399")),
        (b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n", ProbeResult(False, "400")),
        (b"HTTP/1.1 199 Early\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", ProbeResult(True, "200")),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Oops\r\n\r\n", ProbeResult(False, "500")),
        (b"HTTP/1.0 200 OK\r\n\r\nbody until close", ProbeResult(True, "200")),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", ProbeResult(False, "101")),
    ],
)
async def test_probe_status_ranges(raw: bytes, expected: ProbeResult) -> None:
    async with raw_server(answer(raw)) as port:
        assert await probe(HOST, port, "/healthz", 1.0, "h") == expected


async def test_probe_sends_one_get_with_connection_close() -> None:
    heads: list[bytes] = []

    async def capture(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
    ) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        heads.append(await reader.read())  # nothing more: the probe closes its side

    async with raw_server(capture) as port:
        result = await probe(HOST, port, "/ready?deep=1", 1.0, "svc.internal:8000")
    assert result == ProbeResult(True, "200")
    head, rest = heads
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "GET /ready?deep=1 HTTP/1.1"
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
    assert fields["host"] == "svc.internal:8000"
    assert fields["connection"] == "close"
    assert "content-length" not in fields
    assert "transfer-encoding" not in fields
    assert rest == b""


async def test_probe_connect_refused() -> None:
    # Bound but not listening, and held for the whole test: connects to it are refused.
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        assert await probe(HOST, port, "/healthz", 1.0, "h") == ProbeResult(
            False, "connect refused"
        )


async def test_probe_times_out_when_the_upstream_never_answers() -> None:
    loop = asyncio.get_running_loop()
    async with raw_server(silent) as port:
        began = loop.time()
        result = await probe(HOST, port, "/healthz", 0.2, "h")
        took = loop.time() - began
    assert result == ProbeResult(False, "timeout after 0.2s")
    assert 0.19 <= took < 1.0


async def test_probe_garbage_is_an_invalid_response() -> None:
    async with raw_server(answer(b"garbage\r\n\r\n")) as port:
        result = await probe(HOST, port, "/healthz", 1.0, "h")
    assert not result.ok
    assert result.detail.startswith("invalid response: ")


async def test_probe_bad_header_line_is_an_invalid_response() -> None:
    async with raw_server(answer(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n")) as port:
        result = await probe(HOST, port, "/healthz", 1.0, "h")
    assert not result.ok
    assert result.detail.startswith("invalid response: ")


async def test_probe_close_before_the_head_ends_fails() -> None:
    async with raw_server(answer(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n")) as port:
        result = await probe(HOST, port, "/healthz", 1.0, "h")
    assert result == ProbeResult(False, "connection closed before the response head")


async def test_probe_caps_the_head_at_64_kib() -> None:
    sent: list[int] = []

    async def endless_head(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        total = 0
        while not stop.is_set():  # a head that never ends, until the probe hangs up
            writer.write(line * 16)
            total += len(line) * 16
            sent.append(total)
            await writer.drain()

    async with raw_server(endless_head) as port:
        result = await probe(HOST, port, "/healthz", 2.0, "h")
    assert result == ProbeResult(False, "response head over 64 KiB")
    assert sent[-1] > 64 * 1024


async def test_probe_does_not_read_the_body() -> None:
    async def endless_body(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"b" * 0x10000 + b"\r\n"
        while not stop.is_set():  # a body that never ends: only reading the head can finish
            writer.write(chunk)
            await writer.drain()

    async with raw_server(endless_body) as port:
        assert await probe(HOST, port, "/healthz", 2.0, "h") == ProbeResult(True, "200")


# HealthChecker against the sample upstream


async def test_cold_start_is_healthy_after_the_first_pass() -> None:
    async with sample_upstream() as (_, port):
        prober = network_prober()
        changes = Changes(prober)
        hc = checker(changes, prober, healthy_after=3)
        upstream = make_upstream(port)
        assert upstream.healthy
        hc.watch(upstream)
        # Out of rotation at once, before any probe ran.
        assert not upstream.healthy
        assert changes.calls == [("blue/0", False, "not checked yet", 0)]
        await changes.until(2)
        assert upstream.healthy
        key, healthy, reason, probes = changes.calls[1]
        assert (key, healthy, probes) == ("blue/0", True, 1)  # one pass, not healthy_after
        assert reason.startswith("first passing check")
        await hc.close()


async def test_sample_flips_unhealthy_and_back_after_exact_streaks() -> None:
    async with sample_upstream() as (settings, port):
        prober = network_prober()
        changes = Changes(prober)
        hc = checker(changes, prober, interval=0.02, healthy_after=2, unhealthy_after=3)
        upstream = make_upstream(port)
        hc.watch(upstream)
        await changes.until(2)
        assert upstream.healthy

        settings.healthy = False
        await changes.until(3)
        _, healthy, reason, n = changes.calls[2]
        assert not healthy
        assert not upstream.healthy
        # The change came with exactly the third failure in a row (a probe in flight at the
        # flip may still have passed, so the streak is located in the recorded results).
        oks = [r.ok for r in prober.results[:n]]
        assert oks[-3:] == [False, False, False]
        assert oks[-4] is True
        assert reason == "3 consecutive failed checks (last: 503)"

        settings.healthy = True
        await changes.until(4)
        _, healthy, reason, n = changes.calls[3]
        assert healthy
        assert upstream.healthy
        oks = [r.ok for r in prober.results[:n]]
        assert oks[-2:] == [True, True]
        assert oks[-3] is False
        assert reason == "2 consecutive passing checks"

        # Steady state: more probes, no more calls.
        await prober.until(prober.count + 4)
        assert len(changes.calls) == 4
        await hc.close()


async def test_default_prober_uses_path_timeout_and_host_header() -> None:
    heads: list[bytes] = []

    async def capture(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
    ) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with raw_server(capture) as port:
        changes = Changes()
        hc = HealthChecker(
            path="/ping",
            interval=0.05,
            timeout=0.5,
            healthy_after=1,
            unhealthy_after=1,
            on_change=changes,
        )
        upstream = make_upstream(port)
        hc.watch(upstream)
        await changes.until(2)
        await hc.close()
    assert upstream.healthy
    assert heads[0].startswith(b"GET /ping HTTP/1.1\r\n")
    assert f"\r\nHost: {HOST}:{port}\r\n".encode() in heads[0]


async def test_default_prober_fails_a_silent_upstream_by_timeout() -> None:
    async with raw_server(silent) as port:
        changes = Changes()
        hc = HealthChecker(
            path="/healthz",
            interval=0.01,
            timeout=0.05,
            healthy_after=1,
            unhealthy_after=1,
            on_change=changes,
        )
        upstream = make_upstream(port)
        hc.watch(upstream, cold=False)
        await changes.until(1)
        await hc.close()
    assert changes.calls == [
        ("blue/0", False, "1 consecutive failed check (last: timeout after 0.05s)", -1)
    ]


# HealthChecker streak logic, with a scripted prober


async def test_streaks_follow_the_script_exactly() -> None:
    T, F = True, False
    script = [T, F, F, T, F, F, F, F, T, F, T, T, T, T]
    prober = Prober(script=script)
    changes = Changes(prober)
    hc = checker(changes, prober, healthy_after=2, unhealthy_after=3)
    hc.watch(make_upstream(1))
    await prober.until(len(script))
    await hc.close()
    assert [(healthy, n) for _, healthy, _, n in changes.calls] == [
        (False, 0),  # cold
        (True, 1),  # first pass
        (False, 7),  # the third failure in a row (the two before were broken by a pass)
        (True, 12),  # the second pass in a row (probe 10 failed in between)
    ]


async def test_cold_upstream_failing_first_stays_out_until_its_first_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="turnout.health")
    prober = Prober(script=[False] * 5 + [True])
    changes = Changes(prober)
    hc = checker(changes, prober, healthy_after=3, unhealthy_after=1)
    upstream = make_upstream(1)
    hc.watch(upstream)
    await prober.until(6)
    await hc.close()
    assert upstream.healthy
    assert [(healthy, n) for _, healthy, _, n in changes.calls] == [(False, 0), (True, 6)]
    # No transition says why it stayed out: the first failure is logged, once.
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "the first failed" in warning
    assert upstream.key in warning


async def test_cold_watch_of_an_already_unhealthy_upstream_reports_only_the_pass() -> None:
    prober = Prober(ok=True)
    changes = Changes(prober)
    hc = checker(changes, prober)
    upstream = make_upstream(1)
    upstream.healthy = False
    hc.watch(upstream)
    assert changes.calls == []  # no real change yet
    await prober.until(4)
    await hc.close()
    assert [(healthy, n) for _, healthy, _, n in changes.calls] == [(True, 1)]


async def test_warm_watch_keeps_a_healthy_upstream_in_rotation() -> None:
    prober = Prober(script=[True, True, False, False, True])
    changes = Changes(prober)
    hc = checker(changes, prober, unhealthy_after=3)
    upstream = make_upstream(1)
    hc.watch(upstream, cold=False)
    assert upstream.healthy
    await prober.until(8)
    await hc.close()
    assert upstream.healthy
    assert changes.calls == []


async def test_warm_watch_of_an_unhealthy_upstream_needs_healthy_after_passes() -> None:
    prober = Prober(ok=True)
    changes = Changes(prober)
    hc = checker(changes, prober, healthy_after=3)
    upstream = make_upstream(1)
    upstream.healthy = False
    hc.watch(upstream, cold=False)
    await changes.until(1)
    await hc.close()
    assert changes.calls == [("blue/0", True, "3 consecutive passing checks", 3)]


async def test_snapshot_and_repr() -> None:
    prober = Prober(script=[True, False, False])
    changes = Changes(prober)
    hc = checker(changes, prober, interval=0.05, unhealthy_after=5)
    hc.watch(make_upstream(1, index=3))
    await prober.until(3)
    # The waiter wakes before the next interval ends, so this is the state after probe 3.
    assert hc.snapshot() == {
        "blue/3": HealthSnapshot(
            healthy=True,
            consecutive_passes=0,
            consecutive_failures=2,
            last_detail="503",
            probes=3,
        )
    }
    text = repr(hc)
    assert "/healthz" in text
    assert "watching=1" in text
    assert "unhealthy=0" in text
    await hc.close()
    assert hc.snapshot() == {}
    assert "closed" in repr(hc)


# timing and overlap


async def test_interval_is_measured_start_to_start() -> None:
    async def slowish(u: Upstream) -> ProbeResult:
        await asyncio.sleep(0.04)  # a probe that takes 40% of the interval
        return ProbeResult(True, "200")

    prober = Prober(slowish)
    hc = checker(Changes(), prober, interval=0.1)
    hc.watch(make_upstream(1), cold=False)
    await prober.until(4)
    await hc.close()
    gaps = [b - a for a, b in zip(prober.starts, prober.starts[1:], strict=False)][:3]
    # End to start would give 0.14; start to start gives 0.1 plus scheduling noise.
    assert min(gaps) >= 0.099
    assert sorted(gaps)[1] < 0.125


async def test_a_probe_slower_than_the_interval_is_followed_at_once_without_overlap() -> None:
    async def slow(u: Upstream) -> ProbeResult:
        await asyncio.sleep(0.1)  # more than three intervals
        return ProbeResult(True, "200")

    prober = Prober(slow)
    hc = checker(Changes(), prober, interval=0.03, timeout=1.0)
    hc.watch(make_upstream(1), cold=False)
    await prober.until(3)
    await hc.close()
    assert prober.max_active == 1
    for end, next_start in zip(prober.ends, prober.starts[1:], strict=False):
        assert 0 <= next_start - end < 0.025  # at once: under one interval


# failures of the prober and of the listener


async def test_a_prober_exception_is_a_failed_probe_not_a_dead_task() -> None:
    calls = 0
    six = asyncio.Event()

    async def broken(u: Upstream) -> ProbeResult:
        nonlocal calls
        calls += 1
        if calls >= 6:
            six.set()
        if calls % 2:
            raise RuntimeError("boom")
        raise asyncio.CancelledError  # not a cancellation of the checker: still just a failure

    changes = Changes()
    hc = checker(changes, broken, unhealthy_after=2)
    upstream = make_upstream(1)
    hc.watch(upstream, cold=False)
    await changes.until(1)
    assert not upstream.healthy
    assert changes.calls[0][2] == "2 consecutive failed checks (last: probe cancelled)"
    async with asyncio.timeout(WAIT):
        await six.wait()  # still probing after both kinds of exception
    snap = hc.snapshot()["blue/0"]
    assert snap.consecutive_failures >= 5
    assert snap.last_detail in ("probe cancelled", "probe error: RuntimeError: boom")
    await hc.close()


async def test_a_hanging_prober_is_bounded_by_the_timeout() -> None:
    never = asyncio.Event()

    async def hangs(u: Upstream) -> ProbeResult:
        await never.wait()
        return ProbeResult(True, "200")

    changes = Changes()
    hc = checker(changes, hangs, timeout=0.05, unhealthy_after=2)
    upstream = make_upstream(1)
    hc.watch(upstream, cold=False)
    await changes.until(1)
    await hc.close()
    assert changes.calls == [
        ("blue/0", False, "2 consecutive failed checks (last: timeout after 0.05s)", -1)
    ]


async def test_a_failing_on_change_does_not_stop_probing() -> None:
    prober = Prober(script=[True, False, True])
    seen: list[bool] = []

    def on_change(upstream: Upstream, healthy: bool, reason: str) -> None:
        seen.append(healthy)
        raise RuntimeError("listener broke")

    hc = HealthChecker(
        path="/healthz",
        interval=0.01,
        timeout=0.5,
        healthy_after=1,
        unhealthy_after=1,
        on_change=on_change,
        prober=prober,
    )
    upstream = make_upstream(1)
    hc.watch(upstream)
    await prober.until(5)
    await hc.close()
    assert seen == [False, True, False, True]
    assert upstream.healthy


# task lifecycle


async def test_unwatch_stops_probing_that_upstream_only() -> None:
    before = asyncio.all_tasks()
    probers = {"blue/0": Prober(), "blue/1": Prober()}
    changes = Changes()
    hc = checker(changes, lambda u: probers[u.key](u))
    a, b = make_upstream(1, 0), make_upstream(2, 1)
    hc.watch(a)
    hc.watch(b)
    await probers["blue/0"].until(2)
    hc.unwatch(a)
    hc.unwatch(a)  # twice is harmless
    stopped_at = probers["blue/0"].count
    await probers["blue/1"].until(probers["blue/1"].count + 4)  # several intervals later
    assert probers["blue/0"].count == stopped_at
    assert set(hc.snapshot()) == {"blue/1"}
    assert len(asyncio.all_tasks() - before) == 1  # only b's task is left
    await hc.close()
    assert asyncio.all_tasks() - before == set()


async def test_unwatch_during_a_probe_reports_nothing_more() -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    async def gated(u: Upstream) -> ProbeResult:
        started.set()
        await gate.wait()
        return ProbeResult(True, "200")

    changes = Changes()
    hc = checker(changes, gated)
    upstream = make_upstream(1)
    hc.watch(upstream)
    async with asyncio.timeout(WAIT):
        await started.wait()
    hc.unwatch(upstream)
    gate.set()
    await hc.close()
    assert [c[1] for c in changes.calls] == [False]  # the cold mark only
    assert not upstream.healthy


async def test_close_cancels_every_task_and_refuses_new_watches() -> None:
    before = asyncio.all_tasks()
    never = asyncio.Event()

    async def hangs(u: Upstream) -> ProbeResult:
        await never.wait()
        return ProbeResult(True, "200")

    fast = Prober()
    hc = checker(Changes(), lambda u: hangs(u) if u.index == 0 else fast(u), timeout=5.0)
    for i in range(3):
        hc.watch(make_upstream(1 + i, i))
    hc.unwatch(make_upstream(9, 9))  # unknown: nothing happens
    await fast.until(4)
    assert len(asyncio.all_tasks() - before) == 3
    await hc.close()
    assert asyncio.all_tasks() - before == set()
    count = fast.count
    await asyncio.sleep(0.05)  # five intervals: a surviving task would have probed again
    assert fast.count == count
    with pytest.raises(RuntimeError):
        hc.watch(make_upstream(5, 5))
    await hc.close()  # idempotent


@pytest.mark.parametrize("stop", ["close", "unwatch"])
async def test_a_prober_that_swallows_the_cancellation_still_stops(stop: str) -> None:
    """A prober (or the stream and timeout machinery under it) that takes the checker's
    cancellation for its own and returns a result: the task ends all the same, records nothing
    more, and close() returns (it waited for ever on a gRPC probe in a hot restart)."""
    before = asyncio.all_tasks()
    started = asyncio.Event()
    never = asyncio.Event()

    async def swallows(u: Upstream) -> ProbeResult:
        started.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            return ProbeResult(False, "cancelled, and said nothing")
        return ProbeResult(True, "200")

    changes = Changes()
    hc = checker(changes, swallows, timeout=5.0)
    upstream = make_upstream(1)
    hc.watch(upstream)
    async with asyncio.timeout(WAIT):
        await started.wait()
        if stop == "unwatch":
            hc.unwatch(upstream)
        await hc.close()
    assert asyncio.all_tasks() - before == set()
    assert [c[1] for c in changes.calls] == [False]  # the cold mark only


async def test_watching_the_same_upstream_twice_keeps_one_task() -> None:
    before = asyncio.all_tasks()
    prober = Prober()
    changes = Changes(prober)
    hc = checker(changes, prober)
    upstream = make_upstream(1)
    hc.watch(upstream)
    hc.watch(upstream)
    assert len(asyncio.all_tasks() - before) == 1
    await prober.until(3)
    assert prober.max_active == 1
    await hc.close()


async def test_first_round_waits_for_every_upstream() -> None:
    gate = asyncio.Event()
    fast = Prober()

    async def gated(u: Upstream) -> ProbeResult:
        await gate.wait()
        return ProbeResult(True, "200")

    hc = checker(Changes(), lambda u: gated(u) if u.index == 1 else fast(u), timeout=5.0)
    await hc.first_round(0.01)  # nothing watched: returns at once
    hc.watch(make_upstream(1, 0))
    hc.watch(make_upstream(2, 1))
    waiter = asyncio.create_task(hc.first_round(WAIT))
    await fast.until(3)
    assert not waiter.done()
    gate.set()
    async with asyncio.timeout(WAIT):
        await waiter
    assert all(s.probes >= 1 for s in hc.snapshot().values())
    await hc.close()


async def test_first_round_gives_up_after_its_timeout() -> None:
    never = asyncio.Event()

    async def hangs(u: Upstream) -> ProbeResult:
        await never.wait()
        return ProbeResult(True, "200")

    loop = asyncio.get_running_loop()
    hc = checker(Changes(), hangs, timeout=5.0)
    hc.watch(make_upstream(1))
    began = loop.time()
    await hc.first_round(0.05)
    assert 0.049 <= loop.time() - began < 1.0
    assert hc.snapshot()["blue/0"].probes == 0
    await hc.close()


# --- what a check sends: Host and fields, per pool --------------------------------------------


class HostCheckingApp:
    """An app that, like Django with ALLOWED_HOSTS, answers 400 to any other Host."""

    def __init__(self, allowed: str) -> None:
        self.allowed = allowed
        self.seen: list[tuple[str, str]] = []  # (Host, X-Probe) of each request
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.host, request.headers.get("X-Probe", "")))
        if request.host != self.allowed:
            return web.Response(status=400, text="DisallowedHost")
        return web.Response(text="ok")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{self.port}"


async def test_checks_and_the_gate_send_the_configured_host_and_fields(
    make_proxy: ProxyFactory,
) -> None:
    """A Host-checking app is healthy once the checks send its name; the pool's own fields
    win over the global ones; the rollout gate sends the same, so a rollout can promote."""
    blue_app, green_app = HostCheckingApp("shop.example"), HostCheckingApp("shop.example")
    try:
        blue_url, green_url = await blue_app.start(), await green_app.start()
        checks = {
            "interval": "100ms",
            "healthy_after": 1,
            "host": "shop.example",
            "headers": {"X-Probe": "turnout"},
        }
        data = proxy_config([blue_url], [green_url], health_check=checks)
        data["pools"]["green"]["health_check"] = {"headers": {"x-probe": "green"}}
        data["rollout"] = {"strategy": "eager"}
        proxy = await make_proxy(data)
        await wait_for(lambda: all(u.healthy for u in proxy.router.upstreams()))
        assert ("shop.example", "turnout") in blue_app.seen
        assert ("shop.example", "green") in green_app.seen
        assert all(seen == ("shop.example", "turnout") for seen in blue_app.seen)
        proxy.rollout.start("eager", by="test")
        await wait_for(lambda: proxy.rollout.snapshot().state == "promoted")
    finally:
        for app in (blue_app, green_app):
            if app.runner is not None:
                await app.runner.cleanup()


async def test_a_check_with_the_upstreams_own_host_is_refused_by_such_an_app(
    make_proxy: ProxyFactory,
) -> None:
    app = HostCheckingApp("shop.example")
    try:
        url = await app.start()
        data = proxy_config([url], [], health_check={"interval": "100ms"})
        proxy = await make_proxy(data)
        await wait_for(lambda: proxy.health.snapshot()["blue/0"].last_detail == "400")
        assert not proxy.router.pools["blue"][0].healthy
        assert app.seen[0] == (f"127.0.0.1:{app.port}", "")
    finally:
        if app.runner is not None:
            await app.runner.cleanup()


@pytest.mark.parametrize(
    ("checks", "problem"),
    [
        ({"host": "shop example"}, "health_check.host: 'shop example' is not a host[:port]"),
        ({"host": "a:99999"}, "health_check.host: 'a:99999' is not a host[:port]"),
        ({"headers": {"X-A": "b\r\nEvil: 1"}}, "health_check.headers: a header value"),
        ({"headers": {"Host": "x"}}, "health_check.headers: Host cannot be set here"),
        ({"headers": {"Bad Name": "x"}}, "'Bad Name' is not a valid header name"),
    ],
)
def test_bad_check_fields_are_config_errors(checks: dict[str, Any], problem: str) -> None:
    data = proxy_config(["http://127.0.0.1:1"], [], health_check=checks)
    with pytest.raises(ConfigError) as refused:
        parse_config(data)
    assert any(problem in error for error in refused.value.errors), refused.value.errors
