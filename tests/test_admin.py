"""The admin API end to end: status, readiness, errors, tokens, audit, metrics, events, CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, get_args

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import HOST, ProxyFactory, Sample, SampleFactory, proxy_config, wait_for
from helpers.admin import ADMIN, Admin, read_events, start_admin_stack

from proxy import cli
from proxy.admin import api as admin_api
from proxy.admin.api import AdminSetupError
from proxy.config import load_config, parse_config
from proxy.control.events import EventData, EventKind, FleetLeader, SplitChanged
from proxy.runtime import Proxy

TIMEOUT = 10.0


AdminFactory = Callable[..., Awaitable[Admin]]


@pytest.fixture
async def admin_factory(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> AdminFactory:
    async def make(blues: int = 1, greens: int = 1, **overrides: Any) -> Admin:
        return await start_admin_stack(sample, make_proxy, session, blues, greens, **overrides)

    return make


@pytest.fixture
async def admin(admin_factory: AdminFactory, monkeypatch: pytest.MonkeyPatch) -> Admin:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    return await admin_factory()


# --- status and readiness ---------------------------------------------------------------------


async def test_status_shows_pools_upstreams_split_stable_and_config(admin: Admin) -> None:
    status = await admin.status()
    assert status["split"] == {"green": 0.0, "blue": 100.0}
    assert status["stable"] == "blue"
    assert status["candidate"] == "green"
    assert status["config"] is None  # built from a dict, no file
    assert status["ramp"] is None
    assert set(status["pools"]) == {"blue", "green"}
    for pool, samples in (("blue", admin.blue), ("green", admin.green)):
        entry = status["pools"][pool]
        assert entry["available"] == 1
        (upstream,) = entry["upstreams"]
        assert upstream["url"] == samples[0].url
        assert (
            upstream
            | {
                "index": 0,
                "weight": 1,
                "healthy": True,
                "state": "up",
                "breaker": "closed",
                "in_flight": 0,
                "queued": 0,
                "draining": False,
                "drained": False,
            }
            == upstream
        )

    # A request in flight shows on its upstream.
    slow = asyncio.create_task(admin.get("/delay/400"))
    await wait_for(lambda: admin.proxy.in_flight == 1)
    status = await admin.status()
    assert status["pools"]["blue"]["upstreams"][0]["in_flight"] == 1
    assert status["pools"]["green"]["upstreams"][0]["in_flight"] == 0
    assert (await slow).status == 200
    status = await admin.status()
    assert status["pools"]["blue"]["upstreams"][0]["in_flight"] == 0
    assert status["pools"]["blue"]["upstreams"][0]["requests"] == 1


@asynccontextmanager
async def admin_on_file(path: Path, blue: Sample, green: Sample) -> AsyncIterator[Admin]:
    """A proxy run from the file at `path` (a reload reads it again), with its admin API."""
    proxy = Proxy(load_config(path), config_path=str(path))
    try:
        await proxy.start()
        await proxy.start_admin()
        async with aiohttp.ClientSession() as session:
            yield Admin(proxy, session, [blue], [green])
    finally:
        await proxy.shutdown(timeout=1.0)


async def test_status_names_the_config_file(
    sample: SampleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    blue, green = await sample("blue"), await sample("green")
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(proxy_config([blue.url], [green.url], admin=ADMIN, split=30)))
    async with admin_on_file(path, blue, green) as admin:
        status = await admin.status()
        assert status["config"] == str(path)
        assert status["split"] == {"green": 30.0, "blue": 70.0}
        listening = f"{HOST}:{admin.proxy.port}"
        assert status["listen"] == listening
        # A reload cannot move the listener: /status keeps saying where it really is.
        moved = proxy_config([blue.url], [green.url], admin=ADMIN, split=30)
        moved["listen"] = {"host": "0.0.0.0", "port": 0}
        path.write_text(yaml.safe_dump(moved))
        assert (await admin.ok("POST", "/reload"))["after"]["restart_needed"] == ["listen.host"]
        assert (await admin.status())["listen"] == listening


async def test_healthz_and_readyz(admin_factory: AdminFactory) -> None:
    fast = {"interval": "100ms", "timeout": "1s", "healthy_after": 1, "unhealthy_after": 1}
    admin = await admin_factory(health_check=fast)
    assert await admin.call("GET", "/healthz") == (200, {"status": "ok"})
    status, ready = await admin.call("GET", "/readyz")
    assert (status, ready["ready"]) == (200, True)
    assert ready["available"] == {"blue": 1, "green": 1}

    # Blue down: green can still serve (failover), so the proxy is ready.
    admin.blue[0].settings.healthy = False
    await wait_for(lambda: not admin.proxy.router.candidates["blue"])
    status, ready = await admin.call("GET", "/readyz")
    assert (status, ready["ready"], ready["available"]) == (200, True, {"blue": 0, "green": 1})

    # Every upstream down: nothing can serve.
    admin.green[0].settings.healthy = False
    await wait_for(lambda: not admin.proxy.router.candidates["green"])
    status, ready = await admin.call("GET", "/readyz")
    assert (status, ready["ready"], ready["available"]) == (503, False, {"blue": 0, "green": 0})
    # /healthz says the process lives, whatever the upstreams do.
    assert (await admin.call("GET", "/healthz"))[0] == 200

    admin.green[0].settings.healthy = True
    await wait_for(lambda: bool(admin.proxy.router.candidates["green"]))
    assert (await admin.call("GET", "/readyz"))[0] == 200


async def test_readyz_is_503_when_every_upstream_is_drained(admin: Admin) -> None:
    await admin.ok("POST", "/pools/blue/upstreams/0/drain", {"force": True})
    assert (await admin.call("GET", "/readyz"))[0] == 200
    await admin.ok("POST", "/pools/green/upstreams/0/drain")
    status, ready = await admin.call("GET", "/readyz")
    assert (status, ready["ready"]) == (503, False)
    await admin.ok("POST", "/pools/green/upstreams/0/undrain")
    assert (await admin.call("GET", "/readyz"))[0] == 200


# --- errors -------------------------------------------------------------------------------------

ERRORS: list[tuple[str, str, Any, int, str]] = [
    # unknown routes and wrong methods
    ("GET", "/nope", None, 404, "not found"),
    ("GET", "/pools/blue/upstreams/0/explode", None, 404, "not found"),
    ("POST", "/rollout/explode", None, 404, "not found"),
    ("GET", "/split", None, 405, "method not allowed"),
    ("POST", "/status", None, 405, "method not allowed"),
    ("DELETE", "/split", None, 405, "method not allowed"),
    ("PUT", "/pools/blue/upstreams/0/drain", None, 405, "method not allowed"),
    # unknown pool, index out of range
    ("POST", "/pools/red/upstreams/0/drain", None, 404, "unknown pool"),
    ("DELETE", "/pools/red/upstreams/0", None, 404, "unknown pool"),
    ("POST", "/pools/red/upstreams", {"url": "http://127.0.0.1:9"}, 404, "unknown pool"),
    ("POST", "/pools/blue/upstreams/1/drain", None, 404, "unknown upstream"),
    ("POST", "/pools/green/upstreams/7/undrain", None, 404, "unknown upstream"),
    ("DELETE", "/pools/blue/upstreams/1", None, 404, "unknown upstream"),
    ("DELETE", "/pools/blue/upstreams/-1", None, 404, "unknown upstream"),
    ("POST", "/pools/blue/upstreams/x/drain", None, 404, "unknown upstream"),
    ("POST", "/pools/blue/upstreams/%C2%B2/drain", None, 404, "unknown upstream"),
    ("DELETE", "/pools/blue/upstreams/" + "9" * 5000, None, 404, "unknown upstream"),
    # split outside 0..100, wrong types, unknown or missing fields, malformed JSON
    ("PUT", "/split", {"green": 101}, 400, "split out of range"),
    ("PUT", "/split", {"green": -0.5}, 400, "split out of range"),
    ("PUT", "/split", {"green": "50"}, 400, "invalid green"),
    ("PUT", "/split", {"green": True}, 400, "invalid green"),
    ("PUT", "/split", {"green": None}, 400, "invalid green"),
    ("PUT", "/split", b'{"green": NaN}', 400, "invalid green"),
    ("PUT", "/split", b'{"green": 1e400}', 400, "invalid green"),
    ("PUT", "/split", {"green": 10, "over": "soon"}, 400, "invalid over"),
    ("PUT", "/split", {"green": 10, "over": "-5s"}, 400, "invalid over"),
    ("PUT", "/split", {"green": 10, "over": [1]}, 400, "invalid over"),
    ("PUT", "/split", {"green": 10, "blue": 90}, 400, "unknown field"),
    ("PUT", "/split", {}, 400, "missing field"),
    ("PUT", "/split", b'{"green": 5', 400, "malformed JSON"),
    ("PUT", "/split", b"\xff\xfe", 400, "malformed JSON"),
    ("PUT", "/split", b"[50]", 400, "malformed request"),
    ("PUT", "/split", b'"green"', 400, "malformed request"),
    ("PUT", "/split", b"x" * 70_000, 413, "body too large"),
    ("POST", "/pools/blue/upstreams", {}, 400, "missing field"),
    ("POST", "/pools/blue/upstreams", {"url": 5}, 400, "invalid upstream"),
    ("POST", "/pools/blue/upstreams", {"url": "ftp://127.0.0.1:9"}, 400, "invalid upstream"),
    ("POST", "/pools/blue/upstreams", {"url": "http://[::1"}, 400, "invalid upstream"),
    ("POST", "/pools/blue/upstreams", {"url": "http://127.0.0.1:9", "weight": 1.5}, 400, "invalid"),
    ("POST", "/pools/blue/upstreams", {"url": "http://127.0.0.1:9", "weight": 0}, 400, "invalid"),
    ("POST", "/pools/blue/upstreams", {"url": "http://127.0.0.1:9", "weight": "2"}, 400, "invalid"),
    ("POST", "/pools/blue/upstreams", {"url": "http://127.0.0.1:9", "x": 1}, 400, "unknown field"),
    ("POST", "/pools/blue/upstreams", b"{", 400, "malformed JSON"),
    ("POST", "/rollout/start", {"strategy": "yolo"}, 400, "invalid strategy"),
    ("POST", "/rollout/start", {"strategy": ["lazy"]}, 400, "invalid strategy"),
    ("POST", "/rollout/start", {"strategy": "lazy", "steps": [1]}, 400, "unknown field"),
    ("POST", "/rollout/start", b"[]", 400, "malformed request"),
    ("POST", "/rollout/pause", {"now": True}, 400, "unexpected body"),
    # conflicts
    ("POST", "/rollout/pause", None, 409, "cannot pause"),
    ("POST", "/rollout/resume", None, 409, "cannot resume"),
    ("POST", "/rollout/abort", None, 409, "cannot abort"),
    ("POST", "/reload", None, 409, "no config file"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    ERRORS,
    ids=[f"{m} {p[:40]} {s}" for m, p, _, s, _ in ERRORS],
)
async def test_error_answers(
    admin: Admin, method: str, path: str, body: Any, status: int, error: str
) -> None:
    before = await admin.status()
    raw = body if isinstance(body, bytes) else None
    got, answer = await admin.call(method, path, None if raw is not None else body, raw=raw)
    assert got == status, answer
    assert set(answer) == {"error", "detail"}
    assert error in answer["error"], answer
    assert answer["detail"], answer  # says what was wrong
    # A refused request changes nothing.
    after = await admin.status()
    assert after["split"] == before["split"]
    assert after["pools"] == before["pools"]
    assert after["rollout"]["state"] == before["rollout"]["state"]


async def test_duplicate_upstream_is_409(admin: Admin) -> None:
    status, answer = await admin.call("POST", "/pools/green/upstreams", {"url": admin.green[0].url})
    assert status == 409
    assert answer["error"] == "duplicate upstream"
    assert "green/0" in answer["detail"]
    assert len((await admin.status())["pools"]["green"]["upstreams"]) == 1


async def test_a_second_rollout_is_409(admin: Admin) -> None:
    await admin.ok("POST", "/rollout/start", {"strategy": "lazy"})
    status, answer = await admin.call("POST", "/rollout/start", {"strategy": "lazy"})
    assert (status, answer["error"]) == (409, "rollout in progress")
    await admin.ok("POST", "/rollout/abort")


# --- tokens -------------------------------------------------------------------------------------


async def test_without_a_token_loopback_is_open(admin: Admin) -> None:
    assert (await admin.call("GET", "/status"))[0] == 200
    assert (await admin.call("PUT", "/split", {"green": 5}))[0] == 200
    assert admin.proxy.spreader.split == 5.0


async def test_token_is_required_when_set(
    admin_factory: AdminFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TEST_TURNOUT_TOKEN", "s3cret")
    admin = await admin_factory(admin={**ADMIN, "token_env": "TEST_TURNOUT_TOKEN"})
    caplog.set_level(logging.INFO, logger="turnout.audit")
    wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}]
    wrong.append({"Authorization": "Basic s3cret"})
    for headers in wrong:
        for method, path, body in (
            ("GET", "/status", None),
            ("GET", "/metrics", None),
            ("PUT", "/split", {"green": 50}),
            ("POST", "/pools/blue/upstreams/0/drain", None),
            ("POST", "/reload", None),
        ):
            status, answer = await admin.call(method, path, body, headers=headers)
            assert status == 401, (method, path, headers)
            assert set(answer) == {"error", "detail"}
    assert admin.proxy.spreader.split == 0.0
    assert not admin.proxy.router.pools["blue"][0].draining
    assert not caplog.records  # nothing was changed, nothing audited

    # Liveness and readiness stay open for probes.
    assert (await admin.call("GET", "/healthz"))[0] == 200
    assert (await admin.call("GET", "/readyz"))[0] == 200

    right = {"Authorization": "Bearer s3cret"}
    assert (await admin.call("GET", "/status", headers=right))[0] == 200
    status, _ = await admin.call("PUT", "/split", {"green": 50}, headers=right)
    assert status == 200
    assert admin.proxy.spreader.split == 50.0
    (record,) = caplog.records
    line = json.loads(record.getMessage())
    assert line["who"] == "token@127.0.0.1"
    # The scheme is case-insensitive (RFC 9110 11.1); a refusal names the scheme it wants.
    assert (await admin.call("GET", "/status", headers={"Authorization": "bearer s3cret"}))[
        0
    ] == 200
    async with admin.session.get(admin.url + "/status") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert resp.headers["X-Turnout-Admin"] == "1"


async def test_wrong_method_names_the_allowed_ones(admin_factory: AdminFactory) -> None:
    admin = await admin_factory()
    async with admin.session.delete(admin.url + "/split") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "PUT"
        assert (await resp.json())["error"] == "method not allowed"


async def test_non_loopback_admin_without_token_refuses_to_start(
    sample: SampleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    blue, green = await sample("blue"), await sample("green")
    data = proxy_config([blue.url], [green.url], admin={"host": "0.0.0.0", "port": 0})
    proxy = Proxy(parse_config(data))
    try:
        with pytest.raises(AdminSetupError, match="TURNOUT_ADMIN_TOKEN"):
            await proxy.start_admin()
        assert proxy.admin_runner is None
        # With a token it may listen there.
        monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "t")
        assert await proxy.start_admin() > 0
    finally:
        await proxy.shutdown(timeout=0)


async def test_turnout_run_exits_2_for_non_loopback_admin_without_token(
    tmp_path: Path,
) -> None:
    data = proxy_config(["http://127.0.0.1:9"], ["http://127.0.0.1:10"])
    data["admin"] = {"host": "0.0.0.0", "port": 0}
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "-c",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 2
    text = (out + err).decode()
    assert "bad config" in text
    assert "admin: the admin API would listen on 0.0.0.0, which is not loopback" in text
    assert "TURNOUT_ADMIN_TOKEN" in text
    assert "bad config" in err.decode()  # an error goes to stderr
    assert "Traceback" not in text


# --- audit --------------------------------------------------------------------------------------


async def test_every_mutation_is_audited(
    admin: Admin, sample: SampleFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="turnout.audit")
    extra = await sample("blue-extra")
    await admin.ok("PUT", "/split", {"green": 20})
    await admin.ok("PUT", "/split", {"green": 40, "over": "10s"})
    await admin.ok("POST", "/pools/blue/upstreams/0/drain", {"force": True})
    await admin.ok("POST", "/pools/blue/upstreams/0/undrain")
    await admin.ok("POST", "/pools/blue/upstreams", {"url": extra.url, "weight": 3})
    await admin.ok("DELETE", "/pools/blue/upstreams/1")
    await admin.ok("POST", "/rollout/start", {"strategy": "lazy"})
    await admin.ok("POST", "/rollout/abort")
    # Reads and refused requests are not audited.
    await admin.call("GET", "/status")
    await admin.call("PUT", "/split", {"green": 500})

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "turnout.audit"]
    for line in lines:
        assert line["who"] == "127.0.0.1"
        assert {"what", "before", "after", "request"} <= set(line)
    got = [(line["request"], line["what"], line["before"], line["after"]) for line in lines]
    assert got[:6] == [
        ("PUT /split", "split", {"green": 0.0}, {"green": 20.0, "over": None}),
        ("PUT /split", "split", {"green": 20.0}, {"green": 40.0, "over": 10.0}),
        (
            "POST /pools/blue/upstreams/0/drain",
            "drain blue/0",
            {"draining": False},
            {"draining": True},
        ),
        (
            "POST /pools/blue/upstreams/0/undrain",
            "undrain blue/0",
            {"draining": True},
            {"draining": False},
        ),
        ("POST /pools/blue/upstreams", "add blue/1", None, {"url": extra.url, "weight": 3}),
        (
            "DELETE /pools/blue/upstreams/1",
            "remove blue/1",
            {"url": extra.url},
            {"removed_after_drain": True},
        ),
    ]
    assert [g[:2] for g in got[6:]] == [
        ("POST /rollout/start", "rollout start"),
        ("POST /rollout/abort", "rollout abort"),
    ]
    assert got[6][2]["state"] == "idle"
    assert got[6][3]["state"] == "progressing"
    assert got[7][3]["state"] == "aborted"


# --- metrics ------------------------------------------------------------------------------------


async def test_metrics_agree_with_the_requests_sent(admin_factory: AdminFactory) -> None:
    admin = await admin_factory(retries={"attempts": 2, "budget": 1.0})
    blue, green = admin.blue[0].url, admin.green[0].url
    for _ in range(30):
        assert (await admin.get("/metrics-blue")).status == 200
    for _ in range(10):
        resp = await admin.get("/metrics-green", **{"X-Turnout-Pool": "green"})
        assert resp.headers["X-Upstream"] == "green0"
    for _ in range(5):
        assert (await admin.get("/status/404")).status == 404
    await admin.ok("PUT", "/split", {"green": 25})

    m = await admin.metrics()
    assert m.labelled("turnout_requests_total") == {
        frozenset({("pool", "blue"), ("upstream", blue), ("code", "200")}): 30.0,
        frozenset({("pool", "blue"), ("upstream", blue), ("code", "404")}): 5.0,
        frozenset({("pool", "green"), ("upstream", green), ("code", "200")}): 10.0,
    }
    # No retries: one attempt per request.
    assert m.labelled("turnout_upstream_attempts_total") == {
        frozenset({("pool", "blue"), ("upstream", blue), ("outcome", "200")}): 30.0,
        frozenset({("pool", "blue"), ("upstream", blue), ("outcome", "404")}): 5.0,
        frozenset({("pool", "green"), ("upstream", green), ("outcome", "200")}): 10.0,
    }
    assert m.value("turnout_request_duration_seconds_count", pool="blue") == 35.0
    assert m.value("turnout_request_duration_seconds_count", pool="green") == 10.0
    assert m.value("turnout_request_duration_seconds_bucket", pool="blue", le="+Inf") == 35.0
    assert 0 < m.value("turnout_request_duration_seconds_sum", pool="blue") < 35.0
    assert m.value("turnout_split_percent", pool="green") == 25.0
    assert m.value("turnout_split_percent", pool="blue") == 75.0
    for pool, url in (("blue", blue), ("green", green)):
        assert m.value("turnout_upstream_in_flight", pool=pool, upstream=url) == 0.0
        states = {
            dict(k)["state"]: v
            for k, v in m.labelled("turnout_upstream_state").items()
            if dict(k)["upstream"] == url
        }
        assert states.pop("up") == 1.0
        assert set(states.values()) == {0.0}
        assert {"down", "draining", "drained", "breaker_open"} <= set(states)
        for reason in ("queue_full", "queue_timeout", "rate_limited"):
            assert m.value("turnout_shed_total", pool=pool, upstream=url, reason=reason) == 0.0
    assert m.labelled("turnout_retries_total") == {}
    assert m.value("turnout_rescued_total") == 0.0
    assert m.value("turnout_rollout_step") == 0.0
    assert m.value("turnout_rollout_state", state="idle") == 1.0
    assert sum(m.labelled("turnout_rollout_state").values()) == 1.0
    assert m.value("turnout_rollback_seconds_count") == 0.0
    assert m.value("turnout_draining_connections", pool="blue") == 0.0

    # In flight and draining.
    slow = asyncio.create_task(admin.get("/delay/500"))
    await wait_for(lambda: admin.proxy.in_flight == 1)
    (busy,) = [u for u in admin.proxy.router.upstreams() if u.in_flight]
    await admin.ok("POST", f"/pools/{busy.pool}/upstreams/0/drain", {"force": True})
    m = await admin.metrics()
    assert m.value("turnout_upstream_in_flight", pool=busy.pool, upstream=busy.url) == 1.0
    assert m.value("turnout_upstream_state", pool=busy.pool, upstream=busy.url, state="up") == 0
    assert (
        m.value("turnout_upstream_state", pool=busy.pool, upstream=busy.url, state="draining")
        == 1.0
    )
    assert m.value("turnout_draining_connections", pool=busy.pool) == 1.0
    assert (await slow).status == 200
    await wait_for(lambda: busy.drained)
    m = await admin.metrics()
    assert (
        m.value("turnout_upstream_state", pool=busy.pool, upstream=busy.url, state="drained") == 1.0
    )
    assert m.value("turnout_upstream_in_flight", pool=busy.pool, upstream=busy.url) == 0.0
    assert m.value("turnout_draining_connections", pool=busy.pool) == 0.0


async def test_metrics_count_shed_requests(admin_factory: AdminFactory) -> None:
    admin = await admin_factory(limits={"max_in_flight": 1, "queue": 0})
    blue = admin.blue[0].url
    # One request holds each pool's only slot; the next has nowhere to go.
    held = [
        asyncio.create_task(admin.get("/delay/400", **{"X-Turnout-Pool": pool}))
        for pool in ("blue", "green")
    ]
    await wait_for(lambda: admin.proxy.in_flight == 2)
    shed = await admin.get("/shed-me")
    assert shed.status == 503
    assert shed.headers["Retry-After"] == "1"
    assert [(await t).status for t in held] == [200, 200]
    m = await admin.metrics()
    assert m.value("turnout_shed_total", pool="blue", upstream=blue, reason="queue_full") == 1.0
    shed_total = sum(m.labelled("turnout_shed_total").values())
    assert shed_total == 1.0
    assert m.value("turnout_requests_total", pool="blue", upstream=blue, code="200") == 1.0


async def test_metrics_of_retries_rescues_and_a_rollout(
    admin_factory: AdminFactory, sample: SampleFactory
) -> None:
    admin = await admin_factory(
        retries={"attempts": 2, "budget": 1.0},
        # A breach pauses: the split stays, so which requests go to green stays known.
        rollout={"steps": [20, 100], "interval": "1m", "fallback": "pause"},
    )
    admin.green[0].settings.error_rate = 1.0
    admin.green[0].settings.error_status = 503
    await admin.ok("POST", "/rollout/start", {"strategy": "adaptive"})
    await wait_for(lambda: admin.proxy.rollout.snapshot().step == 1)
    assert admin.proxy.spreader.split == 20.0
    m = await admin.metrics()
    assert m.value("turnout_rollout_step") == 1.0
    states = {dict(k)["state"]: v for k, v in m.labelled("turnout_rollout_state").items()}
    assert sum(states.values()) == 1.0
    assert states["progressing"] + states["insufficient_data"] == 1.0
    assert m.value("turnout_split_percent", pool="green") == 20.0

    # A forced pool is never shielded: the tester sees the candidate's own answer.
    resp = await admin.get("/forced", **{"X-Turnout-Pool": "green"})
    assert (resp.status, resp.headers["X-Upstream"]) == (503, "green0")
    # 2 of these 10 go to green; each failure is answered by the stable pool: a retry and a
    # rescue.
    for _ in range(10):
        resp = await admin.get("/shielded")
        assert (resp.status, resp.headers["X-Upstream"]) == (200, "blue0")
    await admin.ok("POST", "/rollout/rollback")
    m = await admin.metrics()
    assert m.value("turnout_retries_total", pool="green", reason="status_503") == 2.0
    assert m.value("turnout_rescued_total") == 2.0
    assert m.value("turnout_rollout_state", state="rolled_back") == 1.0
    assert m.value("turnout_rollout_step") == 0.0
    assert m.value("turnout_split_percent", pool="green") == 0.0
    assert m.value("turnout_rollback_seconds_count") == 1.0
    assert m.value("turnout_rollback_seconds_bucket", le="+Inf") == 1.0
    green = admin.green[0].url
    blue = admin.blue[0].url
    # Clients saw blue's answers and the forced request's 503; the shielded 503s of green
    # appear only among the attempts.
    assert m.labelled("turnout_requests_total") == {
        frozenset({("pool", "blue"), ("upstream", blue), ("code", "200")}): 10.0,
        frozenset({("pool", "green"), ("upstream", green), ("code", "503")}): 1.0,
    }
    assert m.labelled("turnout_upstream_attempts_total") == {
        frozenset({("pool", "blue"), ("upstream", blue), ("outcome", "200")}): 10.0,
        frozenset({("pool", "green"), ("upstream", green), ("outcome", "503")}): 3.0,
    }


# --- events -------------------------------------------------------------------------------------


async def test_events_stream_split_changes_drains_and_reloads(
    sample: SampleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    blue, green = await sample("blue"), await sample("green")
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(proxy_config([blue.url], [green.url], admin=ADMIN)))
    proxy = Proxy(load_config(path), config_path=str(path), rng=random.Random(1))
    await proxy.start()
    await proxy.start_admin()
    try:
        async with aiohttp.ClientSession() as session:
            admin = Admin(proxy, session, [blue], [green])
            async with session.get(admin.url + "/events") as stream:
                assert stream.status == 200
                assert stream.content_type == "text/event-stream"
                # The opening comment says the subscription is in place.
                assert (await stream.content.readline()).startswith(b":")
                await admin.ok("PUT", "/split", {"green": 10})
                await admin.ok("POST", "/pools/green/upstreams/0/drain")
                await admin.ok("POST", "/reload")
                status, _ = await admin.call("POST", "/reload")  # the file did not change
                assert status == 200
                path.write_text("pools: {blue: {upstreams: []}, nonsense: 1}\n")
                assert (await admin.call("POST", "/reload"))[0] == 400
                events = await read_events(stream, 6)
        kinds = [kind for kind, _ in events]
        assert kinds[0] == "split"
        # Exactly its kind's fields; `ramp` (None: not a step of a ramp) is left out.
        assert events[0][1].keys() - {"seq", "kind", "time"} == {"before", "after", "by"}
        assert events[0][1] | {"before": 0.0, "after": 10.0, "by": "127.0.0.1"} == events[0][1]
        assert events[1][0] == "drain"
        assert events[1][1]["upstream"] == "green/0"
        # Nothing was in flight on green/0: it is drained at once, before the reload.
        assert "drained" in kinds
        assert kinds.count("reload") == 2
        assert kinds[-1] == "reload_failed"
        reload = next(data for kind, data in events if kind == "reload")
        assert reload["path"] == str(path)
        failed = events[-1][1]
        assert failed["path"] == str(path)
        assert any("nonsense" in e for e in failed["errors"])
        seqs = [data["seq"] for _, data in events]
        assert seqs == sorted(seqs)
    finally:
        await proxy.shutdown(timeout=1.0)


def test_every_event_kind_has_one_frozen_payload() -> None:
    # By name: @dataclass(slots=True) leaves the class it replaced among the subclasses.
    payloads = {(p.kind, p.__name__) for p in EventData.__subclasses__()}
    assert sorted(kind for kind, _ in payloads) == sorted(get_args(EventKind))
    split = SplitChanged(before=0.0, after=5.0, by="test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        split.after = 6.0  # type: ignore[misc]
    assert split.as_dict() == {"before": 0.0, "after": 5.0, "by": "test"}
    # A field without a default says None out loud (a first leader has no previous one).
    assert FleetLeader(leader="m0", previous=None, instance="m1").as_dict()["previous"] is None


async def test_a_quiet_event_stream_stays_open_with_keep_alives(
    admin_factory: AdminFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watcher that sees no event for several heartbeats still gets the next one: the
    stream stays open with keep-alive comments until the client leaves."""
    monkeypatch.setattr(admin_api, "SSE_HEARTBEAT", 0.02)
    admin = await admin_factory()
    async with admin.session.get(admin.url + "/events") as stream:
        beats = 0
        async with asyncio.timeout(TIMEOUT):
            while beats < 5:
                raw = await stream.content.readline()
                assert raw, "the event stream ended while quiet"
                beats += raw == b": keep-alive\n"
        await admin.ok("PUT", "/split", {"green": 7})
        ((kind, data),) = await read_events(stream, 1)
    assert (kind, data["after"]) == ("split", 7.0)
    # The client left: its subscription (and the read pending on it) is gone.
    await wait_for(lambda: not admin.proxy.events.subscribers)


