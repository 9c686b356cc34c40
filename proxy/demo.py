"""`turnout demo`: a blue and a green sample upstream, the proxy, live traffic and a cutover."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field

import aiohttp
import uvloop

from .config import parse_config
from .runtime import Proxy
from .sample import SampleSettings, start

HOST = "127.0.0.1"
STEPS = (0.0, 25.0, 50.0, 100.0)
CLIENTS = 8


@dataclass
class Tally:
    """What the demo's clients saw, per pool and in all."""

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


async def _client(session: aiohttp.ClientSession, url: str, tallies: list[Tally]) -> None:
    while True:
        pool: str | None = None
        error: str | None = None
        try:
            async with session.get(url) as resp:
                await resp.read()
                pool = resp.headers.get("X-Upstream")
                if resp.status >= 500:
                    error = f"HTTP {resp.status}"
        except aiohttp.ClientError as exc:
            error = type(exc).__name__
        for tally in tallies:
            tally.add(pool, error)


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def demo(bad_green: bool, duration: float) -> int:
    blue_settings = SampleSettings(name="blue")
    green_settings = SampleSettings(
        name="green", error_rate=0.2 if bad_green else 0.0, error_status=503
    )
    blue_runner, blue_port = await start(blue_settings, HOST, 0)
    green_runner, green_port = await start(green_settings, HOST, 0)
    config = parse_config(
        {
            "listen": {"host": HOST, "port": 0},
            "pools": {
                "blue": {"upstreams": [{"url": f"http://{HOST}:{blue_port}"}]},
                "green": {"upstreams": [{"url": f"http://{HOST}:{green_port}"}]},
            },
            "split": 0,
        }
    )
    proxy = Proxy(config)
    port = await proxy.start()
    url = f"http://{HOST}:{port}/"
    _line(f"turnout demo: blue on :{blue_port}, green on :{green_port}, proxy on :{port}")
    if bad_green:
        _line("green answers 20% of requests with 503; retries on blue shield the clients")
    steps = " -> ".join(f"{s:g}" for s in STEPS)
    _line(f"driving {CLIENTS} concurrent clients; shifting the split {steps}")
    total = Tally()
    step_time = duration / len(STEPS)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:
        step_tally = Tally()
        tallies = [total, step_tally]
        clients = [asyncio.create_task(_client(session, url, tallies)) for _ in range(CLIENTS)]
        try:
            for split in STEPS:
                proxy.set_split(split)
                step_tally.__init__()  # type: ignore[misc]
                await asyncio.sleep(step_time)
                blue, green = step_tally.share("blue"), step_tally.share("green")
                _line(
                    f"  split {split:5.1f}% | {step_tally.sent:6d} requests | "
                    f"blue {blue:5.1f}% green {green:5.1f}% | failed {step_tally.failed}"
                )
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
    await proxy.shutdown(timeout=2.0)
    await blue_runner.cleanup()
    await green_runner.cleanup()
    _line("summary:")
    _line(f"  requests sent     {total.sent}")
    _line(f"  share per pool    blue {total.share('blue'):.1f}%  green {total.share('green'):.1f}%")
    _line(f"  failed requests   {total.failed}" + (f"  {total.errors}" if total.errors else ""))
    _line("  final split       100% green")
    return 0 if total.failed == 0 else 1


def run_demo(bad_green: bool = False, duration: float = 12.0) -> int:
    return uvloop.run(demo(bad_green, duration))
