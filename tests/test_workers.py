"""`turnout run --workers 2`: two worker processes on one port share one state. Both serve;
/metrics and /status count every worker's requests once; a split change, a drain and a reload
reach every worker; an adaptive rollout decides on the outcomes of all workers together; SIGTERM
drains every worker and fails no request; a killed worker is restarted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import HOST, SampleFactory, proxy_config
from helpers.load import Load
from helpers.processes import ADMIN_API, LISTENING, ProxyProcess, admin_get, until_draining
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cli import main
from proxy.config import parse_config
from proxy.logic.analysis import PoolWindow, latency_bin
from proxy.logic.breaker import BreakerState
from proxy.procs.shared import OutcomeReport, RoutingState, forget_member, routing_state
from proxy.procs.supervisor import LeaderProxy
from proxy.procs.worker import MemberProxy

TIMEOUT = 10.0
WORKERS = 2

WorkersFactory = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def turnout_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[WorkersFactory]:
    """`python -m proxy run -c FILE --workers 2` (or another count) on ports 0, its stdout
    read line by line."""
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    started: list[ProxyProcess] = []

    async def start(data: dict[str, Any], workers: int = WORKERS) -> ProxyProcess:
        path = tmp_path / "turnout.yaml"
        path.write_text(yaml.safe_dump({"admin": {"host": HOST, "port": 0}, **data}))
        log = tmp_path / "turnout.log"
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "proxy", "run", "-c", str(path), "--workers", str(workers)),
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        process = ProxyProcess(proc, log)
        started.append(process)
        process.port = int((await process.wait_line(LISTENING))[2])
        process.admin_port = int((await process.wait_line(ADMIN_API))[2])
        return process

    yield start
    for process in started:
        if process.alive:
            # SIGTERM first: the workers drain and exit with the supervisor.
            process.signal(signal.SIGTERM)
            try:
                await process.exit_code(TIMEOUT)
            except TimeoutError:
                process.proc.kill()
        await process.proc.wait()
        await process._reader


class RawClient:
    """One keep-alive client connection: it stays on the worker that accepted it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(*await asyncio.open_connection(HOST, port))

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        """(status, X-Upstream) of one GET; the body is read and dropped."""
        lines = [f"GET {path} HTTP/1.1", "Host: turnout"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(TIMEOUT):
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            length = re.search(r"(?im)^content-length: *(\d+)", head)
            assert length is not None, head
            await self.reader.readexactly(int(length[1]))
        upstream = re.search(r"(?im)^x-upstream: *(\S+)", head)
        return int(head.split(" ", 2)[1]), upstream[1] if upstream else ""

    def close(self) -> None:
        self.writer.close()


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


def served(doc: dict[str, Any]) -> list[int]:
    return [w["served"] for w in doc["workers"]]


def all_follow(doc: dict[str, Any]) -> bool:
    """Every worker routes by the supervisor's latest state."""
    return all(w["generation"] == doc["generation"] for w in doc["workers"])


async def fresh_connections(url: str, count: int, path: str = "/x") -> Counter[tuple[int, str]]:
    """`count` GETs, each on a connection of its own (so the workers share them out)."""
    results: Counter[tuple[int, str]] = Counter()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.get(url + path) as resp:
                await resp.read()
                results[resp.status, resp.headers.get("X-Upstream", "")] += 1

        for _ in range(count // 4):
            await asyncio.gather(*(one() for _ in range(4)))
    return results


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("T" when stopped by a signal)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


async def until_states(pids: list[int], stopped: bool) -> None:
    async with asyncio.timeout(TIMEOUT):
        while any((process_state(pid) == "T") != stopped for pid in pids):
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def only_worker(doc: dict[str, Any], index: int) -> AsyncIterator[None]:
    """Meanwhile only worker `index` takes new connections: every other worker is stopped
    (SIGSTOP), so it cannot accept. The kernel spreads the connections waiting on a listener
    shared by several processes as it pleases (a burst may all go to one), so a test that
    must reach a given worker picks it this way rather than hoping for its share."""
    others = [w["pid"] for w in doc["workers"] if w["index"] != index]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        await until_states(others, stopped=True)
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)
        await until_states(others, stopped=False)


async def through_each_worker(
    session: aiohttp.ClientSession, process: ProxyProcess, count: int
) -> tuple[Counter[tuple[int, str]], dict[str, Any]]:
    """`count` fresh connections through each worker in turn; returns the answers and the
    /status that counted them all, each on the worker it was sent through."""
    doc = await status(session, process)
    start = served(doc)
    results: Counter[tuple[int, str]] = Counter()
    for index in range(WORKERS):
        async with only_worker(doc, index), asyncio.timeout(TIMEOUT):
            results += await fresh_connections(process.url, count)
            expected = [n + count * (i <= index) for i, n in enumerate(start)]
            doc = await until(session, process, served_is(expected))
    return results, doc


def served_is(expected: list[int]) -> Callable[[dict[str, Any]], bool]:
    return lambda doc: served(doc) == expected


async def on_each_worker(
    session: aiohttp.ClientSession, process: ProxyProcess
) -> dict[int, RawClient]:
    """A keep-alive connection accepted by each worker (it stays on that worker)."""
    found: dict[int, RawClient] = {}
    for index in range(WORKERS):
        doc = await status(session, process)
        before = served(doc)
        async with only_worker(doc, index):
            client = await RawClient.open(process.port)
            assert await client.get("/who", {"X-Turnout-Pool": "blue"}) == (200, "blue")
            after = [n + (i == index) for i, n in enumerate(before)]
            await until(session, process, served_is(after))
        found[index] = client
    return found


def metric_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


async def test_both_workers_serve_and_every_request_is_counted_once(
    sample: SampleFactory, turnout_workers: WorkersFactory
) -> None:
    blue, green = await sample("blue"), await sample("green")
    process = await turnout_workers(proxy_config([blue.url], [green.url]))
    async with aiohttp.ClientSession() as session:
        first = await status(session, process)
        assert [w["state"] for w in first["workers"]] == ["ready"] * WORKERS
        assert len({w["pid"] for w in first["workers"]}) == WORKERS
        # Each worker reports within 50 ms: the supervisor's figures are the sum.
        results, doc = await through_each_worker(session, process, 8)
        sent = 8 * WORKERS
        assert served(doc) == [8] * WORKERS
        assert results == {(200, "blue"): sent}
        assert doc["pools"]["blue"]["upstreams"][0]["requests"] == sent
        assert doc["rollout"]["windows"]["blue"]["requests"] == sent
        assert sum(w["outcomes"]["blue"]["requests"] for w in doc["workers"]) == sent
        async with session.get(process.admin + "/metrics") as resp:
            text = await resp.text()
        assert metric_sum(text, "turnout_requests_total") == sent
        assert 'turnout_requests_total{code="200",pool="blue"' in text
        assert metric_sum(text, "turnout_request_duration_seconds_count") == sent
        assert 'turnout_workers{state="ready"} 2.0' in text
        # The dashboard is the supervisor's, beside the admin API it reads.
        async with session.get(process.admin + "/ui") as resp:
            assert resp.status == 200
            assert "Turnout dashboard" in await resp.text()
            assert "default-src 'self'" in resp.headers["Content-Security-Policy"]


async def test_a_split_change_reaches_every_worker_within_100ms(
    sample: SampleFactory, turnout_workers: WorkersFactory
) -> None:
    blue, green = await sample("blue"), await sample("green")
    process = await turnout_workers(proxy_config([blue.url], [green.url]))
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        before = (await status(session, process))["generation"]
        async with session.put(process.admin + "/split", json={"green": 30}) as resp:
            assert resp.status == 200
        changed = loop.time()
        doc = await until(session, process, lambda d: d["generation"] > before and all_follow(d))
        # Polled over HTTP, so bounded loosely here; the workers' own figure is tighter.
        assert loop.time() - changed < 1.0
        lags = [w["lag_ms"] for w in doc["workers"]]
        assert all(lag is not None and 0 <= lag < 100 for lag in lags), lags
        results = await fresh_connections(process.url, 200)
        assert set(results) == {(200, "blue"), (200, "green")}
        assert 40 <= results[200, "green"] <= 80, results


async def test_a_drain_reaches_every_worker(
    sample: SampleFactory, turnout_workers: WorkersFactory
) -> None:
    a, b, green = await sample("blue-a"), await sample("blue-b"), await sample("green")
    process = await turnout_workers(proxy_config([a.url, b.url], [green.url]))
    async with aiohttp.ClientSession() as session:
        async with session.post(process.admin + "/pools/blue/upstreams/0/drain") as resp:
            assert resp.status == 200
        await until(session, process, all_follow)
        # Every worker serves some of these, and none of them reaches the drained upstream.
        results, _ = await through_each_worker(session, process, 8)
        assert results == {(200, "blue-b"): 8 * WORKERS}
        # Nothing in flight at blue-a in any worker: drained, and the workers know it.
        await until(
            session,
            process,
            lambda d: d["pools"]["blue"]["upstreams"][0]["state"] == "drained" and all_follow(d),
        )


async def test_a_rollout_decides_on_the_outcomes_of_every_worker(
    sample: SampleFactory, turnout_workers: WorkersFactory
) -> None:
    """With max_error_rate 20 % a candidate failing everything is rolled back at 6 failures
    (tests/test_analysis.py has the test itself); each worker sees only 4."""
    blue, green = await sample("blue"), await sample("green", error_rate=1.0)
    rollout = {
        "strategy": "adaptive",
        "steps": [50, 100],
        "interval": "60s",
        "threshold": {"max_error_rate": 0.2, "min_requests": 1000},
        "fallback": "rollback",
    }
    process = await turnout_workers(proxy_config([blue.url], [green.url], rollout=rollout))
    async with aiohttp.ClientSession() as session:
        clients = await on_each_worker(session, process)
        async with session.post(process.admin + "/rollout/start", json={}) as resp:
            assert resp.status == 200
        await until(session, process, lambda d: d["rollout"]["step"] == 1 and all_follow(d))
        green_only = {"X-Turnout-Pool": "green"}
        for _ in range(4):
            assert await clients[0].get("/fail", green_only) == (500, "green")

        # Worker 0's four failures are in the supervisor's window, judged, and not enough.
        doc = await until(
            session, process, lambda d: " 4 candidate outcomes" in d["rollout"]["reason"]
        )
        assert doc["rollout"]["state"] == "progressing", doc["rollout"]
        assert doc["rollout"]["windows"]["green"]["errors"] == 4
        assert [w["outcomes"]["green"]["errors"] for w in doc["workers"]] == [4, 0]
        for _ in range(4):
            assert await clients[1].get("/fail", green_only) == (500, "green")
        doc = await until(session, process, lambda d: d["rollout"]["state"] == "rolled_back")
        # The breach counted more failures than either worker saw (4 each): both workers'.
        judged = re.search(r"over (\d+) requests", doc["rollout"]["reason"])
        assert judged is not None, doc["rollout"]["reason"]
        assert 6 <= int(judged[1]) <= 8, doc["rollout"]["reason"]
        # Reports come every 50 ms: the last failures may be counted after the verdict.
        doc = await until(
            session,
            process,
            lambda d: [w["outcomes"]["green"]["errors"] for w in d["workers"]] == [4, 4],
        )
        assert doc["rollout"]["windows"]["green"]["errors"] == 8
        assert doc["split"]["green"] == 0.0
        # The rollback reaches both workers: what they serve now is blue.
        doc = await until(session, process, all_follow)
        for client in clients.values():
            assert await client.get("/after") == (200, "blue")
            client.close()


async def test_sighup_and_sigterm_reach_every_worker_and_fail_no_request(
    sample: SampleFactory, turnout_workers: WorkersFactory, tmp_path: Path
) -> None:
    blue, green, blue2 = await sample("blue"), await sample("green"), await sample("blue2")
    process = await turnout_workers(proxy_config([blue.url], [green.url], drain={"timeout": "5s"}))
    path = tmp_path / "turnout.yaml"
    data = yaml.safe_load(path.read_text())
    async with aiohttp.ClientSession() as session:
        pids = [w["pid"] for w in (await status(session, process))["workers"]]
        async with Load(process.url, clients=4) as load:
            await load.until(50)
            # SIGHUP: the supervisor reloads, the workers follow.
            data["pools"]["blue"]["upstreams"] = [{"url": blue2.url}]
            path.write_text(yaml.safe_dump(data))
            process.signal(signal.SIGHUP)
            await until(
                session,
                process,
                lambda d: d["pools"]["blue"]["upstreams"][0]["url"] == blue2.url and all_follow(d),
            )
            results = await fresh_connections(process.url, 20)
            assert results == {(200, "blue2"): 20}

            # Slow requests, each on a connection of its own, in flight when SIGTERM comes.
            async def slow() -> tuple[int, str | None]:
                async with (
                    aiohttp.ClientSession() as own,
                    own.get(process.url + "/delay/1000") as resp,
                ):
                    await resp.read()
                    return resp.status, resp.headers.get("Connection")

            held = [asyncio.create_task(slow()) for _ in range(4)]
            await until(
                session,
                process,
                lambda d: sum(u["in_flight"] for u in d["pools"]["blue"]["upstreams"]) >= 4,
            )
            await load.more(20)
            # As a service manager does (systemd's KillMode=control-group): every process of
            # the service at once; a worker takes its signal and the supervisor's as one.
            process.signal(signal.SIGTERM)
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            load.stop.set()
            await until_draining(session, process)
        answers = await asyncio.gather(*held)
    assert await process.exit_code(TIMEOUT) == 0
    assert answers == [(200, "close")] * 4
    assert load.failures() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("workers", [WORKERS, 1])
async def test_sigterm_fails_no_request_of_a_keep_alive_client(
    sample: SampleFactory, turnout_workers: WorkersFactory, workers: int
) -> None:
    """Clients keep sending across a SIGTERM: busy ones, and idle keep-alive ones that send
    again at moments through the drain. Each request is answered, or its connection is closed
    or refused before it was sent, never dropped after: with workers as with one process."""
    blue = await sample("blue")
    config = proxy_config([blue.url], [], drain={"timeout": "5s"})
    process = await turnout_workers(config, workers)
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


async def test_a_second_sigterm_ends_every_worker_at_once(
    sample: SampleFactory, turnout_workers: WorkersFactory
) -> None:
    blue, green = await sample("blue"), await sample("green")
    process = await turnout_workers(proxy_config([blue.url], [green.url], drain={"timeout": "30s"}))
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        # A response that streams for 20 s, on whichever worker took it.
        stuck = await session.get(process.url + "/stream?chunks=200&interval=100")
        assert await stuck.content.readany()
        process.signal(signal.SIGTERM)
        await until_draining(session, process)
        assert process.alive  # its worker waits for the request in flight, up to 30 s
        process.signal(signal.SIGTERM)
        second = loop.time()
        assert await process.exit_code(TIMEOUT) == 0
        assert loop.time() - second < 3.0
        with pytest.raises(aiohttp.ClientError):
            await stuck.read()
        stuck.release()


async def test_a_killed_worker_is_restarted(
    sample: SampleFactory, turnout_workers: WorkersFactory
) -> None:
    blue, green = await sample("blue"), await sample("green")
    process = await turnout_workers(proxy_config([blue.url], [green.url]))
    async with aiohttp.ClientSession() as session:
        old = (await status(session, process))["workers"][0]["pid"]
        os.kill(old, signal.SIGKILL)
        doc = await until(
            session,
            process,
            lambda d: d["workers"][0]["restarts"] == 1 and d["workers"][0]["state"] == "ready",
        )
        assert doc["workers"][0]["pid"] != old
        assert doc["workers"][1]["restarts"] == 0
        assert "worker 0" in process.log.read_text()
        async with session.get(process.admin + "/metrics") as resp:
            assert "turnout_worker_restarts_total 1.0" in await resp.text()
        # The new worker 0 serves (and worker 1 still does).
        results, doc = await through_each_worker(session, process, 8)
        assert results == {(200, "blue"): 8 * WORKERS}
        assert served(doc) == [8] * WORKERS


# the seam in one process: no sockets, no processes ------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0.0, 200.0)), max_size=60))
def test_counts_recorded_elsewhere_give_the_same_figures(
    outcomes: list[tuple[bool, float]],
) -> None:
    here, there = PoolWindow(span=10.0, bucket=0.25), PoolWindow(span=10.0, bucket=0.25)
    bins: Counter[int] = Counter()
    for error, latency in outcomes:
        here.record(5.0, error, latency)
        bins[latency_bin(latency)] += 1
    there.record_counts(5.0, sum(error for error, _ in outcomes), bins)
    assert here.figures(5.1) == there.figures(5.1)
    assert here.figures(5.1).histogram == there.figures(5.1).histogram


def two_pools(blue: list[str], green: list[str]) -> dict[str, Any]:
    return proxy_config(blue, green, admin={"host": HOST, "port": 0})


async def test_routing_state_crosses_the_wire_without_change() -> None:
    config = parse_config(two_pools(["http://127.0.0.1:9001"], ["http://127.0.0.1:9002"]))
    leader = LeaderProxy(config, workers=2)
    leader.set_split(12.5)
    leader.fence_candidate("green was rolled back")
    first = routing_state(leader, 1, 1, 3.0)
    assert first.fence == "green was rolled back"
    wire = json.loads(json.dumps(first.to_wire()))
    assert RoutingState.from_wire(wire, None) == first
    # Without the configuration it refers to a state is refused, with it the previous one's.
    later = routing_state(leader, 2, 1, 4.0)
    bare = json.loads(json.dumps(later.to_wire(with_config=False)))
    assert RoutingState.from_wire(bare, first) == later
    with pytest.raises(ValueError, match="configuration"):
        RoutingState.from_wire(bare, None)


async def test_members_report_and_the_leader_adds_them_up() -> None:
    blue_url, green_url = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
    config = parse_config(two_pools([blue_url], [green_url]))
    leader = LeaderProxy(config, workers=2)
    members = [MemberProxy(config, member=f"worker-{i}", workers=2) for i in range(2)]
    state = routing_state(leader, 1, 1, 0.0)
    for member in members:
        member.follow(state)
        # Per-upstream limits are shared out: both workers together stay within them.
        assert member.settings.max_connections == config.listen.max_connections // 2
        admission = member.router.pools["blue"][0].admission.snapshot()
        assert admission.max_in_flight == config.limits.max_in_flight // 2
    for i, member in enumerate(members):
        green = member.router.pools["green"][0]
        for n in range(3 + i):
            member.record_outcome("green", n == 0, 0.01)
            green.codes[500 if n == 0 else 200] = green.codes.get(500 if n == 0 else 200, 0) + 1
            outcome = "500" if n == 0 else "200"
            green.attempts[outcome] = green.attempts.get(outcome, 0) + 1
        green.admission.try_enter()  # one request in flight in each member
    for member in members:
        report = member.report()
        assert report is not None
        leader.merge(OutcomeReport.from_wire(json.loads(json.dumps(report.to_wire()))))
        assert member.report() is None  # nothing new since
    figures = leader.figures("green")
    assert (figures.requests, figures.errors) == (7, 2)
    green = leader.router.pools["green"][0]
    assert green.codes == {500: 2, 200: 5}
    assert green.attempts == {"500": 2, "200": 5}
    assert green.in_flight == 2
    # A breaker open in one member shows on the leader; a member gone no longer counts.
    members[1].router.pools["green"][0].breaker._open("test")
    report = members[1].report()
    assert report is not None
    leader.merge(report)
    assert green.breaker.state is BreakerState.OPEN
    assert green.state_name() == "breaker_open"
    assert leader.events.history[-1].kind == "breaker"
    forget_member(leader.router.upstreams(), "worker-1")
    assert green.in_flight == 1
    assert green.state_name() == "up"  # the breaker closed


async def test_members_follow_drains_removals_splits_and_promotions() -> None:
    a, b, g = "http://127.0.0.1:9001", "http://127.0.0.1:9003", "http://127.0.0.1:9002"
    config = parse_config(two_pools([a, b], [g]))
    leader = LeaderProxy(config, workers=1)
    member = MemberProxy(config, member="worker-0")
    leader.control.drain("blue", 0)
    leader.set_split(40.0)
    member.follow(routing_state(leader, 1, 1, 0.0))
    blue = member.router.pools["blue"]
    assert [u.draining for u in blue] == [True, False]
    assert member.router.candidates["blue"] == (blue[1],)
    assert member.spreader.split == 40.0
    # The leader drops blue/0 and promotes: the member keeps blue/1 (now index 0) as it was.
    kept = blue[1]
    leader.router.pools["blue"] = (leader.router.pools["blue"][1],)
    leader.stable = "green"
    member.follow(routing_state(leader, 2, 1, 0.0))
    assert member.router.pools["blue"] == (kept,)
    assert kept.index == 0
    assert blue[0] in member.retiring
    assert member.stable == "green"
    assert member.generation == 2
    # A rollback's fence on the candidate (now blue) reaches the member, and its lifting.
    leader.fence_candidate("blue was rolled back")
    member.follow(routing_state(leader, 3, 1, 0.0))
    assert (member.router.fenced, member.fence_reason) == ("blue", "blue was rolled back")
    leader.fence_candidate("")
    member.follow(routing_state(leader, 4, 1, 0.0))
    assert (member.router.fenced, member.fence_reason) == (None, "")
    await member.shutdown(timeout=0)
    await leader.control.close()


def test_fewer_than_one_worker_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(two_pools(["http://127.0.0.1:9001"], [])))
    assert main(["run", "-c", str(path), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
