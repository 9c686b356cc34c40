"""Per-upstream resilience end to end (DESIGN.md guarantees 2 and 3), over real sockets.

Real sample upstreams behind the real proxy, driven by real clients under steady concurrent
load that is bounded in count and time: breakers open, half-open and close; retries stay
within attempts and the budget; admission sheds overload fast with a reason; health checks
take upstreams out of rotation and back; a dead pool fails over to the other one.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sized
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
import httptools
import pytest
from aiohttp import web
from conftest import HOST, ProxyFactory, Sample, SampleFactory, proxy_config, wait_for
from prometheus_client.parser import text_string_to_metric_families

from proxy.control.events import Event
from proxy.http.upstream import Upstream
from proxy.logic.breaker import BreakerState
from proxy.runtime import GEN0_THRESHOLD, Proxy, freeze_startup_heap
from proxy.tools.sample import start as start_sample

# Health checks far apart: an upstream that fails after the proxy started is met by the data
# path first, not taken out of rotation by a probe.
SLOW_CHECKS: dict[str, Any] = {"interval": "60s"}
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=5)

# -- load ----------------------------------------------------------------------------------------


@dataclass
class Failure:
    """A request the client saw fail: a status other than 200, or an exception."""

    status: int
    upstream: str
    body: str

    def __repr__(self) -> str:
        return f"<{self.status} from {self.upstream or '-'}: {self.body[:120]}>"


@dataclass
class Load:
    """`clients` concurrent clients sending GETs one after another on keep-alive connections,
    until `total` requests have been sent or `stop()` is awaited; every answer is tallied."""

    session: aiohttp.ClientSession
    url: str
    clients: int = 20
    total: int = 20_000
    sent: int = 0
    ok: int = 0
    failures: list[Failure] = field(default_factory=list)
    upstreams: Counter[str] = field(default_factory=Counter)
    stopping: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return self.ok + len(self.failures)

    def start(self) -> Load:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._client(i)) for i in range(self.clients)]
        return self

    async def _client(self, index: int) -> None:
        while not self.stopping and self.sent < self.total:
            self.sent += 1
            url = f"{self.url}/load/{index}/{self.sent}"
            try:
                async with self.session.get(url, timeout=CLIENT_TIMEOUT) as resp:
                    body = await resp.read()
                    upstream = resp.headers.get("X-Upstream", "")
                    if resp.status == 200:
                        self.ok += 1
                        self.upstreams[upstream] += 1
                    else:
                        text = body.decode("utf-8", "replace")
                        self.failures.append(Failure(resp.status, upstream, text))
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(Failure(0, "", repr(exc)))

    async def until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,
        msg: Callable[[], object] = lambda: "",
    ) -> None:
        """Keep the load running until `predicate()` holds (fails after `timeout`)."""
        try:
            await wait_for(lambda: predicate() or self.finished, timeout)
        except TimeoutError:
            raise AssertionError(f"timed out waiting: {self} {msg()}") from None
        assert predicate(), f"load ended before the condition held: {self} {msg()}"

    async def more(self, n: int, timeout: float = 5.0) -> None:
        """Let `n` more requests be answered."""
        target = self.answered + n
        await self.until(lambda: self.answered >= target, timeout)

    @property
    def finished(self) -> bool:
        return all(t.done() for t in self.tasks)

    async def stop(self) -> Load:
        self.stopping = True
        async with asyncio.timeout(10):
            await asyncio.gather(*self.tasks)
        return self

    def __repr__(self) -> str:
        return (
            f"<Load sent={self.sent} ok={self.ok} failures={len(self.failures)}"
            f" {dict(self.upstreams)} {self.failures[:5]}>"
        )


LoadFactory = Callable[..., Load]


@pytest.fixture
async def load(session: aiohttp.ClientSession) -> AsyncIterator[LoadFactory]:
    """Starts loads on the shared client session; any still running at the end are stopped
    before the session closes."""
    loads: list[Load] = []

    def make(url: str, **kwargs: Any) -> Load:
        started = Load(session, url, **kwargs).start()
        loads.append(started)
        return started

    yield make
    for running in loads:
        running.stopping = True
    await asyncio.gather(*(t for running in loads for t in running.tasks), return_exceptions=True)


@pytest.fixture
async def restarted() -> AsyncIterator[list[web.AppRunner]]:
    """Runners of sample upstreams brought back on their old port; cleaned up at the end."""
    runners: list[web.AppRunner] = []
    yield runners
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def quiet_gc() -> Iterator[None]:
    """For tests that time the proxy: collect the test process's garbage first and freeze what
    is left, so that a full collection of every earlier test's objects (measured at 30-110 ms)
    does not land inside the window being timed."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def test_serving_starts_no_young_collection_for_every_few_hundred_requests() -> None:
    """After start-up Turnout freezes its heap and raises the youngest generation's threshold
    from CPython's 700, which a few hundred requests in flight cross several times a second
    (each collection a stall of the loop); loadtests.bench measures what it is worth."""
    before = gc.get_threshold()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GEN0_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def revive(upstream: Sample, runners: list[web.AppRunner]) -> None:
    """Start a stopped sample upstream again on the port it had."""
    runner, port = await start_sample(upstream.settings, HOST, upstream.port)
    runners.append(runner)
    assert port == upstream.port


