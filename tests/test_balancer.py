"""Balancers: exact smooth round robin, weighted random, weighted power of two choices."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.logic.balancer import (
    Balancer,
    BalancerKind,
    LeastRequest,
    RandomBalancer,
    RoundRobin,
    make_balancer,
)


class Up:
    """A stand-in upstream: a name, a weight and a live in-flight count."""

    __slots__ = ("in_flight", "name", "weight")

    def __init__(self, name: str, weight: int = 1, in_flight: int = 0) -> None:
        self.name = name
        self.weight = weight
        self.in_flight = in_flight

    def __repr__(self) -> str:
        return self.name


def ups(*weights: int) -> tuple[Up, ...]:
    return tuple(Up("abcdefghij"[i], w) for i, w in enumerate(weights))


def pick_names(
    balancer: Balancer[Up], candidates: Sequence[Up], n: int, exclude: Up | None = None
) -> list[str]:
    out = []
    for _ in range(n):
        picked = balancer.pick(candidates, exclude)
        assert picked is not None
        out.append(picked.name)
    return out


def names(
    balancer: Balancer[Up], candidates: Sequence[Up], n: int, exclude: Up | None = None
) -> str:
    return "".join(pick_names(balancer, candidates, n, exclude))


def nginx_order(weights: Sequence[int], n: int) -> Iterator[int]:
    """Reference smooth weighted round robin, as nginx documents it."""
    current = [0] * len(weights)
    total = sum(weights)
    for _ in range(n):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[best] -= total
        yield best


class Fixed(random.Random):
    """A Random whose random() returns the given values in turn."""

    def __init__(self, values: Sequence[float]) -> None:
        super().__init__(0)
        self._values = list(values)

    def random(self) -> float:
        return self._values.pop(0)


BALANCERS: list[BalancerKind] = ["round_robin", "random", "least_request"]


# --- common to all -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BALANCERS)
def test_empty_candidates_give_none(kind: BalancerKind) -> None:
    balancer = make_balancer(kind, random.Random(1))
    assert balancer.pick(()) is None
    assert balancer.pick((), Up("x")) is None


@pytest.mark.parametrize("kind", BALANCERS)
def test_a_single_candidate_is_picked_unless_excluded(kind: BalancerKind) -> None:
    balancer = make_balancer(kind, random.Random(1))
    only = (Up("a", 3, in_flight=50),)
    assert all(balancer.pick(only) is only[0] for _ in range(20))
    assert balancer.pick(only, only[0]) is None
    assert balancer.pick(only, Up("z")) is only[0]


@pytest.mark.parametrize("kind", BALANCERS)
@pytest.mark.parametrize("size", [2, 3, 4, 5])
def test_exclude_is_never_picked(kind: BalancerKind, size: int) -> None:
    balancer = make_balancer(kind, random.Random(7))
    candidates = ups(*range(1, size + 1))
    for excluded in candidates:
        picks = Counter(names(balancer, candidates, 300, excluded))
        assert excluded.name not in picks
        assert set(picks) == {c.name for c in candidates} - {excluded.name}


@pytest.mark.parametrize("kind", BALANCERS)
def test_weight_zero_is_never_picked(kind: BalancerKind) -> None:
    balancer = make_balancer(kind, random.Random(3))
    candidates = ups(0, 2, 0, 1)
    assert set(names(balancer, candidates, 300)) == {"b", "d"}
    assert set(names(balancer, candidates, 100, candidates[1])) == {"d"}
    assert balancer.pick(ups(0, 0)) is None
    lone = ups(0, 4)
    assert balancer.pick(lone, lone[1]) is None


@pytest.mark.parametrize("kind", BALANCERS)
def test_an_equal_but_distinct_object_is_not_excluded(kind: BalancerKind) -> None:
    balancer = make_balancer(kind, random.Random(3))
    candidates = ups(1, 1)
    assert set(names(balancer, candidates, 200, Up("a"))) == {"a", "b"}


def test_make_balancer_kinds() -> None:
    assert isinstance(make_balancer("round_robin"), RoundRobin)
    assert isinstance(make_balancer("random"), RandomBalancer)
    assert isinstance(make_balancer("least_request", random.Random(1)), LeastRequest)
    with pytest.raises(ValueError, match="unknown balancer"):
        make_balancer("fastest")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["random", "least_request"])
def test_a_seeded_rng_makes_picks_reproducible(kind: BalancerKind) -> None:
    candidates = ups(1, 2, 3, 4)
    first = names(make_balancer(kind, random.Random(42)), candidates, 200)
    again = names(make_balancer(kind, random.Random(42)), candidates, 200)
    other = names(make_balancer(kind, random.Random(43)), candidates, 200)
    assert first == again
    assert first != other


# --- round robin -------------------------------------------------------------------------------


def test_round_robin_3_1_is_smooth_and_exact() -> None:
    rr = RoundRobin()
    candidates = ups(3, 1)
    assert names(rr, candidates, 12) == "aaba" * 3


def test_round_robin_equal_weights_cycle() -> None:
    rr = RoundRobin()
    assert names(rr, ups(1, 1, 1), 9) == "abc" * 3
    assert names(rr, ups(4, 4), 6) == "ab" * 3


def test_round_robin_5_1_1_is_nginx_documented_order() -> None:
    assert names(RoundRobin(), ups(5, 1, 1), 14) == "aabacaa" * 2


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=6))
def test_round_robin_matches_nginx(weights: list[int]) -> None:
    candidates = ups(*weights)
    n = 2 * sum(weights) + 3
    expected = "".join("abcdefghij"[i] for i in nginx_order(weights, n))
    assert names(RoundRobin(), candidates, n) == expected
    # Exact shares over every full cycle.
    counts = Counter(names(RoundRobin(), candidates, sum(weights)))
    assert [counts[c.name] for c in candidates] == weights


def test_round_robin_with_weights_too_long_to_precompute_still_matches_nginx() -> None:
    weights = [4_999, 2, 3_001, 1]
    n = 600
    expected = "".join("abcd"[i] for i in nginx_order(weights, n))
    rr = RoundRobin()
    assert names(rr, ups(*weights), n) == expected


@pytest.mark.parametrize("weights", [(3, 1, 2), (4_999, 2, 3_001, 1)], ids=["cycle", "loop"])
def test_round_robin_exclude_keeps_the_others_in_proportion(weights: tuple[int, ...]) -> None:
    rr = RoundRobin()
    candidates = ups(*weights)
    rest = sum(weights) - weights[1]
    picks = Counter(names(rr, candidates, rest * 4, candidates[1]))
    assert "b" not in picks
    for c in candidates:
        if c is not candidates[1]:
            assert abs(picks[c.name] - 4 * c.weight) <= 4


def test_round_robin_exclude_gives_up_the_turn() -> None:
    rr = RoundRobin()
    candidates = ups(3, 1)
    assert names(rr, candidates, 2) == "aa"
    # b is due; a retry that excludes b gets the next in order, and the order carries on.
    assert names(rr, candidates, 1, candidates[1]) == "a"
    assert names(rr, candidates, 6) == "aabaaa"


def test_round_robin_state_follows_the_tuple_identity() -> None:
    rr = RoundRobin()
    blue = ups(3, 1)
    green = (Up("x"), Up("y"))
    assert names(rr, blue, 2) == "aa"
    assert names(rr, green, 1) == "x"
    assert names(rr, blue, 2) == "ba"  # blue's place was kept while green was served
    assert names(rr, green, 1) == "y"
    rebuilt = tuple(list(blue))  # an equal tuple, but a new object: a fresh start
    assert rebuilt is not blue
    assert names(rr, rebuilt, 4) == "aaba"


def test_round_robin_forgets_old_tuples() -> None:
    rr = RoundRobin()
    for _ in range(50):
        names(rr, ups(2, 1), 2)
    assert repr(rr) == "RoundRobin(tuples=8, last_weights=[2, 1])"


# --- random ------------------------------------------------------------------------------------


def test_random_follows_the_weights() -> None:
    rb = RandomBalancer(random.Random(11))
    picks = Counter(names(rb, ups(3, 1), 20_000))
    # sd of the share is 0.003; 0.02 is more than 6 sd.
    assert abs(picks["a"] / 20_000 - 0.75) < 0.02


def test_random_with_exclude_follows_the_remaining_weights() -> None:
    rb = RandomBalancer(random.Random(12))
    candidates = ups(1, 2, 3)
    picks = Counter(names(rb, candidates, 20_000, candidates[1]))
    assert abs(picks["a"] / 20_000 - 0.25) < 0.02
    assert picks["a"] + picks["c"] == 20_000


@settings(max_examples=100)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=1_000), min_size=2, max_size=6),
    excluded=st.integers(min_value=0, max_value=5),
    u=st.floats(min_value=0.0, max_value=1.0, exclude_max=True) | st.just(1.0 - 2.0**-53),
)
def test_random_exclude_maps_every_draw_onto_another_member(
    weights: list[int], excluded: int, u: float
) -> None:
    candidates = ups(*weights)
    skip = candidates[excluded % len(candidates)]
    picked = RandomBalancer(Fixed([u])).pick(candidates, skip)
    assert picked is not None
    assert picked is not skip
    assert picked in candidates


def test_random_exclude_is_exactly_weighted() -> None:
    # One draw in the middle of each unit of the remaining weight lands on each member as
    # often as its weight.
    candidates = ups(2, 5, 1, 3)
    remaining = 2 + 1 + 3
    draws = [(k + 0.5) / remaining for k in range(remaining)]
    rb = RandomBalancer(Fixed(draws))
    assert Counter(names(rb, candidates, remaining, candidates[1])) == {"a": 2, "c": 1, "d": 3}


# --- least request -----------------------------------------------------------------------------


def test_least_request_two_candidates_always_takes_the_idle_one() -> None:
    lr = LeastRequest(random.Random(5))
    idle, busy = Up("idle", in_flight=0), Up("busy", in_flight=10)
    for candidates in ((idle, busy), (busy, idle)):
        assert all(lr.pick(candidates) is idle for _ in range(500))


def test_least_request_never_picks_the_most_loaded_of_three_or_more() -> None:
    lr = LeastRequest(random.Random(6))
    candidates = (Up("a", in_flight=2), Up("b", in_flight=9), Up("c", in_flight=1))
    picks = Counter(names(lr, candidates, 3_000))
    assert "b" not in picks
    # Power of two choices: c wins against both others, a only when drawn with b.
    assert abs(picks["c"] / 3_000 - 2 / 3) < 0.05
    four = (*candidates, Up("d", in_flight=5))
    assert "b" not in names(lr, four, 3_000)


def test_least_request_compares_load_per_weight() -> None:
    lr = LeastRequest(random.Random(8))
    # 6 in flight over weight 4 is less loaded than 2 over weight 1.
    heavy, light = Up("heavy", weight=4, in_flight=6), Up("light", weight=1, in_flight=2)
    assert all(lr.pick((light, heavy)) is heavy for _ in range(300))


@pytest.mark.parametrize(
    ("weights", "shares"),
    [((3, 1), (0.75, 0.25)), ((1, 1, 2), (0.25, 0.25, 0.5)), ((1, 2, 3, 4), (0.1, 0.2, 0.3, 0.4))],
)
def test_least_request_follows_the_weights_when_loads_are_equal(
    weights: tuple[int, ...], shares: tuple[float, ...]
) -> None:
    lr = LeastRequest(random.Random(9))
    candidates = ups(*weights)
    picks = Counter(names(lr, candidates, 20_000))
    for c, share in zip(candidates, shares, strict=True):
        assert abs(picks[c.name] / 20_000 - share) < 0.02


def test_least_request_reads_live_load_from_the_same_tuple() -> None:
    lr = LeastRequest(random.Random(10))
    a, b = Up("a"), Up("b")
    candidates = (a, b)
    a.in_flight = 4
    assert all(lr.pick(candidates) is b for _ in range(50))
    b.in_flight = 5
    assert all(lr.pick(candidates) is a for _ in range(50))


def test_least_request_exclude() -> None:
    lr = LeastRequest(random.Random(13))
    idle, busy = Up("idle"), Up("busy", in_flight=50)
    # The retry must go elsewhere, even to a busier upstream.
    assert all(lr.pick((idle, busy), idle) is busy for _ in range(50))
    three = (idle, busy, Up("mid", in_flight=5))
    assert set(pick_names(lr, three, 300, idle)) == {"mid"}
    four = (*three, Up("low", in_flight=1))
    picks = Counter(pick_names(lr, four, 3_000, idle))
    assert set(picks) == {"mid", "low"}  # busy is the most loaded of those left


@settings(max_examples=100)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=100), min_size=3, max_size=6),
    loads=st.lists(st.integers(min_value=0, max_value=5), min_size=6, max_size=6),
    excluded=st.integers(min_value=0, max_value=5),
    draws=st.lists(
        st.floats(min_value=0.0, max_value=1.0, exclude_max=True) | st.just(1.0 - 2.0**-53),
        min_size=2,
        max_size=2,
    ),
)
def test_least_request_draws_two_distinct_members(
    weights: list[int], loads: list[int], excluded: int, draws: list[float]
) -> None:
    candidates = ups(*weights)
    for c, load in zip(candidates, loads, strict=False):
        c.in_flight = load
    skip = candidates[excluded % len(candidates)]
    for exclude in (None, skip):
        picked = LeastRequest(Fixed(draws)).pick(candidates, exclude)
        assert picked is not None
        assert picked is not exclude
        # The pick is never the strictly most loaded of the members still in play.
        others = [c for c in candidates if c is not exclude and c is not picked]
        assert any(o.in_flight * picked.weight >= picked.in_flight * o.weight for o in others)
