"""Header rules of the data path: hop-by-hop filtering, framing checks, prepared bytes."""

from __future__ import annotations

from http import HTTPStatus
from typing import TypeAlias

RawHeaders: TypeAlias = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 plus the legacy names proxies meet in the wild. Framing headers
# (content-length, transfer-encoding) are rewritten by the proxy, never copied.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)

# Headers whose values name further hop-by-hop headers.
NAMING_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-connection"})

MAX_TARGET = 8192
MAX_HEAD = 32768
MAX_HEADERS = 100
MAX_RESPONSE_HEAD = 65536
# Raw bytes of a request head still arriving: the limits above plus the request line and
# whitespace. httptools holds a header's pieces until the header ends; this bounds that.
MAX_HEAD_BYTES = MAX_TARGET + MAX_HEAD + 1024

CRLF = b"\r\n"
CHUNK_END = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
VIA = b"1.1 turnout"
VIA_10 = b"1.0 turnout"  # Via names the protocol version the message was received with


# Lengths of the names in NAMING_HEADERS: most headers are passed over without lower().
_NAMING_LENGTHS = frozenset(len(n) for n in NAMING_HEADERS)


def hop_names(headers: RawHeaders) -> set[bytes] | None:
    """Extra header names declared hop-by-hop by Connection/Keep-Alive/Proxy-Connection
    (`Keep-Alive: timeout=5` items are parameters, not names); None when there are none."""
    named: set[bytes] | None = None
    for name, value in headers:
        if len(name) in _NAMING_LENGTHS and name.lower() in NAMING_HEADERS:
            for item in value.split(b","):
                token = item.strip().lower()
                if token and token not in HOP_BY_HOP and b"=" not in token:
                    if named is None:
                        named = set()
                    named.add(token)
    return named


def chunk(data: bytes) -> bytes:
    """One chunk of chunked transfer coding."""
    return b"%x\r\n%b\r\n" % (len(data), data)


_REASONS = {s.value: s.phrase.encode("latin-1") for s in HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def error_name(status: int) -> str:
    """The `error` of the proxy's own JSON error body for a client error: `request_timeout`."""
    return reason(status).decode("latin-1").lower().replace(" ", "_").replace("-", "_")


def status_line(status: int, version: bytes = b"1.1") -> bytes:
    return b"HTTP/%b %d %b\r\n" % (version, status, reason(status))


def valid_transfer_encoding(value: bytes) -> bool:
    """Only a single plain `chunked` coding is accepted from clients; anything else is
    either unsupported or an obfuscation attempt (request smuggling)."""
    return value.strip().lower() == b"chunked"
