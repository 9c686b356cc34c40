"""Fleet: several Turnout instances follow one split and one rollout through a real etcd.

Every test here starts its own etcd processes (data under /dev/shm, loopback ports, 1 s
leases) and real proxies: in this process on port 0, or `python -m proxy run` processes where
a member must be paused or killed. The figures measured (apply lag, skew) are printed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from conftest import HOST, SampleFactory, proxy_config, wait_for
from helpers.load import Load
from helpers.processes import ADMIN_API, LISTENING, ProxyProcess, admin_get

from proxy.config import parse_config
from proxy.fleet import FleetMember, join
from proxy.fleet.state import FleetState, MemberRecord
from proxy.fleet.store import EtcdStore, StoreError, client_tls
from proxy.runtime import Proxy
from proxy.tools.fleet_demo import fleet_demo

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(
    ETCD is None, reason="the etcd binary is not installed (.ci/run installs etcd-server)"
)
TIMEOUT = 10.0
TTL = "1s"


# etcd ----------------------------------------------------------------------------------------


@dataclass
class Etcd:
    """One etcd process (a cluster member); its data in a directory under /dev/shm."""

    name: str
    client: str
    peer: str
    data: str
    proc: asyncio.subprocess.Process | None = None
    log: Path | None = None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            await self.proc.wait()


def _ports() -> tuple[int, int]:
    # etcd takes no port 0; a clash is caught (etcd exits) and the start retried elsewhere.
    base = random.randrange(20000, 60000, 2)
    return base, base + 1


async def _healthy(url: str, proc: asyncio.subprocess.Process, tls: ssl.SSLContext | None) -> bool:
    deadline = time.monotonic() + 15.0
    connector = aiohttp.TCPConnector(ssl=tls if tls is not None else False)
    async with aiohttp.ClientSession(connector=connector) as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                return False
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with asyncio.timeout(1), session.get(url + "/health") as resp:
                    if resp.status == 200 and '"health":"true"' in await resp.text():
                        return True
            await asyncio.sleep(0.05)
    return False


async def start_cluster(
    size: int, base: Path, tls: tuple[str, ...] = (), checker: ssl.SSLContext | None = None
) -> list[Etcd]:
    """`size` etcd members on loopback, each with its own data directory; `tls`: etcd's
    flags for TLS towards clients (then its client URLs are https, checked with `checker`)."""
    assert ETCD is not None
    scheme = "https" if tls else "http"
    for _ in range(5):
        members = []
        for i in range(size):
            client, peer = _ports()
            members.append(
                Etcd(
                    f"e{i}",
                    f"{scheme}://{HOST}:{client}",
                    f"http://{HOST}:{peer}",
                    tempfile.mkdtemp(dir=base),
                )
            )
        cluster = ",".join(f"{m.name}={m.peer}" for m in members)
        for m in members:
            m.log = Path(m.data) / "etcd.log"
            with m.log.open("wb") as out:
                m.proc = await asyncio.create_subprocess_exec(
                    ETCD,
                    *("--name", m.name, "--data-dir", str(Path(m.data) / "data")),
                    *("--listen-client-urls", m.client, "--advertise-client-urls", m.client),
                    *("--listen-peer-urls", m.peer, "--initial-advertise-peer-urls", m.peer),
                    *("--initial-cluster", cluster, "--initial-cluster-state", "new"),
                    *("--heartbeat-interval", "50", "--election-timeout", "500"),
                    *("--log-level", "warn", "--logger", "zap", *tls),
                    stdout=out,
                    stderr=out,
                )
        try:
            results = await asyncio.gather(
                *(_healthy(m.client, m.proc, checker) for m in members if m.proc is not None)
            )
        except BaseException:
            for m in members:
                await m.stop()
            raise
        if all(results):
            return members
        for m in members:
            await m.stop()
    raise AssertionError("etcd did not start (5 attempts)")


@pytest.fixture
async def etcd_cluster() -> AsyncIterator[Callable[[int], Awaitable[list[Etcd]]]]:
    base = Path(tempfile.mkdtemp(prefix="turnout-fleet-", dir="/dev/shm"))
    started: list[Etcd] = []

    async def make(size: int = 1) -> list[Etcd]:
        members = await start_cluster(size, base)
        started.extend(members)
        return members

    yield make
    for m in started:
        await m.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def etcd(etcd_cluster: Callable[[int], Awaitable[list[Etcd]]]) -> Etcd:
    return (await etcd_cluster(1))[0]


class Forwarder:
    """A TCP forwarder between a member and etcd that a test can cut (a partition: bytes
    stop flowing, connections stay open), heal (the held connections close, new ones flow)
    or break (every connection closes at once)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.server: asyncio.Server | None = None
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, HOST, 0)
        return f"http://{HOST}:{self.server.sockets[0].getsockname()[1]}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            await self.flowing.wait()
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self.writers.discard(writer)
            return
        self.writers.add(up_writer)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self.tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for task in pipes:
            task.cancel()
        for w in (writer, up_writer):
            w.close()
            self.writers.discard(w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()

    def cut(self) -> None:
        self.flowing.clear()

    def drop(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()

    def heal(self) -> None:
        self.drop()
        self.flowing.set()

    async def close(self) -> None:
        self.heal()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def forwarder() -> AsyncIterator[Callable[[str], Awaitable[tuple[Forwarder, str]]]]:
    started: list[Forwarder] = []

    async def make(target: str) -> tuple[Forwarder, str]:
        fwd = Forwarder(target)
        started.append(fwd)
        return fwd, await fwd.start()

    yield make
    for fwd in started:
        await fwd.close()


# the store -----------------------------------------------------------------------------------


async def test_watch_resumes_after_a_broken_connection_without_a_gap(
    etcd: Etcd, forwarder: Callable[[str], Awaitable[tuple[Forwarder, str]]]
) -> None:
    fwd, url = await forwarder(etcd.client)
    direct, watching = EtcdStore([etcd.client]), EtcdStore([url])
    seen: list[int] = []

    async def watch(start: int) -> None:
        async for batch in watching.watch("/w/", prefix=True, start_revision=start):
            assert batch.snapshot is None
            seen.extend(event.kv.mod_revision for event in batch.events)

    try:
        _, revision = await direct.get("/w/", prefix=True)
        task = asyncio.create_task(watch(revision + 1))
        written = [await direct.put(f"/w/{i}", b"x") for i in range(5)]
        await wait_for(lambda: len(seen) == 5, TIMEOUT)
        fwd.drop()  # the watch's connection breaks between two batches
        written += [await direct.put(f"/w/{i}", b"y") for i in range(5, 10)]
        await wait_for(lambda: len(seen) == 10, TIMEOUT)
        assert seen == written
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await direct.close()
        await watching.close()


async def test_watch_from_a_compacted_revision_reads_the_keys_anew(etcd: Etcd) -> None:
    store = EtcdStore([etcd.client])
    try:
        first = await store.put("/c/a", b"1")
        await store.put("/c/b", b"2")
        last = await store.put("/c/a", b"3")
        async with aiohttp.ClientSession() as session:
            body = {"revision": str(last), "physical": True}
            async with session.post(etcd.client + "/v3/kv/compaction", json=body) as resp:
                assert resp.status == 200
        stream = store.watch("/c/", prefix=True, start_revision=first)
        batch = await anext(stream)
        assert batch.snapshot is not None
        assert batch.revision >= last
        assert {kv.key: kv.value for kv in batch.snapshot} == {"/c/a": b"3", "/c/b": b"2"}
        later = await store.put("/c/b", b"4")
        batch = await anext(stream)
        assert [e.kv.mod_revision for e in batch.events] == [later]
        await stream.aclose()
    finally:
        await store.close()


# members -------------------------------------------------------------------------------------


def fleet_config(
    endpoints: list[str], blue: str, green: str, instance: str, **overrides: Any
) -> dict[str, Any]:
    fleet = {"etcd": endpoints, "name": "shop", "instance": instance, "lease_ttl": TTL}
    fleet.update(overrides.pop("fleet", {}))
    data = proxy_config([blue], [green], fleet=fleet, **overrides)
    data["admin"] = {"host": HOST, "port": 0}
    data["health_check"] = {"interval": "200ms", "timeout": "500ms"}
    return data


@dataclass
class Fleet:
    """Proxies in this process, each a fleet member."""

    proxies: list[Proxy] = field(default_factory=list)

    def member(self, proxy: Proxy) -> FleetMember:
        assert isinstance(proxy.fleet, FleetMember)
        return proxy.fleet

    def leader(self) -> Proxy | None:
        leading = [p for p in self.proxies if p.fleet is not None and p.fleet.leading]
        return leading[0] if len(leading) == 1 else None

    def followers(self) -> list[Proxy]:
        return [p for p in self.proxies if p.fleet is not None and not p.fleet.leading]

    def formed(self) -> bool:
        """One leader, every member knows it and applied the fleet's newest state."""
        leader = self.leader()
        if leader is None:
            return False
        revision = self.member(leader).revision
        return revision > 0 and all(
            self.member(p).leader == self.member(leader).instance
            and self.member(p).applied_revision == revision
            and len(self.member(p).members) == len(self.proxies)
            for p in self.proxies
        )


@pytest.fixture
async def fleet_factory() -> AsyncIterator[Callable[..., Awaitable[Fleet]]]:
    fleets: list[Fleet] = []

    async def make(configs: list[dict[str, Any]]) -> Fleet:
        fleet = Fleet()
        fleets.append(fleet)
        for data in configs:
            proxy = Proxy(parse_config(data), rng=random.Random(1))
            await proxy.start_admin()
            await proxy.start()
            fleet.proxies.append(proxy)
            join(proxy)
        await wait_for(fleet.formed, TIMEOUT)
        return fleet

    yield make
    for fleet in fleets:
        for proxy in fleet.proxies:
            await proxy.shutdown(timeout=1.0)


async def admin_call(
    session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    async with asyncio.timeout(TIMEOUT), session.request(method, url, json=body) as resp:
        return resp.status, await resp.json()


def admin_url(proxy: Proxy) -> str:
    return f"http://{HOST}:{proxy.admin_port}"


def split_events(proxy: Proxy, after: float) -> list[float]:
    return [e.time for e in proxy.events.history if e.kind == "split" and e.time >= after]


async def realised_green(url: str, requests: int = 1000) -> float:
    async with Load(url, clients=8, limit=requests) as load:
        await load.until(requests)
    assert not load.failures()
    went = Counter(r.upstream for r in load.done)
    return 100.0 * went["green"] / sum(went.values())


# 1. a shift on one member applies on all ------------------------------------------------------


async def test_shift_on_one_member_applies_on_every_member(
    etcd: Etcd, sample: SampleFactory, fleet_factory: Callable[..., Awaitable[Fleet]]
) -> None:
    blue, green = await sample("blue"), await sample("green")
    fleet = await fleet_factory(
        [fleet_config([etcd.client], blue.url, green.url, f"m{i}") for i in range(3)]
    )
    follower = fleet.followers()[0]
    before = time.time()
    async with aiohttp.ClientSession() as session:
        code, answer = await admin_call(
            session, "PUT", admin_url(follower) + "/split", {"green": 25}
        )
        answered = time.time()
        assert code == 200, answer
        # It answered once the fleet's state held the split and it applied it itself.
        assert follower.spreader.split == 25.0
        await wait_for(lambda: all(p.spreader.split == 25.0 for p in fleet.proxies), 1.0)
        applied = [split_events(p, before)[-1] for p in fleet.proxies]
        print(
            f"\nfleet shift: answered after {answered - before:.3f} s; applied "
            f"{min(applied) - before:.3f}..{max(applied) - before:.3f} s after the command "
            f"(skew {1000 * (max(applied) - min(applied)):.1f} ms)"
        )
        assert max(applied) - before < 1.0
        for proxy in fleet.proxies:
            share = await realised_green(f"http://{HOST}:{proxy.port}")
            assert abs(share - 25.0) <= 1.5, (proxy.fleet, share)
        # The state says who wrote it, with revisions every member reports.
        _, status = await admin_call(session, "GET", admin_url(follower) + "/status")
    fleet_status = status["fleet"]
    leader = fleet.leader()
    assert leader is not None
    assert fleet_status["leader"] == fleet.member(leader).instance
    assert fleet_status["connected"] is True
    assert {m["instance"] for m in fleet_status["members"]} == {"m0", "m1", "m2"}
    assert status["split"]["green"] == 25.0


# 2. a failing green is rolled back fleet-wide --------------------------------------------------


@pytest.mark.parametrize("failing", ["every", "one"])
async def test_green_failing_behind_members_rolls_the_fleet_back(
    failing: str,
    etcd: Etcd,
    sample: SampleFactory,
    fleet_factory: Callable[..., Awaitable[Fleet]],
) -> None:
    blue = await sample("blue")
    # 503: an answer the proxy retries on the stable pool, so clients see none of them.
    greens = [await sample("green", error_status=503) for _ in range(3)]
    # A failing green's breaker opens after 5 failures, and then lets 3 trials through per
    # `open_for`. Should a leader change right then (1 s leases on a busy machine), the new
    # leader judges the step afresh and needs those trials: 500 ms instead of 5 s keeps them
    # within the bound below.
    breaker = {"open_for": "500ms"}
    fleet = await fleet_factory(
        [
            fleet_config([etcd.client], blue.url, g.url, f"m{i}", rollout=ROLLOUT, breaker=breaker)
            for i, g in enumerate(greens)
        ]
    )
    loads = [Load(f"http://{HOST}:{p.port}", clients=3, limit=200_000) for p in fleet.proxies]
    for load in loads:
        await load.__aenter__()
    try:
        async with aiohttp.ClientSession() as session:
            code, answer = await admin_call(
                session, "POST", admin_url(fleet.proxies[0]) + "/rollout/start"
            )
        assert code == 200, answer
        await wait_for(lambda: all(p.spreader.split == 10.0 for p in fleet.proxies), TIMEOUT)
        await asyncio.gather(*(load.more(100) for load in loads))
        if failing == "every":
            broken = greens
        else:
            # Behind one member that does not lead: the leader sees it only in the fleet's
            # published outcomes.
            follower = fleet.followers()[0]
            broken = [greens[fleet.proxies.index(follower)]]
        failed_at = time.time()
        for green in broken:
            green.settings.error_rate = 1.0
        await wait_for(lambda: all(p.spreader.split == 0.0 for p in fleet.proxies), TIMEOUT)
        applied = [split_events(p, failed_at)[-1] for p in fleet.proxies]
        leader = fleet.leader()
        assert leader is not None
        state = leader.rollout.state.value
        print(
            f"\nfleet rollback ({failing} failing): split 0 everywhere "
            f"{max(applied) - failed_at:.3f} s after green started failing"
        )
        leads = [
            (e.data["instance"], round(e.time - failed_at, 3))
            for p in fleet.proxies
            for e in p.events.history
            if e.kind in ("fleet_leading", "fleet_stood_down")
        ]
        assert max(applied) - failed_at < 2.0, (leads, leader.rollout.reason)
        assert state == "rolled_back"
        await asyncio.gather(*(load.more(50) for load in loads))
    finally:
        for load in loads:
            await load.finish()
    failures = [f for load in loads for f in load.failures()]
    assert not failures, failures[:5]
    assert all(p.status()["rollout"]["state"] == "rolled_back" for p in fleet.proxies)
    for proxy in fleet.followers():
        seen = [e.data["state"] for e in proxy.events.history if e.kind == "fleet_rollout"]
        assert seen[-1] == "rolled_back", seen
        assert "progressing" in seen, seen
    # Every member fences the rolled-back candidate from failover traffic, as the leader does.
    assert all(p.router.fenced == "green" for p in fleet.proxies)


# members as processes ------------------------------------------------------------------------


@pytest.fixture
async def turnout_fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[list[ProxyProcess]]]]:
    """`python -m proxy run -c FILE` per member, each with its own file and log."""
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    started: list[ProxyProcess] = []

    async def start(
        configs: list[dict[str, Any]], workers: tuple[int, ...] = ()
    ) -> list[ProxyProcess]:
        processes = []
        for i, data in enumerate(configs):
            extra = ("--workers", str(workers[i])) if i < len(workers) else ()
            path = tmp_path / f"turnout-{i}.yaml"
            path.write_text(yaml.safe_dump(data))
            log = tmp_path / f"turnout-{i}.log"
            with log.open("wb") as stderr:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "proxy", "run", "-c", str(path), *extra),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=stderr,
                )
            process = ProxyProcess(proc, log)
            started.append(process)
            processes.append(process)
        for process in processes:
            process.port = int((await process.wait_line(LISTENING))[2])
            process.admin_port = int((await process.wait_line(ADMIN_API))[2])
        return processes

    yield start
    for process in started:
        if process.alive:
            with contextlib.suppress(ProcessLookupError):
                process.signal(signal.SIGCONT)
                process.signal(signal.SIGTERM)
            try:
                await process.exit_code(TIMEOUT)
            except TimeoutError:
                process.proc.kill()
        await process.proc.wait()
        await process._reader


