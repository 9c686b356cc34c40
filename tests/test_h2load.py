"""HTTP/2 under load from h2load (Debian's nghttp2-client): thousands of multiplexed streams
through Turnout while the split moves, every one answered, each pool taking its share."""

from __future__ import annotations

import asyncio
import re
import shutil

from conftest import HOST, ProxyFactory, SampleFactory, proxy_config, wait_for

from proxy.logic.routing import POOLS, PoolName
from proxy.runtime import Proxy

RESULT = re.compile(
    r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed"
)


def served(proxy: Proxy, pool: PoolName) -> int:
    return sum(upstream.requests for upstream in proxy.router.pools[pool])


async def h2load(url: str, requests: int) -> tuple[int, int, str]:
    """Run h2load (4 connections, 16 streams each): (succeeded, failed, its output)."""
    binary = shutil.which("h2load")
    assert binary is not None, "h2load is not installed (apt-get install nghttp2-client)"
    proc = await asyncio.create_subprocess_exec(
        binary,
        *("-c4", "-m16", f"-n{requests}", url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    match = RESULT.search(text)
    assert match is not None, text
    return int(match.group(3)), int(match.group(4)), text


async def test_every_stream_of_a_load_is_answered_while_the_split_moves(
    sample: SampleFactory, make_proxy: ProxyFactory
) -> None:
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(proxy_config([blue.url], [green.url]))
    load = asyncio.create_task(h2load(f"http://{HOST}:{proxy.port}/", 6000))
    control = proxy.control
    await wait_for(lambda: proxy.in_flight > 0, timeout=10)
    control.set_split(50, by="test")
    await wait_for(lambda: served(proxy, "green") >= 200 or load.done(), timeout=30)
    control.set_split(100, by="test")
    succeeded, failed, text = await load
    assert (succeeded, failed) == (6000, 0), text
    shares = {pool: served(proxy, pool) for pool in POOLS}
    assert shares["blue"] > 0, shares
    assert shares["green"] > 0, shares
