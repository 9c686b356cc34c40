"""`turnout run --workers 2`: two worker processes on one port share one state. Both serve;
/metrics and /status count every worker's requests once; a split change and a drain reach every
worker; an adaptive rollout decides on the outcomes of all workers together; a killed worker is
restarted. SIGTERM and SIGHUP, which must do with workers what they do to one process, are tested
both ways in tests/test_shutdown.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import HOST, SampleFactory, proxy_config, wait_for
from helpers.load import fresh_connections
from helpers.processes import (
    ProcessFactory,
    ProxyProcess,
    all_follow,
    reap,
    spawn,
    status,
    until,
)
from helpers.raw_http import RawClient, RawUpstreamFactory, Seen, answer_ok
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cli import main
from proxy.config import parse_config
from proxy.logic.analysis import PoolWindow, latency_bin
from proxy.logic.breaker import BreakerState
from proxy.procs.shared import OutcomeReport, RoutingState, forget_member, routing_state
from proxy.procs.supervisor import WorkerPool, supervisor_proxy
from proxy.procs.worker import Member

TIMEOUT = 10.0
WORKERS = 2


@pytest.fixture
async def turnout_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ProcessFactory]:
    """`python -m proxy run -c FILE --workers 2`, for what only a supervisor and its workers
    do (tests/test_shutdown.py runs the rest both ways, with `turnout_process`)."""
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    started: list[ProxyProcess] = []

    async def start(data: dict[str, Any]) -> ProxyProcess:
        process = await spawn(tmp_path, data, "--workers", str(WORKERS))
        started.append(process)
        return process

    yield start
    for process in started:
        await reap(process, graceful=True)


async def get(
    client: RawClient, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """(status, X-Upstream) of one GET on a keep-alive connection (it stays on the worker that
    accepted it)."""
    lines = [f"GET {path} HTTP/1.1", "Host: turnout"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    resp = await client.request(("\r\n".join(lines) + "\r\n\r\n").encode())
    upstream = resp.value(b"x-upstream")
    return resp.status, upstream.decode() if upstream else ""


def served(doc: dict[str, Any]) -> list[int]:
    return [w["served"] for w in doc["workers"]]


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
            assert await get(client, "/who", {"X-Turnout-Pool": "blue"}) == (200, "blue")
            after = [n + (i == index) for i, n in enumerate(before)]
            await until(session, process, served_is(after))
        found[index] = client
    return found


def metric_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


async def test_both_workers_serve_and_every_request_is_counted_once(
    sample: SampleFactory, turnout_workers: ProcessFactory
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
    sample: SampleFactory, turnout_workers: ProcessFactory
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
    sample: SampleFactory, turnout_workers: ProcessFactory
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


async def test_a_drain_waits_for_what_the_workers_hold_there(
    sample: SampleFactory, raw_upstream: RawUpstreamFactory, turnout_workers: ProcessFactory
) -> None:
    held_at = await raw_upstream(lambda seen: None)  # answers nothing until told
    other, green = await sample("blue-b"), await sample("green")
    process = await turnout_workers(proxy_config([held_at.url, other.url], [green.url]))
    async with aiohttp.ClientSession() as session:
        await until(session, process, lambda d: d["pools"]["blue"]["available"] == 2)
        # One request at a time until one reaches the upstream that holds it.
        async with asyncio.timeout(TIMEOUT):
            while True:
                held = asyncio.create_task(plain_get(session, process.url + "/held"))
                while not (held.done() or held_at.requests):
                    await asyncio.sleep(0.005)
                if held_at.requests:
                    break
                assert (await held) == (200, "blue-b")
        # The supervisor serves no request: it sees this one through the workers' reports, and
        # so does its drain, which waits for it.
        doc = await until(session, process, lambda d: blue0(d)["in_flight"] == 1)
        assert blue0(doc)["state"] == "up"
        async with session.post(process.admin + "/pools/blue/upstreams/0/drain") as resp:
            assert resp.status == 200
        doc = await until(session, process, all_follow)
        assert (blue0(doc)["state"], blue0(doc)["in_flight"]) == ("draining", 1)
        assert not held.done()
        assert held_at.answer_held(answer_ok(Seen())) == 1
        assert (await held) == (200, "raw")
        doc = await until(session, process, lambda d: blue0(d)["state"] == "drained")
        assert blue0(doc)["in_flight"] == 0
        metrics = await (await session.get(process.admin + "/metrics")).text()
        assert f'turnout_upstream_in_flight{{pool="blue",upstream="{held_at.url}"}} 0.0' in metrics


def blue0(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc["pools"]["blue"]["upstreams"][0])


async def plain_get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status, resp.headers.get("X-Upstream", "")


async def test_a_rollout_decides_on_the_outcomes_of_every_worker(
    sample: SampleFactory, turnout_workers: ProcessFactory
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
            assert await get(clients[0], "/fail", green_only) == (500, "green")

        # Worker 0's four failures are in the supervisor's window, judged, and not enough.
        doc = await until(
            session, process, lambda d: " 4 candidate outcomes" in d["rollout"]["reason"]
        )
        assert doc["rollout"]["state"] == "progressing", doc["rollout"]
        assert doc["rollout"]["windows"]["green"]["errors"] == 4
        assert [w["outcomes"]["green"]["errors"] for w in doc["workers"]] == [4, 0]
        for _ in range(4):
            assert await get(clients[1], "/fail", green_only) == (500, "green")
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
            assert await get(client, "/after") == (200, "blue")
            client.close()


async def test_a_killed_worker_is_restarted(
    sample: SampleFactory, turnout_workers: ProcessFactory
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
    leader = supervisor_proxy(config, workers=2)
    leader.control.put_split(12.5)
    leader.control.fence("green was rolled back")
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
    leader = supervisor_proxy(config, workers=2)
    pool = leader.front
    assert isinstance(pool, WorkerPool)
    members = [Member(config, member=f"worker-{i}", workers=2) for i in range(2)]
    state = routing_state(leader, 1, 1, 0.0)
    for member in members:
        member.follow(state)
        # Per-upstream limits are shared out: both workers together stay within them.
        assert member.proxy.settings.max_connections == config.listen.max_connections // 2
        admission = member.proxy.router.pools["blue"][0].admission.snapshot()
        assert admission.max_in_flight == config.limits.max_in_flight // 2
    for i, member in enumerate(members):
        green = member.proxy.router.pools["green"][0]
        for n in range(3 + i):
            member.proxy.record_outcome("green", n == 0, 0.01)
            green.codes[500 if n == 0 else 200] = green.codes.get(500 if n == 0 else 200, 0) + 1
            outcome = "500" if n == 0 else "200"
            green.attempts[outcome] = green.attempts.get(outcome, 0) + 1
        green.admission.try_enter()  # one request in flight in each member
    for member in members:
        report = member.report()
        assert report is not None
        pool.merge(OutcomeReport.from_wire(json.loads(json.dumps(report.to_wire()))))
        assert member.report() is None  # nothing new since
    figures = leader.figures("green")
    assert (figures.requests, figures.errors) == (7, 2)
    green = leader.router.pools["green"][0]
    assert green.codes == {500: 2, 200: 5}
    assert green.attempts == {"500": 2, "200": 5}
    assert green.in_flight == 2
    # A breaker open in one member shows on the leader; a member gone no longer counts.
    members[1].proxy.router.pools["green"][0].breaker._open("test")
    report = members[1].report()
    assert report is not None
    pool.merge(report)
    assert green.breaker_state is BreakerState.OPEN
    assert green.state_name() == "breaker_open"
    assert leader.events.history[-1].kind == "breaker"
    forget_member(leader.router.upstreams(), "worker-1")
    assert green.in_flight == 1
    assert green.state_name() == "up"  # the breaker closed


async def test_members_follow_drains_removals_splits_and_promotions() -> None:
    a, b, g = "http://127.0.0.1:9001", "http://127.0.0.1:9003", "http://127.0.0.1:9002"
    config = parse_config(two_pools([a, b], [g]))
    leader = supervisor_proxy(config, workers=1)
    member = Member(config, member="worker-0")
    leader.control.drain("blue", 0)
    leader.control.put_split(40.0)
    member.follow(routing_state(leader, 1, 1, 0.0))
    blue = member.proxy.router.pools["blue"]
    assert [u.draining for u in blue] == [True, False]
    assert member.proxy.router.candidates["blue"] == (blue[1],)
    assert member.proxy.spreader.split == 40.0
    # The leader drops blue/0 and promotes: the member keeps blue/1 (now index 0) as it was.
    kept = blue[1]
    leader.control.remove_upstream("blue", 0)
    await wait_for(lambda: len(leader.router.pools["blue"]) == 1)
    leader.control.set_stable("green")
    member.follow(routing_state(leader, 2, 1, 0.0))
    assert member.proxy.router.pools["blue"] == (kept,)
    assert kept.index == 0
    assert blue[0] in member.retiring
    assert member.proxy.stable == "green"
    assert member.generation == 2
    # A rollback's fence on the candidate (now blue) reaches the member, and its lifting.
    leader.control.fence("blue was rolled back")
    member.follow(routing_state(leader, 3, 1, 0.0))
    assert (member.proxy.router.fenced, member.proxy.fence_reason) == (
        "blue",
        "blue was rolled back",
    )
    leader.control.fence("")
    member.follow(routing_state(leader, 4, 1, 0.0))
    assert (member.proxy.router.fenced, member.proxy.fence_reason) == (None, "")
    await member.shutdown(timeout=0)
    await leader.control.close()


async def test_members_replace_an_upstream_whose_protocol_changed_and_move_the_rest() -> None:
    """The leader reloads a configuration in which blue speaks h2c and green/0 weighs 3: a
    member replaces blue/0 (the old one finishes what it has in flight) and keeps green/0 with
    its new weight, in a rebuilt routing snapshot."""
    a, g = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
    config = parse_config(two_pools([a], [g]))
    leader = supervisor_proxy(config, workers=1)
    member = Member(config, member="worker-0")
    member.follow(routing_state(leader, 1, 1, 0.0))
    (old_blue,) = member.proxy.router.pools["blue"]
    (green,) = member.proxy.router.pools["green"]
    assert old_blue.mux is None
    data = two_pools([a], [g])
    data["pools"]["blue"]["protocol"] = "h2c"
    data["pools"]["green"]["upstreams"][0]["weight"] = 3
    leader.control.apply_config(parse_config(data))
    before = member.proxy.router
    member.follow(routing_state(leader, 2, 2, 0.0))
    (new_blue,) = member.proxy.router.pools["blue"]
    assert new_blue is not old_blue
    assert new_blue.mux is not None
    assert (new_blue.key, new_blue.url) == ("blue/0", a)
    assert old_blue in member.retiring
    assert old_blue.draining
    assert member.proxy.router.pools["green"] == (green,)
    assert green.weight == 3
    assert member.proxy.router is not before
    assert member.proxy.router.generation > before.generation
    await member.shutdown(timeout=0)
    await leader.control.close()


def test_fewer_than_one_worker_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(two_pools(["http://127.0.0.1:9001"], [])))
    assert main(["run", "-c", str(path), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
