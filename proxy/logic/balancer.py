"""Balancers: which upstream of a pool gets the request.

Pure and synchronous. The caller rebuilds the tuple of eligible upstreams only when their state
changes and passes the same tuple object on every request, so each balancer keeps what it derives
from a tuple (weights, cumulative weights, the round-robin order) keyed on the tuple's identity,
and a pick only reads it. Weights are read when a tuple is first seen; an upstream of weight 0 (or
less) is never picked.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Sequence
from math import gcd
from typing import Any, Final, Literal, Protocol, TypeVar

__all__ = [
    "Balancer",
    "BalancerKind",
    "LeastRequest",
    "Member",
    "RandomBalancer",
    "RoundRobin",
    "make_balancer",
]

BalancerKind = Literal["round_robin", "random", "least_request"]

# Tuples remembered per balancer; a balancer normally sees one live tuple per pool.
_CACHED_TUPLES: Final = 8
# Longest precomputed round-robin cycle (sum of the weights over their gcd); beyond it the
# round robin runs nginx's loop per pick instead.
_MAX_CYCLE: Final = 4096


class Member(Protocol):
    @property
    def weight(self) -> int: ...

    @property
    def in_flight(self) -> int: ...


T = TypeVar("T", bound=Member)


class Balancer(Protocol[T]):
    def pick(self, candidates: Sequence[T], exclude: object | None = None) -> T | None: ...


class _Weights:
    """What a balancer derives from one candidates tuple; built once per tuple."""

    __slots__ = ("cum", "current", "cycle", "members", "pos", "source", "total", "weights")

    def __init__(self, source: Sequence[Any] | None, *, cycle: bool = False) -> None:
        self.source = source
        members = tuple(c for c in source or () if c.weight > 0)
        self.members: tuple[Any, ...] = members
        self.weights: tuple[int, ...] = tuple(int(c.weight) for c in members)
        cum: list[int] = []
        total = 0
        for w in self.weights:
            total += w
            cum.append(total)
        self.cum = cum
        self.total = total
        # Round-robin state: smooth weighted round robin, either as its precomputed cycle
        # (a list index per pick) or as nginx's current weights when the cycle would be long.
        self.pos = 0
        self.current = [0] * len(members)
        self.cycle: tuple[Any, ...] = ()
        if cycle and members:
            self.cycle = _swrr_cycle(members, self.weights)

    def index_of(self, exclude: object) -> int:
        for i, member in enumerate(self.members):
            if member is exclude:
                return i
        return -1


def _swrr_cycle(members: tuple[Any, ...], weights: tuple[int, ...]) -> tuple[Any, ...]:
    """The whole repeating order of the smooth round robin, or () if it is too long to keep."""
    divisor = 0
    for w in weights:
        divisor = gcd(divisor, w)
    # Weights scaled by a common factor give the same order, so the reduced ones are used.
    reduced = [w // divisor for w in weights]
    length = sum(reduced)
    if length > _MAX_CYCLE:
        return ()
    current = [0] * len(members)
    return tuple(members[_swrr_step(reduced, current, length)] for _ in range(length))


def _swrr_step(weights: Sequence[int], current: list[int], total: int, skip: int = -1) -> int:
    """One pick of nginx's smooth weighted round robin; `skip` takes no part (nor its weight)."""
    best = -1
    best_weight = 0
    for i, w in enumerate(weights):
        if i == skip:
            continue
        cw = current[i] + w
        current[i] = cw
        if best < 0 or cw > best_weight:
            best = i
            best_weight = cw
    current[best] -= total
    return best


class _PerTuple:
    """Keeps one _Weights per candidates tuple, by identity; the last one is a single check."""

    __slots__ = ("_last", "_states")

    _round_robin: bool = False

    def __init__(self) -> None:
        self._last = _Weights(None)
        self._states: dict[int, _Weights] = {}

    def _switch(self, candidates: Sequence[Any]) -> _Weights:
        # Keyed by id(); the entry holds the tuple itself, so the id cannot be reused by another
        # object while the entry lives.
        state = self._states.get(id(candidates))
        if state is None or state.source is not candidates:
            if len(self._states) >= _CACHED_TUPLES:
                del self._states[next(iter(self._states))]
            state = _Weights(candidates, cycle=self._round_robin)
            self._states[id(candidates)] = state
        self._last = state
        return state

    def __repr__(self) -> str:
        last = self._last
        return (
            f"{type(self).__name__}(tuples={len(self._states)}, last_weights={list(last.weights)})"
        )


