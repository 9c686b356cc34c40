"""One client request and its journey to an upstream and back (the hot path)."""

from __future__ import annotations

import json
from collections.abc import Coroutine
from enum import Enum
from time import monotonic
from typing import TYPE_CHECKING, Final

from proxy.http import headers as h
from proxy.http.headers import RawHeaders
from proxy.http.request import parse_request_head
from proxy.http.upstream import BadResponse, ConnectError, Upstream, UpstreamConnection
from proxy.logic import grpcstatus
from proxy.logic.admission import Shed, ShedReason
from proxy.logic.routing import OTHER, PoolName
from proxy.logic.stats import CODE_LABELS

if TYPE_CHECKING:
    from proxy.http.h2front import H2Stream
    from proxy.http.server import ClientConnection

SHED_DETAIL = {
    "queue_full": "the upstream's in-flight limit and queue are full",
    "queue_timeout": "waited in the upstream's queue longer than limits.queue_timeout",
    "rate_limited": "the upstream's rate limit (limits.rate) is exhausted",
}

# A request body up to this size is kept so that the request can be retried elsewhere.
RETRY_BODY_LIMIT: Final = 65536


class Outcome(Enum):
    OK = "ok"
    CONNECT_ERROR = "connect_error"
    BAD_RESPONSE = "bad_response"
    TIMEOUT = "timeout"
    RESET = "reset"  # the upstream closed before any response byte
    CUT = "cut"  # the response body was cut short after it had started
    RETRY_STATUS = "retry_status"
    CLIENT_GONE = "client_gone"


# A candidate's connection failures and broken answers are shielded like its failing statuses.
SHIELDED_OUTCOMES: Final = frozenset({Outcome.CONNECT_ERROR, Outcome.RESET, Outcome.BAD_RESPONSE})


class Phase(Enum):
    """A phase of an exchange with a time bound (its `timeouts.` setting has the same name)."""

    REQUEST_HEADERS = "request_headers"
    RESPONSE_HEADERS = "response_headers"
    CLIENT_BODY = "client_body"  # the client sends no request body byte
    CLIENT_SEND = "client_send"  # the client takes no response byte
    UPSTREAM_BODY = "upstream_body"  # the upstream sends no response byte or takes no body byte
    TUNNEL_IDLE = "tunnel_idle"  # no byte either way through a WebSocket tunnel


class Stage(Enum):
    """Where an exchange stands, in order (as h11's states). Each attempt goes from STARTED
    (maybe through QUEUED) to HOLDING, then WAITING, and back to STARTED when it settles;
    FINISHED is final."""

    NEW = "new"  # its head is in; the client connection starts it when it may
    STARTED = "started"  # choosing an upstream, or between two attempts
    QUEUED = "queued"  # in an upstream's admission queue
    HOLDING = "holding"  # holds an upstream's admission slot and breaker trial (connecting)
    WAITING = "waiting"  # holding, its request out, the attempt's outcome awaited
    FINISHED = "finished"  # recorded, its connection freed


class Attempt:
    """One try of an exchange on one upstream. It holds the upstream's breaker trial from the
    moment the breaker grants it, and its admission slot once admitted, and gives back what it
    holds exactly once (`settle`), whatever ends it: an outcome, a shed, a cancelled wait."""

    __slots__ = ("admitted", "epoch", "reused", "settled", "started", "upstream")

    def __init__(self, upstream: Upstream, epoch: int) -> None:
        self.upstream: Final = upstream
        self.epoch: Final = epoch  # the breaker's, when it granted the trial
        self.admitted = False
        self.settled = False
        # When the request's first byte left (the upstream's time runs from there).
        self.started = 0.0
        self.reused = False  # sent on a pooled connection

    def admit(self) -> None:
        self.admitted = True
        self.started = monotonic()

    def settle(self, verdict: bool | None) -> None:
        """Give back the admission slot (when admitted) and the breaker trial, with the
        breaker's verdict (None: not the upstream's doing). Only the first call counts."""
        if self.settled:
            return
        self.settled = True
        upstream = self.upstream
        try:
            if self.admitted:
                upstream.admission.leave()
        finally:
            upstream.breaker.release(verdict, epoch=self.epoch)


