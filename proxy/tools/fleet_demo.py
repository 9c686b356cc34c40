"""`turnout demo --fleet N`: N proxies in one process follow one rollout through a local etcd.

It starts an etcd of its own (the `etcd` binary, data in a temporary directory), a blue and a
green sample upstream, and N proxies that join one fleet; clients spread their requests over
every proxy. The rollout is started on a member that does not lead, so the command travels to
the leader through etcd; the live display shows each member's split (the leader starred).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.config import parse_config
from proxy.fleet import join
from proxy.runtime import Proxy
from proxy.tools.demo import (
    BAD_GREEN_ERROR_RATE,
    BAD_GREEN_STATUS,
    CLIENTS,
    GRACE,
    MIN_DURATION,
    PROGRESS_EVERY,
    Summary,
    Tally,
    Timeline,
    _client,
    _narrate,
    demo_config,
)
from proxy.tools.sample import SampleSettings, start

HOST = "127.0.0.1"
ETCD_START = 15.0
Write = Callable[[str], None]


class DemoError(Exception):
    """The fleet demo cannot run here."""


@dataclass
class LocalEtcd:
    """An etcd process of the demo's own, on loopback."""

    url: str
    proc: asyncio.subprocess.Process
    data: str

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        shutil.rmtree(self.data, ignore_errors=True)


