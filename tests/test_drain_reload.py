"""Split changes, ramps, drains, upstream removal and addition, and reloads under steady load:
not one failed client request, and every request goes where the routing state says."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import ProxyFactory, Sample, SampleFactory, proxy_config, wait_for
from helpers.admin import ADMIN, Admin, start_admin_stack
from helpers.load import Load

from proxy.config import load_config
from proxy.http.upstream import Upstream
from proxy.runtime import Proxy

TIMEOUT = 10.0


@pytest.fixture
async def admin_factory(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> Callable[..., Awaitable[Admin]]:
    async def make(blues: int = 1, greens: int = 1, **overrides: Any) -> Admin:
        return await start_admin_stack(sample, make_proxy, session, blues, greens, **overrides)

    return make


AdminFactory = Callable[..., Awaitable[Admin]]


@dataclass
class FileProxy:
    """A proxy built from a YAML file (so that it can reload it), with its admin API."""

    admin: Admin
    path: Path

    def write(self, data: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(data))


@pytest.fixture
async def file_proxy(
    tmp_path: Path, session: aiohttp.ClientSession
) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[FileProxy]]]:
    proxies: list[Proxy] = []

    async def make(data: dict[str, Any]) -> FileProxy:
        path = tmp_path / "turnout.yaml"
        path.write_text(yaml.safe_dump({"admin": ADMIN, **data}))
        proxy = Proxy(load_config(path), config_path=str(path), rng=random.Random(1))
        proxies.append(proxy)
        await proxy.start()
        await proxy.start_admin()
        return FileProxy(Admin(proxy, session, [], []), path)

    yield make
    for proxy in proxies:
        await proxy.shutdown(timeout=1.0)


def upstream(proxy: Proxy, key: str) -> Upstream:
    pool, _, index = key.partition("/")
    assert pool in ("blue", "green")
    return proxy.router.pools["blue" if pool == "blue" else "green"][int(index)]


def events(proxy: Proxy, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in proxy.events.history if e.kind == kind]


async def hold_on(admin: Admin, key: str, path: str = "/delay/1000") -> list[asyncio.Task[Any]]:
    """Start slow requests until one of them is in flight on upstream `key` (call it while
    nothing else is in flight)."""
    target = upstream(admin.proxy, key)
    held: list[asyncio.Task[Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while not target.in_flight:
            held.append(asyncio.create_task(admin.get(path)))
            await wait_for(lambda: admin.proxy.in_flight >= len(held) or target.in_flight > 0)
    return held


# --- split changes ------------------------------------------------------------------------------


async def test_split_change_under_load(admin_factory: AdminFactory) -> None:
    admin = await admin_factory()
    async with Load(admin.proxy_url) as load:
        await load.until(150)
        before = len(load.done)
        await admin.ok("PUT", "/split", {"green": 50})
        half = load.started
        await load.more(400)
        halved = len(load.done)
        await admin.ok("PUT", "/split", {"green": 0})
        back = load.started
        await load.more(150)
    assert load.failures() == []
    assert load.went(done=before) == {"blue0": before}
    shares = load.went(first=half, done=halved)
    assert set(shares) == {"blue0", "green0"}
    assert abs(shares["green0"] / shares.total() - 0.5) < 0.04, shares
    assert load.went(first=back) == {"blue0": load.started - back}
    # Green gets nothing now: it keeps no connections once its requests ended.
    green = upstream(admin.proxy, "green/0")
    await wait_for(lambda: not green.connections)
    assert green.snapshot().idle_connections == 0
    assert [(e["before"], e["after"]) for e in events(admin.proxy, "split")] == [
        (0.0, 50.0),
        (50.0, 0.0),
    ]


async def test_ramp_under_load(admin_factory: AdminFactory) -> None:
    admin = await admin_factory()
    async with Load(admin.proxy_url) as load:
        await load.until(100)
        before = len(load.done)
        answer = await admin.ok("PUT", "/split", {"green": 100, "over": "800ms"})
        assert answer["split"] == {"green": 100.0, "over": 0.8}
        start = load.started
        ramp = (await admin.status())["ramp"]
        assert ramp["target"] == 100.0
        assert 0.0 <= ramp["remaining"] <= 0.8
        await wait_for(lambda: admin.proxy.control.ramp_status() is None, TIMEOUT)
        end = load.started
        await load.more(150)
    assert load.failures() == []
    assert load.went(done=before) == {"blue0": before}
    during = [r.upstream for r in load.done if start <= r.seq < end]
    assert len(during) > 40
    first, second = during[: len(during) // 2], during[len(during) // 2 :]
    # The share of green rises as the ramp goes on.
    assert first.count("green0") < second.count("green0")
    assert first.count("blue0") > second.count("blue0") > 0
    assert load.went(first=end) == {"green0": load.started - end}
    status = await admin.status()
    assert (status["split"], status["ramp"]) == ({"green": 100.0, "blue": 0.0}, None)
    (ramp,) = events(admin.proxy, "ramp")
    assert (ramp["start"], ramp["target"], ramp["over"]) == (0.0, 100.0, 0.8)
    (done,) = events(admin.proxy, "split")
    assert (done["before"], done["after"]) == (0.0, 100.0)
    blue = upstream(admin.proxy, "blue/0")
    await wait_for(lambda: not blue.connections)


async def test_a_pool_at_split_0_keeps_no_busy_connections_past_drain_timeout(
    admin_factory: AdminFactory,
) -> None:
    admin = await admin_factory(split=100, drain={"timeout": "300ms"})
    green = upstream(admin.proxy, "green/0")
    blue = upstream(admin.proxy, "blue/0")
    loop = asyncio.get_running_loop()
    stuck = asyncio.create_task(admin.get("/delay/800"))
    await wait_for(lambda: green.in_flight == 1)
    await admin.ok("PUT", "/split", {"green": 0})
    changed = loop.time()
    assert green.snapshot().idle_connections == 0
    # A tester's request forced onto green after the change is not the change's to end.
    forced = asyncio.create_task(admin.get("/delay/900", **{"X-Turnout-Pool": "green"}))
    await wait_for(lambda: green.in_flight == 2)
    # At drain.timeout the stuck request's upstream connection is cut; being an idempotent
    # request whose answer had not started, it is retried on blue, so the client still gets
    # its answer.
    await wait_for(lambda: blue.in_flight == 1, TIMEOUT)
    assert 0.25 < loop.time() - changed < 2.0
    assert green.in_flight == 1
    resp = await stuck
    assert (resp.status, resp.headers["X-Upstream"]) == (200, "blue0")
    resp = await forced
    assert (resp.status, resp.headers["X-Upstream"]) == (200, "green0")
    assert green.in_flight == 0
    assert (await admin.get("/after")).headers["X-Upstream"] == "blue0"
    m = await admin.metrics()
    assert m.value("turnout_retries_total", pool="green", reason="reset") == 1.0


# --- drains -------------------------------------------------------------------------------------


async def test_drain_and_undrain_under_load(admin_factory: AdminFactory) -> None:
    admin = await admin_factory(blues=2)
    proxy = admin.proxy
    blue1 = upstream(proxy, "blue/1")
    held = await hold_on(admin, "blue/1")
    async with Load(admin.proxy_url) as load:
        await load.until(100)
        assert not any(task.done() for task in held)
        before = len(load.done)
        answer = await admin.ok("POST", "/pools/blue/upstreams/1/drain")
        drained_at = load.started
        assert answer["draining"] is True
        # Idle pooled connections to it are closed at once; the busy one stays.
        assert blue1.snapshot().idle_connections == 0
        assert blue1.in_flight >= 1
        assert blue1.connections
        status = (await admin.status())["pools"]["blue"]["upstreams"][1]
        assert status | {"draining": True, "drained": False, "state": "draining"} == status
        await load.more(200)
        # The requests in flight on it finish normally.
        assert all(r.status == 200 for r in await asyncio.gather(*held))
        await wait_for(lambda: blue1.drained)
        assert not blue1.connections
        status = (await admin.status())["pools"]["blue"]["upstreams"][1]
        assert status | {"draining": True, "drained": True, "state": "drained"} == status
        assert status["in_flight"] == 0
        (drained,) = events(proxy, "drained")
        assert (drained["upstream"], drained["cut_requests"]) == ("blue/1", 0)
        await load.more(100)
        undraining = len(load.done)
        answer = await admin.ok("POST", "/pools/blue/upstreams/1/undrain")
        assert answer["draining"] is False
        undrained_at = load.started
        await load.more(200)
    assert load.failures() == []
    assert set(load.went(done=before)) == {"blue0", "blue1"}
    between = load.went(first=drained_at, done=undraining)
    assert set(between) == {"blue0"}
    assert between.total() > 100
    after = load.went(first=undrained_at)
    assert after["blue1"] > after.total() / 4, after
    assert "green0" not in load.went()
    assert [e["upstream"] for e in events(proxy, "undrain")] == ["blue/1"]
    assert not blue1.draining
    assert not blue1.drained


async def test_delete_drains_then_removes_under_load(admin_factory: AdminFactory) -> None:
    admin = await admin_factory(blues=2)
    proxy = admin.proxy
    blue0 = upstream(proxy, "blue/0")
    held = await hold_on(admin, "blue/0")
    async with Load(admin.proxy_url) as load:
        await load.until(100)
        assert not any(task.done() for task in held)
        before = len(load.done)
        status, answer = await admin.call("DELETE", "/pools/blue/upstreams/0")
        assert status == 202
        assert answer == {"removing": {"url": admin.blue[0].url}, "what": "remove blue/0"}
        deleted_at = load.started
        # Still listed (draining) while its request is in flight.
        assert (await admin.status())["pools"]["blue"]["upstreams"][0]["draining"] is True
        await load.more(200)
        assert all(r.status == 200 for r in await asyncio.gather(*held))
        await wait_for(lambda: bool(events(proxy, "upstream_removed")))
        await load.more(100)
    assert load.failures() == []
    assert set(load.went(done=before)) == {"blue0", "blue1"}
    assert load.went(first=deleted_at) == {"blue1": load.started - deleted_at}
    (removed,) = events(proxy, "upstream_removed")
    assert (removed["upstream"], removed["url"]) == ("blue/0", admin.blue[0].url)
    # The one left is renumbered.
    left = (await admin.status())["pools"]["blue"]["upstreams"]
    assert [(u["index"], u["url"]) for u in left] == [(0, admin.blue[1].url)]
    assert blue0 not in proxy.router.upstreams()
    assert not blue0.connections
    assert (await admin.call("POST", "/pools/blue/upstreams/1/drain"))[0] == 404


async def test_added_upstream_takes_traffic_after_its_health_check_passes(
    admin_factory: AdminFactory, sample: SampleFactory
) -> None:
    fast = {"interval": "100ms", "timeout": "1s", "healthy_after": 1, "unhealthy_after": 1}
    admin = await admin_factory(health_check=fast)
    proxy = admin.proxy
    newcomer = await sample("blue-new")
    newcomer.settings.healthy = False
    async with Load(admin.proxy_url) as load:
        await load.until(100)
        routed = proxy.router
        status, answer = await admin.call(
            "POST", "/pools/blue/upstreams", {"url": newcomer.url, "weight": 1}
        )
        assert status == 201
        assert answer == {"added": {"url": newcomer.url, "weight": 1}, "what": "add blue/1"}
        # A new routing state, swapped whole; requests in flight keep the one they started with.
        assert proxy.router.generation == routed.generation + 1
        assert (len(routed.pools["blue"]), len(proxy.router.pools["blue"])) == (1, 2)
        added = upstream(proxy, "blue/1")
        entry = (await admin.status())["pools"]["blue"]["upstreams"][1]
        assert entry | {"url": newcomer.url, "healthy": False, "state": "down"} == entry
        # Checked twice and failed: still out of rotation.
        await wait_for(lambda: proxy.health.snapshot()["blue/1"].probes >= 2, TIMEOUT)
        assert not added.healthy
        unhealthy = len(load.done)
        newcomer.settings.healthy = True
        await wait_for(lambda: added.healthy, TIMEOUT)
        healthy_at = load.started
        await load.more(200)
    assert load.failures() == []
    assert load.went(done=unhealthy) == {"blue0": unhealthy}
    after = load.went(first=healthy_at)
    assert set(after) == {"blue0", "blue-new"}
    assert after["blue-new"] > after.total() / 4, after
    assert "green0" not in load.went()


async def test_drain_gives_a_websocket_drain_timeout_then_1001(admin_factory: AdminFactory) -> None:
    admin = await admin_factory(drain={"timeout": "500ms"})
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT):
        async with admin.session.ws_connect(admin.proxy_url + "/ws") as ws:
            await admin.ok("POST", "/pools/blue/upstreams/0/drain", {"force": True})
            drained = loop.time()
            await ws.send_str("still here")
            assert await ws.receive_str() == "still here"
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
            assert loop.time() - drained > 0.4
    await wait_for(lambda: upstream(admin.proxy, "blue/0").drained)


async def test_split_0_gives_a_websocket_drain_timeout_then_1001(
    admin_factory: AdminFactory,
) -> None:
    admin = await admin_factory(split=100, drain={"timeout": "500ms"})
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT):
        async with admin.session.ws_connect(admin.proxy_url + "/ws") as ws:
            assert upstream(admin.proxy, "green/0").in_flight == 1
            await admin.ok("PUT", "/split", {"green": 0})
            changed = loop.time()
            await ws.send_str("still here")
            assert await ws.receive_str() == "still here"
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
            assert loop.time() - changed > 0.4


# --- reload -------------------------------------------------------------------------------------


def pools(blue: list[Sample], green: list[Sample], **more: Any) -> dict[str, Any]:
    return proxy_config([s.url for s in blue], [s.url for s in green], **more)


async def test_reload_with_changed_upstreams_under_load(
    sample: SampleFactory, file_proxy: Callable[[dict[str, Any]], Awaitable[FileProxy]]
) -> None:
    blue_a, blue_b = await sample("blue-a"), await sample("blue-b")
    green_a, green_b = await sample("green-a"), await sample("green-b")
    fp = await file_proxy(pools([blue_a], [green_a]))
    admin, proxy = fp.admin, fp.admin.proxy
    kept = upstream(proxy, "green/0")
    old_blue = upstream(proxy, "blue/0")
    held = await hold_on(admin, "blue/0")
    async with Load(admin.proxy_url) as load:
        await load.until(100)
        assert not any(task.done() for task in held)
        # Blue's only upstream is replaced, green gains one, the balancer changes.
        fp.write(pools([blue_b], [green_a, green_b], admin=ADMIN, balancer="round_robin"))
        before = len(load.done)
        answer = await admin.ok("POST", "/reload")
        reloaded_at = load.started
        assert answer["reloaded"] is True
        assert answer["before"] == {
            "blue": [blue_a.url],
            "green": [green_a.url],
            "balancer": "least_request",
        }
        assert answer["after"] == {
            "blue": [blue_b.url],
            "green": [green_a.url, green_b.url],
            "balancer": "round_robin",
        }
        await load.more(300)
        assert all(r.status == 200 for r in await asyncio.gather(*held))
        await wait_for(lambda: old_blue.drained)
        await load.more(50)
    assert load.failures() == []
    assert load.went(done=before) == {"blue-a": before}
    # From the answer on, blue's traffic goes to its new upstream; at no moment to green.
    assert load.went(first=reloaded_at) == {"blue-b": load.started - reloaded_at}
    assert set(load.went()) == {"blue-a", "blue-b"}
    assert not old_blue.connections
    status = await admin.status()
    assert status["config"] == str(fp.path)
    assert [u["url"] for u in status["pools"]["blue"]["upstreams"]] == [blue_b.url]
    assert [u["url"] for u in status["pools"]["green"]["upstreams"]] == [green_a.url, green_b.url]
    # A kept upstream keeps its live state.
    assert upstream(proxy, "green/0") is kept
    assert proxy.config.balancer == "round_robin"
    (reload,) = events(proxy, "reload")
    assert reload["path"] == str(fp.path)


async def test_reload_gives_kept_upstreams_new_limits_and_breaker_settings(
    sample: SampleFactory, file_proxy: Callable[[dict[str, Any]], Awaitable[FileProxy]]
) -> None:
    """An operator who raises limits.max_in_flight or lowers breaker.consecutive_failures and
    reloads gets them on the upstreams that stay, which keep their requests in flight."""
    blue = await sample("blue")
    fp = await file_proxy(pools([blue], [], limits={"max_in_flight": 1, "queue": 0}))
    admin, proxy = fp.admin, fp.admin.proxy
    kept = upstream(proxy, "blue/0")
    held = await hold_on(admin, "blue/0")
    refused = await admin.get("/")
    assert refused.status == 503
    assert (await refused.json())["error"] == "queue_full"
    fp.write(
        pools(
            [blue],
            [],
            admin=ADMIN,
            limits={"max_in_flight": 4, "queue": 0},
            breaker={"consecutive_failures": 2},
        )
    )
    await admin.ok("POST", "/reload")
    assert upstream(proxy, "blue/0") is kept
    assert kept.in_flight == 1
    answers = await asyncio.gather(*(admin.get("/delay/100") for _ in range(3)))
    assert [a.status for a in answers] == [200, 200, 200]
    assert all(r.status == 200 for r in await asyncio.gather(*held))
    (status,) = (await admin.status())["pools"]["blue"]["upstreams"]
    assert status["limits"] == {"max_in_flight": 4, "queue": 0, "queue_timeout": 1.0, "rate": None}
    # Two failures now open the breaker (five before the reload).
    blue.settings.error_status, blue.settings.error_rate = 503, 1.0
    for _ in range(2):
        assert (await admin.get("/")).status == 503
    assert kept.breaker.state.value == "open"


async def test_a_moved_upstream_is_named_by_its_new_key(
    sample: SampleFactory, file_proxy: Callable[[dict[str, Any]], Awaitable[FileProxy]]
) -> None:
    """A reload that removes blue/0 makes blue/1 the new blue/0, with its live state and a new
    weight; what is said of it afterwards (its breaker's events, /status) names it so."""
    first, second = await sample("first"), await sample("second")
    fp = await file_proxy(pools([first, second], [], breaker={"consecutive_failures": 2}))
    admin, proxy = fp.admin, fp.admin.proxy
    moved = upstream(proxy, "blue/1")
    data = pools([second], [], admin=ADMIN, breaker={"consecutive_failures": 2})
    data["pools"]["blue"]["upstreams"][0]["weight"] = 3
    fp.write(data)
    await admin.ok("POST", "/reload")
    assert upstream(proxy, "blue/0") is moved
    assert (moved.key, moved.weight) == ("blue/0", 3)
    second.settings.error_status, second.settings.error_rate = 503, 1.0
    for _ in range(2):
        assert (await admin.get("/")).status == 503
    (opened,) = events(proxy, "breaker")
    assert (opened["upstream"], opened["url"], opened["after"]) == ("blue/0", second.url, "open")
    (shown,) = (await admin.status())["pools"]["blue"]["upstreams"]
    assert (shown["url"], shown["weight"], shown["breaker"]) == (second.url, 3, "open")


async def test_reload_names_the_settings_that_wait_for_a_restart(
    sample: SampleFactory, file_proxy: Callable[[dict[str, Any]], Awaitable[FileProxy]]
) -> None:
    """Listeners and health checks are set up once: a reload that changes them applies the
    rest and says which ones need a restart, instead of accepting them silently."""
    blue = await sample("blue")
    fp = await file_proxy(pools([blue], []))
    admin, proxy = fp.admin, fp.admin.proxy
    port = proxy.port
    assert (await admin.ok("POST", "/reload"))["after"].get("restart_needed") is None
    fp.write(
        pools(
            [blue],
            [],
            admin=ADMIN,
            listen={"host": "127.0.0.1", "port": port + 1},
            health_check={"interval": "7s"},
            split=20,
        )
    )
    answer = await admin.ok("POST", "/reload")
    assert answer["after"]["restart_needed"] == ["listen.port", "health_check"]
    assert proxy.spreader.split == 20.0  # the rest is applied
    assert (await admin.get("/")).status == 200  # still on the port it had
    (event,) = events(proxy, "reload")[-1:]
    assert event["restart_needed"] == ["listen.port", "health_check"]


async def test_reload_with_a_broken_file_changes_nothing(
    sample: SampleFactory, file_proxy: Callable[[dict[str, Any]], Awaitable[FileProxy]]
) -> None:
    blue, green, other = await sample("blue"), await sample("green"), await sample("other")
    fp = await file_proxy(pools([blue], [green], split=10))
    admin, proxy = fp.admin, fp.admin.proxy
    before = await admin.status()
    config = proxy.config
    broken = pools([other], [green], admin=ADMIN, split=150, balancer="fastest")
    broken["pools"]["blue"]["upstreams"][0]["weight"] = 0
    broken["retries"] = {"attempts": 2, "bogus": True}
    async with Load(admin.proxy_url) as load:
        await load.until(100)
        fp.write(broken)
        status, answer = await admin.call("POST", "/reload")
        failed_at = load.started
        await load.more(200)
    assert status == 400
    assert answer["error"] == "invalid config"
    errors = answer["detail"]
    assert isinstance(errors, list)
    for path in ("split", "balancer", "pools.blue.upstreams[0].weight", "retries.bogus"):
        assert any(e.startswith(path) for e in errors), (path, errors)
    assert load.failures() == []
    assert proxy.config is config
    after = await admin.status()
    assert after["split"] == before["split"] == {"green": 10.0, "blue": 90.0}
    assert [u["url"] for u in after["pools"]["blue"]["upstreams"]] == [blue.url]
    assert set(load.went(first=failed_at)) == {"blue", "green"}
    (failed,) = events(proxy, "reload_failed")
    assert failed["errors"] == errors
    assert events(proxy, "reload") == []


async def test_renumbered_upstreams_stay_health_checked(
    sample: SampleFactory, file_proxy: Callable[[dict[str, Any]], Awaitable[FileProxy]]
) -> None:
    """Removing an upstream renumbers those after it (by DELETE or by reload); each one is
    still checked under its new key, and one added later takes no one's checks over."""
    fast = {"interval": "50ms", "timeout": "1s", "healthy_after": 1, "unhealthy_after": 1}
    a, b, c, d = [await sample(name) for name in ("a", "b", "c", "d")]
    green = await sample("green")
    fp = await file_proxy(pools([a, b], [green], health_check=fast))
    admin, proxy = fp.admin, fp.admin.proxy
    ub = upstream(proxy, "blue/1")
    await admin.ok("DELETE", "/pools/blue/upstreams/0")
    await wait_for(lambda: proxy.router.pools["blue"] == (ub,))
    await admin.ok("POST", "/pools/blue/upstreams", {"url": c.url})
    uc = upstream(proxy, "blue/1")
    await wait_for(lambda: uc.healthy)
    assert set(proxy.health.snapshot()) == {"blue/0", "blue/1", "green/0"}
    b.settings.healthy = False
    await wait_for(lambda: not ub.healthy)
    b.settings.healthy = True
    await wait_for(lambda: ub.healthy)

    # By reload: [b, c] -> [c, d]: c moves to index 0, d is new at index 1.
    fp.write(pools([c, d], [green], admin=ADMIN, health_check=fast))
    await admin.ok("POST", "/reload")
    assert proxy.router.pools["blue"][0] is uc
    ud = upstream(proxy, "blue/1")
    assert ud.healthy  # checked before the swap
    assert set(proxy.health.snapshot()) == {"blue/0", "blue/1", "green/0"}
    c.settings.healthy = False
    await wait_for(lambda: not uc.healthy)
    assert ud.healthy
    status = await admin.status()
    assert [(u["url"], u["state"]) for u in status["pools"]["blue"]["upstreams"]] == [
        (c.url, "down"),
        (d.url, "up"),
    ]
    c.settings.healthy = True
    await wait_for(lambda: uc.healthy)
