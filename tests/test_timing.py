"""Durations are timed finely on the loop Turnout runs on in production (uvloop), whose own
clock moves in whole milliseconds: a 0.4 ms answer must not read as 0 or 1 ms in the metrics,
the access log or the analysis that decides a rollout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import uvloop
from conftest import HOST, proxy_config

from proxy.config import parse_config
from proxy.runtime import Proxy
from proxy.tools.sample import SampleSettings, start

REQUESTS = 40


def off_whole_ms(seconds: float) -> bool:
    ms = seconds * 1000
    return abs(ms - round(ms)) > 1e-6


async def serve_and_measure(log: Path) -> tuple[float, float, list[dict[str, float]]]:
    loop = asyncio.get_running_loop()
    runner, port = await start(SampleSettings(name="blue"), HOST, 0)
    url = f"http://{HOST}:{port}"
    data = proxy_config([url], [url], access_log={"to": str(log)})
    proxy = Proxy(parse_config(data))
    try:
        await proxy.start()
        async with aiohttp.ClientSession() as session:
            for _ in range(REQUESTS):
                async with session.get(f"http://{HOST}:{proxy.port}/") as resp:
                    assert resp.status == 200
                    await resp.read()
        async with asyncio.timeout(10):
            while len(log.read_text().splitlines()) < REQUESTS:
                await asyncio.sleep(0.01)
        tick = loop.time()
        while loop.time() == tick:
            await asyncio.sleep(0)
        loop_step = loop.time() - tick
        return (
            loop_step,
            proxy.observed.pool_stats["blue"].duration.sum,
            [json.loads(line) for line in log.read_text().splitlines()],
        )
    finally:
        await proxy.shutdown(timeout=1.0)
        await runner.cleanup()


def test_durations_are_finer_than_the_loop_clock(tmp_path: Path) -> None:
    loop_step, duration_sum, lines = uvloop.run(serve_and_measure(tmp_path / "access.log"))
    # What makes this test mean something: the loop's clock here moves in whole milliseconds.
    assert loop_step >= 0.0009
    assert len(lines) == REQUESTS
    # request_duration_seconds: the sum of 40 durations is not a whole number of milliseconds.
    assert off_whole_ms(duration_sum), duration_sum
    # The access log (3 decimals of ms): durations and upstream times have fractions.
    assert sum(off_whole_ms(line["duration_ms"] / 1000) for line in lines) > REQUESTS // 2
    assert sum(off_whole_ms(line["upstream_ms"] / 1000) for line in lines) > REQUESTS // 2