async def test_events_replay_recent_history(admin: Admin) -> None:
    await admin.ok("PUT", "/split", {"green": 30})
    await admin.ok("PUT", "/split", {"green": 60})
    async with admin.session.get(admin.url + "/events?replay=2") as stream:
        events = await read_events(stream, 2)
    assert [(k, d["after"]) for k, d in events] == [("split", 30.0), ("split", 60.0)]
    # A replay count that is not a plain number replays nothing.
    for odd in ("%C2%B2", "9" * 5000, "-1", "x"):
        async with admin.session.get(admin.url + "/events?replay=" + odd) as stream:
            assert stream.status == 200
            await admin.ok("PUT", "/split", {"green": 1})
            ((kind, data),) = await read_events(stream, 1)
            assert (kind, data["after"]) == ("split", 1.0)
            await admin.ok("PUT", "/split", {"green": 0})


async def test_a_reader_coming_back_gets_what_it_missed(admin: Admin) -> None:
    """SSE's Last-Event-ID: a reconnecting reader gets every held event after the last one
    it saw, then the live stream."""
    await admin.ok("PUT", "/split", {"green": 10})
    async with admin.session.get(admin.url + "/events?replay=1") as stream:
        ((_, seen),) = await read_events(stream, 1)
    assert seen["after"] == 10.0
    for green in (20, 30):  # while the reader is away
        await admin.ok("PUT", "/split", {"green": green})
    headers = {"Last-Event-ID": str(seen["seq"])}
    async with admin.session.get(admin.url + "/events", headers=headers) as stream:
        missed = await read_events(stream, 2)
        await admin.ok("PUT", "/split", {"green": 40})
        live = await read_events(stream, 1)
    assert [d["after"] for _, d in missed + live] == [20.0, 30.0, 40.0]


