"""One client request and its journey to an upstream and back (the hot path)."""

from __future__ import annotations

import asyncio
import json
from enum import Enum
from typing import TYPE_CHECKING

from . import headers as h
from .admission import Shed
from .headers import RawHeaders
from .router import OTHER
from .routing import PoolName, parse_override
from .upstream import BadResponse, ConnectError, Upstream, UpstreamConnection

if TYPE_CHECKING:
    from .runtime import Proxy
    from .server import ClientConnection

SHED_DETAIL = {
    "queue_full": "the upstream's in-flight limit and queue are full",
    "queue_timeout": "waited in the upstream's queue longer than limits.queue_timeout",
    "rate_limited": "the upstream's rate limit (limits.rate) is exhausted",
}

# A request body up to this size is kept so that the request can be retried elsewhere.
RETRY_BODY_LIMIT = 65536


class Outcome(Enum):
    OK = "ok"
    CONNECT_ERROR = "connect_error"
    BAD_RESPONSE = "bad_response"
    TIMEOUT = "timeout"
    RESET = "reset"  # the upstream closed before any response byte
    CUT = "cut"  # the response body was cut short after it had started
    RETRY_STATUS = "retry_status"
    CLIENT_GONE = "client_gone"


class Exchange:
    """State of one request; callbacks from both connections meet here."""

    __slots__ = (
        "attempts",
        "attempts_left",
        "body_done",
        "body_size",
        "buffered",
        "buffered_size",
        "bytes_out",
        "chunked",
        "client",
        "conn",
        "content_length",
        "detail",
        "error",
        "expect_continue",
        "forward_head",
        "head_timer",
        "host",
        "keep_alive",
        "method",
        "no_body",
        "note",
        "out",
        "outcome",
        "override",
        "pool",
        "request_headers",
        "rescue_from",
        "resp_chunked",
        "resp_close",
        "resp_until_close",
        "response_started",
        "retries",
        "retry_status",
        "retry_to",
        "reused_conn",
        "started",
        "status",
        "sticky_key",
        "target",
        "tried",
        "upgrade",
        "upgrade_rest",
        "upstream",
        "upstream_time",
        "version",
        "waiter",
        "websocket",
    )

    def __init__(
        self,
        client: ClientConnection,
        method: bytes,
        target: bytes,
        version: str,
        headers: RawHeaders,
        keep_alive: bool,
    ) -> None:
        self.client = client
        self.method = method
        self.target = target
        self.version = version
        self.request_headers = headers
        self.keep_alive = keep_alive
        self.error: tuple[int, str] | None = None
        self.detail = ""
        self.host: bytes | None = None
        self.chunked = False
        self.content_length = 0
        self.expect_continue = False
        self.upgrade = False
        self.websocket = False
        self.upgrade_rest: list[bytes] | None = None
        self.override: PoolName | None = None
        self.sticky_key: bytes | None = None
        self.forward_head: bytes | None = None
        self.no_body = method == b"HEAD"
        # Body chunks received so far, kept while they fit the retry limit.
        self.buffered: list[bytes] | None = []
        self.buffered_size = 0
        self.body_size = 0
        self.body_done = False
        self.conn: UpstreamConnection | None = None
        self.upstream: Upstream | None = None
        self.waiter: asyncio.Future[Outcome] | None = None
        self.head_timer: asyncio.TimerHandle | None = None
        self.outcome = Outcome.OK
        self.status = 0
        self.retry_status = 0
        self.attempts_left = 0
        self.retries = 0
        self.rescue_from: PoolName | None = None
        self.pool: PoolName | None = None
        self.started = client.proxy.loop.time()
        self.tried: tuple[Upstream, ...] = ()
        self.retry_to: Upstream | None = None
        self.response_started = False
        self.resp_chunked = False
        self.resp_close = False
        self.resp_until_close = False
        self.reused_conn = False
        self.out: list[bytes] = []
        # For the access log.
        self.attempts = 0
        self.bytes_out = 0
        self.upstream_time = 0.0
        self.note = ""
        self._inspect_headers()

    # request side ------------------------------------------------------------

    def _inspect_headers(self) -> None:
        """One pass over the request head: framing checks and the values routing needs."""
        if self.method == b"CONNECT":
            # A reverse proxy opens no tunnels to arbitrary hosts (the parser also stops here).
            self.error = (405, "CONNECT is not supported by a reverse proxy")
            return
        if self.version != "1.1" and self.version != "1.0":
            # llhttp also accepts 0.9 and 2.0 request lines; neither can be relayed as HTTP/1.1.
            self.error = (505, f"HTTP/{self.version} is not supported")
            return
        router = self.client.proxy.router
        override_name = router.override_header
        sticky_header = router.sticky_header
        cookie: bytes | None = None
        sticky_value: bytes | None = None
        te_seen = False
        for name, value in self.request_headers:
            lname = name.lower()
            if lname == b"host":
                if self.host is not None:
                    self.error = (400, "duplicate Host header")
                    return
                self.host = value
            elif lname == b"transfer-encoding":
                if te_seen or not h.valid_transfer_encoding(value):
                    self.error = (400, "unsupported or ambiguous Transfer-Encoding")
                    return
                te_seen = True
                self.chunked = True
            elif lname == b"content-length":
                self.content_length = int(value)
            elif lname == b"expect":
                if value.strip().lower() == b"100-continue":
                    self.expect_continue = True
                else:
                    self.error = (417, "unsupported Expect")
                    return
            elif lname == b"upgrade":
                self.upgrade = True
                self.websocket = value.strip().lower() == b"websocket"
            elif lname == override_name:
                self.override = parse_override(value)
            elif lname == b"cookie":
                cookie = value if cookie is None else cookie + b"; " + value
            elif lname == sticky_header:
                sticky_value = value
        if self.host is None and self.version == "1.1":
            self.error = (400, "missing Host header")
            return
        if te_seen and self.version == "1.0":
            self.error = (400, "Transfer-Encoding in an HTTP/1.0 request")
            return
        if router.sticky_cookie is not None or sticky_value is not None:
            self.sticky_key = router.sticky_key(cookie, sticky_value)

    def feed_body(self, data: bytes) -> None:
        self.body_size += len(data)
        buffered = self.buffered
        conn = self.conn
        if buffered is not None:
            self.buffered_size += len(data)
            if self.buffered_size <= RETRY_BODY_LIMIT or conn is None:
                buffered.append(data)
                if conn is None and self.buffered_size > RETRY_BODY_LIMIT:
                    # Not attached yet: hold the client until an upstream takes the body.
                    self.client.pause_reading(self.client.PAUSE_BODY)
            else:
                self.buffered = None
        if conn is not None:
            conn.write(h.chunk(data) if self.chunked else data)

    def end_body(self) -> None:
        self.body_done = True
        conn = self.conn
        if conn is not None:
            if self.chunked:
                conn.write(h.CHUNK_END)
            self._start_head_timer()

    def body_error(self, detail: str) -> None:
        """The client's request body was malformed mid-stream: the upstream gets a cut
        request (it cannot take it for complete) and the client a 400."""
        if self.error is None:
            self.error = (400, detail)
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        if not self.response_started:
            self.client.send_error(self, 400, "bad_request", detail)
        else:
            self.client.abort()
        self._finish_attempt(Outcome.CLIENT_GONE)

    def retriable(self) -> bool:
        settings = self.client.proxy.settings
        return self.method in settings.retry_methods and self.buffered is not None

    def _build_forward_head(self) -> bytes:
        client = self.client
        named = h.hop_names(self.request_headers)
        parts = [self.method, b" ", self.target, b" HTTP/1.1\r\n"]
        xff: bytes | None = None
        via: bytes | None = None
        for name, value in self.request_headers:
            lname = name.lower()
            if lname in h.HOP_BY_HOP or lname == b"expect":
                continue
            if named is not None and lname in named:
                continue
            if lname == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
                continue
            if lname == b"via":
                via = value if via is None else via + b", " + value
                continue
            if lname == b"x-forwarded-proto" or lname == b"x-forwarded-host":
                continue
            parts += (name, b": ", value, b"\r\n")
        if self.host is None and self.upstream is not None:
            parts += (b"Host: ", self.upstream.host_header, b"\r\n")
        peer = client.peer_ip
        parts += (b"X-Forwarded-For: ", peer if xff is None else xff + b", " + peer, b"\r\n")
        parts += (b"X-Forwarded-Proto: ", client.scheme, b"\r\n")
        if self.host is not None:
            parts += (b"X-Forwarded-Host: ", self.host, b"\r\n")
        ours = h.VIA if self.version == "1.1" else h.VIA_10
        parts += (b"Via: ", ours if via is None else via + b", " + ours, b"\r\n")
        if self.websocket:
            parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
        elif self.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif self.content_length or self.method in (b"POST", b"PUT", b"PATCH"):
            parts += (b"Content-Length: ", b"%d" % self.content_length, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    # the coroutine -------------------------------------------------------------

    async def run(self) -> None:
        client = self.client
        try:
            if self.error is not None:
                if not self.response_started:
                    status, detail = self.error
                    client.send_error(self, status, h.error_name(status), detail)
                return
            await self._forward()
        except Exception as exc:
            client.proxy.log.exception("unexpected error while forwarding")
            if not self.response_started:
                client.send_error(self, 500, "internal_error", type(exc).__name__)
            else:
                client.abort()
        finally:
            client.proxy.record_response(self)
            client.exchange_finished(self)

    async def _forward(self) -> None:
        proxy = self.client.proxy
        router = proxy.router
        pool = router.choose_pool(self.override, self.sticky_key)
        self.pool = pool
        self.attempts_left = proxy.settings.retry_attempts
        budget = proxy.retry_budget
        budget.request_started()
        try:
            await self._attempts(proxy, router.pick_admissible(pool))
        finally:
            budget.request_finished()
            for _ in range(self.retries):
                budget.end_retry()

    async def _attempts(self, proxy: Proxy, upstream: Upstream | None) -> None:
        loop = proxy.loop
        while True:
            if upstream is None:
                pool = self.pool or ""
                self.client.send_error(
                    self,
                    503,
                    "no_upstream",
                    f"no healthy upstream in pool {pool} or the other pool",
                    pool,
                )
                return
            breaker = upstream.breaker
            if not breaker.acquire():
                # Opened, or out of half-open trial slots, since the candidates were built.
                self.tried = (*self.tried, upstream)
                upstream = self._untried(upstream)
                continue
            epoch = breaker.epoch
            admission = upstream.admission
            try:
                if not admission.try_enter():
                    await admission.enter()
            except Shed as exc:
                breaker.release(None, epoch=epoch)
                self.upstream = upstream
                self.note = exc.reason
                self.client.send_error(
                    self, 503, exc.reason, SHED_DETAIL[exc.reason], upstream.pool, upstream.key
                )
                return
            except BaseException:
                breaker.release(None, epoch=epoch)
                raise
            # The slot and the breaker verdict are settled in `finally`, after the body ended.
            verdict: bool | None = None
            upstream.requests += 1
            self.attempts += 1
            started = loop.time()
            try:
                outcome = await self._attempt(upstream)
                verdict = self._verdict(outcome)
            finally:
                admission.leave()
                breaker.release(verdict, epoch=epoch)
            self.upstream_time = loop.time() - started
            if verdict is not None:
                error = not verdict or self.status >= 500
                proxy.record_outcome(upstream.pool, error, self.upstream_time)
            if outcome is Outcome.OK or outcome is Outcome.CLIENT_GONE:
                if outcome is Outcome.OK and self.rescue_from not in (None, upstream.pool):
                    proxy.rescued += 1
                    self.note = "rescued"
                return
            if outcome is Outcome.RESET and self.reused_conn and self.buffered is not None:
                # A pooled connection closed by the upstream just as it was reused: the
                # request never reached it, so a fresh connection to the same upstream is safe.
                self._reset_attempt()
                continue
            upstream.failures += 1
            if outcome is Outcome.CUT:
                return
            if outcome is Outcome.RETRY_STATUS:
                retry_to = self.retry_to  # chosen when the answer's head was seen
            elif outcome in proxy.settings.retry_outcomes:
                retry_to = self._retry_target(upstream, outcome.value)
            else:
                retry_to = None
            if retry_to is not None:
                upstream = retry_to
                self._reset_attempt()
                continue
            self._send_failure(outcome, upstream)
            return

    def _verdict(self, outcome: Outcome) -> bool | None:
        """The outcome as the breaker sees it: True ok, False failure, None not the
        upstream's doing."""
        if outcome is Outcome.OK:
            return self.status not in self.client.proxy.settings.breaker_statuses
        if outcome is Outcome.CLIENT_GONE:
            return None
        if outcome is Outcome.RESET and self.reused_conn:
            return None
        return False

    def _untried(self, failed: Upstream) -> Upstream | None:
        """Any available upstream not tried yet, own pool first (a rare path: the breaker
        refused a pick made from fresh candidates)."""
        candidates = self.client.proxy.router.candidates
        for pool in (failed.pool, OTHER[failed.pool]):
            for upstream in candidates[pool]:
                if upstream not in self.tried:
                    return upstream
        return None

    def _retry_target(self, failed: Upstream, reason: str) -> Upstream | None:
        """Where a retry would go, or None when none may be made. A failed candidate request
        goes to the stable pool (a shielded canary); otherwise another upstream of the same
        pool first, then the other pool; never one this request has tried, and only within
        the retry budget."""
        if self.attempts_left <= 0 or not self.retriable():
            return None
        proxy = self.client.proxy
        self.tried = (*self.tried, failed)
        stable = proxy.stable
        if failed.pool != stable:
            upstream = self._pick_untried(stable, failed)
        else:
            upstream = self._pick_untried(failed.pool, failed) or self._pick_untried(
                OTHER[failed.pool], failed
            )
        if upstream is None:
            return None
        if reason == "connect_error":
            # The request never reached an upstream: sending it on adds load nowhere, so it
            # does not draw on the budget (which bounds the extra load retries put on
            # upstreams). It still counts against attempts and in the retries metric.
            pass
        elif proxy.retry_budget.try_begin_retry():
            self.retries += 1  # budget slots held until the request ends
        else:
            return None
        self.attempts_left -= 1
        if failed.pool != stable:
            self.rescue_from = failed.pool
        proxy.pool_stats[failed.pool].retried(reason)
        self.note = f"retried: {reason}"
        return upstream

    def _pick_untried(self, pool: PoolName, failed: Upstream) -> Upstream | None:
        router = self.client.proxy.router
        upstream = router.pick_in(pool, failed)
        if upstream is None or upstream not in self.tried:
            return upstream
        # The balancer excludes only the last failure; from a third try on it may offer one
        # tried before, while an untried one remains (a rare path: scan the candidates).
        for candidate in router.candidates[pool]:
            if candidate not in self.tried:
                return candidate
        return None

    def _send_failure(self, outcome: Outcome, upstream: Upstream) -> None:
        if outcome is Outcome.TIMEOUT:
            status, err = 504, "upstream_timeout"
        else:
            status, err = 502, "bad_gateway"
        self.client.send_error(
            self, status, err, self.detail or outcome.value, upstream.pool, upstream.key
        )

    def _reset_attempt(self) -> None:
        self.conn = None
        self.outcome = Outcome.OK
        self.detail = ""
        self.retry_to = None

    async def _attempt(self, upstream: Upstream) -> Outcome:
        self.upstream = upstream
        proxy = self.client.proxy
        conn = upstream.pop_idle()
        if conn is None:
            try:
                conn = await upstream.connect(proxy.settings.connect_timeout)
            except ConnectError as exc:
                self.detail = f"connect to {upstream.url} failed: {exc}"
                return Outcome.CONNECT_ERROR
            if self.client.closed or self.error is not None:
                conn.close()
                return Outcome.CLIENT_GONE
        self.reused_conn = conn.reused
        conn.reused = True
        if self.forward_head is None:
            self.forward_head = self._build_forward_head()
        self.waiter = proxy.loop.create_future()
        self.conn = conn
        conn.start(self, self.forward_head, self.no_body)
        if self.buffered:
            chunked = self.chunked
            for data in self.buffered:
                conn.write(h.chunk(data) if chunked else data)
            if self.buffered_size > RETRY_BODY_LIMIT:
                self.buffered = None
        self.client.resume_reading(self.client.PAUSE_BODY)
        if self.body_done:
            if self.chunked:
                conn.write(h.CHUNK_END)
            self._start_head_timer()
        elif self.expect_continue and self.version == "1.1":
            self.expect_continue = False
            self.client.write(h.CONTINUE_100)
        if self.client.write_paused:
            conn.pause_reading()
        try:
            return await self.waiter
        finally:
            self.waiter = None
            timer = self.head_timer
            if timer is not None:
                timer.cancel()
                self.head_timer = None
            if self.conn is conn and conn.sink is self:
                conn.detach()

    def _start_head_timer(self) -> None:
        if self.head_timer is None and not self.response_started:
            proxy = self.client.proxy
            self.head_timer = proxy.loop.call_later(
                proxy.settings.response_headers_timeout, self._head_timeout
            )

    def _head_timeout(self) -> None:
        self.head_timer = None
        conn = self.conn
        if conn is not None and not self.response_started:
            conn.detach()
            timeout = self.client.proxy.settings.response_headers_timeout
            self.detail = f"no response headers within {timeout:g}s"
            self._finish_attempt(Outcome.TIMEOUT)

    def _finish_attempt(self, outcome: Outcome) -> None:
        self.outcome = outcome
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    # upstream callbacks ------------------------------------------------------

    def upstream_head(
        self,
        conn: UpstreamConnection,
        status: int,
        reason: bytes,
        headers: RawHeaders,
    ) -> None:
        timer = self.head_timer
        if timer is not None:
            timer.cancel()
            self.head_timer = None
        if status == 101 and not self.websocket:
            self._upstream_error(conn, Outcome.BAD_RESPONSE, "101 to a request without upgrade")
            return
        if (
            status in self.client.proxy.settings.retry_statuses
            and self.upstream is not None
            and (retry_to := self._retry_target(self.upstream, f"status_{status}")) is not None
        ):
            # Swallowed only when a retry will be made; the last answer reaches the client.
            self.retry_to = retry_to
            self.retry_status = status
            self.detail = f"upstream answered {status}"
            conn.detach()
            self._finish_attempt(Outcome.RETRY_STATUS)
            return
        self.status = status
        self.response_started = True
        # Held until the end of this read: head and body then leave in one write.
        self.out.append(self._response_head(conn, status, reason, headers))

    def _response_head(
        self,
        conn: UpstreamConnection,
        status: int,
        reason: bytes,
        headers: RawHeaders,
    ) -> bytes:
        client = self.client
        named = h.hop_names(headers)
        parts = [b"HTTP/1.1 %d %b\r\n" % (status, reason or h.reason(status))]
        length: bytes | None = None
        te = False
        for name, value in headers:
            lname = name.lower()
            if lname in h.HOP_BY_HOP:
                if lname == b"content-length":
                    length = value
                elif lname == b"transfer-encoding":
                    te = True
                continue
            if named is not None and lname in named:
                continue
            parts += (name, b": ", value, b"\r\n")
        parts += (b"Via: ", h.VIA, b"\r\n")
        close = client.closing or not self.keep_alive or not self.body_done
        if status == 101:
            parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
            parts.append(b"\r\n")
            return b"".join(parts)
        no_body = self.no_body or status in (204, 304)
        self.resp_until_close = length is None and not te and not no_body
        if no_body:
            if length is not None:
                parts += (b"Content-Length: ", length, b"\r\n")
            conn.no_body = True
        elif length is not None and not te:
            parts += (b"Content-Length: ", length, b"\r\n")
        elif self.version == "1.1":
            parts.append(b"Transfer-Encoding: chunked\r\n")
            self.resp_chunked = True
        else:
            # An HTTP/1.0 client learns where the body ends when the connection closes.
            close = True
        if close:
            self.resp_close = True
            parts.append(b"Connection: close\r\n")
        elif self.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def upstream_body(self, data: bytes) -> None:
        if self.response_started:
            self.bytes_out += len(data)
            self.out.append(h.chunk(data) if self.resp_chunked else data)

    def flush(self) -> None:
        """Write what this read of the upstream produced, in one system call."""
        out = self.out
        if out:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def upstream_done(self, conn: UpstreamConnection) -> None:
        if self.resp_chunked:
            self.out.append(h.CHUNK_END)
        self.flush()
        upstream = conn.upstream
        reusable = self.body_done and conn.should_keep_alive()
        self.conn = None
        upstream.release(conn, reusable, self.client.proxy.loop.time())
        self._finish_attempt(Outcome.OK)

    def upstream_failed(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if self.response_started:
            if exc is None and self.resp_until_close:
                # A close-delimited body ends when the upstream closes.
                if self.resp_chunked:
                    self.out.append(h.CHUNK_END)
                self.flush()
                self.conn = None
                conn.close()
                self._finish_attempt(Outcome.OK)
                return
            # Never let a cut body look complete: cut the client's connection too.
            self.client.abort()
            self._upstream_error(conn, Outcome.CUT, "response body cut short by the upstream")
            return
        if isinstance(exc, BadResponse):
            self._upstream_error(conn, Outcome.BAD_RESPONSE, f"invalid response: {exc}")
        else:
            reason = str(exc) if exc is not None else "connection closed"
            self._upstream_error(conn, Outcome.RESET, f"upstream closed: {reason}")

    def _upstream_error(self, conn: UpstreamConnection, outcome: Outcome, detail: str) -> None:
        self.detail = detail
        self.conn = None
        conn.detach()
        self._finish_attempt(outcome)

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        self.flush()
        if not (self.websocket and self.status == 101):
            self._upstream_error(conn, Outcome.BAD_RESPONSE, "unexpected protocol switch")
            return
        self.client.start_tunnel(self, conn, rest)

    def upstream_pause(self) -> None:
        self.client.pause_reading(self.client.PAUSE_UPSTREAM)

    def upstream_resume(self) -> None:
        self.client.resume_reading(self.client.PAUSE_UPSTREAM)

    def tunnel_closed(self) -> None:
        self._finish_attempt(Outcome.OK)

    # client side events ------------------------------------------------------

    def client_lost(self) -> None:
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.detach()
        self._finish_attempt(Outcome.CLIENT_GONE)

    def error_body(self, status: int, error: str, detail: str, pool: str, upstream: str) -> bytes:
        payload: dict[str, object] = {"error": error, "status": status, "detail": detail}
        if pool:
            payload["pool"] = pool
        if upstream:
            payload["upstream"] = upstream
        return json.dumps(payload).encode() + b"\n"

    def __repr__(self) -> str:
        target = self.target.decode("latin-1")
        return f"<Exchange {self.method.decode()} {target} status={self.status}>"
