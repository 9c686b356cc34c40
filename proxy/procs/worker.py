"""A worker process of `turnout run --workers N`: the client data path, following the supervisor's
routing state and reporting its outcomes (proxy/procs/shared.py), over the socketpair it inherits
(JSON lines). No admin API, health checker or rollout controller of its own. When the supervisor
says stop, or its link drops, it drains (stops accepting, answers what is in flight with
`Connection: close`) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import uvloop

from proxy.config import Config, UpstreamConfig
from proxy.http.upstream import Upstream, upstream_ident
from proxy.logic.routing import POOLS, PoolName
from proxy.procs.shared import (
    REPORT_INTERVAL,
    OutcomeRecorder,
    OutcomeReport,
    RoutingState,
    UpstreamRoute,
    upstream_key,
)
from proxy.procs.wire import READY, STOP, Kind, Ready, WireError, encode_message, read_message
from proxy.runtime import Proxy, Role, freeze_startup_heap

log = logging.getLogger("turnout.workers")

LINK_LIMIT = 8 * 1024 * 1024  # longest message (a configuration with very many upstreams)
LINK_BUFFER = 8 * 1024 * 1024  # unsent bytes towards a peer that does not read
STARTUP_TIMEOUT = 30.0


class Member:
    """A worker's part in the seam: its proxy serves the clients by the supervisor's routing state
    (`follow`, written through the proxy's control), with its share of the limits and no health
    checks of its own; its outcomes go to the supervisor (`report`)."""

    def __init__(
        self,
        config: Config,
        *,
        member: str,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.member = member
        self.recorder = OutcomeRecorder(member)
        role = Role(share=workers, checks_health=False, outcomes=self.recorder)
        self.proxy = Proxy(config, role=role)
        self.clock = clock
        self.generation = 0
        self._reported_generation = 0
        self._served = 0
        self.config_generation = -1
        self.applied_at = 0.0
        self.retiring: set[Upstream] = set()
        self._upstream_configs: dict[str, UpstreamConfig] = {}
        self._retire_tasks: set[asyncio.Task[None]] = set()

    def follow(self, state: RoutingState) -> None:
        """Route by `state` from now on, in one synchronous step."""
        proxy = self.proxy
        control = proxy.control
        new_config = state.config_generation != self.config_generation
        config = state.config if new_config else proxy.config
        current = {upstream_key(u): u for u in proxy.router.upstreams()}
        pools: dict[PoolName, tuple[Upstream, ...]] = {}
        rebuild = new_config
        for name in POOLS:
            protocol = getattr(config.pools, name).protocol
            kept: list[Upstream] = []
            for index, route in enumerate(state.pools[name]):
                upstream = current.pop((name, upstream_ident(route.url, protocol)), None)
                if upstream is None:
                    upstream = proxy.new_upstream(
                        name, index, self._upstream_config(route), protocol
                    )
                    rebuild = True
                elif upstream.place(index, route.weight):
                    rebuild = True
                self._route(upstream, route)
                kept.append(upstream)
            pools[name] = tuple(kept)
        for upstream in current.values():
            self._retire(upstream)
            rebuild = True
        if rebuild:
            control.apply(config, pools)
        else:
            proxy.router.refresh()
        self.config_generation = state.config_generation
        control.set_stable(state.stable)
        if state.fence != control.fence_reason:
            control.fence(state.fence)
        if state.split != proxy.spreader.split:
            control.set_split(state.split, by="supervisor")
        self.generation = state.generation
        self.applied_at = self.clock()

    def _upstream_config(self, route: UpstreamRoute) -> UpstreamConfig:
        cfg = self._upstream_configs.get(route.url)
        if cfg is None or cfg.weight != route.weight:
            cfg = UpstreamConfig.model_validate({"url": route.url, "weight": route.weight})
            self._upstream_configs[route.url] = cfg
        return cfg

    def _route(self, upstream: Upstream, route: UpstreamRoute) -> None:
        upstream.healthy = route.healthy
        if route.draining and not upstream.draining:
            upstream.draining = True
            upstream.close_idle()
        elif not route.draining:
            upstream.draining = False
        if route.drained and not upstream.drained:
            self._cut(upstream)
        upstream.drained = route.drained

    def _cut(self, upstream: Upstream) -> None:
        """The supervisor's drain of `upstream` ended (or timed out): end what is left."""
        upstream.close_idle()
        for client in list(self.proxy.tunnels):
            if client.tunnel is not None and client.tunnel.upstream is upstream:
                client.going_away()
        for conn in list(upstream.connections):
            if not conn.closed:
                conn.abort()

    def _retire(self, upstream: Upstream) -> None:
        """An upstream the supervisor no longer routes to: no new requests, the rest finish
        within drain.timeout."""
        upstream.draining = True
        upstream.close_idle()
        self.retiring.add(upstream)
        task = self.proxy.loop.create_task(self._finish_retiring(upstream))
        self._retire_tasks.add(task)
        task.add_done_callback(self._retire_tasks.discard)

    async def _finish_retiring(self, upstream: Upstream) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.proxy.settings.drain_timeout):
                    await upstream.until_idle()
            self._cut(upstream)
        finally:
            self.retiring.discard(upstream)

    def report(self) -> OutcomeReport | None:
        """What happened since the previous report (None when nothing did); the first one
        after following a new routing state says so, even when nothing else happened."""
        proxy = self.proxy
        served, self._served = proxy.served - self._served, proxy.served
        force = self.generation != self._reported_generation
        self._reported_generation = self.generation
        return self.recorder.take(
            proxy,
            [*proxy.router.upstreams(), *self.retiring],
            generation=self.generation,
            applied_at=self.applied_at,
            served=served,
            force=force,
        )

    async def shutdown(self, timeout: float | None = None) -> None:
        await self.proxy.shutdown(timeout)
        for task in list(self._retire_tasks):
            task.cancel()

    def __repr__(self) -> str:
        return f"<Member {self.member} generation={self.generation} {self.proxy!r}>"