def memory_dir() -> str | None:
    """Where etcd's data goes: memory when the machine has /dev/shm (fsyncs cost nothing)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


async def start_etcd() -> LocalEtcd:
    binary = shutil.which("etcd")
    if binary is None:
        raise DemoError("the etcd binary is not installed (Debian: apt-get install etcd-server)")
    base = memory_dir()
    for _ in range(5):
        # etcd takes no port 0: pick two and try elsewhere when they are taken.
        client = random.randrange(20000, 60000, 2)
        url, peer = f"http://{HOST}:{client}", f"http://{HOST}:{client + 1}"
        data = tempfile.mkdtemp(prefix="turnout-demo-etcd-", dir=base)
        proc = await asyncio.create_subprocess_exec(
            binary,
            *("--name", "demo", "--data-dir", os.path.join(data, "data")),
            *("--listen-client-urls", url, "--advertise-client-urls", url),
            *("--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer),
            *("--initial-cluster", f"demo={peer}", "--log-level", "error", "--logger", "zap"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        etcd = LocalEtcd(url, proc, data)
        if await _healthy(etcd):
            return etcd
        await etcd.stop()
    raise DemoError("etcd did not start")


async def _healthy(etcd: LocalEtcd) -> bool:
    deadline = time.monotonic() + ETCD_START
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and etcd.proc.returncode is None:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with asyncio.timeout(1), session.get(etcd.url + "/health") as resp:
                    if '"health":"true"' in await resp.text():
                        return True
            await asyncio.sleep(0.05)
    return False


def _line(proxies: list[Proxy], began: float, failed: int) -> str:
    now = proxies[0].loop.time()
    leader = next((p for p in proxies if p.fleet is not None and p.fleet.leading), None)
    rollout = (leader or proxies[0]).status()["rollout"]
    step = f"{rollout['step']}/{len(rollout['steps'])}" if rollout["step"] else "-/-"
    members = "  ".join(
        f"{p.fleet.instance}{'*' if p is leader else ' '} {p.spreader.split:5.1f}%"
        for p in proxies
        if p.fleet is not None
    )
    return f"{now - began:5.1f}s {rollout['state']:<17} step {step} | {members} | failed {failed}"


async def fleet_demo(size: int, bad_green: bool, duration: float, write: Write) -> Summary:
    duration = max(duration, MIN_DURATION)
    etcd = await start_etcd()
    blue_runner, blue_port = await start(SampleSettings(name="blue"), HOST, 0)
    green_runner, green_port = await start(
        SampleSettings(
            name="green",
            error_rate=BAD_GREEN_ERROR_RATE if bad_green else 0.0,
            error_status=BAD_GREEN_STATUS,
        ),
        HOST,
        0,
    )
    proxies: list[Proxy] = []
    try:
        for i in range(size):
            data: dict[str, Any] = demo_config(blue_port, green_port, duration)
            data["admin"] = {"host": HOST, "port": 0}
            data["fleet"] = {"etcd": [etcd.url], "name": "demo", "instance": f"i{i + 1}"}
            proxy = Proxy(parse_config(data))
            await proxy.start_admin()
            await proxy.start()
            proxies.append(proxy)
            join(proxy)
        return await _drive(proxies, etcd.url, bad_green, duration, write)
    finally:
        for proxy in proxies:
            await proxy.shutdown(timeout=2.0)
        await blue_runner.cleanup()
        await green_runner.cleanup()
        await etcd.stop()


async def _formed(proxies: list[Proxy]) -> Proxy:
    async with asyncio.timeout(ETCD_START):
        while True:
            leaders = [p for p in proxies if p.fleet is not None and p.fleet.leading]
            if len(leaders) == 1 and all(
                p.fleet is not None and p.fleet.applied_revision for p in proxies
            ):
                return leaders[0]
            await asyncio.sleep(0.05)


async def _drive(
    proxies: list[Proxy], etcd: str, bad_green: bool, duration: float, write: Write
) -> Summary:
    loop = asyncio.get_running_loop()
    leader = await _formed(proxies)
    taker = next(p for p in proxies if p is not leader)
    assert leader.fleet is not None
    assert taker.fleet is not None
    write(
        f"turnout demo: a fleet of {len(proxies)} proxies on etcd {etcd}; "
        f"{leader.fleet.instance} leads (*); {CLIENTS} clients spread over them"
    )
    if bad_green:
        write(f"green answers {BAD_GREEN_ERROR_RATE:.0%} of requests with {BAD_GREEN_STATUS}")
    tally = Tally()
    stop = asyncio.Event()
    began = loop.time()
    timeline = Timeline.fit(duration)
    narrator = loop.create_task(_narrator(leader, write))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
        clients = [
            loop.create_task(
                _client(session, f"http://{HOST}:{proxies[i % len(proxies)].port}/", tally, stop)
            )
            for i in range(CLIENTS)
        ]
        try:
            await _watch(proxies, taker, began, duration, timeline, tally, write)
        finally:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
            narrator.cancel()
            await asyncio.gather(narrator, return_exceptions=True)
    final = next((p for p in proxies if p.fleet is not None and p.fleet.leading), leader)
    splits = ", ".join(f"{p.fleet.instance} {p.spreader.split:g}%" for p in proxies if p.fleet)
    write(f"every member's split: {splits}")
    summary = Summary(
        sent=tally.sent,
        failed=tally.failed,
        errors=dict(tally.errors),
        share={pool: tally.share(pool) for pool in ("blue", "green")},
        rescued=sum(p.observed.rescued for p in proxies),
        final_state=final.status()["rollout"]["state"],
        expected_state="rolled_back" if bad_green else "promoted",
        split=final.spreader.split,
        stable=final.stable,
        rollback_seconds=None,
        elapsed=loop.time() - began,
    )
    for line in summary.lines():
        write(line)
    return summary


async def _narrator(leader: Proxy, write: Write) -> None:
    async for event in leader.events.subscribe():
        line = _narrate(event)
        if line is not None:
            write(line)


async def _watch(
    proxies: list[Proxy],
    taker: Proxy,
    began: float,
    duration: float,
    timeline: Timeline,
    tally: Tally,
    write: Write,
) -> None:
    loop = asyncio.get_running_loop()
    assert taker.fleet is not None
    started = False
    ended_at: float | None = None
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        now = loop.time()
        write(_line(proxies, began, tally.failed))
        state = taker.status()["rollout"]["state"]
        if not started and now - began >= timeline.lead_in:
            write(f"  >> rollout started on {taker.fleet.instance}, which does not lead")
            await taker.fleet.command("rollout", {"action": "start", "fields": {}}, "demo")
            started = True
        elif started and ended_at is None and state in ("promoted", "rolled_back", "aborted"):
            ended_at = now
        if ended_at is not None and now - ended_at >= timeline.tail:
            return
        if now >= began + duration + (0.0 if ended_at is not None else duration * GRACE):
            if ended_at is None:
                write(f"  the rollout did not end in time; it is {state}")
            return


def run_fleet_demo(size: int, bad_green: bool, duration: float, write: Write) -> Summary:
    import uvloop

    return uvloop.run(fleet_demo(size, bad_green, duration, write))