class Exchange:
    """State of one request; callbacks from both connections meet here."""

    __slots__ = (
        "answered",
        "attempt",
        "attempts",
        "attempts_left",
        "body_done",
        "body_size",
        "buffered",
        "buffered_size",
        "bytes_out",
        "client",
        "conn",
        "detail",
        "error",
        "expect_continue",
        "head",
        "keep_alive",
        "method",
        "no_body",
        "note",
        "out",
        "pool",
        "relayed",
        "request_headers",
        "rescue_from",
        "resp_chunked",
        "resp_close",
        "resp_until_close",
        "response_started",
        "retry_to",
        "stage",
        "started",
        "status",
        "tried",
        "upgrade",
        "upgrade_rest",
        "upstream",
        "upstream_time",
        "version",
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
        self.version = version
        self.request_headers = headers
        self.keep_alive = keep_alive
        head = parse_request_head(
            method,
            target,
            version,
            headers,
            client.proxy.router,
            client.forwarded,
            client.peer_ip,
            client.scheme,
        )
        # What the head says, read where it is needed (not copied: the hot path pays per
        # field). The few fields an exchange changes as it goes are its own:
        self.head = head
        # set when the request is refused (status, detail); the body's framing still counts,
        self.error = head.error
        self.detail = ""
        # cleared once the proxy has told the client to go on (100 Continue),
        self.expect_continue = head.expect_continue
        # cleared when an upgrade other than WebSocket goes on as a plain request.
        self.upgrade = head.upgrade
        self.upgrade_rest: list[bytes] | None = None
        self.no_body = method == b"HEAD"
        # Body chunks received so far, kept while they fit the retry limit.
        self.buffered: list[bytes] | None = []
        self.buffered_size = 0
        self.body_size = 0
        self.body_done = False
        self.conn: UpstreamConnection | None = None
        self.upstream: Upstream | None = None
        # The attempt under way, or the last one.
        self.attempt: Attempt | None = None
        self.stage = Stage.NEW
        self.status = 0
        self.answered = 0  # the status of the attempt's answer (0: none yet)
        self.attempts_left = 0
        self.rescue_from: PoolName | None = None
        self.pool: PoolName | None = None
        # Durations are timed on the monotonic clock itself: the loop's clock (uvloop) moves
        # in whole milliseconds, too coarse for a request or an upstream's answer.
        self.started = monotonic()
        self.tried: tuple[Upstream, ...] = ()
        self.retry_to: Upstream | None = None
        self.response_started = False
        # Some of the response left for the client (until then a bad response can still
        # become a 502).
        self.relayed = False
        self.resp_chunked = False
        self.resp_close = False
        self.resp_until_close = False
        self.out: list[bytes] = []
        # For the access log.
        self.attempts = 0
        self.bytes_out = 0
        self.upstream_time = 0.0
        self.note = ""

    # request side ------------------------------------------------------------

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
            conn.write(h.chunk(data) if self.head.chunked else data)

    def end_body(self) -> None:
        self.body_done = True
        conn = self.conn
        if conn is not None:
            if self.head.chunked:
                conn.write(h.CHUNK_END)
            self._arm_head_deadline()

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
        if self.stage is Stage.NEW:
            self.start()  # it answers nothing more, but finishes the exchange

    # the attempts --------------------------------------------------------------
    # The common case runs to its end in callbacks, with no task: start() picks an upstream,
    # takes its breaker trial and admission slot and sends the request on a pooled connection;
    # the connection's callbacks bring the outcome to _finish_attempt, which settles the attempt
    # and then finishes the exchange or starts the next attempt. Only waiting in an admission
    # queue and opening a connection await, each in a short task that hands back to these steps.

    def start(self) -> None:
        """Begin serving the request (once; ClientConnection decides when it may)."""
        if self.stage is not Stage.NEW:
            return
        self.stage = Stage.STARTED
        try:
            if self.error is not None:
                if not self.response_started:
                    status, detail = self.error
                    self.client.send_error(self, status, h.error_name(status), detail)
                self._finish()
                return
            proxy = self.client.proxy
            router = proxy.router
            pool = router.choose_pool(self.head.override, self.head.sticky_key)
            self.pool = pool
            self.attempts_left = self.client.serving.settings.retry_attempts
            proxy.retry_budget.request(self.started)
            upstream = router.pick_admissible(pool, self.head.override is not None)
            if upstream is not None and upstream.pool != pool and upstream.pool != proxy.stable:
                proxy.failed_over_to_candidate(pool, False)
            self._next(upstream)
        except Exception as exc:
            self._crash(exc)

    def _next(self, upstream: Upstream | None) -> None:
        """Start an attempt on `upstream` (or on another one when its breaker refuses), or
        answer 503 when none is left."""
        while True:
            if upstream is None:
                pool = self.pool
                assert pool is not None  # chosen by start() before any attempt
                detail = self.client.proxy.no_upstream_detail(pool, self.head.override is not None)
                self.client.send_error(self, 503, "no_upstream", detail, pool)
                self._finish()
                return
            breaker = upstream.breaker
            if breaker.acquire():
                break
            # Opened, or out of half-open trial slots, since the candidates were built.
            self.tried = (*self.tried, upstream)
            upstream = self._untried(upstream)
        attempt = Attempt(upstream, breaker.epoch)
        try:
            admitted = upstream.admission.try_enter()
        except Shed as exc:
            attempt.settle(None)
            self._shed(upstream, exc.reason)
            return
        if admitted:
            self._admitted(attempt)
        else:
            self._spawn(self._queue(attempt))

    async def _queue(self, attempt: Attempt) -> None:
        """Wait in the upstream's admission queue (bounded in places and in time)."""
        try:
            self.stage = Stage.QUEUED
            try:
                await attempt.upstream.admission.enter()
            except Shed as exc:
                attempt.settle(None)
                self._shed(attempt.upstream, exc.reason)
                return
            except BaseException:
                attempt.settle(None)
                raise
            finally:
                if self.stage is Stage.QUEUED:
                    self.stage = Stage.STARTED
            self._admitted(attempt)
        except Exception as exc:
            self._crash(exc)
        except BaseException:
            self._finish()
            raise

    def _admitted(self, attempt: Attempt) -> None:
        # From here the attempt holds the upstream's admission slot and breaker trial; _settle
        # (or _abandon on the way out of an error) gives both back (Attempt.settle).
        attempt.admit()
        upstream = attempt.upstream
        self.attempt = attempt
        self.upstream = upstream
        self.stage = Stage.HOLDING
        self.answered = 0
        upstream.requests += 1
        self.attempts += 1
        conn = upstream.pop_idle()
        if conn is None:
            self._spawn(self._connect(upstream))
        else:
            self._send(conn)

    async def _connect(self, upstream: Upstream) -> None:
        try:
            try:
                conn = await upstream.connect(self.client.serving.settings.connect_timeout)
            except ConnectError as exc:
                # The upstream by its key: the answer goes to clients, its address must not.
                self.detail = f"connect to {upstream.key} failed: {exc}"
                self._settle(Outcome.CONNECT_ERROR)
                return
            if self.client.closed or self.error is not None:
                conn.close()
                self._settle(Outcome.CLIENT_GONE)
                return
            self._send(conn)
        except Exception as exc:
            self._crash(exc)
        except BaseException:
            self._abandon()
            self._finish()
            raise

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        # The client connection holds the task: the loop keeps only a weak reference.
        self.client.task = self.client.proxy.loop.create_task(coro)

    def _send(self, conn: UpstreamConnection) -> None:
        """Send the request on `conn`; its outcome comes back through _finish_attempt."""
        attempt = self.attempt
        assert attempt is not None  # admitted
        attempt.reused = conn.reused
        if not conn.reused:
            # The upstream's time runs from the request's first byte: opening the connection is
            # judged by connect errors and timeouts, and is the price of a pool's first steps
            # (a candidate's new connections would otherwise look like a slower candidate).
            attempt.started = monotonic()
        conn.reused = True
        head = self.head.forward_head
        assert head is not None  # parse_request_head makes it unless the request was refused
        if self.head.host is None:
            # HTTP/1.0 without Host: name the upstream, right after the request line.
            cut = head.index(b"\r\n") + 2
            head = b"%bHost: %b\r\n%b" % (head[:cut], conn.upstream.host_header, head[cut:])
        self.conn = conn
        self.stage = Stage.WAITING
        conn.start(self, head, self.no_body)
        client = self.client
        if self.buffered:
            chunked = self.head.chunked
            for data in self.buffered:
                conn.write(h.chunk(data) if chunked else data)
            if self.buffered_size > RETRY_BODY_LIMIT:
                self.buffered = None
        if client.paused:
            client.resume_reading(client.PAUSE_BODY)
        if self.body_done:
            if self.head.chunked:
                conn.write(h.CHUNK_END)
            self._arm_head_deadline()
        elif self.expect_continue and self.version == "1.1":
            self.expect_continue = False
            client.write(h.CONTINUE_100)
        if client.write_paused:
            conn.pause_reading()

    def _finish_attempt(self, outcome: Outcome) -> None:
        """The outcome of the attempt under way (the first one reported counts)."""
        if self.stage is Stage.WAITING:
            self._settle(outcome)

    def _settle(self, outcome: Outcome) -> None:
        try:
            self._settle_attempt(outcome)
        except Exception as exc:
            self._crash(exc)

    def _settle_attempt(self, outcome: Outcome) -> None:
        """Give back what the attempt held, record it, then finish or try again."""
        attempt = self.attempt
        assert attempt is not None
        upstream = attempt.upstream
        self._end_wait()
        verdict = self._verdict(outcome)
        self._release(verdict)
        proxy = self.client.proxy
        self.upstream_time = monotonic() - attempt.started
        answered = self.answered
        # Labelled by the status of the upstream's answer when one came. Compared by identity:
        # an Enum's hash is Python code (a set of outcomes costs a call into the interpreter).
        if answered and (
            outcome is Outcome.OK
            or outcome is Outcome.RETRY_STATUS
            or outcome is Outcome.CLIENT_GONE
        ):
            label = CODE_LABELS[answered]
        else:
            label = outcome.value
        attempts = upstream.attempts
        attempts[label] = attempts.get(label, 0) + 1
        if verdict is not None:
            error = not verdict or answered >= 500
            proxy.record_outcome(upstream.pool, error, self.upstream_time)
        if outcome is Outcome.OK or outcome is Outcome.CLIENT_GONE:
            rescue_from = self.rescue_from
            if outcome is Outcome.OK and rescue_from is not None and rescue_from != upstream.pool:
                proxy.observed.rescued += 1
                self.note = "rescued"
            self._finish()
            return
        if outcome is Outcome.RESET and attempt.reused and self.buffered is not None:
            # A pooled connection closed by the upstream just as it was reused: the
            # request never reached it, so a fresh connection to the same upstream is safe.
            self._reset_attempt()
            self._next(upstream)
            return
        upstream.failures += 1
        if outcome is Outcome.CUT:
            self._finish()
            return
        if outcome is Outcome.RETRY_STATUS:
            retry_to = self.retry_to  # chosen when the answer's head was seen
        else:
            retry_to = self._retry_target(upstream, outcome, 0)
        if retry_to is not None:
            self._reset_attempt()
            self._next(retry_to)
            return
        self._send_failure(outcome, upstream)
        self._finish()

    def _end_wait(self) -> None:
        """No outcome is awaited any more: drop the head deadline and a connection still
        serving this attempt (it cannot be reused)."""
        if self.stage is Stage.WAITING:
            self.stage = Stage.HOLDING
        self.client.head_deadline = 0.0
        conn = self.conn
        if conn is not None and conn.sink is self:
            conn.detach()

    def _release(self, verdict: bool | None) -> None:
        if self.stage is Stage.HOLDING:
            self.stage = Stage.STARTED
            attempt = self.attempt
            assert attempt is not None  # admitted
            attempt.settle(verdict)

    def _abandon(self) -> None:
        """Leave the attempt under way without a verdict (an error, a cancellation)."""
        self._end_wait()
        self._release(None)

    def _crash(self, exc: Exception) -> None:
        self.client.proxy.log.error("unexpected error while forwarding", exc_info=exc)
        if self.stage is Stage.FINISHED:
            return
        self._abandon()
        if not self.response_started:
            self.client.send_error(self, 500, "internal_error", type(exc).__name__)
        else:
            self.client.abort()
        self._finish()

    def _finish(self) -> None:
        """The exchange is over: record it, free the connection."""
        if self.stage is Stage.FINISHED:
            return
        self.stage = Stage.FINISHED
        client = self.client
        try:
            client.proxy.record_response(self)
        finally:
            client.exchange_finished(self)

    def _shed(self, upstream: Upstream, reason: ShedReason) -> None:
        self.upstream = upstream
        self.note = reason
        self.client.send_error(self, 503, reason, SHED_DETAIL[reason], upstream.pool, upstream.key)
        self._finish()

    def _verdict(self, outcome: Outcome) -> bool | None:
        """The outcome as the breaker sees it: True ok, False failure, None not the
        upstream's doing."""
        if outcome is Outcome.OK or outcome is Outcome.RETRY_STATUS:
            # A shielded status outside retries.on is the analysis' failure, not the breaker's.
            return self.answered not in self.client.serving.settings.breaker_statuses
        if outcome is Outcome.CLIENT_GONE:
            return None
        if outcome is Outcome.RESET and self.attempt is not None and self.attempt.reused:
            return None
        return False

    def _untried(self, failed: Upstream) -> Upstream | None:
        """Any available upstream not tried yet, own pool first (a rare path: the breaker
        refused a pick made from fresh candidates)."""
        router = self.client.proxy.router
        own = failed.pool
        pools = (own,) if self._stays_in(own) else (own, OTHER[own])
        for pool in pools:
            for upstream in router.candidates[pool]:
                if upstream not in self.tried:
                    return upstream
        return None

    def _stays_in(self, pool: PoolName) -> bool:
        """Whether a retry must stay in `pool`: forced by the override header, or the other
        pool fenced (a candidate just rolled back)."""
        return self.head.override is not None or not self.client.proxy.router.may_fail_over(pool)

    def _retry_target(self, failed: Upstream, outcome: Outcome, status: int) -> Upstream | None:
        """Where a retry of the failed attempt goes (`status`: its answer's, 0 when none came),
        or None when none may be made. A failed candidate request is shielded: retried once
        on the stable pool (rollout.shield), on top of retries.attempts. A failure in
        retries.on goes to another upstream of the same pool first, then the other pool. Never
        to an upstream this request has tried, out of a pool the override header forced or
        into a fenced one, and only within the retry budget."""
        if self.buffered is None:
            return None
        proxy = self.client.proxy
        settings = self.client.serving.settings
        if status:
            retry = status in settings.retry_statuses
            shield = status in settings.shield_statuses
        else:
            retry = outcome in settings.retry_outcomes
            shield = settings.shield_failures and outcome in SHIELDED_OUTCOMES
        head = self.head
        # A gRPC call is a POST; one whose request is buffered may go again.
        if (
            self.method not in settings.retry_methods
            and outcome is not Outcome.CONNECT_ERROR
            and not head.grpc
        ):
            # Any method may be re-sent after a connect error: nothing reached an upstream
            # (Envoy's connect-failure, HAProxy's conn-failure).
            return None
        stable = proxy.stable
        own = failed.pool
        shield = shield and own != stable and head.override is None and self.rescue_from is None
        if not shield and not (retry and self.attempts_left > 0):
            return None
        self.tried = (*self.tried, failed)
        if shield:
            upstream = self._pick_untried(stable, failed)
        else:
            upstream = self._pick_untried(own, failed)
            if upstream is None and not self._stays_in(own):
                upstream = self._pick_untried(OTHER[own], failed)
        if upstream is None:
            return None
        # A request that never reached an upstream adds load nowhere when sent on, so a connect
        # error's retry does not draw on the budget (which bounds the extra load retries put on
        # upstreams). It still counts against attempts and in the retries metric.
        if outcome is not Outcome.CONNECT_ERROR and not proxy.retry_budget.try_retry(monotonic()):
            return None
        if not shield:
            self.attempts_left -= 1
        if own != stable and upstream.pool == stable:
            self.rescue_from = own
        elif upstream.pool != own:
            proxy.failed_over_to_candidate(own, True)
        reason = f"status_{status}" if status else outcome.value
        proxy.observed.pool_stats[own].retried(reason)
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

    def _grpc_answered(self, fields: list[bytes] | None, status: int) -> int:
        """A gRPC call's answer as the status the analysis, breakers and retries judge: the
        HTTP status unless its grpc-status is a failure (grpc.failures)."""
        code = grpcstatus.status_in(fields)
        if code is None or code not in self.client.serving.settings.grpc_failures:
            return status
        return grpcstatus.as_http_status(code)

    def _reset_attempt(self) -> None:
        self.conn = None
        self.detail = ""
        self.retry_to = None

    def _arm_head_deadline(self) -> None:
        if not self.response_started:
            timeout = self.client.serving.settings.response_headers_timeout
            if 0.0 < self.head.call_timeout < timeout:
                timeout = self.head.call_timeout - (monotonic() - self.started)
            self.client.arm_head_deadline(timeout)

    def head_timeout(self) -> None:
        """The client connection's head deadline passed for this exchange."""
        conn = self.conn
        if conn is not None and not self.response_started:
            conn.detach()
            proxy = self.client.proxy
            proxy.observed.timeouts[Phase.RESPONSE_HEADERS.value] += 1
            timeout = self.client.serving.settings.response_headers_timeout
            if 0.0 < self.head.call_timeout < timeout:
                self.detail = f"the call's grpc-timeout of {self.head.call_timeout:g}s passed"
                self.attempts_left = 0  # the deadline is the call's, not the attempt's
            else:
                self.detail = f"no response headers within {timeout:g}s"
            self._finish_attempt(Outcome.TIMEOUT)

    def stalled(self, phase: Phase, timeout: float) -> None:
        """No byte moved in `phase` for `timeout`: end the attempt, release what it holds,
        and answer the client (408, 504) or, once its response has begun, cut it. Only the
        upstream's stall counts against its breaker."""
        conn = self.conn
        if conn is None or self.stage is not Stage.WAITING:
            return
        self.client.proxy.observed.timeouts[phase.value] += 1
        self.note = f"{phase.value}_timeout"
        client = self.client
        if phase is Phase.CLIENT_BODY or phase is Phase.CLIENT_SEND:
            # The upstream holds a partial request or an unsent response: never reuse it.
            self.conn = None
            conn.detach()
            if self.response_started:
                client.abort()
            else:
                detail = f"no request body byte within {timeout:g}s"
                client.send_error(self, 408, h.error_name(408), detail)
            self._finish_attempt(Outcome.CLIENT_GONE)
        elif self.response_started:
            client.abort()  # never let a cut body look complete
            detail = f"no response body byte from the upstream within {timeout:g}s"
            self._upstream_error(conn, Outcome.CUT, detail)
        else:
            detail = f"the upstream took no request body byte within {timeout:g}s"
            self._upstream_error(conn, Outcome.TIMEOUT, detail)

    # upstream callbacks ------------------------------------------------------

    def upstream_head(self, conn: UpstreamConnection, status: int) -> None:
        self.client.head_deadline = 0.0
        # A gRPC answer that is all head (trailers-only) carries the call's status here.
        answered = self._grpc_answered(conn.fields, status) if self.head.grpc else status
        self.answered = answered
        if status == 101 and not self.head.websocket:
            self._upstream_error(conn, Outcome.BAD_RESPONSE, "101 to a request without upgrade")
            return
        if (
            answered in self.client.serving.settings.failure_statuses
            and self.upstream is not None
            and (retry_to := self._retry_target(self.upstream, Outcome.RETRY_STATUS, answered))
            is not None
        ):
            # Swallowed only when a retry will be made; the last answer reaches the client.
            self.retry_to = retry_to
            self.detail = f"upstream answered {status}"
            if answered != status:
                self.detail += f" with grpc-status {grpcstatus.status_in(conn.fields)}"
            conn.detach()
            self._finish_attempt(Outcome.RETRY_STATUS)
            return
        stream = self.client.stream
        if stream is not None:
            self._hold_stream_head(stream, conn, status)
            return
        head = self._response_head(conn, status)
        if len(head) > h.MAX_RESPONSE_HEAD:
            # Checked once here: the fields of a head that came in one read are not counted
            # one by one (see UpstreamConnection.head_size).
            raise BadResponse("response head too large")
        self.status = status
        self.response_started = True
        # Held until the end of this read: head and body then leave in one write.
        self.out.append(head)

    def _hold_stream_head(self, stream: H2Stream, conn: UpstreamConnection, status: int) -> None:
        """An HTTP/2 client's answer: its head goes to the stream as fields, held (like the
        HTTP/1.1 head in `out`) until this read of the upstream is over."""
        fields = conn.fields
        if conn.named is not None:
            fields = h.without_named(fields, conn.named)
        size = 0
        for part in fields:
            size += len(part)
        if size > h.MAX_RESPONSE_HEAD:
            raise BadResponse("response head too large")
        no_body = self._body_framing(conn, status)
        self.status = status
        self.response_started = True
        stream.hold_head(status, fields, conn.length, no_body)

    def _body_framing(self, conn: UpstreamConnection, status: int) -> bool:
        """Whether the answer has no body (HEAD, 204, 304); else whether its body ends where
        the upstream closes (no length, no chunks) is noted for upstream_failed."""
        no_body = self.no_body or status in (204, 304)
        if no_body:
            conn.no_body = True
        self.resp_until_close = conn.length is None and not conn.te and not no_body
        return no_body

    def _response_head(self, conn: UpstreamConnection, status: int) -> bytes:
        client = self.client
        # The connection's list of fields is rebuilt for each response: extend it in place.
        parts = conn.fields
        named = conn.named
        if named is not None:
            # Rare: Connection names further hop-by-hop fields, maybe ones that came before it.
            parts = h.without_named(parts, named)
        parts.insert(0, h.response_line(status, conn.reason))
        length = conn.length
        te = conn.te
        parts.append(h.VIA_LINE)
        close = client.closing or not self.keep_alive or not self.body_done
        if status == 101:
            parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
            parts.append(b"\r\n")
            return b"".join(parts)
        if self._body_framing(conn, status):
            if length is not None:
                h.add_field(parts, b"Content-Length", length)
        elif length is not None and not te:
            h.add_field(parts, b"Content-Length", length)
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
        client = self.client
        stream = client.stream
        if stream is not None:
            if stream.respond(out):
                out.clear()
                client.upstream_progress += 1
                self.relayed = True
            return
        if out:
            client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            self.relayed = True

    def upstream_done(self, conn: UpstreamConnection) -> None:
        trailers = conn.trailers
        if self.resp_chunked:
            self.out.append(h.CHUNK_END if trailers is None else h.last_chunk(trailers))
        if self.head.grpc:
            self.answered = self._grpc_answered(trailers, self.answered)
        self.flush()
        stream = self.client.stream
        if stream is not None:
            stream.respond_end(trailers)
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
                stream = self.client.stream
                if stream is not None:
                    stream.respond_end(None)
                self.conn = None
                conn.close()
                self._finish_attempt(Outcome.OK)
                return
            if not self.relayed and isinstance(exc, BadResponse):
                # Invalid before anything left (a bad chunk size in the head's own read):
                # the client can still be told so plainly.
                self.out.clear()
                stream = self.client.stream
                if stream is not None:
                    stream.drop_head()
                self.response_started = False
                self.resp_chunked = False
                self.resp_close = False
                self.status = 0
                self._upstream_error(conn, Outcome.BAD_RESPONSE, f"invalid response: {exc}")
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
        if not (self.head.websocket and self.status == 101):
            self._upstream_error(conn, Outcome.BAD_RESPONSE, "unexpected protocol switch")
            return
        self.client.start_tunnel(self, conn, rest)

    def upstream_pause(self) -> None:
        self.client.pause_reading(self.client.PAUSE_UPSTREAM)

    def upstream_resume(self) -> None:
        client = self.client
        client.upstream_progress += 1
        client.resume_reading(client.PAUSE_UPSTREAM)

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
        target = self.head.target.decode("latin-1")
        return f"<Exchange {self.method.decode()} {target} status={self.status}>"
