"""`turnout run --workers N`: a supervisor and N worker processes on one port, one rollout.

The supervisor (`supervisor_proxy`) runs what a single Turnout runs except the client data path:
the admin API, the control layer, health checks, the rollout controller and events. Its front, the
`WorkerPool`, binds the listening socket and starts N workers (`python -m proxy worker ...`,
proxy/procs/worker.py) that inherit it and serve clients, with no admin API, health checker or
rollout controller of their own.
Every connection waits in the one accept queue until some worker takes it, so a worker that stops
accepting loses none (unlike SO_REUSEPORT listeners, whose queues die with them).

The processes share one state through the seam of proxy/procs/shared.py, here over a socketpair per
worker carrying JSON lines: the supervisor pushes the routing state on every change, each worker
reports its outcomes every 50 ms, and the supervisor's windows, rollout decisions, /status and
/metrics add them up. A worker whose link drops drains and exits; the supervisor restarts a worker
that exits. SIGTERM to the supervisor: it lets go of the listening socket, every worker drains
(stops accepting, answers what is in flight with `Connection: close`) and exits, then the supervisor
does. SIGHUP: the supervisor reloads and validates, then pushes the new configuration. A hot restart
(proxy/procs/handover.py) hands the listening socket and the state to a new supervisor, which starts
its own workers on it; then this one stops as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from proxy.admin.metrics import WorkerCollector
from proxy.config import Config
from proxy.control.events import BreakerChanged
from proxy.http.upstream import Upstream
from proxy.logic.gauges import MemberGauges
from proxy.logic.routing import POOLS, PoolName
from proxy.procs.shared import (
    OutcomeReport,
    RoutingState,
    UpstreamKey,
    forget_member,
    merge_report,
    routing_state,
    upstream_key,
)
from proxy.procs.wire import READY, STOP, Stop, WireError, encode_message, read_message
from proxy.procs.worker import LINK_BUFFER, LINK_LIMIT, STARTUP_TIMEOUT
from proxy.runtime import Proxy, Role

log = logging.getLogger("turnout.workers")

STOP_GRACE = 3.0  # past drain.timeout, before a worker that does not exit is killed
RESTART_DELAY = 0.1
RESTART_DELAY_MAX = 5.0
STABLE_RUN = 10.0  # a worker that ran this long restarts without backoff
LAG_HISTORY = 64


class WorkerError(Exception):
    """The workers could not be started."""


# the supervisor ----------------------------------------------------------------------------


def supervisor_proxy(
    config: Config,
    *,
    workers: int,
    config_path: str | None = None,
    command: Sequence[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Proxy:
    """The supervisor's proxy: control, health, rollout and the shared state; its front is the
    worker processes (`WorkerPool`), which serve the clients. Its upstreams' in-flight gauges,
    sheds and breaker states are the workers' (`SharedUpstreams`); so is the access log."""
    shared = SharedUpstreams()
    role = Role(
        front=lambda proxy: WorkerPool(proxy, shared, workers, command=command, clock=clock),
        writes_access_log=False,
        fit_upstream=shared.fit,
    )
    return Proxy(config, config_path=config_path, role=role)


class SharedUpstreams:
    """The supervisor's upstreams by key, each with a view of what the workers hold there
    (`MemberGauges`)."""

    def __init__(self) -> None:
        self.by_key: dict[UpstreamKey, Upstream] = {}

    def fit(self, upstream: Upstream) -> None:
        upstream.members = MemberGauges()
        self.by_key[upstream_key(upstream)] = upstream

    def prune(self, live: Iterable[Upstream]) -> None:
        """Forget upstreams that left the configuration once nothing is in flight there."""
        keys = {upstream_key(u) for u in live}
        for key, upstream in list(self.by_key.items()):
            if key not in keys and upstream.in_flight == 0:
                del self.by_key[key]

    def __repr__(self) -> str:
        return f"<SharedUpstreams {len(self.by_key)}>"


def _same_routing(a: RoutingState, b: RoutingState) -> bool:
    return (a.split, a.stable, a.fence, a.config_generation, a.pools) == (
        b.split,
        b.stable,
        b.fence,
        b.config_generation,
        b.pools,
    )


