"""Header rules of the data path: hop-by-hop filtering, framing checks, prepared bytes."""

from __future__ import annotations

from http import HTTPStatus
from typing import Final, TypeAlias

from proxy.logic import grpcstatus

RawHeaders: TypeAlias = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 plus the legacy names proxies meet in the wild. Framing headers
# (content-length, transfer-encoding) are rewritten by the proxy, never copied.
HOP_BY_HOP: Final = frozenset(
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


def length_mask(names: frozenset[bytes]) -> int:
    """The lengths of `names` as bits: `mask >> len(name) & 1` says whether a name may be one
    of them in two machine operations, where a set of lengths boxes and hashes each length."""
    mask = 0
    for name in names:
        mask |= 1 << len(name)
    return mask


# Most names are passed over on their length alone, without a lower() or a hash.
HOP_BY_HOP_LENGTHS: Final = length_mask(HOP_BY_HOP)

# Never dropped because Connection names them: an HTTP/1.1 request must carry Host (framing
# headers are hop-by-hop already, and the proxy sets them itself).
NEVER_NAMED: Final = HOP_BY_HOP | {b"host"}

# Headers whose values name further hop-by-hop headers.
NAMING_HEADERS: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
# Their most common values, which name nothing further: passed over without a split.
PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"Keep-Alive", b"close", b"Close"})

# Fields RFC 9110 defines as singletons whose repetition a request may use to be read one way
# here and another way further on (which credentials, which media type): a repeat is a 400.
# Host is checked apart. Only names of these lengths are looked up.
SINGLETONS: Final = frozenset({b"authorization", b"proxy-authorization", b"content-type"})
SINGLETON_LENGTHS: Final = length_mask(SINGLETONS)

# A request head's limits are settings (listen.max_request_target, ...); a response head's:
MAX_RESPONSE_HEAD: Final = 65536
# Raw bytes of one chunk-size line (with its extensions) or of the trailer section of a
# chunked body, and trailer fields, in both directions: bounded like a head (a chunked body
# could otherwise end in an endless trailer section). Trailers are not relayed.
MAX_CHUNK_FRAMING: Final = 32768
MAX_TRAILERS: Final = 100

CRLF: Final = b"\r\n"
# How an HTTP/2 client with prior knowledge opens (RFC 9113 §3.4): llhttp stops at this line.
H2_PREFACE_LINE: Final = b"PRI * HTTP/2.0\r\n"
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CHUNK_END: Final = b"0\r\n\r\n"
CONTINUE_100: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
VIA: Final = b"1.1 turnout"
VIA_10: Final = b"1.0 turnout"  # Via names the protocol version the message was received with
VIA_LINE: Final = b"Via: " + VIA + CRLF
VIA_10_LINE: Final = b"Via: " + VIA_10 + CRLF


def add_field(parts: list[bytes], name: bytes, value: bytes) -> None:
    """Add one field to a head being built, as the (name, b": ", value, CRLF) run that
    without_named reads. Four appends: `+=` of a tuple would build the tuple, then go
    through the generic in-place add (mypyc has no list-with-tuple primitive for it)."""
    parts.append(name)
    parts.append(b": ")
    parts.append(value)
    parts.append(CRLF)


def plain_connection(value: bytes) -> bool:
    """Whether a Connection (or Keep-Alive...) value names no further field. The two usual
    values are compared by ==: a set lookup hashes each new value."""
    return value == b"keep-alive" or value == b"close" or value in PLAIN_CONNECTION


def add_hop_names(named: set[bytes] | None, value: bytes) -> set[bytes] | None:
    """`named` with the header names one Connection/Keep-Alive/Proxy-Connection value lists."""
    for item in value.split(b","):
        token = item.strip().lower()
        if token and token not in NEVER_NAMED and token != b"close" and b"=" not in token:
            if named is None:
                named = set()
            named.add(token)
    return named


def without_named(fields: list[bytes], named: set[bytes]) -> list[bytes]:
    """Fields laid out as (name, b": ", value, CRLF) runs, less those whose name is in `named`."""
    kept: list[bytes] = []
    for i in range(0, len(fields), 4):
        if fields[i].lower() not in named:
            kept += fields[i : i + 4]
    return kept


def grpc_error_head(status: int, error: str, detail: str, pool: str, close: bool) -> bytes:
    """The proxy's own answer to a gRPC call, as gRPC clients read it: HTTP 200 with the
    status in a trailers-only head (UNAVAILABLE for no upstream, DEADLINE_EXCEEDED for a
    timeout), the reason in grpc-message."""
    message = f"{error}: {detail}" + (f" (pool {pool})" if pool and pool not in detail else "")
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\ngrpc-status: %d\r\n"
        b"grpc-message: %b\r\nContent-Length: 0\r\n%b\r\n"
        % (
            grpcstatus.from_http_status(status),
            grpcstatus.encode_message(message),
            b"Connection: close\r\n" if close else b"",
        )
    )


def last_chunk(trailers: list[bytes]) -> bytes:
    """The end of a chunked body with its trailer fields (runs of name, ": ", value, CRLF)."""
    return b"0\r\n%b\r\n" % b"".join(trailers)


def chunk(data: bytes) -> bytes:
    """One chunk of chunked transfer coding."""
    return b"%x\r\n%b\r\n" % (len(data), data)


_REASONS = {s.value: s.phrase.encode("latin-1") for s in HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def error_name(status: int) -> str:
    """The `error` of the proxy's own JSON error body for a client error: `request_timeout`."""
    return reason(status).decode("latin-1").lower().replace(" ", "_").replace("-", "_")


_RESPONSE_LINES: dict[tuple[int, bytes], bytes] = {}


def response_line(status: int, reason: bytes) -> bytes:
    """`HTTP/1.1 <status> <reason>` as relayed from an upstream (its reason phrase kept)."""
    line = _RESPONSE_LINES.get((status, reason))
    if line is None:
        line = b"HTTP/1.1 %d %b\r\n" % (status, reason or _REASONS.get(status, b"Unknown"))
        if len(_RESPONSE_LINES) < 256:  # upstreams' own reason phrases: bounded
            _RESPONSE_LINES[(status, reason)] = line
    return line


def status_line(status: int, version: bytes = b"1.1") -> bytes:
    return b"HTTP/%b %d %b\r\n" % (version, status, reason(status))


def valid_transfer_encoding(value: bytes) -> bool:
    """Only a single plain `chunked` coding is accepted from clients; anything else is
    either unsupported or an obfuscation attempt (request smuggling)."""
    return value.strip().lower() == b"chunked"


def origin_form(target: bytes) -> tuple[bytes, bytes] | None:
    """The authority and origin-form target of an absolute-form request target
    (`http://host:8080/p?q` -> `host:8080`, `/p?q`), None for any other form or scheme;
    an empty authority is b"" (RFC 9112 3.2.2: the proxy takes the host from the target)."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    ends = [i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0]
    cut = min(ends) if ends else len(rest)
    authority, path = rest[:cut].rpartition(b"@")[2], rest[cut:]  # userinfo is not passed on
    return authority, path if path.startswith(b"/") else b"/" + path
