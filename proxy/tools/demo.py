"""`turnout demo`: a blue and a green sample upstream, the proxy and live traffic in one
process, and an adaptive rollout from blue to green with a live progress display.

With `--bad-green` green answers a share of requests with 503; the analysis catches it at the
first step and rolls back, while shielded retries on blue keep every client request whole.
The rollout's interval is fitted to `--duration` so that a good green is promoted in time.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop

from proxy.config import parse_config
from proxy.control.events import Event
from proxy.runtime import Proxy
from proxy.tools.sample import SampleSettings, start

HOST = "127.0.0.1"
CLIENTS = 8
STEPS = (5.0, 25.0, 50.0, 100.0)
DEFAULT_DURATION = 18.0
MIN_DURATION = 4.0
BAD_GREEN_ERROR_RATE = 0.2
BAD_GREEN_STATUS = 503  # one of retries.on, so a failed green request is retried on blue
PROGRESS_EVERY = 0.5
# Share of the duration (with a floor in seconds) that traffic runs before the rollout
# starts, and after it ends so that the display shows where the traffic went.
LEAD_IN = (0.1, 0.5)
TAIL = (0.1, 1.0)
# Held steps: all but the last (100, promoted at once); plus slack for gates and ticks.
HELD_STEPS = len(STEPS) - 1 + 0.5
# After the duration, a rollout still under way gets this share of it more to finish.
GRACE = 0.25

Write = Callable[[str], None]


def _write_stdout(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@dataclass
class Tally:
    """What the demo's clients saw: requests sent, answered per pool, failed."""

    sent: int = 0
    failed: int = 0
    by_pool: dict[str, int] = field(default_factory=lambda: {"blue": 0, "green": 0})
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, pool: str | None, error: str | None) -> None:
        self.sent += 1
        if error is not None:
            self.failed += 1
            self.errors[error] = self.errors.get(error, 0) + 1
        elif pool in self.by_pool:
            self.by_pool[pool] += 1

    def share(self, pool: str) -> float:
        ok = sum(self.by_pool.values())
        return 100.0 * self.by_pool[pool] / ok if ok else 0.0


@dataclass(frozen=True, slots=True)
class Summary:
    """How the demo ended; `ok` when the rollout ended as expected and no client failed."""

    sent: int
    failed: int
    errors: dict[str, int]
    share: dict[str, float]
    rescued: int
    final_state: str
    expected_state: str
    split: float
    stable: str
    rollback_seconds: float | None
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.final_state == self.expected_state and self.failed == 0

    def lines(self) -> list[str]:
        failed = f"{self.failed} (expected 0)"
        if self.errors:
            failed += f"  {self.errors}"
        took = (
            "n/a (no rollback)"
            if self.rollback_seconds is None
            else f"{self.rollback_seconds * 1000:.0f} ms from green's first failure to split 0"
        )
        blue, green = self.share["blue"], self.share["green"]
        return [
            "summary:",
            f"  requests sent      {self.sent} in {self.elapsed:.1f} s",
            f"  share per pool     blue {blue:.1f}%  green {green:.1f}%",
            f"  failed requests    {failed}",
            f"  rescued by stable  {self.rescued} failed green requests answered by blue",
            f"  final state        {self.final_state} (expected {self.expected_state}); "
            f"split {self.split:g}% green, {self.stable} is stable",
            f"  time to rollback   {took}",
            f"  result             {'OK' if self.ok else 'NOT AS EXPECTED'}",
        ]


@dataclass(frozen=True, slots=True)
class Timeline:
    """Seconds of traffic before the rollout, each step's interval, traffic after the end."""

    lead_in: float
    interval: float
    tail: float

    @classmethod
    def fit(cls, duration: float) -> Timeline:
        lead_in = max(duration * LEAD_IN[0], LEAD_IN[1])
        tail = max(duration * TAIL[0], TAIL[1])
        return cls(lead_in, (duration - lead_in - tail) / HELD_STEPS, tail)


def demo_config(blue_port: int, green_port: int, duration: float) -> dict[str, Any]:
    """The proxy's configuration, its rollout interval fitted into `duration`."""
    interval = Timeline.fit(duration).interval
    return {
        "listen": {"host": HOST, "port": 0},
        "admin": {"host": HOST, "port": 0},
        "pools": {
            "blue": {"upstreams": [{"url": f"http://{HOST}:{blue_port}"}]},
            "green": {"upstreams": [{"url": f"http://{HOST}:{green_port}"}]},
        },
        "split": 0,
        "health_check": {"interval": "1s"},
        "rollout": {
            "strategy": "adaptive",
            "steps": list(STEPS),
            "interval": f"{interval * 1000:.0f}ms",
            "threshold": {"min_requests": 50},
            "fallback": "rollback",
        },
    }


