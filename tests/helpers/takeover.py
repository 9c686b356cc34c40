"""A `turnout run` process that a successor may take over (hot restart): its stdout read as
bytes, line by line, and the lines it prints."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

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

    async def port(self, pattern: re.Pattern[bytes], timeout: float = 10.0) -> int:
        match = pattern.search(await self.wait_line(pattern, timeout))
        assert match is not None
        return int(match.group(1))

    async def drain_output(self) -> None:
        assert self.proc.stdout is not None
        self.lines.extend((await self.proc.stdout.read()).splitlines(keepends=True))

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def first_process(
    config: dict[str, Any], tmp_path: Path, *args: str
) -> tuple[Path, str, Process]:
    """Write `config` and start a Turnout on it (with `args`) that a successor may take over:
    the config file, the takeover socket's path and the process."""
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(config))
    handover = str(tmp_path / "handover.sock")
    return (
        path,
        handover,
        await Process.start("-c", str(path), "--takeover-socket", handover, *args),
    )
