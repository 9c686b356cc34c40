"""Hot restart: a new process takes the listening sockets over under load, dropping nothing."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from conftest import HOST, SampleFactory

LISTENING = re.compile(rb"turnout: proxy listening on http://[^:]+:(\d+)")
ADMIN = re.compile(rb"turnout: admin API on http://[^:]+:(\d+)")
TOOK_OVER = b"took the listening sockets over"


class Process:
    """A `turnout run` subprocess whose stdout is read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[bytes] = []

    @classmethod
    async def start(cls, *args: str) -> Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return cls(proc)

    async def wait_line(self, pattern: re.Pattern[bytes] | bytes, timeout: float = 10.0) -> bytes:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if pattern.search(line) if isinstance(pattern, re.Pattern) else pattern in line:
                        return line
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(b"".join(self.lines).decode(errors="replace"))
                self.lines.append(line)

    async def port(self, pattern: re.Pattern[bytes]) -> int:
        match = pattern.search(await self.wait_line(pattern))
        assert match is not None
        return int(match.group(1))

    async def drain_output(self) -> None:
        assert self.proc.stdout is not None
        self.lines.extend((await self.proc.stdout.read()).splitlines(keepends=True))

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def load(url: str, stop: asyncio.Event, results: Counter[Any], clients: int = 10) -> None:
    """Keep `clients` keep-alive clients busy until `stop` (bounded by 20,000 requests)."""
    budget = [20_000]

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set() and budget[0] > 0:
            budget[0] -= 1
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    results[resp.status] += 1
            except aiohttp.ClientError as exc:
                results[type(exc).__name__] += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))


async def test_takeover_under_load_drops_nothing(sample: SampleFactory, tmp_path: Path) -> None:
    """Two hot restarts in a row under load: each new process takes the sockets over, the old
    one drains and exits 0, no client sees an error, and the split carries over. The second
    takeover also proves the first successor listens for takeovers on the same path."""
    blue = await sample("blue")
    green = await sample("green")
    config = {
        "listen": {"host": HOST, "port": 0},
        "admin": {"host": HOST, "port": 0},
        "pools": {
            "blue": {"upstreams": [{"url": blue.url}]},
            "green": {"upstreams": [{"url": green.url}]},
        },
        "split": 40,
        "drain": {"timeout": "5s"},
    }
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(config))
    handover = str(tmp_path / "handover.sock")
    running = await Process.start("-c", str(path), "--takeover-socket", handover)
    processes = [running]
    try:
        port = await running.port(LISTENING)
        admin = await running.port(ADMIN)
        async with (
            aiohttp.ClientSession() as session,
            session.put(f"http://{HOST}:{admin}/split", json={"green": 25}) as resp,
        ):
            assert resp.status == 200
        stop = asyncio.Event()
        results: Counter[Any] = Counter()
        traffic = asyncio.create_task(load(f"http://{HOST}:{port}/", stop, results))
        async with asyncio.timeout(10):
            while sum(results.values()) < 200:
                await asyncio.sleep(0.01)
        for _ in range(2):
            new = await Process.start("-c", str(path), "--takeover-socket", handover, "--takeover")
            processes.append(new)
            await new.wait_line(TOOK_OVER)
            assert await new.port(LISTENING) == port
            async with asyncio.timeout(15):
                assert await running.proc.wait() == 0
            running = new
            served_before = sum(results.values())
            async with asyncio.timeout(10):
                while sum(results.values()) < served_before + 200:
                    await asyncio.sleep(0.01)
        stop.set()
        await traffic
        assert set(results) == {200}, results
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{HOST}:{admin}/status") as resp,
        ):
            status = await resp.json()
        assert status["split"]["green"] == 25
        running.proc.terminate()
        async with asyncio.timeout(15):
            assert await running.proc.wait() == 0
        for process in processes:
            await process.drain_output()
            assert b"Traceback" not in b"".join(process.lines)
    finally:
        for process in processes:
            process.kill()


async def test_takeover_without_a_running_turnout_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "turnout.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": HOST, "port": 0},
                "admin": {"host": HOST, "port": 0},
                "pools": {"blue": {"upstreams": []}, "green": {"upstreams": []}},
            }
        )
    )
    proc = await Process.start(
        "-c", str(path), "--takeover", "--takeover-socket", str(tmp_path / "nobody.sock")
    )
    async with asyncio.timeout(15):
        code = await proc.proc.wait()
    await proc.drain_output()
    output = b"".join(proc.lines)
    assert code == 1
    assert b"cannot take over" in output
    assert b"Traceback" not in output
