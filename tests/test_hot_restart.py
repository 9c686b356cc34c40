"""Hot restart: a new process takes the listening sockets over under load, dropping nothing."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import HOST, SampleFactory
from helpers.takeover import ADMIN, LISTENING, TOOK_OVER, Process, first_process

STARTUP = 40.0  # a supervisor starts its workers (each within 30 s) before it says it serves


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


async def stop_cleanly(serving: Process, processes: list[Process]) -> None:
    """SIGTERM the process that serves (it exits 0); no process printed a traceback."""
    serving.proc.terminate()
    async with asyncio.timeout(15):
        assert await serving.proc.wait() == 0
    for process in processes:
        await process.drain_output()
        assert b"Traceback" not in b"".join(process.lines)


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
    path, handover, running = await first_process(config, tmp_path)
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
        await stop_cleanly(running, processes)
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


async def admin_call(admin: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://{HOST}:{admin}{path}", json=body) as resp,
    ):
        return resp.status, await resp.json()


async def until(admin: int, check: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Poll /status until `check(status)` holds; the last status, or an AssertionError."""
    status: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                status = (await admin_call(admin, "GET", "/status"))[1]
                if check(status):
                    return status
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(status) from None


async def hot_restart(
    config: dict[str, Any], tmp_path: Path, before: Any, after: Any, *args: str
) -> None:
    """Run a Turnout (with `args`) under load, let `before(admin)` change its state, take it
    over by another (with `args`), and once the old process has exited let `after(admin)`
    check the successor; no request may fail."""
    path, handover, old = await first_process(config, tmp_path, *args)
    processes = [old]
    try:
        port = await old.port(LISTENING, STARTUP)
        admin = await old.port(ADMIN)
        stop = asyncio.Event()
        results: Counter[Any] = Counter()
        traffic = asyncio.create_task(load(f"http://{HOST}:{port}/", stop, results))
        await before(admin)
        new = await Process.start(
            "-c", str(path), "--takeover-socket", handover, "--takeover", *args
        )
        processes.append(new)
        await new.wait_line(TOOK_OVER, STARTUP)
        async with asyncio.timeout(15):
            assert await old.proc.wait() == 0
        await after(admin)
        stop.set()
        await traffic
        assert set(results) == {200}, results
        await stop_cleanly(new, processes)
    finally:
        for process in processes:
            process.kill()


def two_pools(blue: list[str], green: list[str], **more: Any) -> dict[str, Any]:
    return {
        "listen": {"host": HOST, "port": 0},
        "admin": {"host": HOST, "port": 0},
        "pools": {
            "blue": {"upstreams": [{"url": url} for url in blue]},
            "green": {"upstreams": [{"url": url} for url in green]},
        },
        "health_check": {"interval": "200ms", "healthy_after": 1},
        "drain": {"timeout": "5s"},
        **more,
    }


@pytest.mark.timeout(150)  # with workers, two supervisors start theirs
@pytest.mark.parametrize("args", [(), ("--workers", "2")], ids=["single", "workers"])
async def test_takeover_carries_a_ramp_and_the_admin_apis_changes_on(
    sample: SampleFactory, tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A ramp under way goes on in the successor from where it was; upstreams the admin API
    added, removed or drained stay so (the file read afresh does not undo them)."""
    blue, blue2, green, green2 = [await sample(n) for n in ("blue", "blue2", "green", "green2")]

    def upstreams(status: dict[str, Any], pool: str) -> list[tuple[str, str]]:
        return [(u["url"], u["state"]) for u in status["pools"][pool]["upstreams"]]

    async def before(admin: int) -> None:
        code, _ = await admin_call(admin, "POST", "/pools/blue/upstreams", {"url": blue2.url})
        assert code == 201
        await until(admin, lambda s: upstreams(s, "blue")[1] == (blue2.url, "up"))
        assert (await admin_call(admin, "POST", "/pools/blue/upstreams/0/drain"))[0] == 200
        assert (await admin_call(admin, "DELETE", "/pools/green/upstreams/1"))[0] == 202
        await until(admin, lambda s: len(s["pools"]["green"]["upstreams"]) == 1)
        # Long enough to be under way still after the takeover on a slow machine.
        code, _ = await admin_call(admin, "PUT", "/split", {"green": 40, "over": "60s"})
        assert code == 200
        await until(admin, lambda s: s["split"]["green"] > 0)

    async def after(admin: int) -> None:
        status = await until(admin, lambda s: True)
        assert status["ramp"]["target"] == 40.0
        assert 0.0 < status["ramp"]["remaining"] < 60.0  # the successor goes on, not over
        assert 0 < status["split"]["green"] < 40
        assert upstreams(status, "blue") == [(blue.url, "drained"), (blue2.url, "up")]
        assert upstreams(status, "green") == [(green.url, "up")]
        reached = status["split"]["green"]
        await until(admin, lambda s: s["split"]["green"] > reached + 1)

    config = two_pools([blue.url], [green.url, green2.url])
    await hot_restart(config, tmp_path, before, after, *args)


async def test_takeover_carries_an_adaptive_rollout_on(
    sample: SampleFactory, tmp_path: Path
) -> None:
    """The successor goes on with the rollout at the step it had reached, not idle with the
    split frozen; the step's analysis starts afresh there."""
    blue, green = await sample("blue"), await sample("green")
    rollout = {"strategy": "adaptive", "steps": [10, 50, 100], "interval": "1h"}

    async def before(admin: int) -> None:
        code, _ = await admin_call(admin, "POST", "/rollout/start", {"strategy": "adaptive"})
        assert code == 200
        await until(admin, lambda s: s["rollout"]["step"] == 1 and s["split"]["green"] == 10)

    async def after(admin: int) -> None:
        status = (await admin_call(admin, "GET", "/status"))[1]
        assert status["split"]["green"] == 10
        assert status["rollout"]["state"] in ("progressing", "insufficient_data")
        assert status["rollout"]["step"] == 1
        assert status["rollout"]["steps"] == [10, 50, 100]
        code, body = await admin_call(admin, "POST", "/rollout/promote")
        assert code == 200, body
        assert body["after"] == {"state": "promoted", "split": 100.0}

    config = two_pools([blue.url], [green.url], rollout=rollout)
    await hot_restart(config, tmp_path, before, after)


async def test_the_draining_old_process_takes_no_more_admin_requests(
    sample: SampleFactory, tmp_path: Path
) -> None:
    """Both processes hold the admin API's listening socket: while the old one drains (a
    WebSocket keeps it busy), every admin request must reach the successor, or a shift lands
    in the process that no longer serves and is answered 200 for nothing."""
    blue, green = await sample("blue"), await sample("green")
    path, handover, old = await first_process(two_pools([blue.url], [green.url]), tmp_path)
    processes = [old]
    try:
        port = await old.port(LISTENING)
        admin = await old.port(ADMIN)
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://{HOST}:{port}/ws") as ws,
        ):
            await ws.send_str("held")
            assert await ws.receive_str() == "held"
            new = await Process.start("-c", str(path), "--takeover-socket", handover, "--takeover")
            processes.append(new)
            await new.wait_line(TOOK_OVER)
            for green_share in range(1, 11):
                code, _ = await admin_call(admin, "PUT", "/split", {"green": green_share})
                assert code == 200
                for _ in range(3):
                    status = (await admin_call(admin, "GET", "/status"))[1]
                    assert status["split"]["green"] == green_share
            # The old process was still draining all along (its WebSocket is open).
            assert old.proc.returncode is None
        async with asyncio.timeout(15):
            assert await old.proc.wait() == 0
        new.proc.terminate()
        async with asyncio.timeout(15):
            assert await new.proc.wait() == 0
    finally:
        for process in processes:
            process.kill()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(150)  # three supervisors or processes start, two of them with workers