# --- the CLI client against the real admin API ------------------------------------------------


async def run_cli(
    capsys: pytest.CaptureFixture[str], *args: str, admin: Admin
) -> tuple[int, str, str]:
    """`turnout ARGS --admin URL` in a thread (the client blocks); exit code, stdout, stderr."""
    capsys.readouterr()
    argv = [*args, "--admin", admin.url, "--timeout", "5"]
    code = await asyncio.to_thread(cli.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> dict[str, list[str]]:
    """The upstream rows of the status table by their POOL/INDEX cell."""
    return {
        cells[0]: cells
        for cells in (line.split() for line in out.splitlines())
        if cells and cells[0].partition("/")[0] in ("blue", "green")
    }


async def test_cli_status_shift_drain_undrain(
    admin_factory: AdminFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    admin = await admin_factory(blues=2)
    for _ in range(4):
        assert (await admin.get("/cli")).status == 200

    code, out, err = await run_cli(capsys, "status", admin=admin)
    assert (code, err) == (0, "")
    assert "green 0%, blue 100%" in out
    assert "stable" in out
    assert "blue" in out
    header = next(line for line in out.splitlines() if line.startswith("POOL/INDEX"))
    for column in ("URL", "WEIGHT", "STATE", "BREAKER", "IN-FLIGHT", "QUEUED"):
        assert column in header
    rows = table_rows(out)
    assert rows["blue/0"][1] == admin.blue[0].url
    assert rows["blue/1"][1] == admin.blue[1].url
    assert rows["green/0"][1] == admin.green[0].url
    assert rows["green/0"][3] == "up"
    assert rows["green/0"][4] == "closed"
    requests = {key: int(rows[key][7]) for key in ("blue/0", "blue/1", "green/0")}
    assert requests["green/0"] == 0
    assert requests["blue/0"] + requests["blue/1"] == 4

    code, out, err = await run_cli(capsys, "status", "--json", admin=admin)
    assert code == 0
    assert json.loads(out)["split"] == {"green": 0.0, "blue": 100.0}

    code, out, err = await run_cli(capsys, "shift", "blue", "70", admin=admin)
    assert (code, err) == (0, "")
    assert "split: green 30%, blue 70%" in out
    assert admin.proxy.spreader.split == 30.0
    code, out, err = await run_cli(capsys, "shift", "green", "30", admin=admin)
    assert (code, err) == (0, "")
    assert "green 30%" in out

    code, out, err = await run_cli(capsys, "shift", "green", "60", "--over", "20s", admin=admin)
    assert code == 0
    ramp = admin.proxy.control.ramp_status()
    assert ramp is not None
    assert ramp["target"] == 60.0
    assert 19.0 <= ramp["remaining"] <= 20.0
    code, out, _ = await run_cli(capsys, "status", admin=admin)
    assert re.search(r"ramp:\s+green to 60% in (19(\.\d)?|20)s", out), out
    await run_cli(capsys, "shift", "green", "30", admin=admin)  # ends the ramp
    assert admin.proxy.control.ramp_status() is None

    code, out, err = await run_cli(capsys, "drain", "blue/1", admin=admin)
    assert (code, err) == (0, "")
    assert "drain blue/1" in out
    assert admin.proxy.router.pools["blue"][1].draining
    await wait_for(lambda: admin.proxy.router.pools["blue"][1].drained)
    code, out, _ = await run_cli(capsys, "status", admin=admin)
    rows = table_rows(out)
    assert rows["blue/1"][3].startswith("drained")
    for _ in range(4):
        assert (await admin.get("/cli")).headers["X-Upstream"] in ("blue0", "green0")

    code, out, err = await run_cli(capsys, "undrain", "blue/1", admin=admin)
    assert (code, err) == (0, "")
    assert not admin.proxy.router.pools["blue"][1].draining

    # A whole pool: the stable one is refused before anything is drained, unless forced.
    code, out, err = await run_cli(capsys, "drain", "blue", admin=admin)
    assert (code, out) == (1, "")
    assert "blue is the stable pool: draining all of it would send every request" in err
    assert "pass --force" in err
    assert not any(u.draining for u in admin.proxy.router.pools["blue"])
    code, out, err = await run_cli(capsys, "drain", "blue", "--force", admin=admin)
    assert (code, err) == (0, "")
    assert all(u.draining for u in admin.proxy.router.pools["blue"])
    assert "drain blue/0" in out
    assert "drain blue/1" in out
    code, out, err = await run_cli(capsys, "undrain", "blue", admin=admin)
    assert code == 0
    assert not any(u.draining for u in admin.proxy.router.pools["blue"])


async def test_a_reader_that_stops_early_gets_no_traceback(admin: Admin) -> None:
    """`turnout status | head`: the reader leaves before the table is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the first write fails with EPIPE
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "status",
            "--admin",
            admin.url,
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert (proc.returncode, err.decode()) == (0, "")


async def test_status_the_cli_and_the_503_say_what_the_last_health_check_got(
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An app that serves no /healthz: every place an operator looks says why it is down, the
    log at start first."""
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)

    async def home(request: web.Request) -> web.Response:
        return web.Response(text="app")

    app = web.Application()
    app.router.add_get("/", home)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        data = proxy_config([f"http://{HOST}:{port}"], [], admin=ADMIN)
        data["health_check"] = {"interval": "100ms"}
        proxy = await make_proxy(data)
        await proxy.start_admin()
        admin = Admin(proxy, session, [], [])
        await wait_for(lambda: admin_upstream(proxy)["last_check"] is not None)
        upstream = (await admin.status())["pools"]["blue"]["upstreams"][0]
        said = "GET /healthz answered 404"
        assert (upstream["healthy"], upstream["last_check"]) == (False, said)
        async with session.get(f"http://{HOST}:{proxy.port}/") as resp:
            assert resp.status == 503
            assert said in (await resp.json())["detail"]
        code, out, _ = await run_cli(capsys, "status", admin=admin)
        assert code == 0
        assert f"blue/0 down: last check {said}" in out.splitlines()
        (first,) = [r for r in caplog.records if "gets no traffic" in r.getMessage()]
        assert first.levelname == "WARNING"
        assert first.getMessage() == (
            f"upstream blue/0 (http://{HOST}:{port}) gets no traffic until a health check"
            f" passes; the first failed: {said}; is health_check.path a path it serves?"
        )
    finally:
        await runner.cleanup()


def admin_upstream(proxy: Proxy) -> dict[str, Any]:
    upstream: dict[str, Any] = proxy.status()["pools"]["blue"]["upstreams"][0]
    return upstream


async def test_cli_errors_print_the_servers_message_and_exit_1(
    admin: Admin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = await run_cli(capsys, "drain", "green/5", admin=admin)
    assert (code, out) == (1, "")
    assert "404 unknown upstream" in err
    assert "pool green has 1 upstream(s); no index 5" in err

    code, out, err = await run_cli(capsys, "reload", admin=admin)
    assert (code, out) == (1, "")
    assert "409 no config file" in err

    code, out, err = await run_cli(capsys, "rollout", "pause", admin=admin)
    assert code == 1
    assert "409 cannot pause" in err
    assert "idle" in err

    # Bad usage never reaches the server: exit 2.
    with pytest.raises(SystemExit) as exc:
        await run_cli(capsys, "shift", "green", "150", admin=admin)
    assert exc.value.code == 2

    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "not-the-token")
    # The proxy has no token set, so a given one is simply not needed.
    assert (await run_cli(capsys, "status", admin=admin))[0] == 0


async def test_cli_needs_the_token_when_the_admin_api_has_one(
    admin_factory: AdminFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "right")
    admin = await admin_factory()
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN")
    code, _, err = await run_cli(capsys, "shift", "green", "10", admin=admin)
    assert code == 1
    assert "401" in err
    assert "TURNOUT_ADMIN_TOKEN" in err
    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "wrong")
    assert (await run_cli(capsys, "shift", "green", "10", admin=admin))[0] == 1
    assert admin.proxy.spreader.split == 0.0
    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "right")
    assert (await run_cli(capsys, "shift", "green", "10", admin=admin))[0] == 0
    assert admin.proxy.spreader.split == 10.0


