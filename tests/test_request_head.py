"""parse_request_head(): one request head read as the proxy forwards it, without a socket."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import proxy_config

from proxy.config import parse_config
from proxy.http.request import RequestHead, parse_request_head
from proxy.http.router import Router
from proxy.http.upstream import Upstream
from proxy.logic.routing import PoolName, SplitSpreader

FORWARDED = b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http\r\n"


def router(**config: Any) -> Router:
    pools: dict[PoolName, tuple[Upstream, ...]] = {"blue": (), "green": ()}
    return Router(parse_config(proxy_config([], [], **config)), pools, SplitSpreader(0.0))


def read(
    fields: list[tuple[bytes, bytes]],
    *,
    method: bytes = b"GET",
    target: bytes = b"/a?b=1",
    version: str = "1.1",
    routing: Router | None = None,
) -> RequestHead:
    return parse_request_head(
        method, target, version, fields, routing or router(), FORWARDED, b"10.0.0.7", b"http"
    )


def forwarded_lines(head: RequestHead) -> list[bytes]:
    assert head.forward_head is not None
    return head.forward_head.split(b"\r\n")


def test_an_ordinary_head_is_forwarded_with_the_proxy_fields() -> None:
    head = read([(b"Host", b"shop"), (b"Accept", b"*/*"), (b"Keep-Alive", b"timeout=5")])
    assert head.error is None
    assert (head.host, head.chunked, head.content_length) == (b"shop", False, 0)
    assert forwarded_lines(head) == [
        b"GET /a?b=1 HTTP/1.1",
        b"Host: shop",
        b"Accept: */*",
        b"X-Forwarded-For: 10.0.0.7",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: shop",
        b"Via: 1.1 turnout",
        b"",
        b"",
    ]


def test_the_absolute_form_names_the_host() -> None:
    head = read([(b"Host", b"other")], target=b"http://shop:8080/x")
    assert (head.error, head.target, head.host) == (None, b"/x", b"shop:8080")
    lines = forwarded_lines(head)
    assert lines[:2] == [b"GET /x HTTP/1.1", b"Host: shop:8080"]
    assert b"Host: other" not in lines


def test_fields_named_by_connection_and_earlier_hops_are_joined() -> None:
    head = read(
        [
            (b"Host", b"shop"),
            (b"X-Secret", b"1"),
            (b"Connection", b"x-secret"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"Via", b"1.0 edge"),
        ],
        method=b"POST",
    )
    lines = forwarded_lines(head)
    assert not any(line.lower().startswith(b"x-secret") for line in lines)
    assert b"X-Forwarded-For: 1.2.3.4, 10.0.0.7" in lines
    assert b"Via: 1.0 edge, 1.1 turnout" in lines
    assert b"Content-Length: 0" in lines  # a POST always says how long its body is


@pytest.mark.parametrize(
    ("fields", "version", "error"),
    [
        ([], "1.1", (400, "missing Host header")),
        ([(b"Host", b"a"), (b"Host", b"b")], "1.1", (400, "duplicate Host header")),
        ([(b"Host", b"a"), (b"Expect", b"later")], "1.1", (417, "unsupported Expect")),
        (
            [(b"Transfer-Encoding", b"chunked")],
            "1.0",
            (400, "Transfer-Encoding in an HTTP/1.0 request"),
        ),
        ([(b"Host", b"a")], "2.0", (505, "HTTP/2.0 is not supported")),
    ],
)
def test_refusals(fields: list[tuple[bytes, bytes]], version: str, error: tuple[int, str]) -> None:
    head = read(fields, version=version)
    assert (head.error, head.forward_head) == (error, None)


def test_a_refused_head_keeps_the_body_framing_read_so_far() -> None:
    head = read([(b"Transfer-Encoding", b"chunked"), (b"Host", b"a"), (b"Host", b"b")])
    assert head.error == (400, "duplicate Host header")
    assert head.chunked  # the connection still reads the chunked body that follows


def test_routing_fields_and_a_grpc_deadline() -> None:
    routing = router(sticky={"cookie": "v"})
    head = read(
        [
            (b"Host", b"shop"),
            (b"X-Turnout-Pool", b"green"),
            (b"Cookie", b"a=1; v=user-42"),
            (b"Content-Type", b"application/grpc"),
            (b"Grpc-Timeout", b"250m"),
        ],
        method=b"POST",
        routing=routing,
    )
    assert (head.override, head.sticky_key) == ("green", b"user-42")
    assert (head.grpc, head.call_timeout) == (True, 0.25)
