"""A request head, read once: `parse_request_head()` checks its framing, finds what routing
needs and builds the head to forward (hop-by-hop fields dropped; X-Forwarded-*, Via and framing
set). Pure: no I/O and no state of its own; the exchange takes what it returns.
"""

from __future__ import annotations

from typing import Final

from proxy.http import headers as h
from proxy.http.headers import RawHeaders
from proxy.http.router import Router
from proxy.logic import grpcstatus
from proxy.logic.routing import PoolName, parse_override


class RequestHead:
    """What one pass over a request head found. With an `error` (status, detail) the request
    is refused; what was read before the problem showed is still set (the body's framing keeps
    the client connection in step while the refusal is answered). Read-only (Final): a plain
    class, not a frozen dataclass, whose __init__ would cost the hot path 2 µs under mypyc."""

    __slots__ = (
        "call_timeout",
        "chunked",
        "content_length",
        "error",
        "expect_continue",
        "forward_head",
        "grpc",
        "host",
        "override",
        "sticky_key",
        "target",
        "upgrade",
        "websocket",
    )

    def __init__(
        self,
        target: bytes,
        host: bytes | None = None,
        error: tuple[int, str] | None = None,
        chunked: bool = False,
        content_length: int = 0,
        upgrade: bool = False,
        websocket: bool = False,
        grpc: bool = False,
        call_timeout: float = 0.0,
        expect_continue: bool = False,
        override: PoolName | None = None,
        sticky_key: bytes | None = None,
        forward_head: bytes | None = None,
    ) -> None:
        self.target: Final = target
        self.host: Final = host
        self.error: Final = error
        self.chunked: Final = chunked
        self.content_length: Final = content_length
        self.upgrade: Final = upgrade
        self.websocket: Final = websocket
        # A gRPC call (content-type application/grpc...), and its own deadline (grpc-timeout,
        # seconds; 0: none).
        self.grpc: Final = grpc
        self.call_timeout: Final = call_timeout
        self.expect_continue: Final = expect_continue
        self.override: Final = override
        self.sticky_key: Final = sticky_key
        self.forward_head: Final = forward_head

    def __repr__(self) -> str:
        return f"<RequestHead {self.target!r} error={self.error}>"