async def fleet_status(session: aiohttp.ClientSession, process: ProxyProcess) -> dict[str, Any]:
    code, doc = await admin_get(session, process.admin + "/status")
    assert code == 200, doc
    return dict(doc)


async def until_status(
    session: aiohttp.ClientSession,
    processes: list[ProxyProcess],
    predicate: Callable[[list[dict[str, Any]]], bool],
    timeout: float = TIMEOUT,
) -> list[dict[str, Any]]:
    """Poll every process's /status until `predicate` holds for them all together."""
    async with asyncio.timeout(timeout):
        while True:
            docs = [await fleet_status(session, p) for p in processes]
            if predicate(docs):
                return docs
            await asyncio.sleep(0.02)


def one_leader(docs: list[dict[str, Any]]) -> str | None:
    """The leader every document names, when they agree and it says it leads."""
    leaders = {d["fleet"]["leader"] for d in docs}
    leading = [d["fleet"]["instance"] for d in docs if d["fleet"]["leading"]]
    if len(leaders) == 1 and leading == list(leaders):
        return str(leading[0])
    return None


def same_revision(docs: list[dict[str, Any]]) -> bool:
    revisions = {d["fleet"]["revision"] for d in docs}
    return len(revisions) == 1 and revisions != {0}


async def test_a_supervisor_with_workers_is_its_host_s_one_member(
    etcd: Etcd,
    sample: SampleFactory,
    turnout_fleet: Callable[..., Awaitable[list[ProxyProcess]]],
    session: aiohttp.ClientSession,
) -> None:
    blue, green = await sample("blue"), await sample("green")
    configs = [fleet_config([etcd.client], blue.url, green.url, f"p{i}") for i in range(2)]
    processes = await turnout_fleet(configs, (1, 2))
    docs = await until_status(
        session,
        processes,
        lambda docs: (
            one_leader(docs) is not None
            and same_revision(docs)
            and all(len(d["fleet"]["members"]) == 2 for d in docs)
        ),
    )
    assert len(docs[1]["workers"]) == 2
    code, answer = await admin_call(session, "PUT", processes[0].admin + "/split", {"green": 25})
    assert code == 200, answer
    await until_status(
        session, processes, lambda docs: all(d["split"]["green"] == 25.0 for d in docs)
    )
    share = await realised_green(processes[1].url)
    assert abs(share - 25.0) <= 1.5, share


