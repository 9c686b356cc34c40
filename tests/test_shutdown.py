"""Graceful shutdown of a `turnout run` process: SIGTERM under load fails no request, requests
in flight finish with `Connection: close`, idle keep-alive connections are closed, WebSocket
tunnels get drain.timeout and a 1001, a second SIGTERM exits at once; SIGHUP reloads."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import HOST, SampleFactory, proxy_config
from helpers.admin import read_events
from helpers.load import Load
from helpers.processes import ProcessFactory, ProxyProcess, admin_get, until_draining

TIMEOUT = 10.0


async def total_in_flight(session: aiohttp.ClientSession, process: ProxyProcess) -> int:
    _, status = await admin_get(session, process.admin + "/status")
    return sum(u["in_flight"] for pool in status["pools"].values() for u in pool["upstreams"])


async def idle_keep_alive(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection that has had one answer and now sits idle, kept alive."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET /idle HTTP/1.1\r\nHost: turnout\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" not in head.lower()
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
    await reader.readexactly(length)
    return reader, writer


async def test_sigterm_under_load_fails_no_request(
    sample: SampleFactory, turnout: ProcessFactory
) -> None:
    blue, green = await sample("blue"), await sample("green")
    process = await turnout(
        proxy_config([blue.url], [green.url], split=30, drain={"timeout": "5s"})
    )
    async with aiohttp.ClientSession() as session:
        # Slow requests, each on a connection of its own, in flight when the signal comes.
        async def slow() -> tuple[int, str | None, str | None]:
            async with (
                aiohttp.ClientSession() as own,
                own.get(process.url + "/delay/1500") as resp,
            ):
                await resp.read()
                return resp.status, resp.headers.get("Connection"), resp.headers["X-Upstream"]

        held = [asyncio.create_task(slow()) for _ in range(3)]
        async with asyncio.timeout(TIMEOUT):
            while await total_in_flight(session, process) < 3:
                await asyncio.sleep(0.01)
        idle = await idle_keep_alive(process.port)
        events = await session.get(process.admin + "/events")
        assert (await events.content.readline()).startswith(b":")

        async with Load(process.url) as load:
            await load.until(200)
            before = len(load.done)
            process.signal(signal.SIGTERM)
            load.stop.set()
            # The admin API still answers while the proxy drains, and says it is not ready.
            await until_draining(session, process)
            # The idle keep-alive connection is closed, while the slow requests still run.
            async with asyncio.timeout(TIMEOUT):
                assert await idle[0].read() == b""
            assert not any(task.done() for task in held)
            idle[1].close()
        answers = await asyncio.gather(*held)
        ((kind, data),) = await read_events(events, 1)
        assert kind == "shutdown"
        assert data["in_flight"] >= 3
        async with asyncio.timeout(TIMEOUT):
            assert await events.content.read() == b""  # the stream ends, it holds nothing up
        events.release()
    assert await process.exit_code(TIMEOUT) == 0
    # In-flight requests finished normally, told the connection closes.
    assert [(status, connection) for status, connection, _ in answers] == [(200, "close")] * 3
    assert load.failures() == []
    went = load.went()
    assert went.total() == len(load.done) >= before >= 200
    assert set(went) == {"blue", "green"}
    assert abs(went["green"] / went.total() - 0.3) < 0.06, went
    assert any("shutting down" in line for line in process.lines)


async def test_sigterm_gives_a_websocket_drain_timeout_then_1001(
    sample: SampleFactory, turnout: ProcessFactory
) -> None:
    blue, green = await sample("blue"), await sample("green")
    process = await turnout(proxy_config([blue.url], [green.url], drain={"timeout": "1s"}))
    loop = asyncio.get_running_loop()
    async with (
        aiohttp.ClientSession() as session,
        asyncio.timeout(TIMEOUT),
        session.ws_connect(process.url + "/ws") as ws,
    ):
        await ws.send_str("before")
        assert await ws.receive_str() == "before"
        process.signal(signal.SIGTERM)
        signalled = loop.time()
        await until_draining(session, process)
        # The tunnel keeps working while the proxy drains.
        await ws.send_str("during")
        assert await ws.receive_str() == "during"
        msg = await ws.receive()
        closed = loop.time()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
    assert closed - signalled > 0.8
    assert await process.exit_code(TIMEOUT) == 0


async def test_a_second_sigterm_exits_at_once(
    sample: SampleFactory, turnout: ProcessFactory
) -> None:
    blue, green = await sample("blue"), await sample("green")
    process = await turnout(proxy_config([blue.url], [green.url], drain={"timeout": "30s"}))
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        # A response that streams for 20 s (the upstream notices at once when it is cut).
        stuck = await session.get(process.url + "/stream?chunks=200&interval=100")
        assert await stuck.content.readany()
        process.signal(signal.SIGTERM)
        await until_draining(session, process)
        assert process.alive  # waiting for the request in flight, up to 30 s
        process.signal(signal.SIGTERM)
        second = loop.time()
        code = await process.exit_code(TIMEOUT)
        assert loop.time() - second < 3.0
        assert code == 0
        with pytest.raises(aiohttp.ClientError):
            await stuck.read()
        stuck.release()


async def test_sighup_reloads_the_config_file(
    sample: SampleFactory, turnout: ProcessFactory, tmp_path: Path
) -> None:
    blue, green, blue2 = await sample("blue"), await sample("green"), await sample("blue2")
    process = await turnout(proxy_config([blue.url], [green.url]))
    path = tmp_path / "turnout.yaml"
    data = yaml.safe_load(path.read_text())
    async with aiohttp.ClientSession() as session:
        async with Load(process.url) as load:
            await load.until(100)
            before = len(load.done)
            data["pools"]["blue"]["upstreams"] = [{"url": blue2.url}]
            path.write_text(yaml.safe_dump(data))
            process.signal(signal.SIGHUP)
            async with asyncio.timeout(TIMEOUT):
                while True:
                    _, status = await admin_get(session, process.admin + "/status")
                    if [u["url"] for u in status["pools"]["blue"]["upstreams"]] == [blue2.url]:
                        break
                    await asyncio.sleep(0.01)
            reloaded = load.started
            await load.more(100)
            # A broken file changes nothing.
            path.write_text("pools: {blue: {upstreams: [{url: 'http://x:1', weight: 0}]}}\n")
            process.signal(signal.SIGHUP)
            async with asyncio.timeout(TIMEOUT):
                while "reload refused" not in process.log.read_text():
                    await asyncio.sleep(0.01)
            await load.more(100)
        _, status = await admin_get(session, process.admin + "/status")
    assert [u["url"] for u in status["pools"]["blue"]["upstreams"]] == [blue2.url]
    assert load.failures() == []
    assert load.went(done=before) == {"blue": before}
    assert load.went(first=reloaded) == {"blue2": load.started - reloaded}
    log = process.log.read_text()
    refused = next(line for line in log.splitlines() if "reload refused" in line)
    assert "weight" in refused
    assert "green" in refused
    process.signal(signal.SIGTERM)
    assert await process.exit_code(TIMEOUT) == 0