class RoundRobin(_PerTuple):
    """Smooth weighted round robin (nginx): weights 3:1 pick A A B A, again and again."""

    __slots__ = ()

    _round_robin = True

    def pick(self, candidates: Sequence[T], exclude: object | None = None) -> T | None:
        state = self._last
        if state.source is not candidates:
            state = self._switch(candidates)
        cycle = state.cycle
        if exclude is None and cycle:
            pos = state.pos
            state.pos = pos + 1 if pos + 1 < len(cycle) else 0
            picked: T | None = cycle[pos]
        else:
            picked = self._pick_slow(state, exclude)
        return picked

    def _pick_slow(self, state: _Weights, exclude: object | None) -> Any:
        members = state.members
        if not members:
            return None
        skip = -1 if exclude is None else state.index_of(exclude)
        if skip >= 0 and len(members) == 1:
            return None
        cycle = state.cycle
        if not cycle:
            total = state.total - (state.weights[skip] if skip >= 0 else 0)
            return members[_swrr_step(state.weights, state.current, total, skip)]
        # The excluded upstream (a retry's first try) gives up its turn to the next in order.
        pos = state.pos
        size = len(cycle)
        while cycle[pos] is exclude:
            pos = pos + 1 if pos + 1 < size else 0
        state.pos = pos + 1 if pos + 1 < size else 0
        return cycle[pos]


class RandomBalancer(_PerTuple):
    """Weighted random choice."""

    __slots__ = ("_random",)

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self._random: Callable[[], float] = rng.random

    def pick(self, candidates: Sequence[T], exclude: object | None = None) -> T | None:
        state = self._last
        if state.source is not candidates:
            state = self._switch(candidates)
        if exclude is None:
            if not state.members:
                return None
            picked: T = state.members[bisect_right(state.cum, self._random() * state.total)]
            return picked
        skip = state.index_of(exclude)
        if skip < 0:
            return self.pick(candidates)
        if len(state.members) == 1:
            return None
        other: T = state.members[_draw_skipping(self._random, state, skip)]
        return other


class LeastRequest(_PerTuple):
    """Power of two choices, weighted: of two distinct weighted draws, the less loaded one."""

    __slots__ = ("_random",)

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self._random: Callable[[], float] = rng.random

    def pick(self, candidates: Sequence[T], exclude: object | None = None) -> T | None:
        state = self._last
        if state.source is not candidates:
            state = self._switch(candidates)
        members = state.members
        size = len(members)
        picked: T | None
        if exclude is None:
            if size > 2:
                first = bisect_right(state.cum, self._random() * state.total)
                picked = _lower(state, first, _draw_skipping(self._random, state, first))
            elif size == 2:
                first = bisect_right(state.cum, self._random() * state.total)
                picked = _lower(state, first, 1 - first)
            else:
                picked = members[0] if size else None
            return picked
        skip = state.index_of(exclude)
        if skip < 0:
            return self.pick(candidates)
        if size > 3:
            first = _draw_skipping(self._random, state, skip)
            picked = _lower(state, first, _draw_skipping(self._random, state, first, skip))
        elif size == 3:
            first = _draw_skipping(self._random, state, skip)
            picked = _lower(state, first, 3 - skip - first)
        else:
            picked = members[1 - skip] if size == 2 else None
        return picked


def _lower(state: _Weights, first: int, second: int) -> Any:
    """Of two members, the one with the lower in_flight/weight; a tie keeps the first drawn."""
    a = state.members[first]
    b = state.members[second]
    if b.in_flight * state.weights[first] < a.in_flight * state.weights[second]:
        return b
    return a


def _draw_skipping(rand: Callable[[], float], state: _Weights, skip: int, skip2: int = -1) -> int:
    """A weighted draw of a member index other than `skip` (and `skip2`, if given)."""
    if 0 <= skip2 < skip:
        skip, skip2 = skip2, skip
    weights = state.weights
    cum = state.cum
    gap = weights[skip]
    gap2 = weights[skip2] if skip2 >= 0 else 0
    # Drawn on the line with the skipped ranges cut out, then mapped back over the gaps (first
    # the lower one); in integers, so that the mapping cannot round onto a range boundary.
    point = int(rand() * (state.total - gap - gap2))
    if point >= cum[skip] - gap:
        point += gap
        if skip2 >= 0 and point >= cum[skip2] - gap2:
            point += gap2
    return bisect_right(cum, point)


def make_balancer(kind: BalancerKind, rng: random.Random | None = None) -> Balancer[Any]:
    """A balancer of the configured kind; `rng` seeds the random ones (default: a fresh one)."""
    if kind == "round_robin":
        return RoundRobin()
    if rng is None:
        rng = random.Random()
    if kind == "random":
        return RandomBalancer(rng)
    if kind == "least_request":
        return LeastRequest(rng)
    raise ValueError(f"unknown balancer kind: {kind!r}")