ROLLOUT = {"strategy": "adaptive", "steps": [10, 50, 100], "interval": "60s"}


async def process_fleet(
    etcd: Etcd,
    sample: SampleFactory,
    turnout_fleet: Callable[..., Awaitable[list[ProxyProcess]]],
    session: aiohttp.ClientSession,
    size: int = 3,
) -> tuple[list[ProxyProcess], list[dict[str, Any]]]:
    blue, green = await sample("blue"), await sample("green")
    processes = await turnout_fleet(
        [
            fleet_config([etcd.client], blue.url, green.url, f"p{i}", rollout=ROLLOUT)
            for i in range(size)
        ]
    )
    docs = await until_status(
        session,
        processes,
        lambda docs: (
            one_leader(docs) is not None
            and same_revision(docs)
            and all(len(d["fleet"]["members"]) == size for d in docs)
        ),
    )
    return processes, docs


def by_instance(processes: list[ProxyProcess], docs: list[dict[str, Any]], name: str) -> int:
    return next(i for i, d in enumerate(docs) if d["fleet"]["instance"] == name)


# 3. the leader dies mid-rollout ---------------------------------------------------------------


async def test_killed_leader_is_replaced_and_the_rollout_holds_its_step(
    etcd: Etcd,
    sample: SampleFactory,
    turnout_fleet: Callable[..., Awaitable[list[ProxyProcess]]],
    session: aiohttp.ClientSession,
) -> None:
    processes, docs = await process_fleet(etcd, sample, turnout_fleet, session)
    follower = next(p for p, d in zip(processes, docs, strict=True) if not d["fleet"]["leading"])
    code, answer = await admin_call(
        session, "POST", follower.admin + "/rollout/start", {"strategy": "adaptive"}
    )
    assert code == 200, answer
    docs = await until_status(
        session,
        processes,
        lambda docs: (
            same_revision(docs)
            and all(d["rollout"]["step"] == 1 and d["split"]["green"] == 10.0 for d in docs)
        ),
    )
    old = one_leader(docs)
    assert old is not None
    before = docs[0]["fleet"]["revision"]
    async with session.get(follower.admin + "/metrics") as resp:
        metrics = await resp.text()
    # The fleet's rollout (judged, or waiting for outcomes), not this member's idle one.
    assert 'turnout_rollout_state{state="idle"} 0.0' in metrics
    for line in (
        "turnout_rollout_step 1.0",
        "turnout_fleet_is_leader 0.0",
        "turnout_fleet_connected 1.0",
        "turnout_fleet_members 3.0",
        f"turnout_fleet_revision {float(before)}",
    ):
        assert line in metrics, line
    victim = processes[by_instance(processes, docs, old)]
    rest = [p for p in processes if p is not victim]
    victim.signal(signal.SIGKILL)
    killed = time.monotonic()
    docs = await until_status(
        session, rest, lambda docs: one_leader(docs) not in (None, old), timeout=TIMEOUT
    )
    took = time.monotonic() - killed
    new = one_leader(docs)
    print(f"\nfleet failover: {new} leads {took:.3f} s after {old} was killed (lease 1 s)")
    assert took < 5.0
    # The step is held, judged afresh by the new leader, not advanced on the old one's figures.
    assert all(d["rollout"]["step"] == 1 and d["split"]["green"] == 10.0 for d in docs)
    assert all(d["rollout"]["state"] in ("progressing", "insufficient_data") for d in docs)
    # The new leader's decisions are new revisions every member applies.
    code, answer = await admin_call(session, "POST", rest[0].admin + "/rollout/pause")
    assert code == 200, answer
    docs = await until_status(
        session,
        rest,
        lambda docs: same_revision(docs) and all(d["rollout"]["state"] == "paused" for d in docs),
    )
    assert docs[0]["fleet"]["revision"] > before
    assert all(d["split"]["green"] == 10.0 for d in docs)


