"""Graceful shutdown and reload of `turnout run`. What must go the same with workers as with one
process is tested both ways (`turnout_process`: one process, and a supervisor with two workers):
SIGTERM under load fails no request, of a busy or an idle keep-alive client; requests in flight
finish with `Connection: close`; idle keep-alive connections are closed; a second SIGTERM exits
at once; SIGHUP reloads, and every worker follows. WebSocket tunnels get drain.timeout and a
1001 (one process)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import HOST, SampleFactory, proxy_config
from helpers.admin import read_events
from helpers.load import Load, fresh_connections
from helpers.processes import (
    ProcessFactory,
    ProxyProcess,
    all_follow,
    status,
    until,
    until_draining,
)

TIMEOUT = 10.0


async def total_in_flight(session: aiohttp.ClientSession, process: ProxyProcess) -> int:
    doc = await status(session, process)
    return sum(u["in_flight"] for pool in doc["pools"].values() for u in pool["upstreams"])


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


async def worker_pids(
    session: aiohttp.ClientSession, process: ProxyProcess, workers: int
) -> list[int]:
    """The pids of the supervisor's workers; none for one process."""
    pids = [w["pid"] for w in (await status(session, process)).get("workers", [])]
    assert len(pids) == (workers if workers > 1 else 0)
    return pids


def assert_gone(pids: list[int]) -> None:
    """None of these processes is left (a supervisor's workers, once it has exited)."""
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def blue_urls(doc: dict[str, Any]) -> list[str]:
    return [u["url"] for u in doc["pools"]["blue"]["upstreams"]]


class KeepAliveClient:
    """An HTTP/1.1 client that reuses its connection as real ones do (aiohttp, httpx): it drops
    a connection the server closed while it sat idle, and sends an idempotent request once
    more on a fresh connection when a reused one ends before a byte of the answer (it may have
    been closed just as the request left). A refused connection (or one reset before it was
    established) is a clean failure: nothing was sent. Anything else is a failed request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> str:
        """ "ok", "refused", or what went wrong."""
        for _ in range(2):
            reused = self.conn is not None and not self.conn[0].at_eof()
            if not reused:
                self.drop()
                try:
                    self.conn = await asyncio.open_connection(HOST, self.port)
                except (ConnectionRefusedError, ConnectionResetError):
                    # Refused, or reset before the connection was established (a listener
                    # closed with the handshake under way): either way nothing was sent.
                    return "refused"
            assert self.conn is not None
            reader, writer = self.conn
            try:
                async with asyncio.timeout(TIMEOUT):
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: turnout\r\n\r\n".encode())
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                    length = re.search(r"(?im)^content-length: *(\d+)", head)
                    await reader.readexactly(int(length[1]) if length else 0)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                self.drop()
                partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
                if reused and not partial:
                    continue
                kind = "reused" if reused else "fresh"
                return f"{type(exc).__name__} on a {kind} connection"
            except TimeoutError:
                self.drop()
                return "no answer in time"
            if re.search(r"(?im)^connection: *close", head):
                self.drop()
            status = head.split(" ", 2)[1]
            return "ok" if status == "200" else f"answered {status}"
        return "the retry failed too"

    def drop(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


async def test_sigterm_under_load_fails_no_request(
    sample: SampleFactory, turnout_process: ProcessFactory, workers: int
) -> None:
    """With workers, SIGTERM comes as a service manager sends it (systemd's
    KillMode=control-group): to every process of the service at once, so a worker takes its
    own signal and the supervisor's as one; every worker drains and exits."""
    blue, green = await sample("blue"), await sample("green")
    process = await turnout_process(
        proxy_config([blue.url], [green.url], split=30, drain={"timeout": "5s"})
    )
    async with aiohttp.ClientSession() as session:
        pids = await worker_pids(session, process, workers)

        # Slow requests, each on a connection of its own, in flight when the signal comes.
        async def slow() -> tuple[int, str | None, str | None]:
            async with (
                aiohttp.ClientSession() as own,
                own.get(process.url + "/delay/1500") as resp,
            ):
                await resp.read()
                return resp.status, resp.headers.get("Connection"), resp.headers["X-Upstream"]

        held = [asyncio.create_task(slow()) for _ in range(4)]
        async with asyncio.timeout(TIMEOUT):
            while await total_in_flight(session, process) < 4:
                await asyncio.sleep(0.01)
        idle = await idle_keep_alive(process.port)
        events = await session.get(process.admin + "/events")
        assert (await events.content.readline()).startswith(b":")

        async with Load(process.url) as load:
            await load.until(200)
            before = len(load.done)
            process.signal(signal.SIGTERM)
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
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
        assert data["in_flight"] >= 4
        async with asyncio.timeout(TIMEOUT):
            assert await events.content.read() == b""  # the stream ends, it holds nothing up
        events.release()
    assert await process.exit_code(TIMEOUT) == 0
    # In-flight requests finished normally, told the connection closes.
    assert [(code, connection) for code, connection, _ in answers] == [(200, "close")] * 4
    assert load.failures() == []
    went = load.went()
    assert went.total() == len(load.done) >= before >= 200
    assert set(went) == {"blue", "green"}
    assert abs(went["green"] / went.total() - 0.3) < 0.06, went
    assert any("shutting down" in line for line in process.lines)
    assert_gone(pids)


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
    sample: SampleFactory, turnout_process: ProcessFactory, workers: int
) -> None:
    """With workers, the second SIGTERM ends every worker at once."""
    blue, green = await sample("blue"), await sample("green")
    process = await turnout_process(proxy_config([blue.url], [green.url], drain={"timeout": "30s"}))
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        pids = await worker_pids(session, process, workers)
        # A response that streams for 20 s, on whichever worker took it (the upstream notices
        # at once when it is cut).
        stuck = await session.get(process.url + "/stream?chunks=200&interval=100")
        assert await stuck.content.readany()
        process.signal(signal.SIGTERM)
        await until_draining(session, process)
        # Waiting for the request in flight (with workers, the worker that took it), up to 30 s.
        assert process.alive
        process.signal(signal.SIGTERM)
        second = loop.time()
        code = await process.exit_code(TIMEOUT)
        assert loop.time() - second < 3.0
        assert code == 0
        with pytest.raises(aiohttp.ClientError):
            await stuck.read()
        stuck.release()
    assert_gone(pids)


