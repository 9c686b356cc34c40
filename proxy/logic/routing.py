"""Pool choice for one request: the spread split, version stickiness, cookies and the override.

Pure and synchronous; every function here runs once per request.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "OTHER",
    "POOLS",
    "PoolName",
    "SplitSpreader",
    "SpreaderSnapshot",
    "cookie_value",
    "parse_override",
    "sticky_bucket",
    "sticky_is_green",
]

PoolName = Literal["blue", "green"]
POOLS: Final[tuple[PoolName, PoolName]] = ("blue", "green")
OTHER: Final[dict[PoolName, PoolName]] = {"blue": "green", "green": "blue"}

STICKY_BUCKETS: Final = 10_000

_CRC_SEED: Final = 0x7475726E  # b"turn": an empty key gets no special bucket 0
_GOLDEN64: Final = 0x9E3779B97F4A7C15
_MASK64: Final = 0xFFFFFFFFFFFFFFFF
# Absorbs the float noise of `split * 100` (1.1 * 100 == 110.00000000000001), so a split of
# 1.1 holds exactly 110 buckets. Far below one bucket, and it keeps the threshold monotonic.
_THRESHOLD_SLACK: Final = 1e-9

_OVERRIDES: Final[dict[bytes, PoolName]] = {b"green": "green", b"blue": "blue"}
_LONGEST_OVERRIDE: Final = 64


@dataclass(frozen=True, slots=True)
class SpreaderSnapshot:
    """State of a SplitSpreader: the split and where the error accumulator stands (0..100)."""

    split: float
    accumulator: float


def _checked_split(split: float) -> float:
    split = float(split)
    if not 0.0 <= split <= 100.0:  # also refuses NaN
        raise ValueError(f"split must be within 0..100, got {split!r}")
    return split


class SplitSpreader:
    """Deterministic spreading of the split: over any N consecutive picks, the number of green
    picks differs from N*split/100 by less than 1 (error diffusion / Bresenham), so over any 1,000
    consecutive requests the realised share is within ±1.5 points (in fact within ±0.1)."""

    __slots__ = ("_acc", "_split")

    def __init__(self, split: float) -> None:
        self._split = _checked_split(split)
        # Starting halfway rounds the running count to nearest instead of flooring it.
        self._acc = 50.0

    @property
    def split(self) -> float:
        return self._split

    def set_split(self, split: float) -> None:
        # The accumulator stays: it is always in [0, 100), so whatever came before, the picks
        # after the change are within one request of the new split from the first one on.
        self._split = _checked_split(split)

    def next_is_green(self) -> bool:
        acc = self._acc + self._split
        if acc >= 100.0:
            self._acc = acc - 100.0
            return True
        self._acc = acc
        return False

    def snapshot(self) -> SpreaderSnapshot:
        return SpreaderSnapshot(self._split, self._acc)

    def __repr__(self) -> str:
        return f"SplitSpreader(split={self._split!r}, accumulator={self._acc!r})"


def sticky_bucket(key: bytes) -> int:
    """The key's bucket in [0, 10000): the same in every process, run and version of Python."""
    # CRC-32 spreads every input byte over 32 bits; the 64-bit Fibonacci multiply and xor-shift
    # carry those bits into the high ones, which the multiply-shift range reduction then reads.
    h = (zlib.crc32(key, _CRC_SEED) * _GOLDEN64) & _MASK64
    return ((h ^ (h >> 29)) * STICKY_BUCKETS) >> 64


def sticky_is_green(bucket: int, split: float) -> bool:
    """Whether a sticky bucket goes to green at this split: bucket < split * 100."""
    return bucket < split * 100.0 - _THRESHOLD_SLACK


def cookie_value(cookie_header: bytes, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header (``a=1; b=2``), unquoted; None if absent."""
    if not name:
        return None
    size = len(cookie_header)
    at = cookie_header.find(name)
    while at >= 0:
        # A real match starts the header or follows ";" (and blanks), and is followed by "="
        # (after blanks); others are the tail of a longer name ("xsid"), text inside a value
        # ("a=sid") or the head of a longer name ("sidx").
        before = at - 1
        while before >= 0 and cookie_header[before] in b" \t":
            before -= 1
        if before < 0 or cookie_header[before] == 0x3B:  # ";"
            eq = at + len(name)
            while eq < size and cookie_header[eq] in b" \t":
                eq += 1
            if eq < size and cookie_header[eq] == 0x3D:  # "="
                end = cookie_header.find(b";", eq + 1)
                value = cookie_header[eq + 1 : end if end >= 0 else size].strip(b" \t")
                if len(value) >= 2 and value[0] == 0x22 and value[-1] == 0x22:  # '"'
                    return value[1:-1]
                return value
        at = cookie_header.find(name, at + 1)
    return None


def parse_override(value: bytes) -> PoolName | None:
    """The pool an override header forces (``green`` or ``blue``, any case, trimmed), else None."""
    pool = _OVERRIDES.get(value)
    if pool is None and len(value) <= _LONGEST_OVERRIDE:
        pool = _OVERRIDES.get(value.strip().lower())
    return pool
