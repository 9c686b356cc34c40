"""Configuration: defaults, durations, every kind of error with its path, example files."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from proxy import config as config_module
from proxy.config import (
    DEFAULT_CONFIG_YAML,
    MAX_DURATION,
    Config,
    ConfigError,
    UpstreamConfig,
    default_config,
    load_config,
    parse_config,
    parse_duration,
    shield_statuses,
)
from proxy.http.accesslog import log_problems

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
# Every file in config/ is a Turnout configuration (deploy/ holds the Kubernetes manifest and
# the Grafana dashboard; tests/test_deploy_files.py checks those).
EXAMPLES = sorted(CONFIG_DIR.iterdir())

BASE: dict[str, Any] = {
    "pools": {
        "blue": {"upstreams": [{"url": "http://127.0.0.1:9001"}]},
        "green": {"upstreams": [{"url": "http://127.0.0.1:9002"}]},
    }
}


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def config_with(**patch: Any) -> Config:
    return parse_config(merged(BASE, patch))


def errors_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def errors_with(**patch: Any) -> list[str]:
    return errors_of(merged(BASE, patch))


# --- defaults ----------------------------------------------------------------------------------


def test_defaults() -> None:
    c = parse_config({"pools": {"blue": {}, "green": {}}})
    assert (c.listen.host, c.listen.port, c.listen.max_connections, c.listen.tls) == (
        "0.0.0.0",
        8080,
        10000,
        None,
    )
    assert (c.admin.host, c.admin.port, c.admin.token_env, c.admin.tls) == (
        "127.0.0.1",
        9901,
        "TURNOUT_ADMIN_TOKEN",
        None,
    )
    assert (c.access_log.to, c.access_log.sample) == ("off", 1.0)
    assert c.pools.blue.upstreams == ()
    assert c.pools.green.tls is None
    assert (c.split, c.balancer) == (0.0, "least_request")
    assert (c.sticky.cookie, c.sticky.header) == (None, None)
    assert c.override_header == "X-Turnout-Pool"
    t = c.timeouts
    assert (t.connect, t.response_headers, t.idle, t.request_headers) == (2.0, 30.0, 60.0, 10.0)
    lim = c.limits
    assert (lim.max_in_flight, lim.queue, lim.queue_timeout, lim.rate) == (256, 512, 1.0, None)
    b = c.breaker
    assert (b.consecutive_failures, b.failure_ratio, b.min_requests) == (5, 0.5, 20)
    assert (b.window, b.open_for, b.half_open_requests) == (10.0, 5.0, 3)
    h = c.health_check
    assert (h.path, h.interval, h.timeout, h.healthy_after, h.unhealthy_after) == (
        "/healthz",
        2.0,
        1.0,
        2,
        3,
    )
    r = c.retries
    assert (r.attempts, r.budget, r.min_per_second) == (2, 0.2, 10.0)
    assert r.methods == ("GET", "HEAD", "OPTIONS")
    assert r.on == ("connect_error", 502, 503, 504)
    assert c.drain.timeout == 30.0
    ro = c.rollout
    assert (ro.strategy, ro.steps, ro.interval, ro.fallback) == (
        "adaptive",
        (1.0, 5.0, 25.0, 50.0, 100.0),
        10.0,
        "rollback",
    )
    th = ro.threshold
    assert (th.max_error_rate, th.max_p99, th.max_p99_ratio, th.min_requests) == (
        0.01,
        0.5,
        1.5,
        50,
    )
    assert (ro.gate.path, ro.gate.expect_status) == (None, 200)
    assert c.gate_path == "/healthz"  # the health check's
    assert ro.shield == ("5xx",)


def test_default_config_matches_its_yaml() -> None:
    c = default_config()
    assert (c.listen.host, c.listen.port) == ("0.0.0.0", 8080)
    assert [u.url for u in c.pools.blue.upstreams] == ["http://127.0.0.1:9001"]
    assert [u.url for u in c.pools.green.upstreams] == ["http://127.0.0.1:9002"]
    assert c == parse_config(yaml.safe_load(DEFAULT_CONFIG_YAML))


def test_complete_example_documents_the_defaults() -> None:
    # config/turnout.yaml spells out every default; drift between it and the code shows here.
    assert load_config(CONFIG_DIR / "turnout.yaml") == default_config()


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("0.5s", 0.5),
        ("1m", 60.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("1ms", 0.001),
        ("0s", 0.0),
        (3, 3.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_duration_forms(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)
    assert config_with(drain={"timeout": text}).drain.timeout == pytest.approx(seconds)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_duration_units(number: int, unit: str) -> None:
    seconds = number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    if seconds > MAX_DURATION:
        with pytest.raises(ValueError, match="at most 168h"):
            parse_duration(f"{number}{unit}")
    else:
        assert parse_duration(f"{number}{unit}") == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("2 sec", "invalid duration '2 sec': expected a number with a unit"),
        ("-1s", "invalid duration '-1s': must not be negative"),
        ("", "invalid duration '': expected a number with a unit"),
        ("2", "invalid duration '2': expected a number with a unit"),
        ("1d", "invalid duration '1d'"),
        ("s", "invalid duration 's'"),
        (-1, "invalid duration -1: must not be negative"),
        (True, "invalid duration True"),
        (None, "invalid duration None"),
        ([1], "invalid duration [1]"),
        (math.inf, "must be finite"),
        ("169h", "invalid duration '169h': at most 168h"),
        (1e300, "at most 168h"),
        # One ASCII number and one unit: full-width digits and compound forms are refused.
        ("\uff11s", "invalid duration '\uff11s': expected a number with a unit"),
        ("1h1m", "invalid duration '1h1m': expected a number with a unit"),
        (".5s", "invalid duration '.5s': expected a number with a unit"),
        ("2s ms", "invalid duration '2s ms'"),
        # Below a millisecond a timer only keeps the loop busy.
        (1.0e-300, "invalid duration 1e-300: 0 or at least 1ms"),
        ("0.5ms", "invalid duration '0.5ms': 0 or at least 1ms"),
    ],
)
def test_bad_durations(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)
    (line,) = errors_with(drain={"timeout": value})
    assert line.startswith("drain.timeout: ")
    assert fragment in line


def test_counts_that_size_tables_are_bounded() -> None:
    # A few digits too many is an error here, not an overflow when a queue is built (or when
    # the limits are divided among workers).
    huge = 10**20
    assert errors_with(
        limits={"max_in_flight": huge, "queue": huge}, listen={"max_connections": huge}
    ) == [
        "listen.max_connections: must be <= 1000000",
        "limits.max_in_flight: must be <= 1000000",
        "limits.queue: must be <= 1000000",
    ]
    assert config_with(limits={"queue": 1_000_000}).limits.queue == 1_000_000


def test_positive_durations_refuse_zero() -> None:
    assert errors_with(timeouts={"connect": "0s", "idle": 0}) == [
        "timeouts.connect: duration '0s' must be > 0",
        "timeouts.idle: duration 0 must be > 0",
    ]
    assert config_with(drain={"timeout": "0s"}).drain.timeout == 0.0


# --- errors: paths and messages ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"listen": {"port": 70000}}, "listen.port: must be <= 65535"),
        ({"listen": {"port": -1}}, "listen.port: must be >= 0"),
        ({"listen": {"port": "80"}}, "listen.port: must be an integer, not '80'"),
        ({"listen": {"port": True}}, "listen.port: must be an integer, not true"),
        ({"listen": {"max_connections": 0}}, "listen.max_connections: must be >= 1"),
        ({"listen": {"host": ""}}, "listen.host: must not be empty"),
        ({"listen": {"tls": "yes"}}, "listen.tls: must be a mapping, not 'yes'"),
        ({"admin": {"port": 65536}}, "admin.port: must be <= 65535"),
        ({"admin": {"token_env": 5}}, "admin.token_env: must be a string, not 5"),
        ({"access_log": {"sample": 1.5}}, "access_log.sample: must be <= 1"),
        ({"access_log": {"to": True}}, "access_log.to: must be a string, not true"),
        ({"access_log": {"to": ""}}, "access_log.to: must be stdout, stderr, off or a file"),
        ({"pools": {"blue": None}}, "pools.blue: must be a mapping, not null"),
        ({"pools": {"green": {"upstreams": {}}}}, "pools.green.upstreams: must be a list"),
        (
            {"pools": {"blue": {"upstreams": [{"weight": 2}]}}},
            "pools.blue.upstreams[0].url: required",
        ),
        (
            {"pools": {"blue": {"upstreams": [{"url": "http://a", "weight": 1001}]}}},
            "pools.blue.upstreams[0].weight: must be <= 1000",
        ),
        (
            {"pools": {"blue": {"upstreams": [{"url": "http://a", "weight": 0}]}}},
            "pools.blue.upstreams[0].weight: must be >= 1",
        ),
        ({"split": 100.5}, "split: must be <= 100"),
        ({"split": -1}, "split: must be >= 0"),
        ({"split": "5"}, "split: must be a number, not '5'"),
        ({"split": math.nan}, "split: must be a finite number"),
        (
            {"balancer": "p2c"},
            "balancer: must be 'round_robin', 'random' or 'least_request', not 'p2c'",
        ),
        ({"sticky": {"cookie": "a b"}}, "sticky.cookie: 'a b' is not a valid header name"),
        ({"sticky": {"header": ""}}, "sticky.header: '' is not a valid header name"),
        ({"override_header": "X:Pool"}, "override_header: 'X:Pool' is not a valid header name"),
        ({"limits": {"max_in_flight": 0}}, "limits.max_in_flight: must be >= 1"),
        ({"limits": {"queue": -1}}, "limits.queue: must be >= 0"),
        ({"limits": {"rate": 0}}, "limits.rate: must be > 0"),
        ({"breaker": {"failure_ratio": 0}}, "breaker.failure_ratio: must be > 0"),
        ({"breaker": {"failure_ratio": 1.1}}, "breaker.failure_ratio: must be <= 1"),
        ({"breaker": {"half_open_requests": 0}}, "breaker.half_open_requests: must be >= 1"),
        (
            {"health_check": {"path": "healthz"}},
            "health_check.path: 'healthz' must be a path starting with '/'",
        ),
        ({"health_check": {"unhealthy_after": 0}}, "health_check.unhealthy_after: must be >= 1"),
        ({"retries": {"attempts": 11}}, "retries.attempts: must be <= 10"),
        ({"retries": {"budget": -0.1}}, "retries.budget: must be >= 0"),
        ({"retries": {"min_per_second": -1}}, "retries.min_per_second: must be >= 0"),
        ({"rollout": {"shield": [404]}}, "rollout.shield[0]: status 404 is not a 5xx status"),
        (
            {"rollout": {"shield": ["5xx", "4xx"]}},
            "rollout.shield[1]: must be a status 500..599 or 5xx, not '4xx'",
        ),
        ({"rollout": {"shield": "5xx"}}, "rollout.shield: must be a list, not '5xx'"),
        ({"retries": {"methods": "GET"}}, "retries.methods: must be a list, not 'GET'"),
        ({"retries": {"methods": ["GE T"]}}, "retries.methods[0]: 'GE T' is not a valid HTTP"),
        ({"retries": {"on": [502, 404]}}, "retries.on[1]: status 404 is not a 5xx status"),
        (
            {"retries": {"on": ["reset"]}},
            "retries.on[0]: must be connect_error, timeout or a status 500..599, not 'reset'",
        ),
        (
            {"rollout": {"strategy": "canary"}},
            "rollout.strategy: must be 'eager', 'lazy' or 'adaptive', not 'canary'",
        ),
        ({"rollout": {"fallback": "stop"}}, "rollout.fallback: must be 'rollback' or 'pause'"),
        (
            {"rollout": {"threshold": {"max_error_rate": 2}}},
            "rollout.threshold.max_error_rate: must be <= 1",
        ),
        (
            {"rollout": {"threshold": {"max_p99_ratio": 0.9}}},
            "rollout.threshold.max_p99_ratio: must be >= 1",
        ),
        (
            {"rollout": {"threshold": {"min_requests": 0}}},
            "rollout.threshold.min_requests: must be >= 1",
        ),
        ({"rollout": {"gate": {"expect_status": 600}}}, "rollout.gate.expect_status: must be <="),
        ({"rollout": {"gate": {"expect_status": 99}}}, "rollout.gate.expect_status: must be >="),
    ],
)
def test_error_paths(patch: dict[str, Any], expected: str) -> None:
    (line,) = errors_with(**patch)
    assert line.startswith(expected)


def test_every_error_at_once() -> None:
    data = {
        "listen": {"port": 70000, "colour": "blue"},
        "pools": {
            "blue": {
                "upstreams": [
                    {"url": "http://a:80"},
                    {"url": "ftp://b"},
                    {"url": "http://A/", "weight": 0},
                ]
            }
        },
        "split": 101,
        "timeouts": {"connect": "2 sec"},
        "retries": {"on": [404]},
        "rollout": {"steps": [1, 25, 10, 100], "threshold": {"max_p99": "-1s"}},
    }
    assert errors_of(data) == [
        "listen.port: must be <= 65535",
        "listen.colour: unknown key",
        "pools.blue.upstreams[1].url: invalid url 'ftp://b': "
        "must be http://host:port or https://host:port",
        "pools.blue.upstreams[2].weight: must be >= 1",
        "pools.blue.upstreams[2].url: duplicate of upstreams[0]",
        "pools.green: required",
        "split: must be <= 100",
        "timeouts.connect: invalid duration '2 sec': expected a number with a unit ms, s, m or h "
        "(e.g. 250ms, 2s, 1.5s, 1m; one unit, ASCII digits)",
        "retries.on[0]: status 404 is not a 5xx status (500..599)",
        "rollout.steps[2]: must be > 25",
        "rollout.threshold.max_p99: invalid duration '-1s': must not be negative",
    ]


def test_config_error_str_joins_lines() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"split": 200, "balancer": "x"})
    assert str(info.value) == "\n".join(info.value.errors)
    assert info.value.errors[0] == "pools: required"
    assert len(info.value.errors) == 3


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, ["pools: required"]),
        (None, ["pools: required"]),
        ([], ["(top level): must be a mapping, not a list"]),
        ("pools", ["(top level): must be a mapping, not 'pools'"]),
        ({"pools": {}}, ["pools.blue: required", "pools.green: required"]),
        ({"pools": []}, ["pools: must be a mapping, not a list"]),
    ],
)
def test_top_level_and_pools_required(data: object, expected: list[str]) -> None:
    assert errors_of(data) == expected


def test_unknown_keys_at_every_depth(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    data = merged(
        BASE,
        {
            "colour": "blue",
            "listen": {"tls": {"cert": str(cert), "key": str(cert), "ciphers": "x"}},
            "pools": {
                "blue": {"upstreams": [{"url": "http://127.0.0.1:9001", "wieght": 2}]},
                "red": {},
            },
            "rollout": {"threshold": {"p99": "1s"}, "gate": {"method": "GET"}},
        },
    )
    assert errors_of(data) == [
        "listen.tls.ciphers: unknown key",
        "pools.blue.upstreams[0].wieght: unknown key",
        "pools.red: unknown key",
        "rollout.threshold.p99: unknown key",
        "rollout.gate.method: unknown key",
        "colour: unknown key",
    ]


def test_non_string_keys_get_a_path() -> None:
    data = merged(BASE, {"listen": {8080: 1, None: 2, False: 3}})
    assert errors_of(data) == [
        "listen.8080: unknown key",
        "listen.null: unknown key",
        "listen.false: unknown key",
    ]


# --- YAML 1.1 booleans -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [False, "off"])
def test_access_log_off(value: object) -> None:
    assert config_with(access_log={"to": value}).access_log.to == "off"


@pytest.mark.parametrize("target", ["stdout", "stderr", "/var/log/turnout.jsonl"])
def test_access_log_targets(target: str) -> None:
    assert config_with(access_log={"to": target}).access_log.to == target


def test_yaml_1_1_booleans_from_safe_load() -> None:
    text = "access_log: {to: off}\nretries: {on: [timeout, 503]}\n"
    data = merged(BASE, yaml.safe_load(text))
    assert True in data["retries"]  # what a YAML 1.1 reader makes of the key `on`
    c = parse_config(data)
    assert c.access_log.to == "off"
    assert c.retries.on == ("timeout", 503)


def test_load_config_keeps_off_and_on_as_words(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(BASE) + "access_log: {to: off}\nretries: {on: [connect_error]}\n"
        "sticky: {cookie: no}\n"
    )
    c = load_config(path)
    assert c.access_log.to == "off"
    assert c.retries.on == ("connect_error",)
    assert c.sticky.cookie == "no"


# --- rollout steps -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([1, 25, 10, 50, 100], ["rollout.steps[2]: must be > 25"]),
        ([5, 5, 100], ["rollout.steps[1]: must be > 5"]),
        ([1, 5, 50], ["rollout.steps[2]: the last step must be 100"]),
        (
            [50, 10, 5],
            [
                "rollout.steps[1]: must be > 50",
                "rollout.steps[2]: must be > 10",
                "rollout.steps[2]: the last step must be 100",
            ],
        ),
        (
            [1, 25, 10, 50],
            ["rollout.steps[2]: must be > 25", "rollout.steps[3]: the last step must be 100"],
        ),
        ([0, 100], ["rollout.steps[0]: must be > 0"]),
        ([1, 150, 100], ["rollout.steps[1]: must be <= 100"]),
        ([1, "x", 100], ["rollout.steps[1]: must be a number, not 'x'"]),
        ([1, 200, 0.5, 100], ["rollout.steps[1]: must be <= 100", "rollout.steps[2]: must be > 1"]),
        ([], ["rollout.steps: must not be empty"]),
        ("1,5,100", ["rollout.steps: must be a list, not '1,5,100'"]),
    ],
)
def test_steps_errors(steps: object, expected: list[str]) -> None:
    assert errors_with(rollout={"steps": steps}) == expected


def test_steps_accept_fractions_and_a_single_step() -> None:
    assert config_with(rollout={"steps": [0.5, 2.5, 100]}).rollout.steps == (0.5, 2.5, 100.0)
    assert config_with(rollout={"steps": [100]}).rollout.steps == (100.0,)


# --- upstreams and pools -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port"),
    [
        ("http://127.0.0.1:9001", "http", "127.0.0.1", 9001),
        ("http://example.com", "http", "example.com", 80),
        ("https://Example.com/", "https", "example.com", 443),
        ("HTTPS://10.0.0.6:8443", "https", "10.0.0.6", 8443),
        ("http://[::1]:8000", "http", "::1", 8000),
    ],
)
def test_upstream_url_parts(url: str, scheme: str, host: str, port: int) -> None:
    upstream = UpstreamConfig(url=url)
    assert (upstream.url, upstream.scheme, upstream.host, upstream.port) == (
        url,
        scheme,
        host,
        port,
    )
    assert upstream.weight == 1


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://a:21", "must be http://host:port or https://host:port"),
        ("127.0.0.1:9001", "must be http://host:port or https://host:port"),
        ("http://", "must be http://host:port or https://host:port"),
        ("http://a:9001/api", "must not have a path ('/api')"),
        ("http://a:9001/?x=1", "must not have a query or fragment"),
        ("http://a:9001#top", "must not have a query or fragment"),
        ("http://user:pw@a:9001", "must not contain user info"),
        ("http://a:99999", "invalid url 'http://a:99999'"),
        ("http://a:port", "invalid url 'http://a:port'"),
        ("http://a:0", "port must be 1..65535"),
        ("http://" + "a" * 64 + ".example:80", "not a valid host name"),
        ("http://a..b:80", "not a valid host name"),
        ("http://a b", "empty or contains spaces"),
        ("", "empty or contains spaces"),
    ],
)
def test_bad_upstream_urls(url: str, fragment: str) -> None:
    (line,) = errors_with(pools={"green": {"upstreams": [{"url": url}]}})
    assert line.startswith("pools.green.upstreams[0].url: invalid url")
    assert fragment in line


def test_upstream_url_must_be_a_string() -> None:
    assert errors_with(pools={"green": {"upstreams": [{"url": 9002}]}}) == [
        "pools.green.upstreams[0].url: must be a string, not 9002"
    ]


def test_duplicate_upstreams_in_one_pool() -> None:
    upstreams = [
        {"url": "http://a:80"},
        {"url": "http://b:80"},
        {"url": "http://A"},
        {"url": "https://a:80"},
        {"url": "http://b:80/"},
    ]
    assert errors_with(pools={"blue": {"upstreams": upstreams}}) == [
        "pools.blue.upstreams[2].url: duplicate of upstreams[0]",
        "pools.blue.upstreams[4].url: duplicate of upstreams[1]",
    ]
    # The same upstream in both pools is allowed (e.g. while rehearsing a rollout).
    same = {"upstreams": [{"url": "http://a:80"}]}
    assert config_with(pools={"blue": same, "green": same}).pools.green.upstreams[0].port == 80


def test_empty_pools_are_allowed() -> None:
    c = config_with(pools={"green": {"upstreams": []}})
    assert c.pools.green.upstreams == ()


# --- TLS files ---------------------------------------------------------------------------------


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    names = {}
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text(f"-----{name}-----\n")
        names[name] = str(path)
    return names


def test_listen_and_admin_tls(pem: dict[str, str]) -> None:
    tls = {"cert": pem["cert"], "key": pem["key"]}
    c = config_with(listen={"tls": tls}, admin={"tls": {**tls, "min_version": 1.3}})
    assert c.listen.tls is not None
    assert c.admin.tls is not None
    assert (c.listen.tls.cert, c.listen.tls.key, c.listen.tls.min_version) == (
        pem["cert"],
        pem["key"],
        "1.2",
    )
    assert c.admin.tls.min_version == "1.3"
    assert config_with(listen={"tls": {**tls, "min_version": "1.3"}}).listen.tls is not None


def test_tls_needs_cert_and_key() -> None:
    assert errors_with(listen={"tls": {}}, admin={"tls": {"min_version": "1.3"}}) == [
        "listen.tls.cert: required",
        "listen.tls.key: required",
        "admin.tls.cert: required",
        "admin.tls.key: required",
    ]


def test_tls_file_errors(pem: dict[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    assert errors_with(
        listen={"tls": {"cert": missing, "key": str(tmp_path), "min_version": "1.1"}}
    ) == [
        f"listen.tls.cert: file not found: {missing}",
        f"listen.tls.key: not a regular file: {tmp_path}",
        "listen.tls.min_version: must be '1.2' or '1.3', not '1.1'",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_tls_unreadable_file(pem: dict[str, str]) -> None:
    os.chmod(pem["key"], 0)
    (line,) = errors_with(listen={"tls": {"cert": pem["cert"], "key": pem["key"]}})
    assert line == f"listen.tls.key: file not readable: {pem['key']}"


def test_upstream_tls(pem: dict[str, str], tmp_path: Path) -> None:
    c = config_with(pools={"green": {"tls": pem}})
    assert c.pools.green.tls is not None
    assert c.pools.green.tls.ca == pem["ca"]
    only_ca = config_with(pools={"green": {"tls": {"ca": pem["ca"]}}}).pools.green.tls
    assert only_ca is not None
    assert only_ca.cert is None
    assert errors_with(pools={"green": {"tls": {"cert": pem["cert"]}}}) == [
        "pools.green.tls.key: required when cert is given"
    ]
    missing = str(tmp_path / "nope.pem")
    # The pairing is reported together with the file error, not instead of it.
    assert errors_with(pools={"blue": {"tls": {"key": missing}}}) == [
        f"pools.blue.tls.key: file not found: {missing}",
        "pools.blue.tls.cert: required when key is given",
    ]


# --- normalisation and cross-field checks ------------------------------------------------------


def test_retries_normalised() -> None:
    r = config_with(
        retries={"methods": ["get", "Put", "GET"], "on": ["502", "timeout", 502]}
    ).retries
    assert r.methods == ("GET", "PUT")
    assert r.on == (502, "timeout")
    assert config_with(retries={"methods": [], "on": []}).retries.methods == ()


def test_listen_and_admin_must_not_share_a_port() -> None:
    assert errors_with(admin={"port": 8080}) == ["admin.port: same as listen.port (8080)"]
    assert errors_with(listen={"host": "127.0.0.1", "port": 9901}) == [
        "admin.port: same as listen.port (9901)"
    ]
    assert config_with(listen={"port": 0}, admin={"port": 0}).admin.port == 0
    apart = config_with(listen={"host": "10.0.0.1", "port": 9901})
    assert apart.listen.port == apart.admin.port


def test_sticky_both_allowed() -> None:
    c = config_with(sticky={"cookie": "session_id", "header": "X-User-Id"})
    assert (c.sticky.cookie, c.sticky.header) == ("session_id", "X-User-Id")


# --- immutability ------------------------------------------------------------------------------


def _model_classes() -> list[type[pydantic.BaseModel]]:
    return [
        value
        for value in vars(config_module).values()
        if isinstance(value, type)
        and issubclass(value, pydantic.BaseModel)
        and value.__module__ == config_module.__name__
        and not value.__name__.startswith("_")
    ]


def test_every_model_is_frozen_and_strict_about_keys() -> None:
    classes = _model_classes()
    assert {cls.__name__ for cls in classes} >= {"Config", "UpstreamConfig", "GateConfig"}
    assert len(classes) == 23
    for cls in classes:
        assert cls.model_config.get("frozen") is True, cls
        assert cls.model_config.get("extra") == "forbid", cls


def test_models_are_frozen() -> None:
    c = default_config()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        c.split = 50
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        c.pools.blue.upstreams[0].weight = 5
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        c.pools.blue.upstreams[0].port = 1  # type: ignore[misc]
    assert isinstance(c.rollout.steps, tuple)
    assert isinstance(c.retries.methods, tuple)
    assert isinstance(c.pools.blue.upstreams, tuple)
    assert hash(c) == hash(default_config())


# --- files -------------------------------------------------------------------------------------


def test_examples_exist() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"turnout.yaml", "minimal.yaml", "canary-sticky.yaml", "lazy.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path: Path) -> None:
    c = load_config(path)
    assert path.read_text().startswith("#"), "every example starts with a comment header"
    # A YAML 1.1 reader (off/on become booleans) must give the same configuration.
    assert parse_config(yaml.safe_load(path.read_text())) == c


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("pools:\n  blue: {upstreams: []}\n  green: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.errors
    assert line.startswith(f"{path}:4:1: invalid YAML: ")


def test_yaml_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("pools:\n  blue: {}\n  green: {}\nsplit: 5\nsplit: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}:5:1: duplicate key 'split'"]


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "pools:\n  blue: &pool {upstreams: [{url: 'http://a:1'}]}\n"
        "  green:\n    <<: *pool\n    upstreams: [{url: 'http://b:2'}]\n"
    )
    assert load_config(path).pools.green.upstreams[0].url == "http://b:2"


def test_load_config_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=rf"^{missing}: cannot read: No such file"):
        load_config(missing)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_config(listing)
    assert info.value.errors == [f"{listing}: top level must be a mapping, not a list"]
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(empty))
    assert info.value.errors == ["pools: required"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


@pytest.mark.parametrize(
    ("text", "where"),
    [("a: &a [*a]\n", "a[0]"), ("split: 5\nrollout: &r {gate: {x: *r}}\n", "rollout.gate.x")],
)
def test_an_alias_that_contains_itself_is_an_error_not_a_crash(
    tmp_path: Path, text: str, where: str
) -> None:
    path = tmp_path / "turnout.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{where}: a YAML alias that contains itself"]


def test_an_access_log_that_cannot_be_written_is_a_config_problem(tmp_path: Path) -> None:
    def problems(to: str) -> list[str]:
        pools: dict[str, Any] = {"blue": {"upstreams": []}, "green": {"upstreams": []}}
        return log_problems(parse_config({"access_log": {"to": to}, "pools": pools}))

    assert problems(str(tmp_path / "access.log")) == []
    assert problems("stdout") == []
    assert problems("/nonexistent/dir/access.log") == [
        "access_log.to: directory /nonexistent/dir does not exist"
    ]
    assert problems(str(tmp_path)) == [f"access_log.to: {tmp_path} is a directory"]


@pytest.mark.parametrize(
    ("shield", "statuses"),
    [
        (["5xx"], set(range(500, 600))),
        ([500, "503", 500], {500, 503}),
        (["5XX", 502], set(range(500, 600))),
        ([], set()),
    ],
)
def test_rollout_shield_names_statuses_or_the_5xx_class(
    shield: list[object], statuses: set[int]
) -> None:
    config = parse_config(
        {
            "pools": {
                "blue": {"upstreams": [{"url": "http://127.0.0.1:1"}]},
                "green": {"upstreams": [{"url": "http://127.0.0.1:2"}]},
            },
            "rollout": {"shield": shield},
        }
    )
    assert shield_statuses(config.rollout.shield) == statuses


def test_a_config_round_trips_through_its_json_dump() -> None:
    """A supervisor sends its workers the configuration as JSON: every setting reads back."""
    c = parse_config(
        {
            "listen": {"max_header_fields": 50},
            "pools": {
                "blue": {
                    "upstreams": [{"url": "http://127.0.0.1:1"}],
                    "health_check": {"host": "blue.example", "headers": {"X-Probe": "b"}},
                },
                "green": {"upstreams": [{"url": "http://127.0.0.1:2"}]},
            },
            "health_check": {"host": "shop.example:8000", "headers": {"X-Probe": "all"}},
            "override_header": None,
            "state_file": "off",
            "rollout": {"gate": {"path": "/gate"}},
        }
    )
    assert parse_config(json.loads(json.dumps(c.model_dump(mode="json")))) == c
