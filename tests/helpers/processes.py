"""`turnout run` as a subprocess (`python -m proxy run -c FILE`): `ProxyProcess`, the `turnout`
fixture that starts one on a config, and calls on its admin API."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import HOST

LISTENING = re.compile(r"turnout: proxy listening on http://([^:]+):(\d+)")
ADMIN_API = re.compile(r"turnout: admin API on http://([^:]+):(\d+)")
TIMEOUT = 10.0


class ProxyProcess:
    """`python -m proxy run -c FILE` with its stdout read line by line and its log in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.lines: list[str] = []
        self._line = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.port = 0
        self.admin_port = 0

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._line.set()
        self._line.set()

    async def wait_line(self, pattern: re.Pattern[str]) -> re.Match[str]:
        async with asyncio.timeout(20):
            while True:
                for line in self.lines:
                    if found := pattern.search(line):
                        return found
                if self._reader.done():
                    raise AssertionError(f"exited: {self.lines} {self.log.read_text()}")
                self._line.clear()
                await self._line.wait()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    async def exit_code(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


ProcessFactory = Callable[[dict[str, Any]], Awaitable[ProxyProcess]]


@pytest.fixture
async def turnout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ProcessFactory]:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    started: list[ProxyProcess] = []

    async def start(data: dict[str, Any]) -> ProxyProcess:
        path = tmp_path / "turnout.yaml"
        path.write_text(yaml.safe_dump({"admin": {"host": HOST, "port": 0}, **data}))
        log = tmp_path / "turnout.log"
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "run",
                "-c",
                str(path),
                "--takeover-socket",
                str(tmp_path / "handover.sock"),
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_TOKEN"},
            )
        process = ProxyProcess(proc, log)
        started.append(process)
        process.port = int((await process.wait_line(LISTENING))[2])
        process.admin_port = int((await process.wait_line(ADMIN_API))[2])
        return process

    yield start
    for process in started:
        if process.alive:
            process.proc.kill()
        await process.proc.wait()
        await process._reader


async def admin_get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with asyncio.timeout(TIMEOUT), session.get(url) as resp:
        return resp.status, await resp.json()


async def until_draining(session: aiohttp.ClientSession, process: ProxyProcess) -> None:
    """Wait until the process has taken the signal: its /readyz says 503."""
    async with asyncio.timeout(TIMEOUT):
        while (await admin_get(session, process.admin + "/readyz"))[0] != 503:
            await asyncio.sleep(0.01)