def parse_request_head(
    method: bytes,
    target: bytes,
    version: str,
    fields: RawHeaders,
    router: Router,
    forwarded: bytes,
    peer_ip: bytes,
    scheme: bytes,
) -> RequestHead:
    """The request line and fields of one request, read as the proxy forwards them. `router`
    names the override and sticky fields; `forwarded` is the client's X-Forwarded-For and
    -Proto lines when the request brings none (`peer_ip` and `scheme` otherwise)."""
    if method == b"CONNECT":
        # A reverse proxy opens no tunnels to arbitrary hosts (the parser also stops here).
        return RequestHead(target, error=(405, "CONNECT is not supported by a reverse proxy"))
    if version != "1.1" and version != "1.0":
        # llhttp also accepts 0.9 and 2.0 request lines; neither can be relayed as HTTP/1.1.
        return RequestHead(target, error=(505, f"HTTP/{version} is not supported"))
    absolute_host: bytes | None = None
    if target[:1] != b"/":
        form = h.origin_form(target)
        if form is not None:
            # Absolute form: the target's host replaces any Host field (RFC 9112 3.2.2).
            absolute_host, target = form
            if not absolute_host:
                return RequestHead(
                    target, error=(400, "no host in the absolute-form request target")
                )
    override_name = router.override_header
    sticky_header = router.sticky_header
    host: bytes | None = None
    chunked = False
    content_length = 0
    upgrade = False
    websocket = False
    grpc = False
    expect_continue = False
    override: PoolName | None = None
    error: tuple[int, str] | None = None
    cookie: bytes | None = None
    sticky_value: bytes | None = None
    xff: bytes | None = None
    via: bytes | None = None
    named: set[bytes] | None = None
    singletons: set[bytes] | None = None
    # The forwarded head: request line, then the fields passed on as they came.
    head = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in fields:
        lname = name.lower()
        length = len(lname)
        if h.SINGLETON_LENGTHS >> length & 1 and lname in h.SINGLETONS:
            if singletons is None:
                singletons = {lname}
            elif lname in singletons:
                error = (400, f"duplicate {name.decode('latin-1')} header")
                break
            else:
                singletons.add(lname)
            if lname == b"content-type" and value.startswith(b"application/grpc"):
                grpc = True
        if h.HOP_BY_HOP_LENGTHS >> length & 1 and lname in h.HOP_BY_HOP:
            if lname == b"transfer-encoding":
                if chunked or not h.valid_transfer_encoding(value):
                    error = (400, "unsupported or ambiguous Transfer-Encoding")
                    break
                chunked = True
            elif lname == b"content-length":
                content_length = int(value)
            elif lname == b"upgrade":
                upgrade = True
                websocket = value.strip().lower() == b"websocket"
            elif lname in h.NAMING_HEADERS and not h.plain_connection(value):
                named = h.add_hop_names(named, value)
            continue
        if lname == b"host":
            if host is not None:
                error = (400, "duplicate Host header")
                break
            host = value
            if absolute_host is not None:
                continue
        elif lname == b"expect":
            if value.strip().lower() != b"100-continue":
                error = (417, "unsupported Expect")
                break
            expect_continue = True
            continue  # the proxy answers 100-continue itself
        elif lname == override_name:
            override = parse_override(value)
        elif lname == b"cookie":
            cookie = value if cookie is None else cookie + b"; " + value
        elif lname == sticky_header:
            sticky_value = value
        if lname == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
        elif lname == b"via":
            via = value if via is None else via + b", " + value
        elif lname != b"x-forwarded-proto" and lname != b"x-forwarded-host":
            h.add_field(head, name, value)
    if error is None:
        if absolute_host is not None:
            host = absolute_host
            head.insert(4, b"Host: %b\r\n" % absolute_host)
        elif host is None and version == "1.1":
            error = (400, "missing Host header")
        if chunked and version == "1.0":
            error = error or (400, "Transfer-Encoding in an HTTP/1.0 request")
    if error is not None:
        return RequestHead(
            target,
            host,
            error,
            chunked,
            content_length,
            upgrade,
            websocket,
            grpc,
            expect_continue=expect_continue,
            override=override,
        )
    sticky_key: bytes | None = None
    if router.sticky_cookie is not None or sticky_value is not None:
        sticky_key = router.sticky_key(cookie, sticky_value)
    if named is not None:
        # Rare: Connection names further hop-by-hop fields, maybe ones that came before it.
        head[4:] = h.without_named(head[4:], named)
        if b"x-forwarded-for" in named:
            xff = None
        if b"via" in named:
            via = None
    if xff is None:
        head.append(forwarded)
    else:
        head += (b"X-Forwarded-For: ", xff, b", ", peer_ip, b"\r\n")
        head += (b"X-Forwarded-Proto: ", scheme, b"\r\n")
    if host is not None:
        h.add_field(head, b"X-Forwarded-Host", host)
    if via is not None:
        ours = h.VIA if version == "1.1" else h.VIA_10
        head += (b"Via: ", via, b", ", ours, b"\r\n")
    else:
        head.append(h.VIA_LINE if version == "1.1" else h.VIA_10_LINE)
    if websocket:
        head.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    elif chunked:
        head.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length or method in (b"POST", b"PUT", b"PATCH"):
        h.add_field(head, b"Content-Length", b"%d" % content_length)
    head.append(b"\r\n")
    call_timeout = 0.0
    if grpc:
        for name, value in fields:
            if name.lower() == b"grpc-timeout":
                call_timeout = grpcstatus.parse_timeout(value)
    return RequestHead(
        target,
        host,
        None,
        chunked,
        content_length,
        upgrade,
        websocket,
        grpc,
        call_timeout,
        expect_continue,
        override,
        sticky_key,
        b"".join(head),
    )