# 4. a paused leader's write is refused ---------------------------------------------------------


async def test_paused_leader_is_fenced_by_etcd(
    etcd: Etcd,
    sample: SampleFactory,
    turnout_fleet: Callable[..., Awaitable[list[ProxyProcess]]],
    session: aiohttp.ClientSession,
) -> None:
    processes, docs = await process_fleet(etcd, sample, turnout_fleet, session)
    old = one_leader(docs)
    assert old is not None
    victim = processes[by_instance(processes, docs, old)]
    rest = [p for p in processes if p is not victim]
    victim.signal(signal.SIGSTOP)
    docs = await until_status(session, rest, lambda docs: one_leader(docs) not in (None, old))
    new = one_leader(docs)
    code, answer = await admin_call(session, "PUT", rest[0].admin + "/split", {"green": 30})
    assert code == 200, answer
    store = EtcdStore([etcd.client])
    try:
        kvs, _ = await store.get("/turnout/shop/state")
        state_before = kvs[0]
        victim.signal(signal.SIGCONT)
        every = [*rest, victim]
        docs = await until_status(
            session,
            every,
            lambda docs: (
                one_leader(docs) == new
                and same_revision(docs)
                and len(docs[0]["fleet"]["members"]) == 3
            ),
        )
        old_doc = docs[-1]
        assert old_doc["fleet"]["fenced_writes"] == 1
        assert old_doc["split"]["green"] == 30.0
        async with session.get(victim.admin + "/metrics") as resp:
            metrics = await resp.text()
        assert "turnout_fleet_fenced_writes_total 1.0" in metrics
        assert "turnout_fleet_is_leader 0.0" in metrics
        # The state is the new leader's, untouched by the old one.
        kvs, _ = await store.get("/turnout/shop/state")
        assert kvs[0].mod_revision == state_before.mod_revision
        assert FleetState.decode(kvs[0].value).writer == new
    finally:
        await store.close()
    assert "event fleet_fenced" in victim.log.read_text()