def url_of(proxy: Proxy) -> str:
    return f"http://{HOST}:{proxy.port}"


def breaker_events(proxy: Proxy, key: str) -> list[tuple[str, str]]:
    return [
        (e.data["before"], e.data["after"])
        for e in proxy.events.history
        if e.kind == "breaker" and e.data["upstream"] == key
    ]


def metric(proxy: Proxy, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric `name` (as scraped from /metrics) whose labels include `labels`."""
    body, _ = proxy.metrics.exposition()
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]


def state_metric(proxy: Proxy, upstream: Upstream) -> str:
    """The state the upstream_state metric reports for `upstream` (the series valued 1)."""
    samples = metric(proxy, "turnout_upstream_state", pool=upstream.pool, upstream=upstream.url)
    states = [labels["state"] for labels, value in samples if value == 1.0]
    assert len(states) == 1, samples
    return states[0]


def status_of(proxy: Proxy, upstream: Upstream) -> dict[str, Any]:
    doc = json.loads(json.dumps(proxy.status(), default=str))
    entry: dict[str, Any] = doc["pools"][upstream.pool]["upstreams"][upstream.index]
    return entry


@dataclass
class Transition:
    """A state change seen the instant it was published, with live figures of that instant."""

    before: str
    after: str
    at: float  # loop clock
    in_flight: int  # requests to the upstream whose outcome was not known yet
    requests: int  # attempts the upstream has been sent so far
    detail: str


def find(proxy: Proxy, key: str) -> Upstream:
    pool, index = key.split("/")
    return proxy.router.pools["green" if pool == "green" else "blue"][int(index)]


def witness(proxy: Proxy, kind: str, key: str) -> list[Transition]:
    """Record `kind` events (breaker, health) of the upstream `key` synchronously, as they
    happen: an event subscriber whose queue is written by the publisher itself."""
    seen: list[Transition] = []
    loop = asyncio.get_running_loop()

    class Witness(asyncio.Queue[Event | None]):
        def put_nowait(self, item: Event | None) -> None:
            if item is None or item.kind != kind or item.data["upstream"] != key:
                return
            data = item.data
            upstream = find(proxy, key)
            before = str(data.get("before", ""))
            after = str(data.get("after", "up" if data.get("healthy") else "down"))
            # Read as counters, never through Breaker.state: that may itself change state.
            in_flight = upstream.breaker.snapshot().in_flight if after == "open" else -1
            detail = str(data.get("reason", ""))
            seen.append(
                Transition(before, after, loop.time(), in_flight, upstream.requests, detail)
            )

    proxy.events.subscribers.add(Witness())
    return seen


# -- breakers under load -----------------------------------------------------------------------

CONSECUTIVE = 5
OPEN_FOR = 0.5


@pytest.mark.parametrize("fault", ["status_503", "refused"])
@pytest.mark.parametrize("attempts", [0, 2])
async def test_failing_upstream_opens_its_breaker_under_load(
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    load: LoadFactory,
    restarted: list[web.AppRunner],
    fault: str,
    attempts: int,
) -> None:
    """One upstream of three starts failing under 20 concurrent clients: without retries the
    clients see only the failures that opened the breaker (and the requests already on their
    way to it then), with retries none; the breaker opens, half-opens after `open_for` and
    closes once the upstream is back."""
    blues = [await sample(f"blue{i}") for i in range(3)]
    green = await sample("green")
    proxy = await make_proxy(
        proxy_config(
            [b.url for b in blues],
            [green.url],
            breaker={
                "consecutive_failures": CONSECUTIVE,
                "open_for": f"{OPEN_FOR}s",
                "half_open_requests": 2,
            },
            # The default budget (20% of the last 10 s of requests, at least 10 retries a
            # second) lets the burst of failures around the opening through. A refused
            # connection reached nothing and is re-sent without drawing on the budget.
            retries={"attempts": attempts},
            health_check=SLOW_CHECKS,
        )
    )
    bad = proxy.router.pools["blue"][1]
    seen = witness(proxy, "breaker", bad.key)
    traffic = load(url_of(proxy))
    await traffic.more(100)
    assert not traffic.failures, traffic

    if fault == "status_503":
        blues[1].settings.error_status = 503
        blues[1].settings.error_rate = 1.0
    else:
        await blues[1].runner.cleanup()
    await traffic.until(lambda: len(seen) >= 1)
    assert state_metric(proxy, bad) == "breaker_open"
    assert status_of(proxy, bad)["breaker"] == "open"
    assert status_of(proxy, bad)["state"] == "breaker_open"
    await wait_for(lambda: bad not in proxy.router.candidates["blue"], 1.0)

    # Back before the breaker half-opens: the trials find it healthy and close the breaker.
    if fault == "status_503":
        blues[1].settings.error_rate = 0.0
    else:
        await revive(blues[1], restarted)
    await traffic.until(lambda: len(seen) >= 3, msg=lambda: seen)
    served = traffic.upstreams["blue1"]
    await traffic.until(lambda: traffic.upstreams["blue1"] >= served + 20)
    await traffic.stop()

    opened, half_opened, closed = seen
    print(
        f"\n{fault} attempts={attempts}: client errors {len(traffic.failures)}, in flight to the"
        f" upstream when its breaker opened {opened.in_flight}, half-open after"
        f" {half_opened.at - opened.at:.3f}s, closed {closed.at - half_opened.at:.3f}s later,"
        f" {traffic.sent} requests, {proxy.retry_budget!r}"
    )
    assert [(t.before, t.after) for t in seen] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert opened.detail == f"{CONSECUTIVE} consecutive failures"
    # Half-open once open_for is up, noticed by the next pick or the proxy's tick (0.5 s).
    # The event loop's clock moves in whole milliseconds (seen: 0.4975 s), hence the 2 ms.
    assert OPEN_FOR - 0.002 <= half_opened.at - opened.at < OPEN_FOR + 0.5 + 0.2
    if attempts == 0:
        # Each failure that opened the breaker reached a client; so did the requests that were
        # already on their way to the upstream then. Nothing after.
        assert CONSECUTIVE <= len(traffic.failures) <= CONSECUTIVE + opened.in_flight, traffic
        assert all(f.status in (502, 503) for f in traffic.failures), traffic
    else:
        assert not traffic.failures, traffic
    assert state_metric(proxy, bad) == "up"
    assert status_of(proxy, bad)["breaker"] == "closed"


# -- overload: a hanging upstream and 1,000 clients ---------------------------------------------

MAX_IN_FLIGHT = 10
QUEUE = 20
QUEUE_TIMEOUT = 0.5
HANG_MS = 1500
STORM = 1000


@dataclass
class Answer:
    """One request as its client saw it; times on the loop clock, from the moment the request
    was written (after the connection was made) to its first response byte."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = -1.0

    @property
    def error(self) -> str:
        if self.status == 200 or not self.body.startswith(b"{"):
            return ""
        return str(json.loads(self.body).get("error", ""))

    @property
    def upstream(self) -> str:
        return self.headers.get("x-upstream", "")


class OneShot(asyncio.Protocol):
    """A minimal client: writes one request as soon as it is connected, reads until close.
    A thousand of them cost the shared event loop far less than a thousand aiohttp clients, so
    the times measured are the proxy's, not the client's."""

    def __init__(self, request: bytes, done: asyncio.Future[Answer]) -> None:
        self.request = request
        self.done = done
        self.answer = Answer()
        self.sent = 0.0
        self.parser = httptools.HttpResponseParser(self)
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sent = self.loop.time()
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.answer.seconds < 0:
            self.answer.seconds = self.loop.time() - self.sent
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.answer)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.answer.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.answer.body += body