async def test_a_supervisor_and_its_workers_are_taken_over_under_load(
    sample: SampleFactory, tmp_path: Path
) -> None:
    """`--takeover --workers 2`: the new supervisor takes the listening sockets and the routing
    state (stable pool, split, rollout) from a supervisor with workers, starts its own workers
    on the same sockets, and the old supervisor and its workers drain and exit. Then a single
    process takes over from it the same way. No client request fails throughout."""
    blue, green = await sample("blue"), await sample("green")
    rollout = {"strategy": "adaptive", "steps": [10, 50, 100], "interval": "1h"}
    config = two_pools([blue.url], [green.url], rollout=rollout)
    path, handover, running = await first_process(config, tmp_path, "--workers", "2")
    processes = [running]
    try:
        # Slower to start than a single process: the workers are processes of their own.
        port = await running.port(LISTENING, STARTUP)
        admin = await running.port(ADMIN)
        # Green promoted, then a rollout back toward blue at its first step: all of it must
        # carry over (a successor starting from the file would send everything to blue).
        assert (await admin_call(admin, "POST", "/rollout/start", {}))[0] == 200
        assert (await admin_call(admin, "POST", "/rollout/promote"))[0] == 200
        assert (await admin_call(admin, "POST", "/rollout/start", {}))[0] == 200
        before = await until(admin, lambda s: s["rollout"]["step"] == 1)
        assert (before["stable"], before["split"]["green"]) == ("green", 90.0)
        pids = [w["pid"] for w in before["workers"]]
        stop = asyncio.Event()
        results: Counter[Any] = Counter()
        traffic = asyncio.create_task(load(f"http://{HOST}:{port}/", stop, results))
        async with asyncio.timeout(10):
            while sum(results.values()) < 200:
                await asyncio.sleep(0.01)
        for args in (("--workers", "2"), ()):
            new = await Process.start(
                "-c", str(path), "--takeover-socket", handover, "--takeover", *args
            )
            processes.append(new)
            await new.wait_line(TOOK_OVER, STARTUP)
            assert await new.port(LISTENING) == port
            async with asyncio.timeout(15):
                assert await running.proc.wait() == 0
            # The old supervisor's workers drained and exited with it.
            assert not any(alive(pid) for pid in pids)
            running = new
            status = (await admin_call(admin, "GET", "/status"))[1]
            assert (status["stable"], status["split"]["green"]) == ("green", 90.0)
            assert status["rollout"]["state"] in ("progressing", "insufficient_data")
            assert status["rollout"]["step"] == 1
            workers = status.get("workers", [])
            assert [w["state"] for w in workers] == ["ready"] * len(workers)
            assert not set(pids) & {w["pid"] for w in workers}
            pids = [w["pid"] for w in workers]
            # The new process serves: traffic goes on through it alone.
            served = sum(results.values())
            async with asyncio.timeout(10):
                while sum(results.values()) < served + 200:
                    await asyncio.sleep(0.01)
        stop.set()
        await traffic
        assert set(results) == {200}, results
        await stop_cleanly(running, processes)
    finally:
        for process in processes:
            process.kill()
