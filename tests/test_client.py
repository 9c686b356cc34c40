"""Client commands: the /status table, argument checks, real HTTP to an admin-like server."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admin.client import (
    ADMIN_HEADER,
    DEFAULT_ADMIN,
    AdminClient,
    ClientError,
    add_client_commands,
    admin_base,
    format_status,
)

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

STATUS: dict[str, Any] = {
    "split": {"green": 25.0, "blue": 75.0},
    "stable": "blue",
    "candidate": "green",
    "config": "config/turnout.yaml",
    "listen": "0.0.0.0:8080",
    "ramp": {"target": 50.0, "remaining": 12.5},
    "pools": {
        "blue": {
            "available": 1,
            "upstreams": [
                {
                    "index": 0,
                    "url": "http://127.0.0.1:9001",
                    "weight": 1,
                    "state": "up",
                    "healthy": True,
                    "draining": False,
                    "drained": False,
                    "breaker": "closed",
                    "in_flight": 3,
                    "queued": 0,
                    "requests": 1200,
                    "failures": 2,
                }
            ],
        },
        "green": {
            "available": 1,
            "upstreams": [
                {
                    "index": 0,
                    "url": "http://127.0.0.1:9002",
                    "weight": 3,
                    "state": "up",
                    "healthy": True,
                    "draining": True,
                    "drained": False,
                    "breaker": "half_open",
                    "in_flight": 0,
                    "queued": 17,
                    "requests": 45,
                    "failures": 0,
                },
                {
                    "index": 1,
                    "url": "http://127.0.0.1:9003",
                    "weight": 1,
                    "state": "down",
                    "healthy": False,
                    "draining": False,
                    "drained": False,
                    "breaker": "open",
                    "in_flight": 0,
                    "queued": 0,
                    "requests": 7,
                    "failures": 7,
                },
            ],
        },
    },
    "rollout": {
        "strategy": "adaptive",
        "state": "progressing",
        "step": 2,
        "steps": [1, 5, 25, 50, 100],
        "reason": "green within thresholds",
        "windows": {
            "blue": {"requests": 100, "errors": 0, "error_rate": 0.0, "p50_ms": 1.2, "p99_ms": 4.5},
            "green": {
                "requests": 30,
                "errors": 1,
                "error_rate": 1 / 30,
                "p50_ms": 1.5,
                "p99_ms": 12.25,
            },
        },
    },
}


def row_of(text: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell`."""
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def header_value(text: str, label: str) -> str:
    for line in text.splitlines():
        if line.startswith(f"{label}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no header {label!r} in:\n{text}")


# --- format_status ----------------------------------------------------------------------------


@pytest.mark.parametrize("green", [6.035, 33.333333, 0.005, 99.995, 12.5])
def test_split_shares_shown_add_up_to_100(green: float) -> None:
    text = format_status({**STATUS, "split": {"green": green, "blue": 100.0 - green}})
    shown = header_value(text, "split")
    green_text, blue_text = (part.split()[1].rstrip("%") for part in shown.split(", "))
    assert round(float(green_text) + float(blue_text), 6) == 100.0, shown
    assert abs(float(green_text) - green) <= 0.005 + 1e-9


def test_full_status_header_block() -> None:
    text = format_status(STATUS)
    assert header_value(text, "split") == "green 25%, blue 75%"
    assert header_value(text, "stable") == "blue"
    assert header_value(text, "candidate") == "green"
    assert header_value(text, "config") == "config/turnout.yaml"
    assert header_value(text, "listen") == "0.0.0.0:8080"
    assert header_value(text, "ramp") == "green to 50% in 12.5s"
    assert header_value(text, "available") == "blue 1/1, green 1/2"
    assert (
        header_value(text, "rollout") == "adaptive, progressing, step 2 (steps 1, 5, 25, 50, 100)"
    )
    assert header_value(text, "reason") == "green within thresholds"
    assert row_of(text, "blue") == ["blue", "100", "0", "0.00%", "1.2ms", "4.5ms"]
    assert row_of(text, "green") == ["green", "30", "1", "3.33%", "1.5ms", "12.25ms"]