async def one_shot(port: int, path: str, headers: dict[str, str] | None = None) -> Answer:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    request = f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\n\r\n"
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Answer] = loop.create_future()
    transport, _ = await loop.create_connection(
        lambda: OneShot(request.encode("latin-1"), done), HOST, port
    )
    try:
        async with asyncio.timeout(5):
            return await done
    finally:
        transport.close()


def at_least(seen: Sized, count: int) -> bool:
    return len(seen) >= count


async def test_hanging_upstream_sheds_a_storm_fast_and_the_other_pool_keeps_serving(
    sample: SampleFactory, make_proxy: ProxyFactory, quiet_gc: None
) -> None:
    """1,000 clients at once on an upstream that takes 1.5 s per request, with room for 10
    in flight and 20 queued: 970 are refused within milliseconds with 503 `queue_full`, 20 with
    503 `queue_timeout` after ~queue_timeout, 10 are answered; the proxy never holds more than
    the limits, the breaker stays closed, and the other pool serves as usual meanwhile."""
    slow = await sample("slow")
    green = await sample("green")
    proxy = await make_proxy(
        proxy_config(
            [slow.url],
            [green.url],
            limits={
                "max_in_flight": MAX_IN_FLIGHT,
                "queue": QUEUE,
                "queue_timeout": f"{QUEUE_TIMEOUT}s",
            },
        )
    )
    upstream = proxy.router.pools["blue"][0]
    peak = {"in_flight": 0, "queued": 0}
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            snap = upstream.admission.snapshot()
            peak["in_flight"] = max(peak["in_flight"], snap.in_flight)
            peak["queued"] = max(peak["queued"], snap.queued)
            assert snap.in_flight <= MAX_IN_FLIGHT, snap
            assert snap.queued <= QUEUE, snap
            await asyncio.sleep(0.001)

    green_answers: list[Answer] = []

    async def other_pool() -> None:
        # Paced, bounded in count: the other pool's ordinary traffic while the storm rages.
        while not stop.is_set() and len(green_answers) < 500:
            green_answers.append(await one_shot(proxy.port, "/g", {"X-Turnout-Pool": "green"}))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(sampler())
    prober = asyncio.create_task(other_pool())
    async with asyncio.timeout(10):
        answers = await asyncio.gather(
            *(one_shot(proxy.port, f"/delay/{HANG_MS}") for _ in range(STORM))
        )
    stop.set()
    await watcher
    await prober

    by_kind = Counter((a.status, a.error) for a in answers)
    full = [a for a in answers if a.error == "queue_full"]
    timed_out = [a for a in answers if a.error == "queue_timeout"]
    served = [a for a in answers if a.status == 200]
    full_times = sorted(a.seconds for a in full)
    print(
        f"\nstorm: {dict(by_kind)}; queue_full answered in median"
        f" {full_times[len(full_times) // 2] * 1000:.1f} ms, max {full_times[-1] * 1000:.1f} ms;"
        f" queue_timeout after {min(a.seconds for a in timed_out):.3f}"
        f"..{max(a.seconds for a in timed_out):.3f} s; peak {peak};"
        f" other pool {len(green_answers)} requests, max"
        f" {max(a.seconds for a in green_answers) * 1000:.1f} ms"
    )
    assert len(served) == MAX_IN_FLIGHT, by_kind
    # Overload is shed, never spilled onto the pool the split did not choose.
    assert all(a.upstream == "slow" for a in served), served
    assert proxy.router.pools["green"][0].requests == len(green_answers)
    assert len(timed_out) == QUEUE, by_kind
    assert len(full) == STORM - MAX_IN_FLIGHT - QUEUE, by_kind
    for a in (*full, *timed_out):
        assert (a.status, a.headers.get("retry-after"), a.upstream) == (503, "1", ""), a
    # Refused at once: every refusal came before the first queued request timed out (an order,
    # not a figure: how fast is the benchmark's to say, and a loaded machine stretches it).
    assert full_times[-1] < min(a.seconds for a in timed_out)
    assert all(a.seconds >= QUEUE_TIMEOUT for a in timed_out), timed_out
    assert peak == {"in_flight": MAX_IN_FLIGHT, "queued": QUEUE}
    snap = upstream.admission.snapshot()
    assert (snap.shed_queue_full, snap.shed_queue_timeout) == (len(full), len(timed_out))
    assert (snap.in_flight, snap.queued) == (0, 0)
    # Sheds are the proxy's own refusals, not failures of the upstream.
    assert upstream.breaker.state is BreakerState.CLOSED
    assert breaker_events(proxy, upstream.key) == []
    assert green_answers
    assert all((a.status, a.upstream) == (200, "green") for a in green_answers), green_answers
    # Never held behind the hanging upstream, whose answers take HANG_MS.
    assert max(a.seconds for a in green_answers) < HANG_MS / 1000
    shed = {
        labels["reason"]: value
        for labels, value in metric(proxy, "turnout_shed_total", upstream=upstream.url)
    }
    assert shed == {"queue_full": len(full), "queue_timeout": len(timed_out), "rate_limited": 0}


