"""Active health checks: probe every upstream on a timer and report changes of its health.

The checker owns `Upstream.healthy`: it sets the flag, then tells the runtime through the
`on_change` callback (which rebuilds the routing candidates). It never imports the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import httptools

from proxy.http.h2upstream import probe_h2
from proxy.http.upstream import Upstream

log = logging.getLogger("turnout.health")

MAX_PROBE_HEAD: Final = 64 * 1024
_READ_SIZE: Final = 16 * 1024
# Closing a probe connection needs one loop turn; the bound only guards against a stuck loop.
_CLOSE_WAIT: Final = 1.0
_TASK_PREFIX: Final = "turnout-health:"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one health probe: ok, and a short detail ("200", "connect refused")."""

    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """What the checker knows about one upstream."""

    healthy: bool
    consecutive_passes: int
    consecutive_failures: int
    last_detail: str | None
    probes: int


Prober = Callable[[Upstream], Awaitable[ProbeResult]]
OnChange = Callable[[Upstream, bool, str], None]
ProbeFields = tuple[tuple[str, str], ...]  # (name, value) fields a check adds


class _HeadParser:
    """httptools callbacks that keep only the final status of the response head."""

    __slots__ = ("done", "parser", "status")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.done = False

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # an interim response; the final one follows
        self.status = status
        self.done = True


def _timeout_detail(timeout: float) -> str:
    return f"timeout after {timeout:g}s"


async def probe(
    host: str,
    port: int,
    path: str,
    timeout: float,
    host_header: str,
    tls: ssl.SSLContext | None = None,
    *,
    h2: bool = False,
    grpc_service: str | None = None,
    headers: ProbeFields = (),
) -> ProbeResult:
    """One GET over a fresh connection (HTTP/2 with `h2`); ok iff the status is 200..399.
    Reads only the head. `headers` are added to the request's own fields."""
    text = path + host_header + "".join(name + value for name, value in headers)
    if any(c in "\r\n" for c in text):
        raise ValueError("path, host header and fields must not contain CR or LF")
    if h2:
        return await _probe_h2(host, port, path, timeout, host_header, tls, grpc_service, headers)
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: turnout-health\r\n"
        f"Accept: */*\r\n{extra}Connection: close\r\n\r\n"
    ).encode("latin-1")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    limit=MAX_PROBE_HEAD,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
            except ConnectionRefusedError:
                return ProbeResult(False, "connect refused")
            except OSError as exc:
                return ProbeResult(False, f"connect failed: {exc.strerror or exc}")
            writer.write(request)
            return await _read_head(reader)
    except TimeoutError:
        return ProbeResult(False, _timeout_detail(timeout))
    except OSError as exc:
        return ProbeResult(False, f"connection error: {exc.strerror or exc}")
    finally:
        if writer is not None:
            writer.close()
            # Wait for the close so no transport outlives the probe (and the test's loop).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_WAIT):
                    await writer.wait_closed()


async def _probe_h2(
    host: str,
    port: int,
    path: str,
    timeout: float,
    host_header: str,
    tls: ssl.SSLContext | None,
    grpc_service: str | None,
    headers: ProbeFields,
) -> ProbeResult:
    try:
        async with asyncio.timeout(timeout):
            ok, detail = await probe_h2(host, port, path, host_header, tls, grpc_service, headers)
            return ProbeResult(ok, detail)
    except TimeoutError:
        return ProbeResult(False, _timeout_detail(timeout))
    except ConnectionRefusedError:
        return ProbeResult(False, "connect refused")
    except OSError as exc:
        return ProbeResult(False, f"connect failed: {exc.strerror or exc}")


async def _read_head(reader: asyncio.StreamReader) -> ProbeResult:
    head = _HeadParser()
    seen = 0
    while seen < MAX_PROBE_HEAD:
        data = await reader.read(min(_READ_SIZE, MAX_PROBE_HEAD - seen))
        if not data:
            return ProbeResult(False, "connection closed before the response head")
        seen += len(data)
        try:
            head.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not head.done:  # an error in the body after a complete head is not ours to judge
                return ProbeResult(False, f"invalid response: {exc}")
        if head.done:
            return ProbeResult(200 <= head.status <= 399, str(head.status))
    return ProbeResult(False, f"response head over {MAX_PROBE_HEAD // 1024} KiB")