def test_full_status_one_aligned_row_per_upstream() -> None:
    text = format_status(STATUS)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("POOL/INDEX"))
    assert header.split() == [
        "POOL/INDEX",
        "URL",
        "WEIGHT",
        "STATE",
        "BREAKER",
        "IN-FLIGHT",
        "QUEUED",
        "REQUESTS",
        "FAILURES",
    ]
    assert row_of(text, "blue/0") == [
        "blue/0",
        "http://127.0.0.1:9001",
        "1",
        "up",
        "closed",
        "3",
        "0",
        "1200",
        "2",
    ]
    assert row_of(text, "green/0")[3:5] == ["up,draining", "half_open"]
    assert row_of(text, "green/1") == [
        "green/1",
        "http://127.0.0.1:9003",
        "1",
        "down",
        "open",
        "0",
        "0",
        "7",
        "7",
    ]
    rows = lines[lines.index(header) + 1 :]
    assert [r.split()[0] for r in rows] == ["blue/0", "green/0", "green/1"]
    # Plain aligned columns: text columns start where their heading starts, numbers end where
    # their heading ends.
    for row in rows:
        assert row.index("http://") == header.index("URL")
        assert len(row) == len(header)
    assert "\x1b" not in text


def test_minimal_status_does_not_crash() -> None:
    text = format_status({})
    assert header_value(text, "split") == "-"
    assert header_value(text, "rollout") == "none"
    assert "(no upstreams)" in text
    assert "WINDOW" not in text


def test_status_without_rollout_or_ramp() -> None:
    doc = copy.deepcopy(STATUS)
    doc["rollout"] = None
    doc["ramp"] = None
    text = format_status(doc)
    assert header_value(text, "rollout") == "none"
    assert "ramp:" not in text
    assert "reason:" not in text
    assert "WINDOW" not in text
    assert row_of(text, "blue/0")[1] == "http://127.0.0.1:9001"


def test_status_with_missing_upstream_fields_and_extra_keys() -> None:
    doc: dict[str, Any] = {
        "split": 40,
        "workers": 4,
        "pools": {
            "blue": {"upstreams": [{"url": "http://10.0.0.5:8000", "healthy": False}]},
            "green": {"upstreams": [{"index": 3, "drained": True, "state": "up", "zone": "b"}]},
        },
        "rollout": {"state": "paused", "since": "12s", "windows": {"green": {}}},
    }
    text = format_status(doc)
    assert header_value(text, "split") == "green 40%"
    assert header_value(text, "workers") == "4"
    assert header_value(text, "rollout") == "paused"
    assert header_value(text, "rollout.since") == "12s"
    assert row_of(text, "blue/0") == ["blue/0", "http://10.0.0.5:8000", "-", "down"] + ["-"] * 5
    assert row_of(text, "green/3")[1:4] == ["-", "-", "up,drained"]
    assert row_of(text, "green") == ["green", "-", "-", "-", "-", "-"]


def test_odd_status_values_are_shown_not_fatal() -> None:
    doc: dict[str, Any] = {
        "split": "unknown",
        "stable": None,
        "config": None,
        "ramp": "soon",
        "pools": {
            "blue": {"available": "x", "upstreams": "not a list"},
            "green": [1, 2],
            "purple": {
                "upstreams": [None, 7, {"url": "http://evil\n\x1b[31mred", "weight": 1e300}]
            },
        },
        "rollout": "broken",
        "nested": {"a": [1, {"b": None}]},
        "huge": 10**400,
        "small": -(10**10000),
        "nan": math.nan,
    }
    text = format_status(doc)
    assert header_value(text, "split") == "unknown"
    assert header_value(text, "ramp") == "soon"
    assert header_value(text, "rollout") == "broken"
    assert header_value(text, "nested") == '{"a": [1, {"b": null}]}'
    assert header_value(text, "nan") == "nan"
    assert header_value(text, "huge") == "~1e400"
    assert header_value(text, "small") == "-~1e10000"
    # A value with control characters is escaped: it stays on its row and prints no escape code.
    assert "\x1b" not in text
    row = row_of(text, "purple/2")
    assert row[1] == "http://evil\\n\\x1b[31mred"
    assert row[2] == "1e+300"
    # Entries that are not upstream objects are left out rather than shown as empty rows.
    assert "purple/0" not in text
    assert "purple/1" not in text
    assert "blue/" not in text


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
UPSTREAM = st.dictionaries(
    st.sampled_from(
        [
            "index",
            "url",
            "weight",
            "state",
            "healthy",
            "draining",
            "drained",
            "breaker",
            "in_flight",
            "queued",
            "requests",
            "failures",
            "other",
        ]
    ),
    JSON,
)
STATUS_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "split": JSON,
        "stable": JSON,
        "candidate": JSON,
        "config": JSON,
        "ramp": JSON,
        "pools": st.dictionaries(
            st.sampled_from(["blue", "green"]),
            st.fixed_dictionaries(
                {}, optional={"available": JSON, "upstreams": st.lists(UPSTREAM, max_size=3) | JSON}
            )
            | JSON,
        )
        | JSON,
        "rollout": st.fixed_dictionaries(
            {},
            optional={
                "strategy": JSON,
                "state": JSON,
                "step": JSON,
                "steps": JSON,
                "reason": JSON,
                "windows": st.dictionaries(st.text(max_size=5), JSON) | JSON,
            },
        )
        | JSON,
        "extra": JSON,
    },
)