# -- a whole pool down -----------------------------------------------------------------------


async def test_pool_down_at_start_fails_over_with_no_client_error(
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    load: LoadFactory,
    dead_url: Callable[[], str],
) -> None:
    green = await sample("green")
    proxy = await make_proxy(proxy_config([dead_url(), dead_url()], [green.url]))
    status = proxy.status()
    assert status["pools"]["blue"]["available"] == 0
    assert [u["state"] for u in status["pools"]["blue"]["upstreams"]] == ["down", "down"]
    traffic = load(url_of(proxy), total=400)
    await traffic.until(lambda: traffic.finished, timeout=10)
    assert traffic.ok == 400, traffic
    assert not traffic.failures, traffic
    assert traffic.upstreams == {"green": 400}
    assert sum(u.requests for u in proxy.router.pools["blue"]) == 0


async def test_a_forced_pool_never_fails_over(
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    dead_url: Callable[[], str],
) -> None:
    """X-Turnout-Pool: green while no green upstream is available answers 503 naming the pool
    and why, never blue's 200; and a green answering 503 is retried inside green only."""
    blue = await sample("blue")
    unhealthy = await sample("green1", healthy=False)
    proxy = await make_proxy(proxy_config([blue.url], [dead_url(), unhealthy.url]))
    url = url_of(proxy) + "/smoke"
    async with session.get(url, headers={"X-Turnout-Pool": "green"}) as resp:
        assert resp.status == 503
        body = await resp.json()
    assert (body["error"], body["pool"]) == ("no_upstream", "green")
    assert body["detail"].startswith(
        "pool green forced by X-Turnout-Pool has no available upstream: green/0 down (GET"
        " /healthz failed: "
    )
    assert body["detail"].endswith("green/1 down (GET /healthz answered 503)")
    # Without the header the same request fails over to blue.
    async with session.get(url) as resp:
        assert (resp.status, resp.headers["X-Upstream"]) == (200, "blue")
    assert proxy.router.pools["blue"][0].requests == 1

    failing = {"error_rate": 1.0, "error_status": 503}
    greens = [await sample(f"green{i}", **failing) for i in range(2)]
    proxy = await make_proxy(proxy_config([blue.url], [g.url for g in greens]))
    async with session.get(url_of(proxy) + "/smoke", headers={"X-Turnout-Pool": "green"}) as resp:
        assert resp.status == 503
        assert resp.headers["X-Upstream"] in ("green0", "green1")
    assert proxy.router.pools["blue"][0].requests == 0
    assert [u.attempts for u in proxy.router.pools["green"]] == [{"503": 1}, {"503": 1}]
    assert metric(proxy, "turnout_retries_total") == [
        ({"pool": "green", "reason": "status_503"}, 1.0)
    ]
    assert proxy.observed.rescued == 0