async def test_sighup_reloads_the_config_file(
    sample: SampleFactory, turnout_process: ProcessFactory, workers: int, tmp_path: Path
) -> None:
    """With workers, the supervisor reloads and every worker follows."""
    blue, green, blue2 = await sample("blue"), await sample("green"), await sample("blue2")
    process = await turnout_process(proxy_config([blue.url], [green.url]))
    path = tmp_path / "turnout.yaml"
    data = yaml.safe_load(path.read_text())
    async with aiohttp.ClientSession() as session:
        pids = await worker_pids(session, process, workers)
        async with Load(process.url) as load:
            await load.until(100)
            before = len(load.done)
            data["pools"]["blue"]["upstreams"] = [{"url": blue2.url}]
            path.write_text(yaml.safe_dump(data))
            process.signal(signal.SIGHUP)
            await until(session, process, lambda d: blue_urls(d) == [blue2.url] and all_follow(d))
            reloaded = load.started
            # New connections too (with workers, shared out among them) reach only blue2.
            assert await fresh_connections(process.url, 20) == {(200, "blue2"): 20}
            await load.more(100)
            # A broken file changes nothing.
            path.write_text("pools: {blue: {upstreams: [{url: 'http://x:1', weight: 0}]}}\n")
            process.signal(signal.SIGHUP)
            async with asyncio.timeout(TIMEOUT):
                while "reload refused" not in process.log.read_text():
                    await asyncio.sleep(0.01)
            await load.more(100)
        doc = await status(session, process)
    assert blue_urls(doc) == [blue2.url]
    assert load.failures() == []
    assert load.went(done=before) == {"blue": before}
    assert load.went(first=reloaded) == {"blue2": load.started - reloaded}
    log = process.log.read_text()
    refused = next(line for line in log.splitlines() if "reload refused" in line)
    assert "weight" in refused
    assert "green" in refused
    process.signal(signal.SIGTERM)
    assert await process.exit_code(TIMEOUT) == 0
    assert_gone(pids)


async def test_sigterm_fails_no_request_of_a_keep_alive_client(
    sample: SampleFactory, turnout_process: ProcessFactory
) -> None:
    """Clients keep sending across a SIGTERM: busy ones, and idle keep-alive ones that send
    again at moments through the drain. Each request is answered, or its connection is closed
    or refused before it was sent, never dropped after: with workers as with one process."""
    blue = await sample("blue")
    config = proxy_config([blue.url], [], drain={"timeout": "5s"})
    process = await turnout_process(config)
    loop = asyncio.get_running_loop()
    results: list[tuple[float, str]] = []
    signalled = asyncio.Event()
    idle_after = (0.05, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2)

    async def busy(client: KeepAliveClient) -> None:
        for _ in range(5000):
            outcome = await client.get("/load")
            results.append((loop.time(), outcome))
            if outcome != "ok":
                return

    async def idle(client: KeepAliveClient, delay: float) -> None:
        await signalled.wait()
        await asyncio.sleep(delay)
        results.append((loop.time(), await client.get("/after-idle")))

    async with aiohttp.ClientSession() as session:
        # A slow request keeps its process draining (and the supervisor alive) for a while
        # after the signal (on a slow machine the signal may come after it was answered).
        slow = asyncio.create_task(session.get(process.url + "/delay/3000"))
        await until(
            session, process, lambda d: d["pools"]["blue"]["upstreams"][0]["in_flight"] == 1
        )
        clients = [loop.create_task(busy(KeepAliveClient(process.port))) for _ in range(16)]
        async with asyncio.timeout(TIMEOUT):
            while len(results) < 500:
                await asyncio.sleep(0.01)
        # Keep-alive connections answered once just before the signal, then idle.
        idlers = [KeepAliveClient(process.port) for _ in idle_after]
        assert await asyncio.gather(*(c.get("/first") for c in idlers)) == ["ok"] * len(idlers)
        clients += [loop.create_task(idle(c, t)) for c, t in zip(idlers, idle_after, strict=True)]
        process.signal(signal.SIGTERM)
        signal_at = loop.time()
        signalled.set()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*clients)
        async with await slow as resp:
            assert resp.status == 200
            await resp.read()
    assert await process.exit_code(TIMEOUT) == 0
    after = Counter(outcome for at, outcome in results if at > signal_at)
    failed = {outcome: n for outcome, n in after.items() if outcome not in ("ok", "refused")}
    assert failed == {}, after
    assert all(outcome == "ok" for at, outcome in results if at <= signal_at)
    assert after["ok"] > 0