@settings(max_examples=200, deadline=None)
@given(STATUS_LIKE)
def test_any_status_shape_renders(doc: dict[str, Any]) -> None:
    text = format_status(doc)
    assert text.startswith("split:")
    assert all(ch.isprintable() for line in text.splitlines() for ch in line)


# --- arguments --------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnout")
    sub = parser.add_subparsers(dest="command", required=True)
    add_client_commands(sub)
    return parser


def run_cli(argv: list[str]) -> int:
    args = make_parser().parse_args(argv)
    code = args.func(args)
    assert isinstance(code, int)
    return code


@pytest.mark.parametrize(
    "argv",
    [
        ["shift", "green", "101"],
        ["shift", "green", "-1"],
        ["shift", "green", "abc"],
        ["shift", "green", "nan"],
        ["shift", "green", "inf"],
        ["shift", "green"],
        ["shift", "red", "50"],
        ["shift", "green", "10", "--over", "5x"],
        ["shift", "green", "10", "--over", "-1s"],
        ["shift", "green", "10", "--over", ""],
        ["rollout", "go"],
        ["rollout", "start", "--strategy", "yolo"],
        ["drain", "red"],
        ["drain", "blue/x"],
        ["drain", "blue/-1"],
        ["drain", "blue/"],
        ["drain", "blue/1/2"],
        ["drain", ""],
        ["undrain", "green/1.5"],
        ["undrain"],
        ["status", "--admin", "ftp://127.0.0.1:9901"],
        ["status", "--admin", "http://"],
        ["status", "--admin", "127.0.0.1:9901"],
        ["status", "--admin", "http://127.0.0.1:99999"],
        ["reload", "--timeout", "0"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "Traceback" not in err


def test_strategy_outside_start_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on the address: the command must refuse before any request.
    code = run_cli(["rollout", "pause", "--strategy", "eager", "--admin", "http://127.0.0.1:9"])
    assert code == 2
    assert "--strategy applies only to start" in capsys.readouterr().err


def test_good_arguments_parse() -> None:
    parser = make_parser()
    args = parser.parse_args(["shift", "green", "25%", "--over", "30"])
    assert (args.percent, args.over, args.admin) == (25.0, "30s", None)  # $TURNOUT_ADMIN, else
    assert admin_base(None) in (os.environ.get("TURNOUT_ADMIN"), DEFAULT_ADMIN)
    args = parser.parse_args(["shift", "green", "0", "--over", "1.5m"])
    assert (args.percent, args.over) == (0.0, "1.5m")
    assert parser.parse_args(["drain", "green/12"]).target == ("green", 12)
    assert parser.parse_args(["undrain", "blue"]).target == ("blue", None)
    args = parser.parse_args(["status", "--admin", "https://admin.example:9443/turnout"])
    assert args.admin == "https://admin.example:9443/turnout"
    assert args.timeout == 10.0


def test_bad_token_is_a_usage_error() -> None:
    with pytest.raises(ClientError) as exc:
        AdminClient(DEFAULT_ADMIN, "two\nlines")
    assert exc.value.exit_code == 2


# --- HTTP against a real admin-like server ----------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    authorization: str | None


@dataclass
class FakeAdmin:
    """Answers like the admin API contract and records every request it receives."""

    token: str | None = None
    status: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(STATUS))
    answers: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    hold: asyncio.Event | None = None
    impostor: bool = False  # answers like the application behind the proxy: no admin header

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        auth = request.headers.get("Authorization")
        self.seen.append(Seen(request.method, request.path, body, auth))
        if self.hold is not None:
            await self.hold.wait()
        if self.token is not None and auth != f"Bearer {self.token}":
            return error(401, "unauthorized", "missing or wrong bearer token")
        key = (request.method, request.path)
        if key in self.answers:
            status, payload = self.answers[key]
            if isinstance(payload, str):
                return web.Response(status=status, text=payload)
            return web.json_response(payload, status=status)
        return self.route(request.method, request.path.split("/")[1:], body)

    def route(self, method: str, parts: list[str], body: Any) -> web.Response:
        match method, parts:
            case "GET", ["status"]:
                return web.json_response(self.status)
            case "PUT", ["split"]:
                return web.json_response({"split": body["green"], "before": 25.0})
            case "POST", ["rollout", action]:
                return web.json_response(
                    {"what": f"rollout {action}", "before": "idle", "after": "progressing"}
                )
            case "POST", ["pools", pool, "upstreams", index, "drain" | "undrain" as action]:
                return web.json_response({"what": f"{action} {pool}/{index}", "draining": True})
            case "POST", ["reload"]:
                return web.json_response({"reloaded": True, "before": "a1", "after": "b2"})
        return error(404, "not found", f"{method} /{'/'.join(parts)}")


def error(status: int, name: str, detail: Any) -> web.Response:
    return web.json_response({"error": name, "detail": detail}, status=status)


async def mark_as_admin(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[ADMIN_HEADER] = "1"


async def start_admin(aiohttp_server: ServerFactory, fake: FakeAdmin) -> str:
    app = web.Application()
    if not fake.impostor:
        app.on_response_prepare.append(mark_as_admin)
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)


async def cli(*argv: str) -> int:
    # The commands block on urllib: run them off the loop so the test server keeps serving.
    return await asyncio.to_thread(run_cli, list(argv))


async def test_status_prints_the_table(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    assert await cli("status", "--admin", url) == 0
    assert fake.seen == [Seen("GET", "/status", None, None)]
    out = capsys.readouterr().out
    assert out == format_status(STATUS) + "\n"
    assert await cli("status", "--json", "--admin", url) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


async def test_shift_puts_the_split(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    assert await cli("shift", "green", "50", "--over", "30s", "--admin", url) == 0
    assert await cli("shift", "green", "12.5", "--admin", url) == 0
    assert fake.seen == [
        Seen("PUT", "/split", {"green": 50.0, "over": "30s"}, None),
        Seen("PUT", "/split", {"green": 12.5}, None),
    ]
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "split: green 50% over 30s (was green 25%)",
        "split: green 12.5% (was green 25%)",
    ]


@pytest.mark.parametrize("action", ["start", "pause", "resume", "promote", "rollback", "abort"])
async def test_rollout_posts_the_action(
    aiohttp_server: ServerFactory, no_token: None, action: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    assert await cli("rollout", action, "--admin", url) == 0
    assert fake.seen == [Seen("POST", f"/rollout/{action}", None, None)]
    assert f"rollout {action}" in capsys.readouterr().out


async def test_rollout_start_sends_the_strategy(
    aiohttp_server: ServerFactory, no_token: None
) -> None:
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    assert await cli("rollout", "start", "--strategy", "lazy", "--admin", url) == 0
    assert fake.seen == [Seen("POST", "/rollout/start", {"strategy": "lazy"}, None)]


@pytest.mark.parametrize("action", ["drain", "undrain"])
async def test_drain_one_upstream(
    aiohttp_server: ServerFactory, no_token: None, action: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    assert await cli(action, "blue/0", "--admin", url) == 0
    assert fake.seen == [Seen("POST", f"/pools/blue/upstreams/0/{action}", None, None)]
    assert capsys.readouterr().out.strip() == f"{action} blue/0: ok"


@pytest.mark.parametrize("action", ["drain", "undrain"])
async def test_drain_whole_pool_learns_upstreams_from_status(
    aiohttp_server: ServerFactory, no_token: None, action: str
) -> None:
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    assert await cli(action, "green", "--admin", url) == 0
    assert [(s.method, s.path) for s in fake.seen] == [
        ("GET", "/status"),
        ("POST", f"/pools/green/upstreams/0/{action}"),
        ("POST", f"/pools/green/upstreams/1/{action}"),
    ]


async def test_drain_whole_pool_goes_on_past_a_refusal(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin()
    fake.answers[("POST", "/pools/green/upstreams/0/drain")] = (
        409,
        {"error": "already draining", "detail": "green/0 is draining"},
    )
    url = await start_admin(aiohttp_server, fake)
    assert await cli("drain", "green", "--admin", url) == 1
    assert [s.path for s in fake.seen][-1] == "/pools/green/upstreams/1/drain"
    captured = capsys.readouterr()
    assert "409 already draining: green/0 is draining" in captured.err
    assert "drain green/1" in captured.out


async def test_drain_pool_with_no_upstreams(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin()
    fake.status["pools"]["blue"]["upstreams"] = []
    url = await start_admin(aiohttp_server, fake)
    assert await cli("drain", "blue", "--admin", url) == 0
    assert [s.path for s in fake.seen] == ["/status"]
    assert "pool blue has no upstreams" in capsys.readouterr().out


async def test_reload_posts(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    assert await cli("reload", "--admin", url + "/") == 0
    assert fake.seen == [Seen("POST", "/reload", None, None)]
    assert capsys.readouterr().out.splitlines() == ["reload: ok", "  a1 -> b2"]


async def test_reload_names_what_the_rollout_in_progress_keeps(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    kept = {"split": "kept at 25: the adaptive rollout in progress steers it"}
    fake.answers[("POST", "/reload")] = (
        200,
        {"what": "reload", "before": {"split": 0}, "after": {"split": 80, "kept_by_rollout": kept}},
    )
    assert await cli("reload", "--admin", url) == 0
    assert capsys.readouterr().out.splitlines() == [
        "reload: ok",
        "  split: 0 -> 80",
        "  kept by the rollout in progress: split kept at 25: the adaptive rollout in progress "
        "steers it",
    ]


async def test_admin_url_with_a_path_prefix(aiohttp_server: ServerFactory, no_token: None) -> None:
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    fake.answers[("POST", "/turnout/reload")] = (200, {"reloaded": True})
    assert await cli("reload", "--admin", url + "/turnout") == 0
    assert [s.path for s in fake.seen] == ["/turnout/reload"]


async def test_the_admin_url_comes_from_turnout_admin_unless_given(
    aiohttp_server: ServerFactory,
    no_token: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    for prefix in ("env", "flag"):
        fake.answers[("POST", f"/{prefix}/reload")] = (200, {"reloaded": True})
    monkeypatch.setenv("TURNOUT_ADMIN", url + "/env")
    assert await cli("reload") == 0
    assert await cli("reload", "--admin", url + "/flag") == 0
    assert [s.path for s in fake.seen] == ["/env/reload", "/flag/reload"]
    capsys.readouterr()
    monkeypatch.setenv("TURNOUT_ADMIN", "127.0.0.1:9901")
    assert await cli("reload") == 2
    err = capsys.readouterr().err
    assert err.startswith("turnout reload: TURNOUT_ADMIN: invalid admin URL '127.0.0.1:9901'")
    assert len(fake.seen) == 2


async def test_token_is_sent_as_bearer(
    aiohttp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "s3cret")
    fake = FakeAdmin(token="s3cret")
    url = await start_admin(aiohttp_server, fake)
    assert await cli("status", "--admin", url) == 0
    assert await cli("shift", "green", "5", "--admin", url) == 0
    assert await cli("drain", "green", "--admin", url) == 0
    assert len(fake.seen) >= 4  # status, shift, the pool's listing, a drain per upstream
    assert {s.authorization for s in fake.seen} == {"Bearer s3cret"}


async def test_missing_token_is_refused_with_a_hint(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin(token="s3cret")
    url = await start_admin(aiohttp_server, fake)
    assert await cli("reload", "--admin", url) == 1
    assert fake.seen == [Seen("POST", "/reload", None, None)]
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "turnout reload: POST /reload: 401 unauthorized: missing or wrong bearer token "
        "(set TURNOUT_ADMIN_TOKEN)"
    ]


async def test_wrong_token_is_refused(
    aiohttp_server: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "wrong")
    fake = FakeAdmin(token="s3cret")
    url = await start_admin(aiohttp_server, fake)
    assert await cli("status", "--admin", url) == 1
    err = capsys.readouterr().err
    assert "401 unauthorized" in err
    assert "set TURNOUT_ADMIN_TOKEN" not in err


@pytest.mark.parametrize(
    ("argv", "key", "status", "name", "detail"),
    [
        (["shift", "green", "30"], ("PUT", "/split"), 409, "rollout active", "pause it first"),
        (["shift", "green", "30"], ("PUT", "/split"), 400, "invalid green", "must be 0..100"),
        (["rollout", "promote"], ("POST", "/rollout/promote"), 409, "no rollout", None),
        (
            ["drain", "green/7"],
            ("POST", "/pools/green/upstreams/7/drain"),
            404,
            "unknown upstream",
            {"pool": "green", "index": 7},
        ),
        (
            ["reload"],
            ("POST", "/reload"),
            400,
            "invalid config",
            ["rollout.steps[2]: must be > 25"],
        ),
    ],
)
async def test_server_refusal_prints_error_and_detail(
    aiohttp_server: ServerFactory,
    no_token: None,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    key: tuple[str, str],
    status: int,
    name: str,
    detail: Any,
) -> None:
    fake = FakeAdmin()
    fake.answers[key] = (status, {"error": name, "detail": detail})
    url = await start_admin(aiohttp_server, fake)
    # A reload refused for an invalid file is a config error (2), like `turnout check`.
    assert await cli(*argv, "--admin", url) == (2 if key == ("POST", "/reload") else 1)
    captured = capsys.readouterr()
    assert captured.out == ""
    line, *more = captured.err.splitlines()
    assert line.startswith(f"turnout {argv[0]}: {key[0]} {key[1]}: {status} {name}")
    if isinstance(detail, list):  # a list of problems: each on its own line, all of them
        assert line.endswith(f": {len(detail)} error(s)")
        assert more == [f"  {problem}" for problem in detail]
    elif detail is not None:
        assert more == []
        shown = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True)
        assert line.endswith(f": {shown}")


async def test_non_json_answers_are_runtime_failures(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin()
    fake.answers[("POST", "/reload")] = (502, "Bad Gateway from something in between")
    fake.answers[("GET", "/status")] = (200, "<html>not the admin API</html>")
    url = await start_admin(aiohttp_server, fake)
    assert await cli("reload", "--admin", url) == 1
    assert await cli("status", "--admin", url) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "turnout reload: POST /reload: 502 Bad Gateway: Bad Gateway from something in between",
        "turnout status: GET /status: the admin API did not answer JSON",
    ]


async def test_nothing_listening_is_one_clear_line(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    app = web.Application()
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    await server.close()
    for argv in (["status"], ["shift", "green", "5"], ["drain", "blue"], ["rollout", "abort"]):
        assert await cli(*argv, "--admin", url) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 4
    for line in lines:
        assert f"cannot connect to the admin API at {url}: connection refused" in line
    assert "Traceback" not in err


async def test_a_silent_server_times_out(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAdmin(hold=asyncio.Event())
    url = await start_admin(aiohttp_server, fake)
    try:
        assert await cli("status", "--admin", url, "--timeout", "0.2") == 1
    finally:
        assert fake.hold is not None
        fake.hold.set()
    assert capsys.readouterr().err.strip() == (
        f"turnout status: no answer from the admin API at {url} within 0.2s"
    )


async def test_http_proxy_settings_are_ignored(
    aiohttp_server: ServerFactory, no_token: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeAdmin()
    url = await start_admin(aiohttp_server, fake)
    assert await cli("reload", "--admin", url) == 0
    assert [s.path for s in fake.seen] == ["/reload"]


async def test_admin_client_request_returns_the_answer(aiohttp_server: ServerFactory) -> None:
    fake = FakeAdmin(token="t")
    url = await start_admin(aiohttp_server, fake)
    client = AdminClient(url, "t", timeout=5.0)
    assert "timeout=5s" in repr(client)
    answer = await asyncio.to_thread(client.request, "PUT", "/split", {"green": 7})
    assert answer == {"split": 7, "before": 25.0}
    with pytest.raises(ClientError) as exc:
        await asyncio.to_thread(client.request, "GET", "/nope")
    assert (exc.value.exit_code, exc.value.status) == (1, 404)
    assert str(exc.value) == "GET /nope: 404 not found: GET /nope"


async def test_a_success_from_something_else_is_not_taken_for_one(
    aiohttp_server: ServerFactory, no_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--admin` pointed at the proxy's own port: the application behind it answers 200 to
    anything. The client must not report a shift, a reload or a rollout that never happened."""
    url = await start_admin(aiohttp_server, FakeAdmin(impostor=True))
    for argv in (["shift", "green", "50"], ["reload"], ["rollout", "promote"], ["status"]):
        assert await cli(*argv, "--admin", url) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4
    assert all(f"{url} is not a Turnout admin API" in line for line in lines), lines