async def test_pool_dying_under_load_fails_over_with_no_client_error(
    sample: SampleFactory, make_proxy: ProxyFactory, load: LoadFactory
) -> None:
    """Both blue upstreams stop (connections refused) under 20 concurrent clients: requests on
    their way are re-sent to the other blue upstream, then to green, until both breakers open
    and green takes everything; no client sees an error."""
    blues = [await sample(f"blue{i}") for i in range(2)]
    green = await sample("green")
    proxy = await make_proxy(
        proxy_config([b.url for b in blues], [green.url], health_check=SLOW_CHECKS)
    )
    traffic = load(url_of(proxy))
    await traffic.more(100)
    await asyncio.gather(*(b.runner.cleanup() for b in blues))
    pool = proxy.router.pools["blue"]
    await traffic.until(lambda: all(u.breaker.snapshot().opens for u in pool))
    served = traffic.upstreams["green"]
    await traffic.until(lambda: traffic.upstreams["green"] >= served + 200)
    await traffic.stop()
    stats = proxy.observed.pool_stats["blue"]
    print(f"\npool dying: {traffic!r} {proxy.retry_budget!r} {stats!r}")
    assert not traffic.failures, traffic
    assert proxy.status()["pools"]["blue"]["available"] == 0
    # Refused connections were re-sent elsewhere without drawing on the retry budget.
    assert stats.retries.get("connect_error", 0) >= 2 * CONSECUTIVE - 1
    assert proxy.retry_budget.snapshot().denied == 0


# -- health checks -----------------------------------------------------------------------------

INTERVAL = 0.1
SLACK = 0.25  # for a probe's own time and a busy event loop
FAST_CHECKS: dict[str, Any] = {
    "interval": f"{INTERVAL}s",
    "timeout": "500ms",
    "unhealthy_after": 3,
    "healthy_after": 2,
}


async def test_failing_health_checks_take_an_upstream_out_and_back(
    sample: SampleFactory, make_proxy: ProxyFactory, load: LoadFactory
) -> None:
    a = await sample("a")
    b = await sample("b")
    green = await sample("green")
    proxy = await make_proxy(proxy_config([a.url, b.url], [green.url], health_check=FAST_CHECKS))
    upstream = proxy.router.pools["blue"][0]
    seen = witness(proxy, "health", upstream.key)
    traffic = load(url_of(proxy), clients=5)
    await traffic.until(lambda: traffic.upstreams["a"] >= 20)

    loop = asyncio.get_running_loop()
    a.settings.healthy = False  # only its /healthz fails; it would still serve requests
    flipped = loop.time()
    await traffic.until(lambda: len(seen) >= 1)
    left = seen[0]
    assert (left.after, left.detail) == ("down", "3 consecutive failed checks (last: 503)")
    # The first failing check comes within an interval, the third two intervals later.
    assert 2 * INTERVAL <= left.at - flipped < 3 * INTERVAL + SLACK
    await wait_for(lambda: upstream not in proxy.router.candidates["blue"], 1.0)
    assert proxy.status()["pools"]["blue"]["upstreams"][0]["state"] == "down"
    assert state_metric(proxy, upstream) == "down"
    await traffic.more(200)
    assert upstream.requests == left.requests  # not one request after it left

    a.settings.healthy = True
    flipped = loop.time()
    await traffic.until(lambda: len(seen) >= 2)
    back = seen[1]
    assert (back.after, back.detail) == ("up", "2 consecutive passing checks")
    assert INTERVAL <= back.at - flipped < 2 * INTERVAL + SLACK
    served = traffic.upstreams["a"]
    await traffic.until(lambda: traffic.upstreams["a"] >= served + 20)
    await traffic.stop()
    assert not traffic.failures, traffic
    assert state_metric(proxy, upstream) == "up"


