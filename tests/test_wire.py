"""The supervisor<->worker wire format: every message survives encode, JSON and decode unchanged,
and a malformed one is refused with a WireError that says where."""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import parse_config
from proxy.logic.admission import SHED_REASONS
from proxy.logic.breaker import BreakerState
from proxy.logic.routing import POOLS
from proxy.procs.shared import (
    OutcomeReport,
    PoolOutcomes,
    RoutingState,
    UpstreamOutcomes,
    UpstreamRoute,
)
from proxy.procs.wire import (
    INT,
    READY,
    STOP,
    STR,
    Ready,
    Stop,
    WireError,
    encode_message,
    optional,
    read_message,
    record,
)

CONFIG = parse_config(
    {
        "pools": {
            "blue": {"upstreams": [{"url": "http://127.0.0.1:9001"}]},
            "green": {"upstreams": [{"url": "http://127.0.0.1:9002", "weight": 3}]},
        },
        "split": 5,
    }
)


def over_json(wire: dict[str, Any]) -> dict[str, Any]:
    crossed: dict[str, Any] = json.loads(json.dumps(wire))
    return crossed


# strategies -----------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=2**53)
numbers = st.floats(allow_nan=False)
names = st.text(max_size=12)
pools = st.sampled_from(POOLS)
routes = st.builds(
    UpstreamRoute, url=names, weight=counts, healthy=st.booleans(), draining=st.booleans(),
    drained=st.booleans(),
)  # fmt: skip
routing_states = st.builds(
    RoutingState,
    generation=counts,
    split=numbers,
    stable=pools,
    config=st.just(CONFIG),
    config_generation=counts,
    pools=st.fixed_dictionaries({p: st.lists(routes, max_size=4).map(tuple) for p in POOLS}),
    published_at=numbers,
    fence=names,
)
by_code = st.dictionaries(st.integers(-(2**40), 2**40), counts, max_size=5)
pool_outcomes = st.builds(
    PoolOutcomes,
    requests=counts,
    errors=counts,
    latency=by_code,
    duration=st.lists(counts, max_size=12),
    duration_sum=numbers,
    retries=st.dictionaries(names, counts, max_size=3),
)
upstream_outcomes = st.builds(
    UpstreamOutcomes,
    in_flight=counts,
    queued=counts,
    breaker=st.sampled_from(BreakerState),
    requests=counts,
    failures=counts,
    codes=by_code,
    shed=st.dictionaries(st.sampled_from(SHED_REASONS), counts),
    attempts=st.dictionaries(names, counts, max_size=3),
)
reports = st.builds(
    OutcomeReport,
    member=names,
    generation=counts,
    applied_at=numbers,
    served=counts,
    connections=counts,
    rescued=counts,
    pools=st.dictionaries(pools, pool_outcomes),
    upstreams=st.dictionaries(st.tuples(pools, names), upstream_outcomes, max_size=4),
    unrouted=st.dictionaries(names, by_code, max_size=3),
    timeouts=st.dictionaries(names, counts, max_size=3),
)


# round trips ----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(state=routing_states)
def test_routing_state_round_trips(state: RoutingState) -> None:
    assert RoutingState.from_wire(over_json(state.to_wire()), None) == state
    # Without the configuration: the receiver's own, of the same config_generation, stands in.
    bare = over_json(state.to_wire(with_config=False))
    assert "config" not in bare
    decoded = RoutingState.from_wire(bare, state)
    assert decoded == state
    assert decoded.config is state.config


@settings(max_examples=150, deadline=None)
@given(report=reports)
def test_outcome_report_round_trips(report: OutcomeReport) -> None:
    assert OutcomeReport.from_wire(over_json(report.to_wire())) == report


@settings(max_examples=100, deadline=None)
@given(outcomes=pool_outcomes, upstream=upstream_outcomes)
def test_outcomes_round_trip(outcomes: PoolOutcomes, upstream: UpstreamOutcomes) -> None:
    assert PoolOutcomes.from_wire(over_json(outcomes.to_wire())) == outcomes
    assert UpstreamOutcomes.from_wire(over_json(upstream.to_wire())) == upstream


