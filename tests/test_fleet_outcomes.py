"""Outcome reports between fleet members (proxy/fleet/outcomes.py), without etcd: a member's
real proxy counts real requests, its tap writes reports, and the leader's tap (another real
proxy) takes them as etcd would hand them over: in order, twice, late, or not at all."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest
from conftest import HOST, ProxyFactory, Sample, SampleFactory, proxy_config

from proxy.fleet.outcomes import FRESH, OutcomeTap
from proxy.runtime import Proxy

Pair = tuple[Proxy, Proxy, Sample]


async def send(proxy: Proxy, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(f"http://{HOST}:{proxy.port}/") as resp:
                await resp.read()


def counted(proxy: Proxy) -> tuple[int, int]:
    """The blue pool's requests and errors in `proxy`'s analysis window."""
    figures = proxy.figures("blue")
    return figures.requests, figures.errors


@pytest.fixture
async def pair(sample: SampleFactory, make_proxy: ProxyFactory) -> Pair:
    """A member and a leader, each a proxy in front of the same blue and green."""
    blue, green = await sample("blue"), await sample("green")
    member = await make_proxy(proxy_config([blue.url], [green.url]))
    leader = await make_proxy(proxy_config([blue.url], [green.url]))
    return member, leader, blue


async def test_a_report_lost_on_the_way_is_carried_by_the_next(
    pair: Pair,
) -> None:
    member, leader, blue = pair
    tap, leading = OutcomeTap(member), OutcomeTap(leader)
    # What a member counted from its first moment is in its first report: a candidate may
    # fail as the fleet forms.
    await send(member, 10)
    first = tap.take(counting=True)
    assert first is not None
    leading.merge("m1", first, wall=100.0)
    assert counted(leader) == (10, 0)
    assert leading.reporting(100.0) == {"m1"}

    await send(member, 10)
    lost = tap.take(counting=True)
    assert lost is not None  # never delivered
    blue.settings.error_rate = 1.0
    await send(member, 5)
    carried = tap.take(counting=True)
    assert carried is not None
    leading.merge("m1", carried, wall=100.5)
    assert counted(leader) == (25, 5)
    # Read twice (a watch resumed from an older revision): nothing more.
    leading.merge("m1", carried, wall=100.6)
    assert counted(leader) == (25, 5)
    assert counted(member) == (25, 5)


async def test_a_leader_counts_only_what_it_did_not_count_itself(
    pair: Pair,
) -> None:
    member, leader, _ = pair
    tap, leading = OutcomeTap(member), OutcomeTap(leader)
    first = tap.take(counting=True)
    assert first is not None
    leading.merge("m1", first, wall=10.0)
    # While the member leads, its windows hold the others' outcomes too: they are not its own.
    await send(member, 7)
    assert tap.take(counting=False) is None
    tap.restart()
    await send(member, 3)
    report = tap.take(counting=True)
    assert report is not None
    leading.merge("m1", report, wall=10.25)
    assert counted(leader) == (3, 0)


async def test_after_a_silence_or_a_restart_only_the_last_increase_counts(
    pair: Pair,
) -> None:
    member, leader, _ = pair
    tap, leading = OutcomeTap(member), OutcomeTap(leader)
    report = tap.take(counting=True)
    assert report is not None
    leading.merge("m1", report, wall=50.0)
    await send(member, 4)
    assert tap.take(counting=True) is not None  # never delivered
    await send(member, 1)
    late = tap.take(counting=True)
    assert late is not None
    # Heard from after longer than FRESH: what it counted before its last report may belong
    # to an earlier step.
    leading.merge("m1", late, wall=50.0 + FRESH + 0.1)
    assert counted(leader) == (1, 0)
    assert leading.reporting(50.0 + FRESH + 0.1) == {"m1"}
    assert leading.reporting(50.0 + 2 * FRESH + 0.2) == set()

    # The same instance name, a new process: its totals start again from zero.
    again = OutcomeTap(member)
    await send(member, 2)
    fresh = again.take(counting=True)
    assert fresh is not None
    leading.merge("m1", fresh, wall=51.5)
    assert counted(leader) == (3, 0)
    await send(member, 2)
    fresh = again.take(counting=True)
    assert fresh is not None
    leading.merge("m1", fresh, wall=51.75)
    assert counted(leader) == (5, 0)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b'{"pools": {"blue": {"requests": 5, "errors": 0, "latency": {"3": 5}}}}',
        b'{"epoch": "e", "totals": {"blue": {"errors": -1, "latency": {}}}, "last": {}}',
        b'{"epoch": "e", "totals": {"blue": {"errors": true, "latency": {}}}, "last": {}}',
        b'{"epoch": "e", "totals": {"blue": {"errors": 0, "latency": {"100000": 1}}}, "last": {}}',
        b'{"epoch": "e", "totals": {"blue": {"errors": 0, "latency": {"x": 1}}}, "last": {}}',
        b'{"epoch": "e", "totals": {"blue": {"errors": 0}}, "last": {}}',
        b'{"epoch": "e", "totals": ["blue"], "last": {}}',
        b'{"epoch": "e", "totals": {}}',
    ],
)
async def test_an_unreadable_report_is_ignored_with_a_warning(
    raw: bytes, pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    _, leader, _ = pair
    leading = OutcomeTap(leader)
    good = b'{"epoch": "e", "totals": {"blue": {"errors": 0, "latency": {"3": 5}}}, "last": {}}'
    leading.merge("m1", good, wall=1.0)
    with caplog.at_level(logging.WARNING, logger="turnout.fleet"):
        leading.merge("m1", raw, wall=1.25)
    assert "unreadable outcomes from m1" in caplog.text
    assert counted(leader) == (0, 0)
    # The last good report stays the one the next is counted from.
    after = (
        b'{"epoch": "e", "totals": {"blue": {"errors": 1, "latency": {"3": 7}}},'
        b' "last": {"blue": {"errors": 0, "latency": {"3": 1}}}}'
    )
    leading.merge("m1", after, wall=1.5)
    assert counted(leader) == (2, 1)


def report(errors: int, requests: int) -> bytes:
    """A report with these totals for blue, all in one latency bin, and no last increase."""
    blue = {"errors": errors, "latency": {"3": requests}}
    return json.dumps({"epoch": "e", "totals": {"blue": blue}, "last": {}}).encode()


async def test_totals_that_go_backwards_count_nothing(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    _, leader, _ = pair
    leading = OutcomeTap(leader)
    leading.merge("m1", report(2, 9), 1.0)
    with caplog.at_level(logging.WARNING, logger="turnout.fleet"):
        leading.merge("m1", report(1, 9), 1.2)
    assert "went backwards" in caplog.text
    assert counted(leader) == (0, 0)
    leading.merge("m1", report(1, 12), 1.4)
    assert counted(leader) == (3, 0)