@pytest.mark.parametrize("passes_at_once", [False, True])
async def test_added_upstream_gets_traffic_only_after_its_first_passing_check(
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    load: LoadFactory,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    passes_at_once: bool,
) -> None:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    blue = await sample("blue")
    green = await sample("green")
    new = await sample("new", healthy=passes_at_once)
    proxy = await make_proxy(
        proxy_config(
            [blue.url], [green.url], health_check=FAST_CHECKS, admin={"host": HOST, "port": 0}
        )
    )
    admin = f"http://{HOST}:{await proxy.start_admin()}"
    seen = witness(proxy, "health", "blue/1")
    traffic = load(url_of(proxy), clients=10)
    await traffic.more(50)
    async with session.post(admin + "/pools/blue/upstreams", json={"url": new.url}) as resp:
        assert resp.status == 201, await resp.text()
    added = proxy.router.pools["blue"][1]
    assert added.url == new.url
    if not passes_at_once:
        assert not added.healthy
        assert added not in proxy.router.candidates["blue"]
        await traffic.until(lambda: proxy.health.snapshot()["blue/1"].probes >= 3)
        assert added.requests == 0
        assert traffic.upstreams["new"] == 0
        new.settings.healthy = True
    await traffic.until(lambda: any(t.after == "up" for t in seen))
    # Out of rotation from the moment it was added; in after its first passing check, and
    # not one request before.
    assert [(t.after, t.detail) for t in seen] == [
        ("down", "not checked yet"),
        ("up", "first passing check (200)"),
    ]
    assert seen[1].requests == 0
    await traffic.until(lambda: traffic.upstreams["new"] >= 20)
    await traffic.stop()
    assert not traffic.failures, traffic


# -- retries ---------------------------------------------------------------------------------


