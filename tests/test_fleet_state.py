"""Fleet records and rules without etcd: the state's encoding, who leads, which moves wait
for `effective_at`, the `fleet:` configuration, and `turnout status` of a fleet member."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import proxy_config
from hypothesis import given
from hypothesis import strategies as st

from proxy.admin.client import format_status
from proxy.config import ConfigError, parse_config
from proxy.fleet.state import (
    FleetRollout,
    FleetState,
    Keys,
    MemberRecord,
    StateError,
    leader_of,
    toward_candidate,
)

shares = st.floats(min_value=0, max_value=100, allow_nan=False)


def test_state_round_trips() -> None:
    state = FleetState(
        25.0,
        "blue",
        FleetRollout("progressing", "adaptive", 2, 25.0, (5.0, 25.0, 100.0), "step 2"),
        effective_at=1700000000.25,
        writer="m0",
        term=7,
    )
    assert FleetState.decode(state.encode()) == state


@pytest.mark.parametrize(
    "raw",
    [b"", b"[]", b"{}", b'{"split": 101, "stable": "blue"}', b'{"split": 5, "stable": "red"}'],
)
def test_unreadable_state_is_refused(raw: bytes) -> None:
    with pytest.raises(StateError):
        FleetState.decode(raw)


def test_member_record_round_trips_and_refuses_garbage() -> None:
    record = MemberRecord("m1", "http://127.0.0.1:9901", 42, {"split": 0.0})
    assert MemberRecord.decode(record.encode()) == record
    with pytest.raises(StateError):
        MemberRecord.decode(b"{")


def test_lowest_creation_revision_leads() -> None:
    assert leader_of({}) is None
    assert leader_of({"b": 7, "a": 9, "c": 8}) == "b"


@given(shares, shares)
def test_toward_candidate_is_away_from_the_stable_pool(old: float, new: float) -> None:
    assert toward_candidate(old, "blue", new) == (new > old + 1e-9)
    assert toward_candidate(old, "green", new) == (new < old - 1e-9)


def test_promotion_is_a_move_toward_the_candidate_and_rollback_is_not() -> None:
    assert toward_candidate(50.0, "blue", 100.0)
    assert not toward_candidate(50.0, "blue", 0.0)
    assert not toward_candidate(50.0, "green", 100.0)


def test_keys_name_their_kind() -> None:
    keys = Keys("shop")
    assert keys.kind("/turnout/shop/state") == ("state", "")
    assert keys.kind(keys.election + "m1") == ("election", "m1")
    assert keys.kind("/turnout/other/state") == ("", "/turnout/other/state")


def base() -> dict[str, Any]:
    return proxy_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])


def test_fleet_config_defaults_and_absence() -> None:
    assert parse_config(base()).fleet is None
    fleet = parse_config(base() | {"fleet": {}}).fleet
    assert fleet is not None
    assert fleet.etcd == ("http://127.0.0.1:2379",)
    assert (fleet.name, fleet.instance, fleet.lease_ttl) == ("default", None, 3.0)
    assert fleet.partition_policy == "local_rollback"


@pytest.mark.parametrize(
    ("fleet", "problem"),
    [
        ({"etcd": []}, "fleet.etcd: must not be empty"),
        ({"etcd": ["ftp://x:1"]}, "fleet.etcd[0]: invalid etcd endpoint"),
        ({"etcd": ["http://x:1/v3"]}, "must not have a path"),
        ({"name": "a/b"}, "fleet.name: invalid name"),
        ({"instance": ""}, "fleet.instance: invalid name"),
        ({"lease_ttl": "200ms"}, "fleet.lease_ttl: must be >= 1"),
        ({"partition_policy": "panic"}, "fleet.partition_policy: must be"),
        ({"leader": True}, "fleet.leader: unknown key"),
    ],
)
def test_bad_fleet_config_is_refused_with_its_path(fleet: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(base() | {"fleet": fleet})
    assert any(problem in e for e in info.value.errors), info.value.errors


def test_status_table_shows_the_fleet_and_its_members() -> None:
    status = {
        "split": {"green": 25.0, "blue": 75.0},
        "stable": "blue",
        "fleet": {
            "name": "shop",
            "instance": "m1",
            "leader": "m0",
            "leading": False,
            "connected": True,
            "revision": 41,
            "fenced_writes": 0,
            "override": None,
            "members": [
                {
                    "instance": "m0",
                    "applied_revision": 42,
                    "admin": "http://a:1",
                    "last_seen": 0.2,
                    "lag": 0,
                    "override": None,
                },
                {
                    "instance": "m1",
                    "applied_revision": 41,
                    "admin": "http://b:1",
                    "last_seen": 1.0,
                    "lag": 1,
                    "override": {"split": 0.0},
                },
            ],
        },
    }
    text = format_status(status)
    assert "fleet:      shop as m1, leader m0, connected, revision 41" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("m")}
    assert rows["m0"].rstrip().endswith("leader")
    assert "LAGGING, local override" in rows["m1"]