# 5. etcd stops under load ---------------------------------------------------------------------


async def test_etcd_paused_under_load_fails_no_request_and_nobody_advances(
    etcd: Etcd, sample: SampleFactory, fleet_factory: Callable[..., Awaitable[Fleet]]
) -> None:
    blue, green = await sample("blue"), await sample("green")
    rollout = ROLLOUT | {"interval": "1s", "threshold": {"min_requests": 20}}
    fleet = await fleet_factory(
        [
            fleet_config([etcd.client], blue.url, green.url, f"m{i}", rollout=rollout)
            for i in range(3)
        ]
    )
    loads = [Load(f"http://{HOST}:{p.port}", clients=3, limit=200_000) for p in fleet.proxies]
    for load in loads:
        await load.__aenter__()
    try:
        async with aiohttp.ClientSession() as session:
            code, answer = await admin_call(
                session, "POST", admin_url(fleet.followers()[0]) + "/rollout/start"
            )
        assert code == 200, answer
        await wait_for(lambda: all(p.spreader.split == 10.0 for p in fleet.proxies), TIMEOUT)
        etcd.signal(signal.SIGSTOP)
        stopped = time.time()
        try:
            await wait_for(
                lambda: all(p.fleet is not None and not p.fleet.connected for p in fleet.proxies),
                TIMEOUT,
            )
            served = [len(load.done) for load in loads]
            async with aiohttp.ClientSession() as session:
                for proxy in fleet.proxies:
                    code, answer = await admin_call(
                        session, "POST", admin_url(proxy) + "/rollout/pause"
                    )
                    assert (code, answer["error"]) == (503, "no fleet leader"), answer
            await asyncio.sleep(2.0)  # etcd stays away past two lease periods, under load
            assert all(len(load.done) > n for load, n in zip(loads, served, strict=True))
            assert all(p.spreader.split == 10.0 for p in fleet.proxies)
            assert not any(p.fleet is not None and p.fleet.leading for p in fleet.proxies)
        finally:
            etcd.signal(signal.SIGCONT)
        resumed = time.time()
        moved = [split_events(p, stopped) for p in fleet.proxies]
        assert all(t >= resumed for times in moved for t in times), moved
        # The fleet comes back on the stored state and the rollout goes on from its step.
        await wait_for(fleet.formed, TIMEOUT)
        await wait_for(lambda: all(p.spreader.split >= 50.0 for p in fleet.proxies), TIMEOUT)
    finally:
        for load in loads:
            await load.finish()
    failures = [f for load in loads for f in load.failures()]
    assert not failures, failures[:5]
    print(f"\nfleet: {sum(len(load.done) for load in loads)} requests, etcd paused 2 s+, 0 failed")


