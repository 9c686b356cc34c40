"""Rollouts end to end (DESIGN.md "Strategies"): real blue and green sample upstreams, the real
proxy and its admin API, steady concurrent client load, and the rollout controller deciding.

The sample upstreams read their settings live, so `green.settings.error_rate = 1.0` breaks
green at once; a hook on each upstream records when it serves its first 5xx, which is where a
time-to-rollback is measured from. Every scenario is bounded: the load stops on an event, and
every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import HOST, ProxyFactory, SampleFactory, proxy_config, wait_for

from proxy.control.events import Event
from proxy.runtime import Proxy
from proxy.tools.sample import SampleSettings, make_app

CLIENTS = 20
# Far above what any scenario needs; a scenario that hangs stops here rather than at the
# per-test timeout.
LOAD_LIMIT = 12.0
STEPS = [5, 25, 50, 100]

# -- upstreams with a seed and a clock on their 5xx answers ------------------------------------


@dataclass
class Upstream:
    """A running sample upstream; `first_5xx` is the loop time of its first 5xx answer."""

    settings: SampleSettings
    runner: web.AppRunner
    port: int
    served: Counter[int] = field(default_factory=Counter)
    first_5xx: float | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.served.items() if status >= 500)


UpstreamFactory = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    runners: list[web.AppRunner] = []

    async def make(name: str, seed: int = 0, **settings: Any) -> Upstream:
        # The service keeps this very object and reads it on every request.
        live = SampleSettings(name=name, **settings)
        app = make_app(live, seed=seed)
        loop = asyncio.get_running_loop()
        up: Upstream | None = None

        async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
            # Ordinary requests only: health checks and gate probes are not traffic.
            if up is None or request.path != "/work":
                return
            up.served[response.status] += 1
            if response.status >= 500 and up.first_5xx is None:
                up.first_5xx = loop.time()

        app.on_response_prepare.append(on_prepare)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        up = Upstream(live, runner, runner.addresses[0][1])
        return up

    yield make
    for runner in runners:
        await runner.cleanup()


# -- the rig: upstreams, proxy, admin API, event recorder --------------------------------------


@dataclass
class Rig:
    """Blue and green upstreams, the proxy with its admin API, and every event it published
    (with the loop time the recorder got it)."""

    proxy: Proxy
    blue: Upstream
    green: Upstream
    admin: aiohttp.ClientSession
    events: list[tuple[float, Event]]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.proxy.port}/work"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.proxy.admin_port}"

    @property
    def state(self) -> str:
        return self.proxy.rollout.state.value

    def stable_now(self) -> str:
        """The stable pool (a call, so that a type checker does not keep an earlier value)."""
        return self.proxy.stable

    @property
    def split(self) -> float:
        return self.proxy.spreader.split

    async def post(self, action: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        url = f"{self.admin_url}/rollout/{action}"
        async with self.admin.post(url, json=body if body is not None else {}) as resp:
            return resp.status, await resp.json()

    async def drain(self, pool: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        url = f"{self.admin_url}/pools/{pool}/upstreams/0/drain"
        async with self.admin.post(url, json=body) as resp:
            return resp.status, await resp.json()

    async def put_split(self, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.admin.put(f"{self.admin_url}/split", json=body) as resp:
            return resp.status, await resp.json()

    async def status(self) -> dict[str, Any]:
        async with self.admin.get(f"{self.admin_url}/status") as resp:
            assert resp.status == 200
            doc: dict[str, Any] = await resp.json()
            return doc

    async def metrics(self) -> dict[str, float]:
        async with self.admin.get(f"{self.admin_url}/metrics") as resp:
            assert resp.status == 200
            return parse_metrics(await resp.text())

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [e.data for _, e in self.events if e.kind == kind]

    def proxy_events(self, kind: str) -> list[dict[str, Any]]:
        """Every event of `kind` the proxy has published (its own history)."""
        return [e.data for e in self.proxy.events.history if e.kind == kind]

    def states(self) -> list[str]:
        return [d["after"] for d in self.kinds("rollout")]

    def caught_up(self) -> bool:
        """Whether the recorder has every event published so far."""
        history = self.proxy.events.history
        return not history or (bool(self.events) and self.events[-1][1].seq == history[-1].seq)

    async def until_state(self, *states: str, timeout: float = 8.0) -> None:
        """Wait until the rollout is in one of `states` and its events are recorded."""
        await wait_for(lambda: self.state in states and self.caught_up(), timeout)

    async def event_time(self, kind: str, timeout: float = 3.0, **match: Any) -> float:
        """When the first event of `kind` whose data has `match` reached the recorder."""

        def found() -> float | None:
            for at, event in self.events:
                if event.kind == kind and all(event.data.get(k) == v for k, v in match.items()):
                    return at
            return None

        await wait_for(lambda: found() is not None, timeout)
        at = found()
        assert at is not None
        return at

    async def ticks(self, count: int, timeout: float = 5.0) -> None:
        """Wait until the rollout controller has taken `count` more looks at the rollout (TICK
        apart): what "nothing moves for a while" is measured in. A controller that is stuck
        fails this wait, where a sleep would let the assertion after it pass."""
        rollout = self.proxy.rollout
        target = rollout.ticks + count
        await wait_for(lambda: rollout.ticks >= target, timeout)

    async def stopped(self) -> None:
        """Wait until the controller's loop has ended (the rollout is over): nothing of the
        controller can move the split after this."""
        await wait_for(lambda: not self.proxy.rollout.running)

    def shares(self) -> list[float]:
        """The candidate share of every step event so far, in order."""
        return [d["share"] for d in self.kinds("rollout_step")]

    async def until_share(self, share: float, timeout: float = 5.0) -> None:
        """Wait until the rollout's latest step is at `share`."""
        await wait_for(lambda: self.shares()[-1:] == [share], timeout)


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels} value` lines as a dict keyed by the name with its labels."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


RigFactory = Callable[..., Awaitable[Rig]]


def rollout_config(
    *,
    steps: list[float] | None = None,
    interval: str = "300ms",
    min_requests: int = 20,
    **rollout: Any,
) -> dict[str, Any]:
    return {
        "strategy": "adaptive",
        "steps": steps or STEPS,
        "interval": interval,
        "threshold": {"min_requests": min_requests},
        **rollout,
    }


@pytest.fixture
async def rig(
    upstream: UpstreamFactory, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RigFactory]:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    sessions: list[aiohttp.ClientSession] = []
    tasks: list[asyncio.Task[None]] = []

    async def make(
        *,
        blue: dict[str, Any] | None = None,
        green: dict[str, Any] | None = None,
        rollout: dict[str, Any] | None = None,
        seed: int = 1,
        upstreams: tuple[Upstream, Upstream] | None = None,
        **overrides: Any,
    ) -> Rig:
        if upstreams is None:
            b = await upstream("blue", seed=seed, **(blue or {}))
            g = await upstream("green", seed=seed + 1000, **(green or {}))
        else:
            b, g = upstreams
        data = proxy_config(
            [b.url],
            [g.url],
            admin={"host": HOST, "port": 0},
            rollout=rollout or rollout_config(),
            **overrides,
        )
        proxy = await make_proxy(data, seed=seed)
        await proxy.start_admin()
        events: list[tuple[float, Event]] = []
        loop = asyncio.get_running_loop()

        async def record() -> None:
            async for event in proxy.events.subscribe():
                events.append((loop.time(), event))

        task = loop.create_task(record())
        tasks.append(task)
        await asyncio.sleep(0)  # the recorder subscribes before anything happens
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Rig(proxy, b, g, session, events)

    yield make
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for session in sessions:
        await session.close()


# -- load ----------------------------------------------------------------------------------


class Load:
    """`clients` concurrent clients sending GETs to the proxy until stopped (or LOAD_LIMIT).

    A client request fails when it does not end in a 200 (any other status, or an error).
    """

    def __init__(self, url: str, clients: int = CLIENTS, *, pause: float = 0.0) -> None:
        self.url = url
        self.clients = clients
        self.pause = pause
        self.sent = 0
        self.ok = 0
        self.failures: Counter[str] = Counter()
        self.by_pool: Counter[str] = Counter()
        self.bodies: list[str] = []  # the first few failed answers, to tell why
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    async def __aenter__(self) -> Load:
        connector = aiohttp.TCPConnector(limit=self.clients)
        self._session = aiohttp.ClientSession(connector=connector)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOAD_LIMIT
        self._tasks = [loop.create_task(self._client(deadline)) for _ in range(self.clients)]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Stop sending; requests in flight finish and count.
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert self._session is not None
        await self._session.close()

    async def _client(self, deadline: float) -> None:
        assert self._session is not None
        loop = asyncio.get_running_loop()
        while not self._stop.is_set() and loop.time() < deadline:
            self.sent += 1
            try:
                async with self._session.get(self.url) as resp:
                    await resp.read()
                    if resp.status == 200:
                        self.ok += 1
                        self.by_pool[resp.headers.get("X-Upstream", "?")] += 1
                    else:
                        self.failures[f"HTTP {resp.status}"] += 1
                        if len(self.bodies) < 5:
                            self.bodies.append(await resp.text())
            except aiohttp.ClientError as exc:
                self.failures[type(exc).__name__] += 1
            if self.pause:
                await asyncio.sleep(self.pause)

    async def until(self, predicate: Callable[[], bool], timeout: float = 8.0) -> None:
        await wait_for(predicate, timeout)

    def __repr__(self) -> str:
        return (
            f"<Load sent={self.sent} ok={self.ok} failed={dict(self.failures)} "
            f"by_pool={dict(self.by_pool)}{' ' + repr(self.bodies) if self.bodies else ''}>"
        )


async def sse(session: aiohttp.ClientSession, url: str) -> AsyncIterator[tuple[str, Any]]:
    """Server-sent events from `url` as (kind, data) pairs."""
    async with session.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        kind = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield kind, json.loads(line.removeprefix("data: "))


# -- adaptive: a healthy green ------------------------------------------------------------------


async def test_healthy_green_promotes_through_every_step_then_walks_back(rig: RigFactory) -> None:
    r = await rig()
    async with Load(r.url) as load:
        status, body = await r.post("start", {"strategy": "adaptive"})
        assert status == 200, body
        assert body["after"]["state"] == "progressing"
        await r.until_state("promoted")
        assert r.split == 100.0
        assert r.proxy.stable == "green"
        assert r.shares() == [5.0, 25.0, 50.0, 100.0]
        # Every step held for the interval and for min_requests green outcomes.
        for step in r.kinds("rollout_step")[1:]:
            figures = step["figures"]
            assert figures["elapsed"] >= 0.3
            assert figures["candidate"]["requests"] >= 20
        promoted = r.kinds("rollout")[-1]
        assert promoted["after"] == "promoted"
        assert promoted["previous_stable"] == "blue"
        assert promoted["stable"] == "green"
        green_at_promotion = load.by_pool["green"]
        assert green_at_promotion > 0

        # The next rollout walks the split back toward blue, now the candidate.
        r.events.clear()
        status, body = await r.post("start", {})
        assert status == 200, body
        await r.until_state("promoted")
        splits = [d["split"] for d in r.kinds("rollout_step")]
        assert splits == [95.0, 75.0, 50.0, 0.0]
        assert r.stable_now() == "blue"
        assert r.split == 0.0
    assert load.failed == 0, load
    assert load.by_pool["green"] > green_at_promotion
    print(f"\nhealthy green, there and back: {load!r}")


async def test_a_rollout_after_a_manual_shift_starts_at_or_above_it(rig: RigFactory) -> None:
    # The operator already sent 10 % to green by hand; steps are 5, 25, 50, 100. Going down to
    # 5 would move sticky clients back from green to blue: the rollout starts at 25 instead.
    r = await rig()
    status, body = await r.put_split({"green": 10})
    assert status == 200, body
    async with Load(r.url) as load:
        status, body = await r.post("start", {"strategy": "adaptive"})
        assert status == 200, body
        await r.until_state("promoted")
    assert r.shares() == [25.0, 50.0, 100.0]
    assert [(d["before"], d["after"]) for d in r.kinds("split")] == [
        (0.0, 10.0),
        (10.0, 25.0),
        (25.0, 50.0),
        (50.0, 100.0),
    ]
    assert load.failed == 0, load


# -- adaptive: a green that fails everything ----------------------------------------------------


async def test_green_failing_everything_rolls_back_within_a_second_and_shields_clients(
    upstream: UpstreamFactory, rig: RigFactory
) -> None:
    # The sample answers injected errors with 503, a status retries.on lists, so every failed
    # green request is retried once on blue: the shielded canary.
    blue = await upstream("blue", seed=1)
    green = await upstream("green", seed=2, error_status=503)
    loop = asyncio.get_running_loop()
    measured: list[float] = []
    reported: list[float] = []
    for run in range(5):
        green.settings.error_rate = 0.0
        green.first_5xx = None
        green.served.clear()
        # A long interval: the first step lasts while green breaks.
        rollout = rollout_config(steps=[10, 50, 100], interval="3s")
        r = await rig(upstreams=(blue, green), seed=run, rollout=rollout)
        async with Load(r.url) as load:
            assert (await r.post("start"))[0] == 200
            await r.until_share(10.0)
            # Steady state at the first step: green takes its share.
            await load.until(lambda: green.served[200] >= 10)
            before, began = green.served[200], loop.time()

            def grown(before: int = before) -> bool:
                return green.served[200] >= before + 10

            await load.until(grown)
            rate = (green.served[200] - before) / (loop.time() - began)
            assert r.split == 10.0

            green.settings.error_rate = 1.0
            rolled_back_at = await r.event_time("split", after=0.0)
            assert green.first_5xx is not None
            took = rolled_back_at - green.first_5xx
            more = load.by_pool["blue"] + 20  # traffic goes on, on blue
            await load.until(lambda more=more: load.by_pool["blue"] >= more)
        assert r.split == 0.0
        # The breach acted at once, not at the end of the step's 3 s interval. How fast is the
        # benchmark's figure (loadtests.cutover, printed below): tens of milliseconds here.
        assert took < 3.0, f"split 0 came {took:.3f} s after green's first failure"
        assert load.failed == 0, (load, r.proxy.retry_budget)
        snap = r.proxy.observed.rollback_seconds.snapshot()
        assert snap.count == 1
        # Every failed green request was answered by blue, and counted.
        assert r.proxy.observed.rescued == green.errors
        measured.append(took)
        reported.append(snap.sum)
        print(
            f"\nrun {run}: green {rate:.0f} req/s, {green.errors} green failures, "
            f"split 0 after {took * 1000:.1f} ms (proxy: {snap.sum * 1000:.1f} ms), {load!r}"
        )
    print(
        f"time to rollback over {len(measured)} runs: median "
        f"{statistics.median(measured) * 1000:.1f} ms, worst {max(measured) * 1000:.1f} ms "
        f"(proxy's rollback_seconds: median {statistics.median(reported) * 1000:.1f} ms, "
        f"worst {max(reported) * 1000:.1f} ms)"
    )


async def test_a_candidate_answering_500_costs_no_client_request(rig: RigFactory) -> None:
    """Green answers 500, a status retries.on does not list but the analysis counts as a
    failure, to 16 clients at the first step: rollout.shield (every 5xx by default) retries
    each of them once on blue, so no client sees one; the analysis still counts them and
    rolls back, and every green attempt is on the per-upstream attempt counters."""
    rollout = rollout_config(steps=[10, 50, 100], interval="3s")
    r = await rig(green={"error_status": 500}, rollout=rollout)
    async with Load(r.url, clients=16) as load:
        assert (await r.post("start"))[0] == 200
        await r.until_share(10.0)
        await load.until(lambda: r.green.served[200] >= 10)
        r.green.settings.error_rate = 1.0
        await r.until_state("rolled_back")
        await load.until(lambda: load.sent >= 200)  # bounded: traffic goes on, on blue
    print(
        f"\ngreen answering 500: {load.failed} client failures of {load.sent},"
        f" {r.green.errors} green 500s, {r.proxy.observed.rescued} rescued,"
        f" {r.proxy.retry_budget!r}"
    )
    assert load.failed == 0, load
    assert r.green.errors > 0
    assert r.proxy.observed.rescued == r.green.errors
    breach = r.kinds("breach")[0]
    assert breach["figures"]["candidate"]["errors"] >= 1
    metrics = await r.metrics()
    green = r.green.url
    assert metrics['turnout_retries_total{pool="green",reason="status_500"}'] == r.green.errors
    assert metrics["turnout_rescued_total"] == r.green.errors
    attempts = f'turnout_upstream_attempts_total{{outcome="500",pool="green",upstream="{green}"}}'
    assert metrics[attempts] == r.green.errors
    assert not any(k.startswith("turnout_requests_total") and 'code="500"' in k for k in metrics)


async def test_shield_off_lets_the_candidate_answer(rig: RigFactory) -> None:
    """rollout.shield: [] turns shielding off: a candidate's 500 (outside retries.on) reaches
    its client, while a 503 (in retries.on) is still retried."""
    r = await rig(
        green={"error_status": 500, "error_rate": 1.0},
        rollout=rollout_config(shield=[]),
        split=50,
    )
    async with aiohttp.ClientSession() as session:
        statuses = Counter[int]()
        for _ in range(10):
            async with session.get(r.url) as resp:
                statuses[resp.status] += 1
        assert statuses == {200: 5, 500: 5}
        r.green.settings.error_status = 503
        for _ in range(10):
            async with session.get(r.url) as resp:
                assert resp.status == 200
                assert resp.headers["X-Upstream"] == "blue"
    assert r.proxy.observed.rescued == 5


# Checks every 100 ms, one failure takes an upstream out and one pass brings it back.
FAST_CHECKS: dict[str, Any] = {"interval": "100ms", "unhealthy_after": 1, "healthy_after": 1}


async def get(url: str) -> tuple[int, str, dict[str, Any] | None]:
    async with aiohttp.ClientSession() as session:
        return await get_on(session, url)


async def get_on(
    session: aiohttp.ClientSession, url: str
) -> tuple[int, str, dict[str, Any] | None]:
    async with session.get(url) as resp:
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, resp.headers.get("X-Upstream", ""), body


async def test_no_failover_to_a_candidate_just_rolled_back(rig: RigFactory) -> None:
    """After a rollback, blue going down does not move its traffic onto the green that was just
    rolled back: 503, saying why. The next rollout lifts that."""
    r = await rig(green={"error_status": 500}, health_check=FAST_CHECKS)
    assert (await r.post("start"))[0] == 200
    await r.until_share(5.0)
    r.green.settings.error_rate = 1.0
    async with Load(r.url) as load:
        await r.until_state("rolled_back")
    assert load.failed == 0, load
    r.green.settings.error_rate = 0.0
    green_served = r.green.served[200]

    r.blue.settings.healthy = False
    await wait_for(lambda: not r.proxy.router.candidates["blue"])
    status, _, body = await get(r.url)
    assert status == 503
    assert body is not None
    assert (body["error"], body["pool"]) == ("no_upstream", "blue")
    assert body["detail"].startswith(
        "pool blue has no available upstream (blue/0 down (GET /healthz answered 503)), and no"
        " request fails over to green: the rollout rolled green back (breach: "
    )
    assert body["detail"].endswith("it takes no failover traffic until a rollout starts")
    assert r.green.served[200] == green_served
    assert r.proxy.status()["pools"]["green"]["available"] == 1

    # A new rollout starts: green may take blue's traffic again.
    assert (await r.post("start"))[0] == 200
    status, upstream, _ = await get(r.url)
    assert (status, upstream) == (200, "green")


async def test_a_drain_that_would_empty_the_stable_pool_is_refused_unless_forced(
    rig: RigFactory,
) -> None:
    """Draining the stable pool's last upstream in rotation would push every request onto the
    candidate, or, after a rollback, fail every one: 409 and nothing changes, unless forced.
    A rollback leaves the candidate's upstreams up and fences the pool, as /status says."""
    r = await rig()
    status, body = await r.drain("blue")
    assert (status, body["error"]) == (409, "would empty the stable pool")
    assert "every request would fail over to the candidate pool green" in body["detail"]
    assert not r.proxy.router.pools["blue"][0].draining
    assert (await get(r.url))[:2] == (200, "blue")

    assert (await r.post("start"))[0] == 200
    await r.until_share(5.0)
    assert (await r.post("rollback"))[0] == 200
    shown = await r.status()
    assert shown["fenced"]["pool"] == "green"
    assert "it takes no failover traffic until a rollout starts" in shown["fenced"]["reason"]
    (green,) = shown["pools"]["green"]["upstreams"]
    assert (green["state"], green["draining"]) == ("up", False)

    status, body = await r.drain("blue")
    assert status == 409
    assert "every request would get 503 (green is fenced: the rollout rolled" in body["detail"]
    assert (await get(r.url))[:2] == (200, "blue")
    status, body = await r.drain("blue", {"force": "yes"})
    assert (status, body["error"]) == (400, "invalid force")

    status, body = await r.drain("blue", {"force": True})
    assert (status, body["draining"]) == (200, True)
    status, _, answer = await get(r.url)
    assert status == 503
    assert answer is not None
    assert answer["error"] == "no_upstream"


async def test_the_candidate_and_a_stable_pool_without_traffic_may_be_drained(
    rig: RigFactory,
) -> None:
    r = await rig()
    assert (await r.drain("green"))[0] == 200  # its share falls back on blue
    assert (await get(r.url))[:2] == (200, "blue")
    assert (await r.drain("green"))[0] == 200  # already draining: nothing to refuse
    assert (await r.put_split({"green": 100}))[0] == 200
    assert (await r.drain("blue"))[0] == 200  # blue takes no traffic: nothing moves


async def test_a_hot_restart_keeps_a_rolled_back_candidate_fenced(rig: RigFactory) -> None:
    r = await rig()
    assert (await r.post("start"))[0] == 200
    await r.until_share(5.0)
    assert (await r.post("rollback"))[0] == 200
    assert r.proxy.router.fenced == "green"
    successor = await rig(upstreams=(r.blue, r.green))
    assert successor.proxy.router.fenced is None
    successor.proxy.rollout.restore(r.proxy.rollout.handover_state())
    assert successor.proxy.router.fenced == "green"
    assert "rolled green back (rolled back by" in successor.proxy.fence_reason


async def test_every_failover_to_the_candidate_is_logged_loudly(
    rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Blue down at split 0: requests fail over to green (DESIGN, Routing), each one counted,
    and said in a warning and an event, at once and then at most every 5 s."""
    r = await rig(health_check=FAST_CHECKS)
    r.blue.settings.healthy = False
    await wait_for(lambda: not r.proxy.router.candidates["blue"])
    with caplog.at_level("WARNING", logger="turnout"):
        async with aiohttp.ClientSession() as session:
            for _ in range(20):
                assert (await get_on(session, r.url))[:2] == (200, "green")
    lines = [rec.getMessage() for rec in caplog.records if "FAILOVER" in rec.getMessage()]
    assert lines == [
        "FAILOVER to the candidate pool green: 1 request(s) for the stable pool blue since the"
        " last such line (latest: no upstream available; blue/0 down (GET /healthz answered"
        " 503))"
    ]
    assert r.proxy.candidate_failovers == 20
    assert [(d["to"], d["requests"]) for d in r.proxy_events("failover")] == [("green", 1)]


# -- adaptive: a green that fails some --------------------------------------------------------


async def test_green_failing_five_percent_is_rolled_back_before_the_split_passes_25(
    rig: RigFactory,
) -> None:
    # Green answers its failures with 500, which retries.on is configured to include: the
    # shielded canary then retries them on blue too.
    r = await rig(
        green={"error_rate": 0.05},
        retries={"on": ["connect_error", 500, 502, 503, 504]},
    )
    async with Load(r.url) as load:
        assert (await r.post("start"))[0] == 200
        await r.until_state("rolled_back")
    assert max(r.shares()) <= 25.0, r.shares()
    assert r.green.served[500] > 0
    assert r.split == 0.0
    breach = r.kinds("breach")[0]
    assert "error rate" in breach["reason"], breach
    figures = breach["figures"]
    assert figures["candidate"]["errors"] > 0
    assert figures["stable"]["errors"] == 0
    assert load.failed == 0, load
    print(f"\ngreen failing 5%: rolled back at {r.shares()[-1]}%, {breach['reason']}; {load!r}")


async def test_green_three_times_slower_at_p99_is_rolled_back_on_the_ratio(
    rig: RigFactory,
) -> None:
    r = await rig(blue={"latency": 0.01}, green={"latency": 0.03})
    async with Load(r.url) as load:
        assert (await r.post("start"))[0] == 200
        await r.until_state("rolled_back")
    breach = r.kinds("breach")[0]
    assert "p99" in breach["reason"], breach
    assert "x stable p99" in breach["reason"], breach
    latency = breach["figures"]["latency"]
    assert latency["outcome"] == "fail"
    candidate, stable = breach["figures"]["candidate"], breach["figures"]["stable"]
    assert candidate["p99"] > 1.5 * stable["p99"]
    assert r.split == 0.0
    assert load.failed == 0, load
    print(f"\ngreen 3x slower: {breach['reason']}; {load!r}")


async def test_fallback_pause_holds_the_split_for_the_operator(rig: RigFactory) -> None:
    # A long interval: the first step lasts while green breaks.
    rollout = rollout_config(interval="2s", fallback="pause")
    r = await rig(green={"error_status": 503}, rollout=rollout)
    async with Load(r.url) as load:
        assert (await r.post("start"))[0] == 200
        await r.until_share(5.0)
        await load.until(lambda: r.green.served[200] >= 20)
        r.green.settings.error_rate = 1.0
        await r.until_state("paused", timeout=3.0)
        assert r.kinds("breach")[0]["fallback"] == "pause"
        assert "breach: candidate error rate" in r.proxy.rollout.reason
        await r.ticks(5)
        assert r.state == "paused"
        assert r.split == 5.0
        status, body = await r.post("rollback")
        assert status == 200, body
        assert body["after"] == {"state": "rolled_back", "split": 0.0}
    # Green kept failing while paused; blue answered every one of those requests.
    assert load.failed == 0, load
    print(f"\nfallback pause holds the split for the operator: {load!r}")
    assert r.proxy.observed.rescued == r.green.errors > 0


# -- adaptive: a green as good as blue, many times ---------------------------------------------


async def test_green_as_good_as_blue_is_never_rolled_back(rig: RigFactory) -> None:
    # Equal error rates on both pools and equal latency: any rollback would be a false alarm.
    # Each proxy runs a rollout to green and the next one back to blue: six in all.
    same = {"error_rate": 0.003, "error_status": 503}
    for seed in range(3):
        r = await rig(blue=same, green=same, seed=seed)
        async with Load(r.url) as load:
            for _ in range(2):
                assert (await r.post("start"))[0] == 200
                await r.until_state("promoted", "rolled_back")
                assert r.state == "promoted", r.proxy.rollout.reason
        assert r.kinds("breach") == []
        assert r.split == 0.0
        assert r.proxy.stable == "blue"
        # Injected errors are retried on the other pool; a client sees one only when the
        # retry draws an injected error too (about 0.3% of retries).
        assert set(load.failures) <= {"HTTP 503"}
        assert load.failed <= max(1, (r.blue.errors + r.green.errors) // 20), load
        print(f"\nseed {seed}: two promotions, {r.blue.errors + r.green.errors} errors, {load!r}")


# -- adaptive: too little traffic -------------------------------------------------------------


async def test_little_traffic_is_insufficient_data_and_never_a_silent_advance(
    rig: RigFactory,
) -> None:
    r = await rig()
    async with Load(r.url, clients=1, pause=0.05):
        assert (await r.post("start"))[0] == 200
        await r.until_state("insufficient_data")
        # Held well past the interval (300 ms): still the first step.
        await r.ticks(6)
        assert r.state == "insufficient_data"
        assert r.split == 5.0
        assert r.shares() == [5.0]
        doc = (await r.status())["rollout"]
        assert doc["state"] == "insufficient_data"
        assert doc["step"] == 1
        assert "insufficient data" in doc["reason"]
        assert "20 needed" in doc["reason"]
        metrics = await r.metrics()
        assert metrics['turnout_rollout_state{state="insufficient_data"}'] == 1.0
        assert metrics["turnout_rollout_step"] == 1.0
    # With traffic the analysis has its data, and the rollout goes on.
    async with Load(r.url) as load:
        await r.until_state("promoted")
    assert r.shares() == [5.0, 25.0, 50.0, 100.0]
    assert "progressing" in r.states()[r.states().index("insufficient_data") :]
    assert load.failed == 0, load
    print(f"\nlittle traffic is insufficient data and never a silent advance: {load!r}")


# -- eager and lazy ------------------------------------------------------------------------------


async def test_eager_waits_for_the_gate_then_goes_to_100_at_once(rig: RigFactory) -> None:
    # The gate asks an ordinary path, which answers 503 while green's error rate is 1.
    r = await rig(
        green={"error_rate": 1.0, "error_status": 503},
        rollout={"strategy": "eager", "gate": {"path": "/gate"}},
    )
    async with Load(r.url) as load:
        assert (await r.post("start", {"strategy": "eager"}))[0] == 200
        await wait_for(lambda: "gate failed" in r.proxy.rollout.reason, 3.0)
        assert r.split == 0.0
        assert r.state == "progressing"
        assert "expected 200" in (await r.status())["rollout"]["reason"]
        r.green.settings.error_rate = 0.0
        await r.until_state("promoted", timeout=4.0)
        assert r.split == 100.0
        assert r.proxy.stable == "green"
        # One jump, no steps in between.
        assert [d["after"] for d in r.kinds("split")] == [100.0]
        await load.until(lambda: load.by_pool["green"] >= 50)
    assert load.failed == 0, load
    print(f"\neager waits for the gate then goes to 100 at once: {load!r}")


async def test_the_gate_asks_the_health_checks_path_unless_told_otherwise(rig: RigFactory) -> None:
    """An app that serves no /healthz: setting health_check.path is enough, the gate asks the
    same path (and /status says which), so rollouts are not left blocked on /healthz."""
    r = await rig(
        blue={"healthy": False},  # /healthz answers 503
        green={"healthy": False},
        health_check={"path": "/ready", **FAST_CHECKS},
        rollout={"strategy": "eager"},
    )
    await wait_for(lambda: all(u.healthy for u in r.proxy.router.upstreams()))
    assert (await r.status())["rollout"]["gate"] == {"path": "/ready", "expect_status": 200}
    assert (await r.post("start", {"strategy": "eager"}))[0] == 200
    await r.until_state("promoted", timeout=4.0)
    assert r.split == 100.0


async def test_lazy_moves_only_when_the_operator_shifts(rig: RigFactory) -> None:
    r = await rig(rollout=rollout_config(strategy="lazy"))
    async with Load(r.url) as load:
        status, body = await r.post("start", {"strategy": "lazy"})
        assert status == 200, body
        await r.ticks(5)  # longer than the adaptive interval: nothing automatic
        assert r.split == 0.0
        assert r.state == "progressing"
        assert (await r.put_split({"green": 30}))[0] == 200
        assert r.split == 30.0
        await r.ticks(3)
        assert r.state == "progressing"
        assert r.split == 30.0
        status, body = await r.put_split({"green": 100, "over": "400ms"})
        assert status == 200, body
        await wait_for(lambda: 30.0 < r.split < 100.0, 2.0)  # ramping
        await r.until_state("promoted", timeout=3.0)
        assert r.split == 100.0
        assert r.proxy.stable == "green"

        # The next lazy rollout walks back to blue; the operator promotes it by API.
        assert (await r.post("start", {"strategy": "lazy"}))[0] == 200
        assert (await r.put_split({"green": 60}))[0] == 200
        await load.until(lambda: load.by_pool["blue"] >= 50)
        status, body = await r.post("promote")
        assert status == 200, body
        assert body["after"] == {"state": "promoted", "split": 0.0}
        assert r.stable_now() == "blue"
    assert load.failed == 0, load
    print(f"\nlazy moves only when the operator shifts: {load!r}")


# -- operator actions ---------------------------------------------------------------------------


async def test_pause_resume_abort_and_rollback_from_the_admin_api(rig: RigFactory) -> None:
    r = await rig(rollout=rollout_config(interval="400ms"))
    async with Load(r.url) as load:
        assert (await r.post("start"))[0] == 200
        await r.until_share(25.0)
        status, body = await r.post("pause")
        assert status == 200, body
        assert body["after"]["state"] == "paused"
        await r.ticks(8)  # two intervals: a paused rollout holds its split
        assert r.state == "paused"
        assert r.split == 25.0
        assert r.shares()[-1] == 25.0
        assert (await r.post("resume"))[0] == 200
        assert r.state == "progressing"
        await r.until_share(50.0)

        assert (await r.post("abort"))[0] == 200
        assert r.state == "aborted"
        await r.stopped()
        assert r.split == 50.0  # an abort leaves the split where it is

        # A new rollout, rolled back by the operator mid-way.
        assert (await r.put_split({"green": 0}))[0] == 200
        assert (await r.post("start"))[0] == 200
        await wait_for(lambda: r.split == 25.0, 5.0)
        status, body = await r.post("rollback")
        assert status == 200, body
        assert body["after"] == {"state": "rolled_back", "split": 0.0}
        assert r.proxy.stable == "blue"
        await r.stopped()
        assert r.split == 0.0
    assert load.failed == 0, load
    print(f"\npause resume abort and rollback from the admin api: {load!r}")
    assert r.proxy.observed.rollback_seconds.snapshot().count == 0  # no green failure to time


async def test_invalid_transitions_are_409(rig: RigFactory) -> None:
    r = await rig(rollout=rollout_config(interval="10s"))
    for action in ("pause", "resume", "abort", "promote", "rollback"):
        status, body = await r.post(action)
        assert status == 409, (action, body)
        assert body["error"]
        assert "idle" in body["detail"]
    assert (await r.post("start", {"strategy": "canary"}))[0] == 400
    assert (await r.post("start", {"strategy": "adaptive", "x": 1}))[0] == 400
    assert (await r.post("start"))[0] == 200
    status, body = await r.post("start")
    assert status == 409
    assert body["error"] == "rollout in progress"
    status, body = await r.post("resume")
    assert status == 409
    assert "progressing" in body["detail"]
    assert (await r.post("pause"))[0] == 200
    assert (await r.post("pause"))[0] == 409
    assert (await r.post("abort"))[0] == 200
    for action in ("pause", "resume", "abort", "promote", "rollback"):
        status, body = await r.post(action)
        assert status == 409, (action, body)
        assert "aborted" in body["detail"]
    async with r.admin.post(f"{r.admin_url}/rollout/restart") as resp:
        assert resp.status == 404


# -- observability ------------------------------------------------------------------------------


async def test_status_events_and_metrics_tell_the_story_of_a_rollback(rig: RigFactory) -> None:
    # Steps of a second: the second step lasts while the test reads /status and breaks green.
    r = await rig(green={"error_status": 503}, rollout=rollout_config(interval="1s"))
    seen: list[tuple[str, Any]] = []
    breach_seen = asyncio.Event()

    async def watch() -> None:
        async for kind, data in sse(r.admin, f"{r.admin_url}/events"):
            seen.append((kind, data))
            if kind == "rollout" and data["after"] == "rolled_back":
                breach_seen.set()
                return

    watcher = asyncio.create_task(watch())
    await wait_for(lambda: len(r.proxy.events.subscribers) >= 2, 3.0)
    async with Load(r.url) as load:
        assert (await r.post("start"))[0] == 200
        await r.until_share(25.0)
        await load.until(lambda: r.green.served[200] >= 50)
        doc = await r.status()
        ro = doc["rollout"]
        assert ro["strategy"] == "adaptive"
        assert ro["state"] == "progressing"
        assert ro["step"] == 2
        assert ro["split"] == 25.0
        assert doc["split"]["green"] == 25.0
        assert doc["stable"] == "blue"
        assert doc["candidate"] == "green"
        for pool in ("blue", "green"):
            window = ro["windows"][pool]
            assert window["requests"] > 0
            assert window["errors"] == 0
            assert window["p99_ms"] is not None
            assert window["p50_ms"] <= window["p99_ms"]
        assert ro["reason"]

        r.green.settings.error_rate = 1.0
        async with asyncio.timeout(3.0):
            await breach_seen.wait()
    await watcher

    kinds = [k for k, _ in seen]
    # Every state change on the stream, in order.
    assert [d["after"] for k, d in seen if k == "rollout"] == ["progressing", "rolled_back"]
    assert [d["share"] for k, d in seen if k == "rollout_step"] == [5.0, 25.0]
    assert kinds.index("breach") < kinds.index("split", kinds.index("breach"))
    breach = next(d for k, d in seen if k == "breach")
    assert breach["fallback"] == "rollback"
    figures = breach["figures"]
    assert figures["split"] == 25.0
    assert figures["candidate"]["errors"] >= 1
    assert figures["candidate"]["error_rate"] > 0.01
    assert figures["stable"]["errors"] == 0
    assert figures["stable"]["requests"] > 0
    assert figures["errors"]["outcome"] == "fail"
    rolled = next(d for k, d in seen if k == "rollout" and d["after"] == "rolled_back")
    assert rolled["figures"] == figures
    assert rolled["reason"].startswith("breach: ")
    step_event = next(d for k, d in seen if k == "rollout_step" and d["share"] == 25.0)
    assert step_event["figures"]["candidate"]["requests"] >= 20  # what let step 1 pass

    doc = await r.status()
    assert doc["rollout"]["state"] == "rolled_back"
    assert doc["split"]["green"] == 0.0
    assert doc["rollout"]["reason"] == rolled["reason"]
    # Each failed green request was answered by blue (rescued): the retry budget (20% of the
    # recent requests, at least 10 a second) lets the burst of green's failures through.
    assert doc["rescued"] == r.proxy.observed.rescued > 0
    assert r.proxy.observed.rescued == r.green.errors, (load, r.green)
    assert load.failed == 0, load
    assert r.proxy.retry_budget.snapshot().denied == 0, load

    metrics = await r.metrics()
    assert metrics["turnout_rollout_step"] == 0.0
    states = {k: v for k, v in metrics.items() if k.startswith("turnout_rollout_state{")}
    assert states == {
        f'turnout_rollout_state{{state="{s}"}}': float(s == "rolled_back")
        for s in (
            "idle",
            "progressing",
            "paused",
            "insufficient_data",
            "promoted",
            "rolled_back",
            "aborted",
        )
    }
    assert metrics["turnout_rescued_total"] == r.proxy.observed.rescued
    assert metrics["turnout_rollback_seconds_count"] == 1.0
    took = metrics["turnout_rollback_seconds_sum"]
    assert 0.0 < took < 1.0
    assert metrics['turnout_rollback_seconds_bucket{le="1.0"}'] == 1.0
    assert metrics['turnout_split_percent{pool="green"}'] == 0.0
    retried = metrics.get('turnout_retries_total{pool="green",reason="status_503"}', 0.0)
    assert retried == r.proxy.observed.rescued
    print(f"\nrollback at 25%: {load!r}, {r.proxy.retry_budget!r}")


async def test_a_manual_split_during_an_automatic_rollout_is_refused(
    sample: SampleFactory, make_proxy: ProxyFactory
) -> None:
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(
        proxy_config(
            [blue.url],
            [green.url],
            admin={"host": "127.0.0.1", "port": 0},
            rollout={"strategy": "adaptive", "interval": "60s"},
        )
    )
    port = await proxy.start_admin()
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/rollout/start", json={}) as resp:
            assert resp.status == 200
        async with session.put(f"{base}/split", json={"green": 50}) as resp:
            assert resp.status == 409
            assert (await resp.json())["error"] == "rollout active"
        async with session.post(f"{base}/rollout/pause") as resp:
            assert resp.status == 200
        async with session.put(f"{base}/split", json={"green": 50}) as resp:
            assert resp.status == 200
    assert proxy.spreader.split == 50


# -- edge cases: the gate awaited, the candidate gone, a reload mid-rollout ---------------------


async def test_a_pause_that_lands_while_the_gate_is_probed_is_not_overridden(
    rig: RigFactory, upstream: UpstreamFactory
) -> None:
    # Green's gate answers only when the test says so: the operator pauses while the
    # controller awaits it, and the step it was about to enter must not be entered.
    asked = asyncio.Event()
    release = asyncio.Event()
    settings = SampleSettings(name="green")
    app = make_app(settings)

    async def gate(request: web.Request) -> web.Response:
        asked.set()
        await release.wait()
        return web.Response(text="ok")

    app.router.add_get("/gate", gate)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, 0).start()
        green = Upstream(settings, runner, runner.addresses[0][1])
        blue = await upstream("blue")
        r = await rig(upstreams=(blue, green), rollout=rollout_config(gate={"path": "/gate"}))
        async with Load(r.url) as load:
            assert (await r.post("start"))[0] == 200
            async with asyncio.timeout(3.0):
                await asked.wait()
            status, body = await r.post("pause")
            assert status == 200, body
            release.set()
            await r.ticks(5)  # the gate's answer came, nothing may move
            assert r.state == "paused", r.kinds("split")
            assert r.split == 0.0, r.kinds("split")
            assert r.shares() == [], r.kinds("split")
            assert r.proxy.rollout.reason.startswith("paused by")
            # Resumed, it goes on as usual.
            assert (await r.post("resume"))[0] == 200
            await r.until_state("promoted")
        assert load.failed == 0, load
    finally:
        await runner.cleanup()


FAST_HEALTH = {"interval": "100ms", "timeout": "500ms", "healthy_after": 1, "unhealthy_after": 1}


async def test_green_down_mid_step_holds_the_rollout_and_the_step_starts_afresh(
    rig: RigFactory,
) -> None:
    # The gate asks a path that stays 200 while green's health check fails: only the health
    # of the candidate can stop the advance on outcomes counted before it went down.
    rollout = rollout_config(interval="2s", gate={"path": "/headers"})
    r = await rig(rollout=rollout, health_check=FAST_HEALTH)
    green = r.proxy.router.pools["green"][0]
    async with Load(r.url) as load:
        assert (await r.post("start"))[0] == 200
        await r.until_share(25.0)
        served = r.green.served[200]
        await load.until(lambda: r.green.served[200] >= served + 25)
        r.green.settings.healthy = False
        await wait_for(lambda: not green.healthy, 2.0)
        await wait_for(lambda: "no candidate upstream takes traffic" in r.proxy.rollout.reason, 4.0)
        assert "green/0 down" in (await r.status())["rollout"]["reason"]
        await r.ticks(5)  # past the interval, with 25+ outcomes: held
        assert r.shares() == [5.0, 25.0], r.shares()
        assert r.split == 25.0, r.shares()
        assert r.state in ("progressing", "insufficient_data")

        r.green.settings.healthy = True
        again = "the candidate takes traffic again: step 2 starts afresh"
        back = await r.event_time("rollout_note", 3.0, reason=again)
        await r.until_state("promoted", timeout=10.0)
    step3 = next(d for d in r.kinds("rollout_step") if d["share"] == 50.0)
    # Step 2 passed on outcomes green served after it came back, over a whole interval.
    assert step3["figures"]["elapsed"] >= 2.0
    assert step3["figures"]["candidate"]["requests"] >= 20
    assert await r.event_time("rollout_step", share=50.0) > back
    assert load.failed == 0, load


async def test_eager_never_promotes_onto_a_candidate_pool_left_empty(rig: RigFactory) -> None:
    r = await rig(
        green={"healthy": False},
        rollout={"strategy": "eager"},
        health_check=FAST_HEALTH,
    )
    await wait_for(lambda: not r.proxy.router.pools["green"][0].healthy, 2.0)
    async with Load(r.url) as load:
        assert (await r.post("start", {"strategy": "eager"}))[0] == 200
        await wait_for(lambda: "green/0 down" in r.proxy.rollout.reason, 2.0)
        async with r.admin.delete(f"{r.admin_url}/pools/green/upstreams/0") as resp:
            assert resp.status == 202
        await wait_for(lambda: not r.proxy.router.pools["green"], 3.0)
        await wait_for(lambda: "pool green is empty" in r.proxy.rollout.reason, 2.0)
        await r.ticks(5)  # nothing to promote onto
        assert r.state == "progressing"
        assert r.split == 0.0
        assert r.proxy.stable == "blue"
        assert "pool green is empty" in (await r.status())["rollout"]["reason"]
        # A healthy green upstream added: once it passes its health check, the rollout ends.
        r.green.settings.healthy = True
        async with r.admin.post(
            f"{r.admin_url}/pools/green/upstreams", json={"url": r.green.url}
        ) as resp:
            assert resp.status == 201
        await r.until_state("promoted", timeout=4.0)
        assert r.split == 100.0
        assert r.stable_now() == "green"
        await load.until(lambda: load.by_pool["green"] >= 20)
    assert load.failed == 0, load


async def test_a_reload_mid_rollout_keeps_its_split_and_steps_and_applies_the_threshold(
    rig: RigFactory, tmp_path: Any
) -> None:
    # Green is 20 ms slower than blue, within the limits the rollout starts with.
    rollout = rollout_config(interval="60s", threshold={"min_requests": 20, "max_p99_ratio": 100})
    r = await rig(green={"latency": 0.02}, rollout=rollout)
    path = tmp_path / "turnout.yaml"
    data = proxy_config([r.blue.url], [r.green.url], admin={"host": HOST, "port": 0})
    r.proxy.config_path = str(path)
    async with Load(r.url) as load:
        assert (await r.post("start"))[0] == 200
        await r.until_share(5.0)
        strict = {"max_p99": "10ms", "max_p99_ratio": 100, "min_requests": 20}
        reloaded = {**rollout, "steps": [10, 20, 100], "threshold": strict}
        # YAML reads JSON: the file says split 50, new steps and a stricter max_p99.
        path.write_text(json.dumps({**data, "split": 50, "rollout": reloaded}))
        async with r.admin.post(f"{r.admin_url}/reload") as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
        kept = answer["after"]["kept_by_rollout"]
        assert set(kept) == {"split", "rollout.steps"}, kept
        assert "kept at 5" in kept["split"]
        assert "5, 25, 50, 100" in kept["rollout.steps"]
        assert r.kinds("reload")[-1]["kept_by_rollout"] == kept
        assert r.split == 5.0
        assert (await r.status())["rollout"]["steps"] == STEPS
        # The new max_p99 judges the step in progress: green is rolled back well before 60 s.
        await r.until_state("rolled_back", timeout=5.0)
    assert "max_p99 10.0 ms" in r.kinds("breach")[0]["reason"], r.kinds("breach")
    assert r.split == 0.0
    assert load.failed == 0, load