@given(pid=counts, timeout=numbers)
def test_link_messages_round_trip(pid: int, timeout: float) -> None:
    assert READY.decode(over_json(READY.encode(Ready(pid))), "ready") == Ready(pid)
    assert STOP.decode(over_json(STOP.encode(Stop(timeout))), "stop") == Stop(timeout)


def test_an_int_where_a_float_goes_is_a_float() -> None:
    stop = STOP.decode({"timeout": 2}, "stop")
    assert stop == Stop(2.0)
    assert type(stop.timeout) is float


async def test_messages_cross_the_link_as_json_lines() -> None:
    report = OutcomeReport(
        member="worker-0",
        generation=3,
        applied_at=1.5,
        served=7,
        connections=2,
        rescued=0,
        pools={"blue": PoolOutcomes(requests=7, errors=1, latency={3: 6, 9: 1})},
        upstreams={
            ("blue", "127.0.0.1:9001"): UpstreamOutcomes(
                in_flight=1, queued=0, breaker=BreakerState.HALF_OPEN, codes={200: 6, 502: 1}
            )
        },
        unrouted={"blue": {503: 2}},
    )
    reader = asyncio.StreamReader()
    reader.feed_data(encode_message("report", report.to_wire()))
    reader.feed_data(encode_message("stop", STOP.encode(Stop(0.5))))
    reader.feed_eof()
    message = await read_message(reader)
    assert message is not None
    assert message[0] == "report"
    assert OutcomeReport.from_wire(message[1]) == report
    assert await read_message(reader) == ("stop", {"timeout": 0.5})
    assert await read_message(reader) is None


# refusals -------------------------------------------------------------------------------------


def a_report() -> dict[str, Any]:
    report = OutcomeReport(
        member="worker-1",
        generation=1,
        applied_at=2.0,
        served=1,
        connections=1,
        rescued=0,
        pools={"green": PoolOutcomes(requests=1, latency={4: 1}, duration=[1, 0])},
        upstreams={
            ("green", "h:1"): UpstreamOutcomes(in_flight=0, queued=0, breaker=BreakerState.OPEN)
        },
        unrouted={},
        timeouts={"head": 1},
    )
    return over_json(report.to_wire())


def a_state() -> dict[str, Any]:
    state = RoutingState(
        generation=2,
        split=10.0,
        stable="blue",
        config=CONFIG,
        config_generation=1,
        pools={"blue": (UpstreamRoute("http://h:1", 1, True, False, False),), "green": ()},
        published_at=3.0,
    )
    return over_json(state.to_wire())


def changed(wire: dict[str, Any], path: tuple[Any, ...], value: Any = ...) -> dict[str, Any]:
    """A copy of `wire` with the value at `path` replaced (deleted when `value` is omitted)."""
    wire = copy.deepcopy(wire)
    *parents, last = path
    here: Any = wire
    for step in parents:
        here = here[step]
    if value is ...:
        del here[last]
    else:
        here[last] = value
    return wire


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("member",), ..., r"report: missing field 'member'"),
        (("pools", "green", "requests"), ..., r"report.pools\['green'\]: missing field"),
        (("upstreams", 0, 1, "breaker"), ..., r"missing field 'breaker'"),
        (("extra",), 1, r"report: unknown field 'extra'"),
        (("pools", "green", "extra"), 1, r"unknown field 'extra'"),
        (("generation",), "1", r"report.generation: expected an integer, got '1'"),
        (("generation",), True, r"report.generation: expected an integer"),
        (("generation",), 1.0, r"report.generation: expected an integer"),
        (("applied_at",), "2", r"report.applied_at: expected a number"),
        (("member",), 1, r"report.member: expected a string"),
        (("pools",), [], r"report.pools: expected an object"),
        (("pools", "purple"), {}, r"report.pools key: expected one of blue, green"),
        (("pools", "green", "latency", "04"), 1, r"expected an integer key, got '04'"),
        (("pools", "green", "duration"), {}, r"report.pools\['green'\].duration: expected an arr"),
        (("pools", "green", "duration", 1), None, r"\.duration\[1\]: expected an integer"),
        (("upstreams", 0), [["green", "h:1"]], r"report.upstreams\[0\]: expected a \[key, val"),
        (("upstreams", 0, 0), ["green"], r"report.upstreams\[0\]\[0\]: expected a pair"),
        (("upstreams", 0, 1, "breaker"), "ajar", r"\.breaker: expected a BreakerState"),
        (("upstreams", 0, 1, "shed", "tired"), 1, r"\.shed key: expected one of queue_full"),
        (("unrouted", "blue"), {"x": 1}, r"report.unrouted\['blue'\] key: expected an integer"),
        (("timeouts", "head"), -0.5, r"report.timeouts\['head'\]: expected an integer"),
    ],
)
def test_a_malformed_report_is_refused(path: tuple[Any, ...], value: Any, error: str) -> None:
    with pytest.raises(WireError, match=error):
        OutcomeReport.from_wire(changed(a_report(), path, value))


