"""gRPC's view of a request: its status codes, which of them are failures, and how Turnout's
own HTTP answers read to a gRPC client.

A gRPC call's outcome is its `grpc-status` (in the trailers, or in the head of a trailers-only
answer), not the HTTP status, which is 200 whenever the server answered at all.
"""

from __future__ import annotations

from typing import Final

CODES: Final = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
# What the analysis and the shield count as the server's failure by default; the others are
# answers (NOT_FOUND, INVALID_ARGUMENT, ...), as a 4xx is.
DEFAULT_FAILURES: Final = (
    "UNAVAILABLE",
    "INTERNAL",
    "UNKNOWN",
    "DEADLINE_EXCEEDED",
    "DATA_LOSS",
    "RESOURCE_EXHAUSTED",
)

# The HTTP status a failed call is retried and shielded as (retries.on, rollout.shield).
_AS_HTTP: Final = {14: 503, 4: 504, 8: 503}
# Turnout's own answers, as gRPC reads them (Envoy's mapping; a timeout is DEADLINE_EXCEEDED).
_FROM_HTTP: Final = {
    400: 13,
    401: 16,
    403: 7,
    404: 12,
    408: 4,
    413: 8,
    429: 14,
    431: 8,
    502: 14,
    503: 14,
    504: 4,
}
_STATUS_FIELD: Final = b"grpc-status"


def status_in(fields: list[bytes] | None) -> int | None:
    """The grpc-status among relayed fields (runs of name, b": ", value, CRLF), if any."""
    if not fields:
        return None
    for i in range(0, len(fields) - 2, 4):
        if len(fields[i]) == 11 and fields[i].lower() == _STATUS_FIELD:
            value = fields[i + 2].strip()
            return int(value) if value.isdigit() else 2  # UNKNOWN: a status no client can read
    return None


def as_http_status(code: int) -> int:
    """A failed call's code as the HTTP status that retries.on and rollout.shield speak of."""
    return _AS_HTTP.get(code, 500)


def from_http_status(status: int) -> int:
    """The gRPC code of one of Turnout's own answers."""
    return _FROM_HTTP.get(status, 2)


def encode_message(text: str) -> bytes:
    """grpc-message's percent-encoding: printable ASCII but % as is, every other byte %XX."""
    return b"".join(
        bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in text.encode()
    )


def parse_codes(names: list[str | int]) -> frozenset[int]:
    """Codes given by name (UNAVAILABLE) or number (14)."""
    out = set()
    for name in names:
        if isinstance(name, int):
            out.add(name)
        else:
            out.add(CODES[name.upper()])
    return frozenset(out)


# grpc-timeout units (the gRPC over HTTP/2 spec): hours down to nanoseconds.
TIMEOUT_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def parse_timeout(value: bytes) -> float:
    """A `grpc-timeout` value (at most 8 digits and a unit: `250m`, `5S`) in seconds; 0.0 for
    one that does not parse, which sets no deadline."""
    value = value.strip()
    digits = value[:-1]
    if not 1 <= len(digits) <= 8 or not digits.isdigit():
        return 0.0
    unit = TIMEOUT_UNITS.get(value[-1])
    if unit is None:
        return 0.0
    return int(digits) * unit
