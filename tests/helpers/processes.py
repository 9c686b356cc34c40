"""`turnout run` as a subprocess (`python -m proxy run -c FILE`): `ProxyProcess`, the `turnout`
fixture that starts one on a config, `turnout_process` that starts it both ways (one process,
and a supervisor with workers), and calls on its admin API."""

from __future__ import annotations

import asyncio
import contextlib
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


async def spawn(tmp_path: Path, data: dict[str, Any], *args: str) -> ProxyProcess:
    """`python -m proxy run -c FILE ARGS...` on `data` (written to tmp_path/turnout.yaml, the
    admin API on port 0), once it has said where it listens."""
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump({"admin": {"host": HOST, "port": 0}, **data}))
    log = tmp_path / "turnout.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "proxy", "run", "-c", str(path), *args),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_TOKEN"},
        )
    process = ProxyProcess(proc, log)
    try:
        process.port = int((await process.wait_line(LISTENING))[2])
        process.admin_port = int((await process.wait_line(ADMIN_API))[2])
    except BaseException:
        await reap(process, graceful=False)
        raise
    return process


async def reap(process: ProxyProcess, *, graceful: bool) -> None:
    """End `process` if it still runs: with `graceful`, SIGTERM first (a supervisor's workers
    drain and exit with it), killed if that takes too long."""
    if process.alive and graceful:
        process.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await process.exit_code(TIMEOUT)
    if process.alive:
        process.proc.kill()
    await process.proc.wait()
    await process._reader


@pytest.fixture
async def turnout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ProcessFactory]:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    started: list[ProxyProcess] = []

    async def start(data: dict[str, Any]) -> ProxyProcess:
        process = await spawn(tmp_path, data, "--takeover-socket", str(tmp_path / "handover.sock"))
        started.append(process)
        return process

    yield start
    for process in started:
        await reap(process, graceful=False)


@pytest.fixture(params=[1, 2], ids=["single", "workers2"])
def workers(request: pytest.FixtureRequest) -> int:
    """How `turnout_process` runs: one process (1), or a supervisor with that many workers."""
    return int(request.param)


@pytest.fixture
async def turnout_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> AsyncIterator[ProcessFactory]:
    """The `turnout` fixture run both ways, so one test covers both: `turnout run -c FILE`, and
    `turnout run -c FILE --workers 2` (a supervisor and two worker processes on one port)."""
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    started: list[ProxyProcess] = []
    args = ["--takeover-socket", str(tmp_path / "handover.sock")]
    if workers > 1:
        args += ["--workers", str(workers)]

    async def start(data: dict[str, Any]) -> ProxyProcess:
        process = await spawn(tmp_path, data, *args)
        started.append(process)
        if workers > 1:
            await process.wait_line(re.compile(rf"turnout: {workers} workers share the port"))
        return process

    yield start
    for process in started:
        await reap(process, graceful=True)


async def admin_get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with asyncio.timeout(TIMEOUT), session.get(url) as resp:
        return resp.status, await resp.json()


async def until_draining(session: aiohttp.ClientSession, process: ProxyProcess) -> None:
    """Wait until the process has taken the signal: its /readyz says 503."""
    async with asyncio.timeout(TIMEOUT):
        while (await admin_get(session, process.admin + "/readyz"))[0] != 503:
            await asyncio.sleep(0.01)


async def status(session: aiohttp.ClientSession, process: ProxyProcess) -> dict[str, Any]:
    code, doc = await admin_get(session, process.admin + "/status")
    assert code == 200
    return dict(doc)


async def until(
    session: aiohttp.ClientSession,
    process: ProxyProcess,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """Poll /status until `predicate` holds for it; return that document."""
    async with asyncio.timeout(timeout):
        while not predicate(doc := await status(session, process)):
            await asyncio.sleep(0.01)
    return doc


def all_follow(doc: dict[str, Any]) -> bool:
    """Every worker routes by the supervisor's latest state (true of one process: it has no
    workers, its /status no `workers`)."""
    return all(w["generation"] == doc["generation"] for w in doc.get("workers", []))