async def test_cli_reload(
    sample: SampleFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="turnout.audit")
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    blue, green, green2 = await sample("blue"), await sample("green"), await sample("green2")
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(proxy_config([blue.url], [green.url], admin=ADMIN)))
    async with admin_on_file(path, blue, green) as admin:
        proxy = admin.proxy
        path.write_text(
            yaml.safe_dump(proxy_config([blue.url], [green.url, green2.url], admin=ADMIN))
        )
        code, out, err = await run_cli(capsys, "reload", admin=admin)
        assert (code, err) == (0, "")
        assert out.startswith("reload")
        assert [u.url for u in proxy.router.pools["green"]] == [green.url, green2.url]
        (record,) = [r for r in caplog.records if r.name == "turnout.audit"]
        line = json.loads(record.getMessage())
        assert (line["who"], line["what"], line["request"]) == (
            "127.0.0.1",
            "reload",
            "POST /reload",
        )
        assert line["before"]["green"] == [green.url]
        assert line["after"]["green"] == [green.url, green2.url]

        path.write_text("pools: {blue: {upstreams: [{url: 'http://x:1', weight: 0}]}}\n")
        code, out, err = await run_cli(capsys, "reload", admin=admin)
        assert (code, out) == (2, "")  # a bad config, as `turnout check` says
        assert "400 invalid config" in err
        assert "weight" in err
        assert "green" in err
        assert [u.url for u in proxy.router.pools["green"]] == [green.url, green2.url]
        # A refused reload changed nothing, so there is nothing to audit.
        assert len([r for r in caplog.records if r.name == "turnout.audit"]) == 1