class SocketMemberLink:
    """A worker's half of the seam (proxy/procs/shared.py): its outcomes to the supervisor,
    over their socketpair."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    @property
    def busy(self) -> bool:
        """The supervisor has not read what was sent: hold reports (counts keep adding up)."""
        return self.writer.transport.get_write_buffer_size() > LINK_BUFFER

    def report(self, report: OutcomeReport) -> None:
        self.send("report", report.to_wire())

    def send(self, kind: Kind, body: Mapping[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_message(kind, body))


async def serve_worker(index: int, workers: int, listen_fd: int, link_fd: int) -> int:
    """A worker process: follow the supervisor's state, serve clients on the inherited
    listener, report outcomes, drain and exit when told to (or when the link drops)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(
        sock=socket.socket(fileno=link_fd), limit=LINK_LIMIT
    )
    link = SocketMemberLink(writer)
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            first = await read_message(reader)
        if first is None or first[0] != "state":
            log.error("no routing state from the supervisor")
            return 1
        state = RoutingState.from_wire(first[1], None)
    except ValueError as exc:  # a WireError, or a line longer than LINK_LIMIT
        log.error("bad routing state from the supervisor: %s", exc)
        return 1
    member = Member(state.config, member=f"worker-{index}", workers=workers)
    member.follow(state)
    proxy = member.proxy
    stop = asyncio.Event()
    drain: list[float] = []
    signals = 0

    def begin(timeout: float) -> None:
        """Drain within `timeout`; at once when told so while draining already."""
        if not stop.is_set():
            drain.append(timeout)
            stop.set()
        elif timeout <= 0:
            proxy.front.abort()

    def on_signal() -> None:
        # A SIGTERM may come both from the supervisor (as a stop message) and straight from
        # a service manager signalling every process of the service: that is still one.
        # Only a second signal to this process, or the supervisor's own second, cuts.
        nonlocal signals
        signals += 1
        begin(proxy.settings.drain_timeout if signals == 1 else 0.0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # Reloads come from the supervisor, which validates them first.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    loop.add_signal_handler(signal.SIGUSR1, proxy.reopen_logs)
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    await proxy.start(listener)
    freeze_startup_heap()
    link.send("ready", READY.encode(Ready(os.getpid())))

    async def follow() -> None:
        nonlocal state
        try:
            while (message := await read_message(reader)) is not None:
                kind, body = message
                if kind == "state":
                    state = RoutingState.from_wire(body, state)
                    member.follow(state)
                    send_report()  # tells the supervisor at once that it follows
                elif kind == "stop":
                    begin(STOP.decode(body, "stop").timeout)
                else:
                    raise WireError(f"the supervisor does not send {kind!r} messages")
        except (ValueError, KeyError, TypeError, ConnectionError) as exc:
            log.error("bad message from the supervisor: %s", exc)
        except Exception:
            # Never a worker that silently stops following: it drains, exits and the
            # supervisor starts a fresh one with the state in force.
            log.exception("cannot follow the supervisor")
        if not stop.is_set():
            log.warning("the supervisor is gone: draining and exiting")
            begin(proxy.settings.drain_timeout)

    def send_report() -> None:
        if not link.busy and (outcomes := member.report()) is not None:
            link.report(outcomes)

    async def report() -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            send_report()

    tasks = [loop.create_task(follow()), loop.create_task(report())]
    await stop.wait()
    await member.shutdown(drain[0])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if (outcomes := member.report()) is not None:
        link.report(outcomes)
    writer.close()
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    return 0


def run_worker(index: int, workers: int, listen_fd: int, link_fd: int) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {index}] %(message)s",
    )
    # The supervisor logs every state change once; its workers only follow them.
    logging.getLogger("turnout.events").setLevel(logging.WARNING)
    return uvloop.run(serve_worker(index, workers, listen_fd, link_fd))