# 6. a member cut off from etcd -----------------------------------------------------------------


async def test_cut_off_member_rolls_back_locally_and_says_so_when_back(
    etcd: Etcd,
    sample: SampleFactory,
    fleet_factory: Callable[..., Awaitable[Fleet]],
    forwarder: Callable[[str], Awaitable[tuple[Forwarder, str]]],
) -> None:
    fwd, through = await forwarder(etcd.client)
    blue = await sample("blue")
    greens = [await sample("green", error_status=503) for _ in range(3)]
    endpoints = [[etcd.client], [etcd.client], [through]]
    fleet = await fleet_factory(
        [
            fleet_config(endpoints[i], blue.url, g.url, f"m{i}", rollout=ROLLOUT)
            for i, g in enumerate(greens)
        ]
    )
    cut_off = fleet.proxies[2]
    member = fleet.member(cut_off)
    assert not member.leading
    loads = [Load(f"http://{HOST}:{p.port}", clients=3, limit=200_000) for p in fleet.proxies]
    for load in loads:
        await load.__aenter__()
    try:
        async with aiohttp.ClientSession() as session:
            code, answer = await admin_call(
                session, "POST", admin_url(fleet.proxies[0]) + "/rollout/start"
            )
            assert code == 200, answer
            await wait_for(lambda: all(p.spreader.split == 10.0 for p in fleet.proxies), TIMEOUT)
            fwd.cut()
            await wait_for(lambda: not member.connected, TIMEOUT)
            # Cut off, it neither moves toward the candidate nor takes commands.
            code, answer = await admin_call(session, "POST", admin_url(cut_off) + "/rollout/pause")
            assert code == 503, answer
            assert answer["error"] == "no fleet leader"
            greens[2].settings.error_rate = 1.0
            await wait_for(lambda: cut_off.spreader.split == 0.0, TIMEOUT)
            override = member.partition.override
            assert override is not None
            assert override["in_force"] is True
            # The others saw nothing wrong: they follow their leader.
            assert [p.spreader.split for p in fleet.proxies[:2]] == [10.0, 10.0]
            await loads[2].more(50)
            fwd.heal()
            await wait_for(lambda: member.connected, TIMEOUT)
            leader = fleet.proxies[0]
            _, status = await admin_call(session, "GET", admin_url(cut_off) + "/status")
            assert status["fleet"]["override"]["split"] == 0.0
            assert "local rollback" in status["fleet"]["override"]["reason"]

            def reported() -> bool:
                assert leader.fleet is not None
                view = {m["instance"]: m for m in leader.fleet.status()["members"]}
                return bool((view.get("m2") or {}).get("override"))

            await wait_for(reported, TIMEOUT)
            assert cut_off.spreader.split == 0.0
            # A newer fleet state that decides no other split keeps the local rollback...
            code, answer = await admin_call(session, "POST", admin_url(leader) + "/rollout/pause")
            assert code == 200, answer
            revision = fleet.member(leader).revision
            await wait_for(lambda: member.applied_revision == revision, TIMEOUT)
            assert [p.spreader.split for p in fleet.proxies] == [10.0, 10.0, 0.0]
            # ...and the fleet's next decision supersedes it.
            code, answer = await admin_call(
                session, "POST", admin_url(leader) + "/rollout/rollback"
            )
            assert code == 200, answer
            await wait_for(lambda: all(p.spreader.split == 0.0 for p in fleet.proxies), TIMEOUT)
            await wait_for(
                lambda: (member.partition.override or {}).get("in_force") is False, TIMEOUT
            )
    finally:
        for load in loads:
            await load.finish()
    failures = [f for load in loads for f in load.failures()]
    assert not failures, failures[:5]


