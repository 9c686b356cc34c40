"""The rollout controller on a clock the test moves: ticks are taken by the test, outcomes are
real requests through the real proxy, and no real time has to pass for a step's interval to
be over (or not). What "nothing happens for a while" means is said in ticks and clock seconds,
so a controller that is stuck fails these tests instead of passing them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from conftest import HOST, ProxyFactory, Sample, SampleFactory, proxy_config

from proxy.control.rollout import RolloutState
from proxy.runtime import Proxy

INTERVAL = 10.0  # seconds of the test's clock


class ManualClock:
    """A clock that stands still until the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Driven:
    proxy: Proxy
    clock: ManualClock
    blue: Sample
    green: Sample
    session: aiohttp.ClientSession

    def state(self) -> RolloutState:
        """A call, so that a type checker does not keep an earlier value."""
        return self.proxy.rollout.state

    @property
    def share(self) -> float:
        return self.proxy.rollout.candidate_share

    async def tick(self, times: int = 1, *, every: float = 0.0) -> None:
        """Take `times` ticks, moving the clock by `every` seconds before each."""
        for _ in range(times):
            self.clock.advance(every)
            await self.proxy.rollout.tick()

    async def send(self, pool: str, count: int) -> list[int]:
        """`count` requests forced to `pool`; their statuses."""
        url = f"http://{HOST}:{self.proxy.port}/"
        statuses = []
        for _ in range(count):
            async with self.session.get(url, headers={"X-Turnout-Pool": pool}) as resp:
                await resp.read()
                statuses.append(resp.status)
        return statuses


DrivenFactory = Callable[..., Awaitable[Driven]]


@pytest.fixture
async def driven(sample: SampleFactory, make_proxy: ProxyFactory) -> AsyncIterator[DrivenFactory]:
    made: list[Driven] = []

    async def make(**rollout: Any) -> Driven:
        blue = await sample("blue")
        green = await sample("green")
        settings = {
            "strategy": "adaptive",
            "steps": [5, 25, 50, 100],
            "interval": f"{INTERVAL:g}s",
            "threshold": {"min_requests": 20},
            **rollout,
        }
        data = proxy_config([blue.url], [green.url], rollout=settings)
        clock = ManualClock()
        proxy = await make_proxy(data, clock=clock)
        proxy.rollout.driven = True
        d = Driven(proxy, clock, blue, green, aiohttp.ClientSession())
        made.append(d)
        return d

    yield make
    for d in made:
        await d.session.close()


async def test_a_step_is_held_for_its_interval_however_many_ticks(driven: DrivenFactory) -> None:
    d = await driven()
    d.proxy.rollout.start("adaptive", "test")
    await d.tick()
    assert d.share == 5.0
    assert await d.send("blue", 40) == [200] * 40
    assert await d.send("green", 40) == [200] * 40
    # Fifty looks at a step with all the outcomes it needs, but no time passed on the clock.
    await d.tick(50)
    assert d.share == 5.0
    assert d.state() is RolloutState.PROGRESSING
    await d.tick(every=INTERVAL - 0.5)
    assert d.share == 5.0
    await d.tick(every=1.0)
    assert d.share == 25.0
    assert d.proxy.rollout.ticks == 53
    assert [e.data["share"] for e in d.proxy.events.history if e.kind == "rollout_step"] == [
        5.0,
        25.0,
    ]


async def test_too_little_traffic_holds_the_first_step_until_it_comes(
    driven: DrivenFactory,
) -> None:
    d = await driven()
    d.proxy.rollout.start("adaptive", "test")
    await d.tick()
    await d.send("blue", 5)
    await d.send("green", 5)
    await d.tick(20, every=INTERVAL)  # far past the interval: still too little to judge
    assert d.state() is RolloutState.INSUFFICIENT_DATA
    assert d.share == 5.0
    assert "20 needed" in d.proxy.rollout.reason
    await d.send("blue", 30)
    await d.send("green", 30)
    await d.tick()
    assert d.state() is RolloutState.PROGRESSING
    assert d.share == 25.0


async def test_a_failing_candidate_is_rolled_back_by_the_next_tick(driven: DrivenFactory) -> None:
    d = await driven()
    d.proxy.rollout.start("adaptive", "test")
    await d.tick()
    await d.send("blue", 40)
    d.green.settings.error_rate = 1.0
    d.green.settings.error_status = 500
    assert set(await d.send("green", 30)) == {500}
    # Driven, the controller looks only when ticked: the failures wait for that look.
    assert d.state() is RolloutState.PROGRESSING
    await d.tick()  # the clock has not moved: a breach needs no interval
    assert d.state() is RolloutState.ROLLED_BACK
    assert d.proxy.spreader.split == 0.0
    assert d.proxy.rollout.ticks == 2


async def test_a_paused_rollout_holds_its_step_through_ticks_and_time(
    driven: DrivenFactory,
) -> None:
    d = await driven()
    d.proxy.rollout.start("adaptive", "test")
    await d.tick()
    await d.send("blue", 40)
    await d.send("green", 40)
    await d.proxy.rollout.action("pause", {}, "test")
    await d.tick(30, every=INTERVAL)
    assert d.state() is RolloutState.PAUSED
    assert d.share == 5.0
    await d.proxy.rollout.action("resume", {}, "test")
    # Resumed, the step is judged afresh: its interval starts over, then it advances.
    await d.send("blue", 40)
    await d.send("green", 40)
    await d.tick(every=INTERVAL / 2)
    assert d.share == 5.0
    await d.tick(every=INTERVAL)
    assert d.share == 25.0


async def test_lazy_moves_only_when_the_operator_shifts(driven: DrivenFactory) -> None:
    d = await driven(strategy="lazy")
    d.proxy.rollout.start("lazy", "test")
    await d.send("green", 40)
    await d.tick(30, every=INTERVAL)
    assert d.proxy.spreader.split == 0.0
    assert d.state() is RolloutState.PROGRESSING
    d.proxy.control.set_split(30.0, by="test")
    await d.tick(30, every=INTERVAL)
    assert d.proxy.spreader.split == 30.0
    assert d.state() is RolloutState.PROGRESSING
    d.proxy.control.set_split(100.0, by="test")
    await d.tick()
    assert d.state() is RolloutState.PROMOTED
    assert d.proxy.stable == "green"