class Worker:
    """The supervisor's handle on one worker process (all its incarnations)."""

    __slots__ = (
        "config_sent",
        "connections",
        "generation",
        "index",
        "lag",
        "outcomes",
        "pid",
        "process",
        "ready",
        "restarts",
        "served",
        "started_at",
        "state",
        "writer",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = "starting"
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pid = 0
        self.restarts = 0
        self.started_at = 0.0
        self.ready: asyncio.Future[None] | None = None
        self.config_sent = -1
        self.served = 0
        self.connections = 0
        self.generation = 0
        self.lag: float | None = None
        self.outcomes: dict[PoolName, list[int]] = {p: [0, 0] for p in POOLS}

    @property
    def member(self) -> str:
        return f"worker-{self.index}"

    def send(self, data: bytes) -> bool:
        """Queue a message; False when the link is closed or the worker does not read it."""
        writer = self.writer
        if writer is None or writer.is_closing() or self.stuck:
            return False
        writer.write(data)
        return True

    @property
    def stuck(self) -> bool:
        """The worker has left LINK_BUFFER bytes unread."""
        writer = self.writer
        return writer is not None and writer.transport.get_write_buffer_size() > LINK_BUFFER

    def status(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "served": self.served,
            "connections": self.connections,
            "generation": self.generation,
            "lag_ms": None if self.lag is None else round(self.lag * 1000, 3),
            "outcomes": {p: {"requests": n, "errors": e} for p, (n, e) in self.outcomes.items()},
        }

    def __repr__(self) -> str:
        return f"<Worker {self.index} pid={self.pid} {self.state} restarts={self.restarts}>"


class WorkerPool:
    """The supervisor's front: starts, links, restarts and stops the worker processes that serve
    the clients; the supervisor's half of the seam (proxy/procs/shared.py): it pushes the
    routing state on every change and adds up what the workers report."""

    def __init__(
        self,
        proxy: Proxy,
        shared: SharedUpstreams,
        count: int,
        *,
        command: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if count < 1:
            raise ValueError("at least one worker")
        self.proxy = proxy
        self.shared = shared
        self.generation = 0
        self.config_generation = 0
        self._published_config: Config | None = None
        self._publish_pending = False
        # -P: the current directory is not put first on sys.path, so an operator's own
        # `proxy.py` or `proxy/` there cannot stand in for Turnout in the workers.
        self.command = list(command or (sys.executable, "-P", "-m", "proxy", "worker"))
        self.clock = clock
        self.workers = [Worker(i) for i in range(count)]
        self.state: RoutingState | None = None
        self.published_at: dict[int, float] = {}
        self.stopping = False
        self._stop_timeout = 0.0
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        proxy.control.listeners.append(self._publish_soon)
        proxy.metrics.registry.register(WorkerCollector(self))

    # the seam ------------------------------------------------------------------

    def _publish_soon(self) -> None:
        """Push the routing state soon (once, however many changes arrive)."""
        if not self._publish_pending:
            self._publish_pending = True
            self.proxy.loop.call_soon(self.publish_if_changed)

    def publish_if_changed(self) -> None:
        self._publish_pending = False
        proxy = self.proxy
        if proxy.config is not self._published_config:
            self.config_generation += 1
            self._published_config = proxy.config
        state = routing_state(proxy, self.generation + 1, self.config_generation, self.clock())
        last = self.state
        if last is not None and _same_routing(state, last):
            return
        self.generation = state.generation
        self.shared.prune(proxy.router.upstreams())
        self.publish(state)

    def merge(self, report: OutcomeReport) -> None:
        """Add a worker's report; breakers that moved are events."""
        proxy = self.proxy
        moved = merge_report(proxy, self.shared.by_key, report)
        if moved:
            proxy.router.refresh()  # /status counts the upstreams available
        for upstream, before, after in moved:
            proxy.events.publish(
                BreakerChanged(
                    upstream=upstream.key,
                    url=upstream.url,
                    before=before.value,
                    after=after.value,
                    worker=report.member,
                )
            )

    def publish(self, state: RoutingState) -> None:
        self.state = state
        self.published_at[state.generation] = state.published_at
        self.published_at.pop(state.generation - LAG_HISTORY, None)
        for worker in self.workers:
            if worker.writer is not None:
                self._send_state(worker, state)

    def _send_state(self, worker: Worker, state: RoutingState) -> None:
        with_config = worker.config_sent != state.config_generation
        if worker.send(encode_message("state", state.to_wire(with_config=with_config))):
            worker.config_sent = state.config_generation
        elif worker.stuck and worker.process is not None and worker.process.returncode is None:
            log.error("worker %d does not read its link; restarting it", worker.index)
            worker.process.kill()

    def _merge(self, worker: Worker, report: OutcomeReport) -> None:
        self.merge(report)
        worker.served += report.served
        worker.connections = report.connections
        for name, outcomes in report.pools.items():
            counts = worker.outcomes[name]
            counts[0] += outcomes.requests
            counts[1] += outcomes.errors
        if report.generation != worker.generation:
            worker.generation = report.generation
            published = self.published_at.get(report.generation)
            # A state published before this worker started says nothing of its lag.
            if published is not None and published >= worker.started_at:
                worker.lag = report.applied_at - published

    # lifecycle -----------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        """Start every worker and wait until each serves; WorkerError if one cannot."""
        self.publish_if_changed()
        self._sock = sock
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            worker.ready = loop.create_future()
            self._tasks.append(loop.create_task(self._supervise(worker)))
        readies = [w.ready for w in self.workers if w.ready is not None]
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                results = await asyncio.gather(*readies, return_exceptions=True)
        except TimeoutError as exc:
            raise WorkerError(f"workers not ready within {STARTUP_TIMEOUT:g}s") from exc
        for result in results:
            if isinstance(result, BaseException):
                raise WorkerError(str(result))

    async def _supervise(self, worker: Worker) -> None:
        delay = RESTART_DELAY
        while not self.stopping:
            started = self.clock()
            try:
                code = await self._run(worker)
            except Exception:
                log.exception("worker %d: supervising it failed", worker.index)
                code = None
            forget_member(self.shared.by_key.values(), worker.member)
            worker.connections = 0
            if self.stopping:
                break
            if worker.ready is not None and not worker.ready.done():
                worker.ready.set_exception(
                    WorkerError(f"worker {worker.index} exited with {code} before serving")
                )
                return
            worker.restarts += 1
            delay = RESTART_DELAY if self.clock() - started > STABLE_RUN else delay
            log.error(
                "worker %d (pid %d) exited with %s; restarting it in %gs",
                worker.index,
                worker.pid,
                code,
                delay,
            )
            worker.state = "restarting"
            await asyncio.sleep(delay)
            delay = min(RESTART_DELAY_MAX, delay * 2)
        worker.state = "exited"

    async def _run(self, worker: Worker) -> int | None:
        """One incarnation of a worker, from spawn to exit; returns its exit code."""
        assert self._sock is not None
        assert self.state is not None
        parent, child = socket.socketpair()
        listen_fd = self._sock.fileno()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                "--index",
                str(worker.index),
                "--workers",
                str(len(self.workers)),
                "--listen-fd",
                str(listen_fd),
                "--link-fd",
                str(child.fileno()),
                pass_fds=(listen_fd, child.fileno()),
            )
        except OSError as exc:
            parent.close()
            log.error("cannot start worker %d: %s", worker.index, exc)
            return None
        finally:
            child.close()
        worker.process = process
        worker.pid = process.pid
        worker.state = "starting"
        worker.started_at = self.clock()
        worker.config_sent = -1
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=LINK_LIMIT)
        worker.writer = writer
        self._send_state(worker, self.state)
        if self.stopping:
            worker.send(encode_message("stop", STOP.encode(Stop(self._stop_timeout))))
        try:
            await self._read(worker, reader)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("worker %d sent a bad message (%s); restarting it", worker.index, exc)
            process.kill()
        except ConnectionError:
            pass
        finally:
            worker.writer = None
            writer.close()
        try:
            async with asyncio.timeout(STOP_GRACE):
                return await process.wait()
        except TimeoutError:
            process.kill()
            return await process.wait()

    async def _read(self, worker: Worker, reader: asyncio.StreamReader) -> None:
        while (message := await read_message(reader)) is not None:
            kind, body = message
            if kind == "report":
                self._merge(worker, OutcomeReport.from_wire(body))
            elif kind == "ready":
                READY.decode(body, "ready")  # a malformed one is refused like any other
                if not self.stopping:
                    worker.state = "ready"
                log.info("worker %d (pid %d) serves", worker.index, worker.pid)
                if worker.ready is not None and not worker.ready.done():
                    worker.ready.set_result(None)
            else:
                raise WireError(f"a worker does not send {kind!r} messages")

    def signal(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    async def stop(self, timeout: float) -> None:
        """Every worker drains (at most `timeout`) and exits; one that does not is killed."""
        self.stopping = True
        self._stop_timeout = timeout
        for worker, task in zip(self.workers, self._tasks, strict=False):
            if worker.state == "restarting":
                task.cancel()  # waiting to start again: nothing to drain
        for worker in self.workers:
            worker.state = "stopping"
            worker.send(encode_message("stop", STOP.encode(Stop(timeout))))
        # The workers alone hold the listener now: once each has stopped accepting, it closes
        # and a new connection is refused (as by a single process), rather than waiting in an
        # accept queue that no process serves, to be reset when the last worker has drained.
        if self._sock is not None:
            self._sock.close()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout + 2 * STOP_GRACE)
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    log.error("worker %d did not exit; killing it", worker.index)
                    worker.process.kill()
            if pending:
                await asyncio.wait(pending, timeout=STOP_GRACE)
        for worker in self.workers:
            worker.state = "exited"

    async def closed(self) -> None:
        """Nothing is left to wait for once the workers have exited (`stop`)."""

    def abort(self) -> None:
        """A second signal: every worker cuts what it still serves and exits."""
        for worker in self.workers:
            worker.send(encode_message("stop", STOP.encode(Stop(0.0))))

    def reopen_logs(self) -> None:
        self.signal(signal.SIGUSR1)

    def load(self) -> dict[str, int]:
        return {
            "connections": sum(w.connections for w in self.workers),
            "workers": len(self.workers),
        }

    def status(self) -> dict[str, Any]:
        # What /status shows has been sent to the workers (`generation` says which state).
        self.publish_if_changed()
        return {"generation": self.generation, "workers": [w.status() for w in self.workers]}

    def __repr__(self) -> str:
        return f"<WorkerPool generation={self.generation} {self.workers}>"