async def test_cli_reload_shows_every_problem_and_what_waits_for_a_restart(
    sample: SampleFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`turnout reload` prints every problem of a refused file (not the first few hundred
    characters of them), names the settings a reload read but cannot apply, and stops naming
    them once the file is back to what the process runs with."""
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    blue, green = await sample("blue"), await sample("green")
    path = tmp_path / "turnout.yaml"
    good = proxy_config([blue.url], [green.url], admin=ADMIN)
    path.write_text(yaml.safe_dump(good))
    async with admin_on_file(path, blue, green) as admin:
        proxy = admin.proxy
        broken = {
            **good,
            "split": 200,
            "balancer": "fastest",
            "timeouts": {"connect": "2x", "response_headers": "3y", "idle": "0s"},
            "limits": {"max_in_flight": 0, "queue": -1, "queue_timeout": "1d"},
            "breaker": {"consecutive_failures": 0, "failure_ratio": 2},
        }
        path.write_text(yaml.safe_dump(broken))
        code, out, err = await run_cli(capsys, "reload", admin=admin)
        assert (code, out) == (2, "")
        paths = [
            "split",
            "balancer",
            "timeouts.connect",
            "timeouts.response_headers",
            "timeouts.idle",
            "limits.max_in_flight",
            "limits.queue",
            "limits.queue_timeout",
            "breaker.consecutive_failures",
            "breaker.failure_ratio",
        ]
        lines = err.splitlines()
        assert lines[0].endswith(f"400 invalid config: {len(paths)} error(s)"), lines
        assert [line.strip().partition(":")[0] for line in lines[1:]] == paths

        moved = {
            **good,
            "listen": {"host": HOST, "port": proxy.port + 1},
            "health_check": {"interval": "7s"},
        }
        path.write_text(yaml.safe_dump(moved))
        code, out, err = await run_cli(capsys, "reload", admin=admin)
        assert (code, err) == (0, "")
        assert "restart needed: listen.port, health_check" in out

        path.write_text(yaml.safe_dump(good))  # back to what the process runs with
        code, out, err = await run_cli(capsys, "reload", admin=admin)
        assert (code, err) == (0, "")
        assert "restart needed" not in out
        assert "restart_needed" not in (await admin.ok("POST", "/reload"))["after"]


async def test_invalid_upstream_is_worded_like_turnout_check(admin: Admin) -> None:
    status, answer = await admin.call(
        "POST", "/pools/blue/upstreams", {"url": "ftp://127.0.0.1:9", "weight": 0}
    )
    assert status == 400
    assert answer == {
        "error": "invalid upstream",
        "detail": [
            "url: invalid url 'ftp://127.0.0.1:9': must be http://host:port or https://host:port",
            "weight: must be >= 1",
        ],
    }