async def _client(
    session: aiohttp.ClientSession, url: str, tally: Tally, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        pool: str | None = None
        error: str | None = None
        try:
            async with session.get(url) as resp:
                await resp.read()
                pool = resp.headers.get("X-Upstream")
                if resp.status != 200:
                    error = f"HTTP {resp.status}"
        except aiohttp.ClientError as exc:
            error = type(exc).__name__
        tally.add(pool, error)


def _ms(seconds: float | None) -> str:
    return "     - " if seconds is None else f"{seconds * 1000:5.1f}ms"


def _progress(proxy: Proxy, began: float, since: float, failed: int) -> str:
    """One line of the live display: the rollout, then each pool's outcomes since `since`."""
    snap = proxy.rollout.snapshot()
    step = f"{snap.step}/{len(STEPS)}" if snap.step else "-/-"
    parts = [
        f"{proxy.loop.time() - began:5.1f}s {snap.state:<17} step {step} "
        f"split {proxy.spreader.split:5.1f}%"
    ]
    for pool in ("blue", "green"):
        figures = proxy.figures(pool, since)
        parts.append(
            f"{pool:>5} {figures.requests:5d} req {figures.error_rate:5.1%} err "
            f"p99 {_ms(figures.p99)}"
        )
    parts.append(f"failed {failed}")
    return " | ".join(parts)


def _narrate(event: Event) -> str | None:
    data = event.data
    if event.kind == "rollout_step":
        share, candidate = data["share"], data["candidate"]
        return f"  >> step {data['step']}: {share:g}% of new requests to {candidate}"
    if event.kind == "breach":
        return f"  !! breach: {data['reason']}"
    if event.kind == "rollout" and data["after"] in ("promoted", "rolled_back", "paused"):
        return f"  >> {data['after']}: {data['reason']}"
    return None


async def _narrator(proxy: Proxy, write: Write) -> None:
    async for event in proxy.events.subscribe():
        line = _narrate(event)
        if line is not None:
            write(line)


async def demo(
    bad_green: bool = False, duration: float = DEFAULT_DURATION, *, write: Write = _write_stdout
) -> Summary:
    """Run the demo for about `duration` seconds and return how it ended."""
    duration = max(duration, MIN_DURATION)
    blue_settings = SampleSettings(name="blue")
    green_settings = SampleSettings(
        name="green",
        error_rate=BAD_GREEN_ERROR_RATE if bad_green else 0.0,
        error_status=BAD_GREEN_STATUS,
    )
    blue_runner, blue_port = await start(blue_settings, HOST, 0)
    green_runner, green_port = await start(green_settings, HOST, 0)
    proxy = Proxy(parse_config(demo_config(blue_port, green_port, duration)))
    try:
        port = await proxy.start()
        await proxy.start_admin()
        return await _drive(proxy, port, bad_green, duration, write, (blue_port, green_port))
    finally:
        await proxy.shutdown(timeout=2.0)
        await blue_runner.cleanup()
        await green_runner.cleanup()


async def _drive(
    proxy: Proxy,
    port: int,
    bad_green: bool,
    duration: float,
    write: Write,
    ports: tuple[int, int],
) -> Summary:
    loop = proxy.loop
    interval = proxy.config.rollout.interval
    write(
        f"turnout demo: blue on :{ports[0]}, green on :{ports[1]}, proxy on :{port}; "
        f"{CLIENTS} clients sending requests for about {duration:g} s"
    )
    write(f"dashboard: http://{HOST}:{proxy.admin_port}/ui (while the demo runs)")
    if bad_green:
        write(
            f"green answers {BAD_GREEN_ERROR_RATE:.0%} of requests with {BAD_GREEN_STATUS}; "
            "each is retried on blue (shielded canary), so clients should see none"
        )
    steps = " -> ".join(f"{s:g}%" for s in STEPS)
    write(f"adaptive rollout to green: steps {steps}, each held at least {interval:.1f} s")
    tally = Tally()
    stop = asyncio.Event()
    url = f"http://{HOST}:{port}/"
    began = loop.time()
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    narrator = loop.create_task(_narrator(proxy, write))
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = [loop.create_task(_client(session, url, tally, stop)) for _ in range(CLIENTS)]
        try:
            await _watch(proxy, began, duration, tally, write)
        finally:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
            narrator.cancel()
            await asyncio.gather(narrator, return_exceptions=True)
    rollback = proxy.observed.rollback_seconds.snapshot()
    summary = Summary(
        sent=tally.sent,
        failed=tally.failed,
        errors=dict(tally.errors),
        share={pool: tally.share(pool) for pool in ("blue", "green")},
        rescued=proxy.observed.rescued,
        final_state=proxy.rollout.state.value,
        expected_state="rolled_back" if bad_green else "promoted",
        split=proxy.spreader.split,
        stable=proxy.stable,
        rollback_seconds=rollback.sum if rollback.count else None,
        elapsed=loop.time() - began,
    )
    for line in summary.lines():
        write(line)
    return summary


async def _watch(proxy: Proxy, began: float, duration: float, tally: Tally, write: Write) -> None:
    """Start the rollout after the lead-in, print progress, stop after the tail."""
    loop = proxy.loop
    end = began + duration
    timeline = Timeline.fit(duration)
    started = False
    ended_at: float | None = None
    last = began
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        now = loop.time()
        write(_progress(proxy, began, last, tally.failed))
        last = now
        state = proxy.rollout.state.value
        if not started and now - began >= timeline.lead_in:
            await proxy.rollout_action("start", {"strategy": "adaptive"}, "demo")
            started = True
        elif started and ended_at is None and state in ("promoted", "rolled_back", "aborted"):
            ended_at = now
        if ended_at is not None and now - ended_at >= timeline.tail:
            return
        if now >= end + (0.0 if ended_at is not None else duration * GRACE):
            if ended_at is None:
                write(f"  the rollout did not end in time; it is {state}")
            return


def run_demo(bad_green: bool = False, duration: float = DEFAULT_DURATION, fleet: int = 0) -> int:
    """`turnout demo`: exit 0 when the rollout ended as expected with no failed request.
    With `fleet`, that many proxies follow the rollout through a local etcd."""
    if fleet:
        from proxy.tools.fleet_demo import DemoError, run_fleet_demo

        try:
            summary = run_fleet_demo(fleet, bad_green, duration, _write_stdout)
        except DemoError as exc:
            print(f"turnout demo: {exc}", file=sys.stderr)
            return 1
    else:
        summary = uvloop.run(demo(bad_green, duration))
    return 0 if summary.ok else 1