# 7. the etcd member that leads Raft dies -------------------------------------------------------


async def raft_leader(members: list[Etcd]) -> Etcd:
    async with aiohttp.ClientSession() as session:
        for m in members:
            async with session.post(m.client + "/v3/maintenance/status", json={}) as resp:
                doc = await resp.json()
            if doc.get("leader") == doc["header"]["member_id"]:
                return m
    raise AssertionError("no etcd member leads")


async def test_etcd_raft_leader_killed_loses_no_decision(
    etcd_cluster: Callable[[int], Awaitable[list[Etcd]]],
    sample: SampleFactory,
    fleet_factory: Callable[..., Awaitable[Fleet]],
) -> None:
    members = await etcd_cluster(3)
    endpoints = [m.client for m in members]
    blue, green = await sample("blue"), await sample("green")
    fleet = await fleet_factory(
        [fleet_config(endpoints, blue.url, green.url, f"m{i}") for i in range(3)]
    )
    follower = admin_url(fleet.followers()[0])
    async with aiohttp.ClientSession() as session:
        code, answer = await admin_call(session, "PUT", follower + "/split", {"green": 25})
        assert code == 200, answer
        revision = fleet.member(fleet.proxies[0]).revision
        (await raft_leader(members)).signal(signal.SIGKILL)
        killed = time.monotonic()
        code, answer = await admin_call(session, "PUT", follower + "/split", {"green": 40})
        # Taken while etcd elects a new Raft leader, or refused clearly (503) and taken after.
        while code == 503:
            code, answer = await admin_call(session, "PUT", follower + "/split", {"green": 40})
        stall = time.monotonic() - killed
        assert code == 200, answer
    await wait_for(lambda: all(p.spreader.split == 40.0 for p in fleet.proxies), TIMEOUT)
    await wait_for(fleet.formed, TIMEOUT)
    print(f"\nfleet: etcd Raft leader killed; the next shift answered after {stall:.3f} s")
    for proxy in fleet.proxies:
        member = fleet.member(proxy)
        assert member.revision > revision
        # Every decision reached every member, in order.
        splits = [e.data["after"] for e in proxy.events.history if e.kind == "split"]
        assert splits[-2:] == [25.0, 40.0], splits


# turnout demo --fleet ------------------------------------------------------------------------


async def test_fleet_demo_rolls_three_members_back_together() -> None:
    lines: list[str] = []
    summary = await fleet_demo(3, True, 6.0, lines.append)
    assert summary.ok, "\n".join(lines)
    assert summary.final_state == "rolled_back"
    assert summary.failed == 0
    assert "every member's split: i1 0%, i2 0%, i3 0%" in lines
    assert any("which does not lead" in line for line in lines)


# coverage ------------------------------------------------------------------------------------


