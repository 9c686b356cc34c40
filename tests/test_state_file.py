"""The routing state survives a restart: `turnout run` keeps split, stable pool and rollout in
a state file (`state_file`), written atomically after each change and read back at start."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import HOST, SampleFactory, wait_for
from helpers.takeover import ADMIN, LISTENING, TOOK_OVER, Process, first_process

from proxy.control.statefile import StateFileError, read, resolve, write_atomically


def config(blue: str, green: str, **more: Any) -> dict[str, Any]:
    return {
        "listen": {"host": HOST, "port": 0},
        "admin": {"host": HOST, "port": 0},
        "pools": {"blue": {"upstreams": [{"url": blue}]}, "green": {"upstreams": [{"url": green}]}},
        "drain": {"timeout": "2s"},
        **more,
    }


class Running:
    """A `turnout run` process and its two addresses."""

    def __init__(self, process: Process, port: int, admin: int) -> None:
        self.process = process
        self.port = port
        self.admin = admin

    @classmethod
    async def start(cls, process: Process) -> Running:
        return cls(process, await process.port(LISTENING), await process.port(ADMIN))

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        url = f"http://{HOST}:{self.admin}{path}"
        async with aiohttp.ClientSession() as s, s.request(method, url, json=body) as resp:
            return resp.status, await resp.json()

    async def status(self) -> dict[str, Any]:
        code, status = await self.call("GET", "/status")
        assert code == 200
        return dict(status)

    async def until(self, check: Any, timeout: float = 10.0) -> dict[str, Any]:
        """/status, asked again until `check` holds for it."""
        async with asyncio.timeout(timeout):
            while not check(status := await self.status()):
                await asyncio.sleep(0.02)
        return status

    async def upstream_of_a_request(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{self.port}/") as resp:
            assert resp.status == 200
            return resp.headers["X-Upstream"]

    async def stop(self) -> None:
        self.process.proc.terminate()
        async with asyncio.timeout(15):
            assert await self.process.proc.wait() == 0
        await self.process.drain_output()
        assert b"Traceback" not in b"".join(self.process.lines)


async def restart(path: Path, handover: str) -> Running:
    return await Running.start(await Process.start("-c", str(path), "--takeover-socket", handover))


async def test_a_promotion_survives_a_plain_restart(sample: SampleFactory, tmp_path: Path) -> None:
    blue, green = await sample("blue"), await sample("green")
    path, handover, process = await first_process(config(blue.url, green.url), tmp_path)
    running = await Running.start(process)
    try:
        assert (await running.call("POST", "/rollout/start", {"strategy": "lazy"}))[0] == 200
        assert (await running.call("POST", "/rollout/promote"))[0] == 200
        kept = tmp_path / "turnout.state.json"
        await wait_for(lambda: kept_state(kept).get("stable") == "green")
        assert (await running.status())["state_file"]["path"] == str(kept)
        await running.stop()

        running = await restart(path, handover)
        assert any(b"routing state from" in line for line in running.process.lines)
        status = await running.status()
        assert (status["split"]["green"], status["stable"]) == (100.0, "green")
        assert status["state_file"]["restored"] is True
        assert status["state_file"]["error"] is None
        assert status["rollout"]["state"] == "promoted"
        assert await running.upstream_of_a_request() == "green"
        # The next rollout walks back toward blue, and that is kept too.
        assert (await running.call("PUT", "/split", {"green": 40}))[0] == 200
        await wait_for(lambda: kept_state(kept).get("split") == 40.0)
        await running.stop()
        running = await restart(path, handover)
        assert (await running.status())["split"]["green"] == 40.0
        await running.stop()
    finally:
        running.process.kill()


async def test_a_supervisor_writes_the_last_change_before_it_exits(
    sample: SampleFactory, tmp_path: Path
) -> None:
    """With --workers the supervisor keeps the file: a change made just before SIGTERM (still
    waiting out the gap between two writes) is written before the process exits."""
    blue, green = await sample("blue"), await sample("green")
    path, handover, process = await first_process(
        config(blue.url, green.url), tmp_path, "--workers", "2"
    )
    running = await Running.start(process)
    try:
        kept = tmp_path / "turnout.state.json"
        assert (await running.call("PUT", "/split", {"green": 20}))[0] == 200
        await wait_for(lambda: kept_state(kept).get("split") == 20.0)
        assert (await running.call("PUT", "/split", {"green": 35}))[0] == 200
        await running.stop()
        assert kept_state(kept)["split"] == 35.0
        running = await restart(path, handover)
        assert (await running.status())["split"]["green"] == 35.0
        await running.stop()
    finally:
        running.process.kill()


async def test_a_corrupt_state_file_falls_back_to_the_config(
    sample: SampleFactory, tmp_path: Path
) -> None:
    blue, green = await sample("blue"), await sample("green")
    (tmp_path / "turnout.state.json").write_text('{"turnout_state": 1, "split": "lots"')
    _, _, process = await first_process(config(blue.url, green.url, split=30), tmp_path)
    running = await Running.start(process)
    try:
        status = await running.status()
        assert status["split"]["green"] == 30.0
        assert status["state_file"]["restored"] is False
        assert "is not JSON" in status["state_file"]["error"]
        # The next change writes a good file over it.
        assert (await running.call("PUT", "/split", {"green": 35}))[0] == 200
        kept = str(tmp_path / "turnout.state.json")
        await wait_for(lambda: _split(kept) == 35.0)
        assert (await running.status())["state_file"]["error"] is None
        await running.stop()
    finally:
        process.kill()


def kept_state(path: Path) -> dict[str, Any]:
    """What the state file holds now ({} before the first write)."""
    return read(str(path)) or {}


def _split(path: str) -> float | None:
    try:
        state = read(path)
    except Exception:
        return None
    return None if state is None else float(state["split"])


async def test_an_unwritable_state_file_is_an_error_not_a_failure(
    sample: SampleFactory, tmp_path: Path
) -> None:
    blue, green = await sample("blue"), await sample("green")
    where = str(tmp_path / "missing" / "state.json")
    _, _, process = await first_process(config(blue.url, green.url, state_file=where), tmp_path)
    running = await Running.start(process)
    try:
        assert (await running.call("PUT", "/split", {"green": 100}))[0] == 200
        status = await running.until(lambda s: s["state_file"]["error"] is not None)
        assert f"cannot write {where}" in status["state_file"]["error"]
        assert await running.upstream_of_a_request() == "green"
        await running.stop()
        assert any(b"state file: cannot write" in line for line in running.process.lines)
    finally:
        process.kill()


def test_where_the_state_file_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_path = str(tmp_path / "turnout.yaml")
    assert resolve("auto", config_path) == str(tmp_path / "turnout.state.json")
    assert resolve("auto", None) is None  # the built-in default configuration keeps none
    assert resolve("off", config_path) is None
    assert resolve(None, config_path) is None
    assert resolve("/var/lib/turnout/state.json", None) == "/var/lib/turnout/state.json"
    # Beside a configuration in a folder it cannot write (here: one that is not there, as a
    # read-only mount looks to anyone but root), under the runtime folder instead.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    elsewhere = resolve("auto", "/nonexistent/etc/turnout.yaml")
    assert elsewhere is not None
    assert Path(elsewhere).parent == tmp_path / "run" / "turnout"
    assert Path(elsewhere).name.startswith("turnout-")
    assert elsewhere.endswith(".state.json")
    assert resolve("auto", "/nonexistent/other/turnout.yaml") != elsewhere


def test_a_reader_never_sees_a_part_of_a_state(tmp_path: Path) -> None:
    """Readers racing 300 writes of states of different sizes see a whole one every time."""
    path = str(tmp_path / "state.json")
    write_atomically(path, b'{"turnout_state": 1, "split": 0, "stable": "blue"}')
    done = threading.Event()
    torn: list[bytes] = []

    def reader() -> None:
        while not done.is_set():
            with open(path, "rb") as f:
                data = f.read()
            try:
                json.loads(data)
            except ValueError:
                torn.append(data)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            padding = " " * (i % 7 * 500)
            state = {"turnout_state": 1, "split": i % 101, "stable": "blue", "note": padding}
            write_atomically(path, json.dumps(state).encode())
    finally:
        done.set()
        thread.join()
    assert torn == []
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left behind


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "is not a Turnout state file"),
        ('{"turnout_state": 1, "split": 101, "stable": "blue"}', "split must be a number"),
        ('{"turnout_state": 1, "split": 5, "stable": "red"}', "stable must be blue or green"),
        ("\xff\xfe", "is not JSON"),
    ],
)
def test_a_state_file_is_checked_before_it_is_used(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(StateFileError, match=problem):
        read(str(path))


async def test_a_takeover_keeps_the_running_state_and_the_file_going(
    sample: SampleFactory, tmp_path: Path
) -> None:
    """`--takeover` carries the running process's state, newer than the file's; the
    successor then keeps the file."""
    blue, green = await sample("blue"), await sample("green")
    path, handover, process = await first_process(config(blue.url, green.url), tmp_path)
    running = await Running.start(process)
    successor: Running | None = None
    kept = tmp_path / "turnout.state.json"
    try:
        assert (await running.call("PUT", "/split", {"green": 40}))[0] == 200
        await wait_for(lambda: kept_state(kept).get("split") == 40.0)
        new = await Process.start("-c", str(path), "--takeover-socket", handover, "--takeover")
        await new.wait_line(TOOK_OVER)
        successor = await Running.start(new)
        async with asyncio.timeout(15):
            assert await running.process.proc.wait() == 0
        status = await successor.status()
        assert status["split"]["green"] == 40.0
        assert status["state_file"]["restored"] is False  # the running process's state won
        assert not any(b"routing state from" in line for line in new.lines)
        assert (await successor.call("PUT", "/split", {"green": 60}))[0] == 200
        await wait_for(lambda: kept_state(kept).get("split") == 60.0)
        await successor.stop()
    finally:
        process.kill()
        if successor is not None:
            successor.process.kill()