class _Watch:
    """Probe state of one watched upstream."""

    __slots__ = (
        "cold",
        "failures",
        "last_detail",
        "passes",
        "probes",
        "stopped",
        "task",
        "upstream",
    )

    def __init__(self, upstream: Upstream, cold: bool) -> None:
        self.upstream = upstream
        self.cold = cold  # no passing probe yet: the first pass makes it healthy
        self.passes = 0
        self.failures = 0
        self.probes = 0
        self.last_detail: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopped = False  # unwatched or closed: its task ends even if a cancel went astray


def _plural(n: int, word: str) -> str:
    return f"{n} consecutive {word} check{'' if n == 1 else 's'}"


class HealthChecker:
    """Probes each watched upstream every `interval` and flips `Upstream.healthy` on streaks."""

    def __init__(
        self,
        *,
        path: str,
        interval: float,
        timeout: float,
        healthy_after: int,
        unhealthy_after: int,
        on_change: OnChange,
        prober: Prober | None = None,
        grpc_service: str | None = None,
        pool_fields: Mapping[str, tuple[str | None, ProbeFields]] | None = None,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be > 0")
        if healthy_after < 1 or unhealthy_after < 1:
            raise ValueError("healthy_after and unhealthy_after must be >= 1")
        self.path = path
        self.grpc_service = grpc_service  # checks are gRPC's Health/Check for this service
        # Per pool: the Host to send instead of the upstream's host:port, and fields to add.
        self.pool_fields = dict(pool_fields or {})
        self.interval = interval
        self.timeout = timeout
        self.healthy_after = healthy_after
        self.unhealthy_after = unhealthy_after
        self._on_change = on_change
        self._prober: Prober = prober if prober is not None else self._default_prober
        self._watches: dict[str, _Watch] = {}
        # Tasks of unwatched upstreams, cancelled but maybe not finished yet; close() awaits them.
        self._stopping: set[asyncio.Task[None]] = set()
        self._unprobed = 0  # watched upstreams without a probe result yet
        self._round = asyncio.Event()
        self._round.set()
        self._closed = False

    def describe(self, detail: str) -> str:
        """A check's result as an operator reads it: `GET /healthz answered 404`."""
        service = self.grpc_service
        asked = f"GET {self.path}" if service is None else f"grpc.health.v1 Check({service!r})"
        if detail.isdigit() or detail.isupper():  # a status code, or a gRPC serving status
            return f"{asked} answered {detail}"
        return f"{asked} failed: {detail}"

    def fields_for(self, upstream: Upstream) -> tuple[str, ProbeFields]:
        """The Host and the added fields a check (or the rollout gate) sends `upstream`."""
        host, headers = self.pool_fields.get(upstream.pool, (None, ()))
        return host or upstream.host_header.decode("latin-1"), headers

    async def _default_prober(self, upstream: Upstream) -> ProbeResult:
        host_header, headers = self.fields_for(upstream)
        return await probe(
            upstream.host,
            upstream.port,
            self.path,
            self.timeout,
            host_header,
            upstream.ssl,
            h2=upstream.mux is not None,
            grpc_service=self.grpc_service,
            headers=headers,
        )

    # control

    def watch(self, upstream: Upstream, *, cold: bool = True) -> None:
        """Start probing `upstream` (first probe at once); cold: out of rotation until it passes."""
        if self._closed:
            raise RuntimeError("health checker is closed")
        current = self._watches.get(upstream.key)
        if current is not None:
            if current.upstream is upstream:
                return
            self.unwatch(current.upstream)  # a new object under the same key replaces the old
        watch = _Watch(upstream, cold)
        self._watches[upstream.key] = watch
        self._unprobed += 1
        self._round.clear()
        if cold:
            self._set(upstream, False, "not checked yet")
        watch.task = asyncio.get_running_loop().create_task(
            self._run(watch), name=f"{_TASK_PREFIX}{upstream.key}"
        )

    def unwatch(self, upstream: Upstream) -> None:
        """Stop probing `upstream`; its health flag keeps its last value."""
        watch = self._watches.get(upstream.key)
        if watch is None or watch.upstream is not upstream:
            return
        del self._watches[upstream.key]
        watch.stopped = True
        if watch.probes == 0:
            self._unprobed -= 1
            if self._unprobed == 0:
                self._round.set()
        task = watch.task
        if task is not None and not task.done():
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def first_round(self, timeout: float) -> None:
        """Wait until every watched upstream has one probe result, or `timeout` has passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                # An upstream watched meanwhile clears the event again: re-check after waking.
                while self._unprobed > 0 and not self._closed:
                    await self._round.wait()

    async def close(self) -> None:
        """Cancel every probe task and wait for them to end."""
        self._closed = True
        for watch in self._watches.values():
            watch.stopped = True
        tasks = [w.task for w in self._watches.values() if w.task is not None]
        tasks.extend(self._stopping)
        self._watches.clear()
        self._unprobed = 0
        self._round.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._stopping.clear()

    # probing

    async def _run(self, watch: _Watch) -> None:
        loop = asyncio.get_running_loop()
        while not watch.stopped:
            started = loop.time()
            result = await self._probe(watch.upstream)
            if watch.stopped:
                # Cancelled meanwhile, and a prober (or the stream and timeout machinery under
                # it) may have taken that cancellation for its own: end here all the same, or
                # close() would wait for this task for ever.
                return
            self._record(watch, result)
            # Start to start; one task per upstream, so a probe slower than the interval is
            # followed at once and never overlapped.
            delay = started + self.interval - loop.time()
            await asyncio.sleep(max(delay, 0.0))

    async def _probe(self, upstream: Upstream) -> ProbeResult:
        try:
            # The default prober bounds itself; this bounds any prober, with the same words.
            async with asyncio.timeout(self.timeout):
                return await self._prober(upstream)
        except TimeoutError:
            return ProbeResult(False, _timeout_detail(self.timeout))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return ProbeResult(False, "probe cancelled")  # not us: a prober's own cancellation
        except Exception as exc:
            return ProbeResult(False, f"probe error: {type(exc).__name__}: {exc}")

    def _record(self, watch: _Watch, result: ProbeResult) -> None:
        if watch.probes == 0:
            self._unprobed -= 1
            if self._unprobed == 0:
                self._round.set()
        watch.probes += 1
        watch.last_detail = result.detail
        upstream = watch.upstream
        if result.ok:
            watch.passes += 1
            watch.failures = 0
            if watch.cold:
                watch.cold = False
                if not upstream.healthy:
                    self._set(upstream, True, f"first passing check ({result.detail})")
            elif not upstream.healthy and watch.passes >= self.healthy_after:
                self._set(upstream, True, _plural(watch.passes, "passing"))
        else:
            watch.failures += 1
            watch.passes = 0
            if watch.cold and watch.probes == 1:
                # Never healthy, so no transition will say why: say it once, at the first try.
                hint = "" if self.grpc_service else "; is health_check.path a path it serves?"
                log.warning(
                    "upstream %s (%s) gets no traffic until a health check passes; the first"
                    " failed: %s%s",
                    upstream.key,
                    upstream.url,
                    self.describe(result.detail),
                    hint,
                )
            if upstream.healthy and watch.failures >= self.unhealthy_after:
                reason = f"{_plural(watch.failures, 'failed')} (last: {result.detail})"
                self._set(upstream, False, reason)

    def _set(self, upstream: Upstream, healthy: bool, reason: str) -> None:
        if upstream.healthy is healthy:
            return
        upstream.healthy = healthy
        log.info("upstream %s %s: %s", upstream.key, "healthy" if healthy else "unhealthy", reason)
        try:
            self._on_change(upstream, healthy, reason)
        except Exception:
            # A broken listener must not stop the probing; the flag is already set.
            log.exception("health on_change failed for upstream %s", upstream.key)

    # observability

    def snapshot(self) -> dict[str, HealthSnapshot]:
        return {
            key: HealthSnapshot(
                healthy=w.upstream.healthy,
                consecutive_passes=w.passes,
                consecutive_failures=w.failures,
                last_detail=w.last_detail,
                probes=w.probes,
            )
            for key, w in self._watches.items()
        }

    def __repr__(self) -> str:
        down = sum(1 for w in self._watches.values() if not w.upstream.healthy)
        state = " closed" if self._closed else ""
        return (
            f"<HealthChecker{state} {self.path} every {self.interval:g}s "
            f"timeout={self.timeout:g}s watching={len(self._watches)} unhealthy={down} "
            f"unprobed={self._unprobed}>"
        )