async def test_leader_holds_the_rollout_while_too_few_members_report(
    etcd: Etcd, sample: SampleFactory, fleet_factory: Callable[..., Awaitable[Fleet]]
) -> None:
    blue, green = await sample("blue"), await sample("green")
    rollout = ROLLOUT | {"interval": "500ms", "threshold": {"min_requests": 10}}
    fleet = await fleet_factory(
        [fleet_config([etcd.client], blue.url, green.url, "m0", rollout=rollout)]
    )
    proxy = fleet.proxies[0]
    member = fleet.member(proxy)
    # Two live members that publish no outcomes (e.g. an older version, or a stuck one).
    store = EtcdStore([etcd.client])
    leases = [await store.grant(5) for _ in range(2)]
    for i, lease in enumerate(leases):
        record = MemberRecord(f"silent{i}", "http://127.0.0.1:1", 0).encode()
        await store.put(f"/turnout/shop/members/silent{i}", record, lease=lease)
    try:
        await wait_for(lambda: len(member.members) == 3, TIMEOUT)
        async with Load(f"http://{HOST}:{proxy.port}", clients=3, limit=200_000) as load:
            await proxy.rollout_action("start", {}, "test")
            await wait_for(lambda: proxy.rollout.state.value == "insufficient_data", TIMEOUT)
            assert "fleet coverage 33%" in proxy.rollout.reason
            await load.more(200)
            assert proxy.rollout.state.value == "insufficient_data"
            assert proxy.spreader.split == 10.0
            for lease in leases:
                await store.revoke(lease)
            # Every live member reports again: the rollout goes on.
            await wait_for(lambda: proxy.spreader.split >= 50.0, TIMEOUT)
        assert not load.failures()
    finally:
        await store.close()


async def test_promotion_takes_effect_at_the_same_instant_on_every_member(
    etcd: Etcd, sample: SampleFactory, fleet_factory: Callable[..., Awaitable[Fleet]]
) -> None:
    blue, green = await sample("blue"), await sample("green")
    rollout = {"steps": [50, 100], "interval": "60s"}
    fleet = await fleet_factory(
        [
            fleet_config([etcd.client], blue.url, green.url, f"m{i}", rollout=rollout)
            for i in range(3)
        ]
    )
    follower = admin_url(fleet.followers()[0])
    async with aiohttp.ClientSession() as session:
        code, answer = await admin_call(session, "POST", follower + "/rollout/start")
        assert code == 200, answer
        await wait_for(lambda: all(p.spreader.split == 50.0 for p in fleet.proxies), TIMEOUT)
        began = time.time()
        # The leader flips its stable pool and decides split 100 in one step.
        code, answer = await admin_call(session, "POST", follower + "/rollout/promote")
        assert code == 200, answer
    await wait_for(lambda: all(p.spreader.split == 100.0 for p in fleet.proxies), TIMEOUT)
    assert all(p.stable == "green" for p in fleet.proxies)
    promoted = [split_events(p, began)[-1] for p in fleet.proxies]
    # It moved with the others, at effective_at, not 300 ms ahead of them.
    skew = max(promoted) - min(promoted)
    print(f"\nfleet promotion: skew between members {skew * 1000:.1f} ms")
    assert skew < 0.15


# TLS towards etcd ---------------------------------------------------------------------------


async def test_members_reach_etcd_over_mutual_tls(
    tmp_path: Path, sample: SampleFactory, fleet_factory: Callable[..., Awaitable[Fleet]]
) -> None:
    ca = trustme.CA()
    server = ca.issue_cert(HOST)
    client = ca.issue_cert("turnout")
    paths = {
        name: str(tmp_path / f"{name}.pem")
        for name in ("ca", "server_cert", "server_key", "client_cert", "client_key")
    }
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["server_cert"])
    server.private_key_pem.write_to_path(paths["server_key"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    base = Path(tempfile.mkdtemp(prefix="turnout-fleet-", dir="/dev/shm"))
    flags = (
        *("--cert-file", paths["server_cert"], "--key-file", paths["server_key"]),
        *("--trusted-ca-file", paths["ca"], "--client-cert-auth"),
    )
    context = client_tls(paths["ca"], paths["client_cert"], paths["client_key"])
    (etcd,) = await start_cluster(1, base, flags, context)
    try:
        blue, green = await sample("blue"), await sample("green")
        tls = {"ca": paths["ca"], "cert": paths["client_cert"], "key": paths["client_key"]}
        fleet = await fleet_factory(
            [
                fleet_config([etcd.client], blue.url, green.url, f"m{i}", fleet={"tls": tls})
                for i in range(2)
            ]
        )
        async with aiohttp.ClientSession() as session:
            code, answer = await admin_call(
                session, "PUT", admin_url(fleet.followers()[0]) + "/split", {"green": 40}
            )
        assert code == 200, answer
        assert all(p.spreader.split == 40.0 for p in fleet.proxies)
        # Without the client certificate etcd refuses the connection.
        store = EtcdStore([etcd.client], tls=client_tls(paths["ca"], None, None))
        with pytest.raises(StoreError):
            await store.get("/turnout/shop/state")
        await store.close()
    finally:
        await etcd.stop()
        shutil.rmtree(base, ignore_errors=True)