async def test_no_retry_once_a_response_byte_went_to_the_client(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(proxy_config([blue.url], [green.url], retries={"attempts": 2}))
    async with session.get(url_of(proxy) + "/cut/100000") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    blue_up, green_up = proxy.router.pools["blue"][0], proxy.router.pools["green"][0]
    assert (blue_up.requests, blue_up.failures, green_up.requests) == (1, 1, 0)
    assert proxy.observed.pool_stats["blue"].retries == {}


async def test_post_is_not_retried_on_503_but_get_is(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    bad = await sample("bad", error_rate=1.0, error_status=503)
    good = await sample("good")
    green = await sample("green")
    proxy = await make_proxy(
        proxy_config(
            [bad.url, good.url],
            [green.url],
            balancer="round_robin",
            breaker={"consecutive_failures": 100},
        )
    )
    bad_up = proxy.router.pools["blue"][0]
    posts: Counter[tuple[int, str]] = Counter()
    for _ in range(6):
        async with session.post(url_of(proxy) + "/submit", data=b"x" * 100) as resp:
            posts[(resp.status, resp.headers["X-Upstream"])] += 1
            await resp.read()
    # Round robin sends every other POST to the bad upstream; its 503 is the answer.
    assert posts == {(503, "bad"): 3, (200, "good"): 3}
    assert proxy.observed.pool_stats["blue"].retries == {}
    gets: Counter[tuple[int, str]] = Counter()
    for _ in range(6):
        async with session.get(url_of(proxy) + "/get") as resp:
            gets[(resp.status, resp.headers["X-Upstream"])] += 1
            await resp.read()
    assert gets == {(200, "good"): 6}
    # POSTs answered 503 were relayed, not failed over: only the GETs' tries on bad retried.
    assert proxy.observed.pool_stats["blue"].retries == {"status_503": bad_up.failures}
    assert bad_up.requests == 3 + bad_up.failures


@pytest.mark.parametrize("attempts", [0, 1, 3])
async def test_retries_attempts_is_respected(
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    attempts: int,
) -> None:
    """Every upstream answers 503: each GET is tried 1 + attempts times, on distinct upstreams,
    and the client gets the last 503."""
    blues = [await sample(f"blue{i}", error_rate=1.0, error_status=503) for i in range(3)]
    green = await sample("green", error_rate=1.0, error_status=503)
    proxy = await make_proxy(
        proxy_config(
            [b.url for b in blues],
            [green.url],
            retries={"attempts": attempts},
            breaker={"consecutive_failures": 100, "min_requests": 100},
        )
    )
    for _ in range(5):
        async with session.get(url_of(proxy) + "/x") as resp:
            assert resp.status == 503
            await resp.read()
    tries = sum(u.requests for u in proxy.router.upstreams())
    assert tries == 5 * (1 + attempts)
    retries = sum(sum(s.retries.values()) for s in proxy.observed.pool_stats.values())
    assert retries == 5 * attempts
    samples = metric(proxy, "turnout_retries_total")
    assert sum(v for _, v in samples) == retries


async def test_retry_budget_bounds_retries_in_an_outage(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    """Every upstream answers 503 after 200 ms: of 60 requests sent at once, only as many are
    retried as the budget allows (0.2 x the window's requests + min_per_second x 10 s)."""
    slow = {"error_rate": 1.0, "error_status": 503, "latency": 0.2}
    blues = [await sample(f"blue{i}", **slow) for i in range(2)]
    green = await sample("green", **slow)
    proxy = await make_proxy(
        proxy_config(
            [b.url for b in blues],
            [green.url],
            retries={"attempts": 2, "budget": 0.2, "min_per_second": 0.5},
            breaker={"consecutive_failures": 1000, "min_requests": 1000},
        )
    )
    n = 60
    answers = await asyncio.gather(*(one_shot(proxy.port, f"/o/{i}") for i in range(n)))
    assert Counter(a.status for a in answers) == {503: n}
    retries = sum(sum(s.retries.values()) for s in proxy.observed.pool_stats.values())
    budget = proxy.retry_budget.snapshot()
    print(f"\nbudget: {retries} retries of {n} failed requests, {budget}")
    assert 5 <= retries <= 0.2 * n + 5
    assert budget.denied >= n - retries  # every request not retried was refused a retry
    assert sum(u.requests for u in proxy.router.upstreams()) == n + retries
    assert sum(v for _, v in metric(proxy, "turnout_retries_total")) == retries


BURSTS = 5


async def test_one_upstream_dying_under_load_costs_no_client_request(
    sample: SampleFactory, make_proxy: ProxyFactory, load: LoadFactory
) -> None:
    """Three blue upstreams, 16 concurrent clients; one starts answering 503 to everything,
    then recovers, five times over. Each time its requests in flight fail together: the budget
    (20% of the last 10 s of requests, at least 10 retries a second) lets all their retries
    through, where one on concurrent retries (at most max(20% in flight, 3)) refused some."""
    # 20 ms of latency keeps about five requests in flight on each upstream; the failing one
    # answers them all at once (the sample decides after its latency).
    blues = [await sample(f"blue{i}", latency=0.02) for i in range(3)]
    green = await sample("green")
    proxy = await make_proxy(
        proxy_config(
            [b.url for b in blues],
            [green.url],
            breaker={"consecutive_failures": CONSECUTIVE, "open_for": "200ms"},
            health_check=SLOW_CHECKS,
        )
    )
    bad = proxy.router.pools["blue"][1]
    seen = witness(proxy, "breaker", bad.key)
    traffic = load(url_of(proxy), clients=16, total=40_000)
    await traffic.more(200)
    for burst in range(BURSTS):
        blues[1].settings.error_status = 503
        blues[1].settings.error_rate = 1.0
        opened, closed = 3 * burst + 1, 3 * burst + 3
        await traffic.until(partial(at_least, seen, opened), msg=lambda: seen)
        blues[1].settings.error_rate = 0.0
        await traffic.until(partial(at_least, seen, closed), msg=lambda: seen)
    await traffic.stop()
    retried = sum(v for _, v in metric(proxy, "turnout_retries_total", pool="blue"))
    print(
        f"\none upstream dying {BURSTS} times: {len(traffic.failures)} client failures of"
        f" {traffic.sent}, {retried:g} retries, {proxy.retry_budget!r}"
    )
    assert not traffic.failures, traffic
    assert [(t.before, t.after) for t in seen] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ] * BURSTS
    assert retried >= BURSTS * CONSECUTIVE
    assert proxy.retry_budget.snapshot().denied == 0


async def test_a_retry_storm_is_capped_at_the_budget_ratio(
    sample: SampleFactory, make_proxy: ProxyFactory, load: LoadFactory
) -> None:
    """Every upstream answers 503 to 16 concurrent clients, and each request would be retried
    twice: the metrics show retries held to budget x requests, plus the floor of
    min_per_second over the 10 s window."""
    failing = {"error_rate": 1.0, "error_status": 503}
    blues = [await sample(f"blue{i}", **failing) for i in range(3)]
    green = await sample("green", **failing)
    ratio, floor, n = 0.2, 1.0, 1500
    proxy = await make_proxy(
        proxy_config(
            [b.url for b in blues],
            [green.url],
            retries={"attempts": 2, "budget": ratio, "min_per_second": floor},
            breaker={"consecutive_failures": 1000, "min_requests": 1000},
            health_check=SLOW_CHECKS,
        )
    )
    traffic = load(url_of(proxy), clients=16, total=n)
    await traffic.until(lambda: traffic.finished, timeout=20)
    requests = sum(v for _, v in metric(proxy, "turnout_requests_total"))
    retries = sum(v for _, v in metric(proxy, "turnout_retries_total"))
    attempts = sum(v for _, v in metric(proxy, "turnout_upstream_attempts_total"))
    print(f"\nretry storm: {retries:g} retries for {requests:g} requests, {proxy.retry_budget!r}")
    assert requests == n
    assert len(traffic.failures) == n
    assert attempts == requests + retries
    assert ratio * requests <= retries <= ratio * requests + floor * 10
    assert proxy.retry_budget.snapshot().denied >= n - retries


# -- rate limit and connection limit ------------------------------------------------------------


async def test_rate_limit_sheds_fast_with_rate_limited(
    sample: SampleFactory, make_proxy: ProxyFactory, quiet_gc: None
) -> None:
    """limits.rate 20/s and 60 requests at once on an upstream that takes 300 ms: 20 are
    admitted (a burst of one second's worth), the rest refused at once with 503
    `rate_limited`, all of them before the upstream answered any admitted one."""
    blue = await sample("blue", latency=0.3)
    green = await sample("green")
    rate = 20
    proxy = await make_proxy(proxy_config([blue.url], [green.url], limits={"rate": float(rate)}))
    answers = await asyncio.gather(*(one_shot(proxy.port, f"/r/{i}") for i in range(60)))
    ok = [a for a in answers if a.status == 200]
    shed = [a for a in answers if a.status != 200]
    slowest_shed = max(a.seconds for a in shed)
    print(f"\nrate: {len(ok)} admitted, {len(shed)} shed in at most {slowest_shed * 1000:.1f} ms")
    # What refilled while the requests arrived may add one or two.
    assert rate <= len(ok) <= rate + 1 + slowest_shed * rate, len(ok)
    for a in shed:
        assert (a.status, a.error, a.headers.get("retry-after")) == (503, "rate_limited", "1")
    assert slowest_shed < min(a.seconds for a in ok)
    assert slowest_shed < 0.25
    upstream = proxy.router.pools["blue"][0]
    assert upstream.admission.snapshot().shed_rate_limited == len(shed)
    assert proxy.router.pools["green"][0].requests == 0
    assert upstream.breaker.snapshot().opens == 0


async def test_requests_abandoned_in_the_queue_free_their_places(
    sample: SampleFactory, make_proxy: ProxyFactory
) -> None:
    """Clients that close while their request waits in the upstream's queue free their places
    at once (as HAProxy's abortonclose): those requests never reach the upstream, and a live
    client is not kept waiting behind them. A request already sent is still answered."""
    blue = await sample("blue")
    green = await sample("green")
    limits = {"max_in_flight": 1, "queue": 5, "queue_timeout": "10s"}
    proxy = await make_proxy(proxy_config([blue.url], [green.url], limits=limits))
    upstream = proxy.router.pools["blue"][0]
    first = asyncio.create_task(one_shot(proxy.port, "/delay/1500"))
    await wait_for(lambda: upstream.in_flight == 1)
    quitters = [await asyncio.open_connection(HOST, proxy.port) for _ in range(5)]
    for i, (_, writer) in enumerate(quitters):
        writer.write(f"GET /quit/{i} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    await wait_for(lambda: upstream.admission.queued == 5)
    for _, writer in quitters:
        writer.close()
    # Long before the request in flight is answered, the queue is empty again.
    await wait_for(lambda: upstream.admission.queued == 0, timeout=1.0)
    assert not first.done()
    live = await one_shot(proxy.port, "/live")
    answer = await first
    assert (answer.status, live.status) == (200, 200)
    assert upstream.requests == 2  # the first one and the live one, none of the quitters


async def test_connection_beyond_max_connections_gets_503_and_is_closed(
    sample: SampleFactory, make_proxy: ProxyFactory
) -> None:
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(
        proxy_config(
            [blue.url], [green.url], listen={"host": HOST, "port": 0, "max_connections": 5}
        )
    )
    request = b"GET /k HTTP/1.1\r\nHost: test\r\n\r\n"
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(5):
            reader, writer = await asyncio.open_connection(HOST, proxy.port)
            held.append((reader, writer))
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), 5)
        assert len(proxy.connections) == 5
        refused = await one_shot(proxy.port, "/k")  # returns once the proxy closed it
        assert (refused.status, refused.error, refused.headers.get("retry-after")) == (
            503,
            "max_connections",
            "1",
        )
        assert refused.headers.get("connection") == "close"
        held.pop()[1].close()
        await wait_for(lambda: len(proxy.connections) == 4)
        assert (await one_shot(proxy.port, "/k")).status == 200
    finally:
        for _, writer in held:
            writer.close()


# -- shielded canary ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clients", "budget"),
    [
        # No more requests at once than the budget's floor of 3 concurrent retries: every
        # failure is rescued under the default budget.
        (3, 0.2),
        # 20 clients: green's failures before its breaker opens come in a burst of about 10
        # (half the requests in flight); a budget of 1.0 lets all of them be retried.
        (20, 1.0),
    ],
)
async def test_failing_canary_is_shielded_by_the_stable_pool(
    sample: SampleFactory, make_proxy: ProxyFactory, load: LoadFactory, clients: int, budget: float
) -> None:
    """Split 50 with every green answer a 503: each GET green fails is retried once on blue,
    so every client gets blue's answer, and proxy.observed.rescued counts those."""
    blue = await sample("blue")
    green = await sample("green", error_rate=1.0, error_status=503)
    proxy = await make_proxy(
        proxy_config([blue.url], [green.url], split=50, retries={"budget": budget})
    )
    traffic = load(url_of(proxy), clients=clients, total=400)
    await traffic.until(lambda: traffic.finished, timeout=10)
    canary = proxy.router.pools["green"][0]
    print(
        f"\ncanary with {clients} clients: {traffic!r} rescued={proxy.observed.rescued}"
        f" {proxy.retry_budget!r}"
    )
    assert traffic.ok == 400, traffic
    assert not traffic.failures, traffic
    assert traffic.upstreams == {"blue": 400}
    # Every failed green attempt was answered by blue, until green's breaker opened and blue
    # took all the traffic.
    assert proxy.observed.rescued == canary.failures >= 1
    assert canary.breaker.snapshot().opens == 1
    assert metric(proxy, "turnout_rescued_total")[0][1] == proxy.observed.rescued