def test_a_field_added_later_may_be_left_out_and_takes_its_default() -> None:
    wire = changed(changed(a_report(), ("timeouts",)), ("upstreams", 0, 1, "attempts"))
    report = OutcomeReport.from_wire(wire)
    assert report.timeouts == {}
    assert report.upstreams["green", "h:1"].attempts == {}
    assert RoutingState.from_wire(changed(a_state(), ("fence",)), None).fence == ""


def test_an_upstream_named_twice_is_refused() -> None:
    wire = a_report()
    wire["upstreams"].append(copy.deepcopy(wire["upstreams"][0]))
    with pytest.raises(WireError, match=r"report.upstreams\[1\]: \('green', 'h:1'\) twice"):
        OutcomeReport.from_wire(wire)


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("stable",), "purple", r"state.stable: expected one of blue, green, got 'purple'"),
        (("pools", "green"), ..., r"state.pools: missing 'green'"),
        (("pools", "blue", 0, "weight"), "1", r"state.pools\['blue'\]\[0\].weight: expected an"),
        (("pools", "blue", 0, "healthy"), 1, r"\.healthy: expected true or false, got 1"),
        (("pools", "blue", 0, "port"), 1, r"state.pools\['blue'\]\[0\]: unknown field 'port'"),
        (("config", "split"), 500, r"state.config: not a valid configuration: split"),
        (("config",), [], r"state.config: not a valid configuration"),
        (("split",), None, r"state.split: expected a number, got None"),
    ],
)
def test_a_malformed_routing_state_is_refused(
    path: tuple[Any, ...], value: Any, error: str
) -> None:
    with pytest.raises(WireError, match=error):
        RoutingState.from_wire(changed(a_state(), path, value), None)


def test_a_routing_state_without_its_configuration_is_refused() -> None:
    bare = changed(a_state(), ("config",))
    previous = RoutingState.from_wire(a_state(), None)
    assert RoutingState.from_wire(bare, previous) == previous
    for held in (None, RoutingState.from_wire(changed(a_state(), ("config_generation",), 0), None)):
        with pytest.raises(WireError, match="without the configuration it refers to"):
            RoutingState.from_wire(bare, held)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{not json\n", "not JSON"),
        (b"\xff\xfe\n", "not JSON"),
        (b"[1, 2]\n", "not a message"),
        (b'{"timeout": 1}\n', "unknown message kind None"),
        (b'{"t": "hello"}\n', "unknown message kind 'hello'"),
        (b"[" * 10_000 + b"\n", "not JSON"),  # deeper than the JSON parser recurses
    ],
)
async def test_a_line_that_is_not_a_message_is_refused(line: bytes, error: str) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(line)
    reader.feed_eof()
    with pytest.raises(WireError, match=error):
        await read_message(reader)


def test_stop_and_ready_are_checked_too() -> None:
    with pytest.raises(WireError, match="stop: missing field 'timeout'"):
        STOP.decode({}, "stop")
    with pytest.raises(WireError, match=r"ready\.pid: expected an integer"):
        READY.decode({"pid": "12"}, "ready")


# declaring a codec ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Message:
    name: str
    count: int = 0
    tags: dict[str, int] = field(default_factory=dict)


def test_a_codec_must_name_every_field_and_no_other() -> None:
    with pytest.raises(TypeError, match="fields"):
        record(_Message, name=STR, count=INT)
    with pytest.raises(TypeError, match="fields"):
        record(_Message, name=STR, count=INT, tags=INT, colour=STR)
    with pytest.raises(TypeError, match="optional name without a default"):
        record(_Message, name=optional(STR), count=INT, tags=INT)
