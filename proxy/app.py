"""Composition root: build the proxy on uvloop, wire signals, shut down in order."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import sys
from typing import Any

import uvloop

from proxy import native
from proxy.admin.api import AdminSetupError
from proxy.config import Config
from proxy.control import statefile
from proxy.control.changes import ControlError
from proxy.control.statefile import StateFile
from proxy.exits import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from proxy.fleet import join as join_fleet
from proxy.procs.handover import (
    HandoverError,
    HandoverServer,
    Inherited,
    confirm_serving,
    default_path,
    request_takeover,
)
from proxy.procs.supervisor import WorkerError, WorkerPool, supervisor_proxy
from proxy.runtime import Proxy, freeze_startup_heap

log = logging.getLogger("turnout")


async def serve(
    config: Config,
    config_path: str | None,
    *,
    handover_path: str | None = None,
    inherited: Inherited | None = None,
    workers: int = 1,
) -> int:
    loop = asyncio.get_running_loop()
    proxy = (
        Proxy(config, config_path=config_path)
        if workers == 1
        else supervisor_proxy(config, config_path=config_path, workers=workers)
    )
    listen, admin = config.listen, config.admin
    # A takeover's routing state is the running process's, newer than the file's.
    kept = keep_state(proxy, config, config_path, read=inherited is None)
    if inherited is not None:
        proxy.restore(inherited.state)
    elif kept is not None:
        proxy.restore(kept)
    try:
        admin_port = await proxy.start_admin(inherited.admin_socket if inherited else None)
    except AdminSetupError as exc:
        print(f"turnout: refusing to start: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except OSError as exc:
        print(
            f"turnout: cannot listen on {admin.host}:{admin.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        await proxy.shutdown(timeout=0)
        return EXIT_RUNTIME
    try:
        port = await proxy.start(inherited.proxy_socket if inherited else None)
    except OSError as exc:
        print(
            f"turnout: cannot listen on {listen.host}:{listen.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        await proxy.shutdown(timeout=0)
        return EXIT_RUNTIME
    except WorkerError as exc:
        print(f"turnout: cannot start the workers: {exc}", file=sys.stderr, flush=True)
        await proxy.shutdown(timeout=0)
        return EXIT_RUNTIME
    join_fleet(proxy)
    freeze_startup_heap()
    if kept is not None:
        proxy.rollout.restore(kept.get("rollout"), by="restart", source="the state file")
    if inherited is not None:
        # The ramp, the drains and the rollout go on here from where the old process was.
        proxy.control.restore(inherited.state.get("control"))
        proxy.rollout.restore(inherited.state.get("rollout"))
        # We serve: the old process may stop accepting and drain.
        await confirm_serving(inherited.channel)
        print("turnout: took the listening sockets over from the running process", flush=True)
    stop = asyncio.Event()
    signals = 0
    handed_over = False

    def on_stop() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting at once")
            proxy.front.abort()
        stop.set()

    async def reload() -> None:
        try:
            await proxy.control.reload(by="SIGHUP")
            log.info("reloaded %s", config_path)
        except ControlError as exc:
            log.error("reload refused, the running configuration stays: %s", exc.detail)
        except Exception:
            log.exception("reload of %s failed", config_path)

    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, proxy.reopen_logs)
    # Said only once the handlers are in place: whoever reads it may signal at once.
    scheme, admin_scheme = ("https" if tls else "http" for tls in (listen.tls, admin.tls))
    print(f"turnout: proxy listening on {scheme}://{listen.host}:{port}", flush=True)
    print(f"turnout: admin API on {admin_scheme}://{admin.host}:{admin_port}", flush=True)
    if isinstance(proxy.front, WorkerPool):
        pids = ", ".join(str(w.pid) for w in proxy.front.workers)
        print(f"turnout: {workers} workers share the port (pids {pids})", flush=True)
    print(f"turnout: {native.describe()}", flush=True)

    def handover_state() -> dict[str, Any]:
        return proxy.handover_state() | {
            "control": proxy.control.handover_state(),
            "rollout": proxy.rollout.handover_state(),
        }

    async def on_handed_over() -> None:
        nonlocal handed_over
        handed_over = True
        # The admin API's listening socket is shared with the successor: stop accepting on it
        # before the successor hears it took over, or the kernel hands about every other admin
        # request (a shift, a drain) to this draining process, which answers 200 and changes
        # nothing that still serves.
        if proxy.admin_runner is not None:
            for site in list(proxy.admin_runner.sites):
                await site.stop()
        # The successor carries the ramp and the rollout on; acting on them here as well
        # would log steps and verdicts twice, and it keeps the state file from now on.
        proxy.control.stop_ramp()
        proxy.state_file = None
        stop.set()

    # A supervisor hands over like a single process: its listening sockets and the routing
    # state; its workers drain with it, the successor's own serve on the same sockets.
    handover = HandoverServer(
        handover_path or default_path(listen.host, port),
        proxy.listening_sockets,
        handover_state,
        on_handed_over,
    )
    await start_handover(handover)
    await stop.wait()
    await handover.close()
    if handed_over:
        await proxy.rollout.close()
    say("turnout: shutting down, draining requests in flight")
    await proxy.shutdown()
    return EXIT_OK


def keep_state(
    proxy: Proxy, config: Config, config_path: str | None, *, read: bool
) -> dict[str, Any] | None:
    """Set up the state file (`state_file`) and, with `read`, return the routing state it
    kept, if any."""
    path = statefile.resolve(config.state_file, config_path)
    if path is None:
        return None
    if config.fleet is not None:
        log.info("state_file is not used with a fleet: etcd holds the routing state")
        return None
    state_file = StateFile(
        path, lambda: proxy.handover_state() | {"rollout": proxy.rollout.handover_state()}
    )
    kept = state_file.load() if read else None
    proxy.state_file = state_file
    if kept is not None:
        state_file.restored = True
        print(
            f"turnout: routing state from {path}: green {kept['split']:g}%,"
            f" stable {kept['stable']}",
            flush=True,
        )
    return kept


def say(line: str) -> None:
    """A line on stdout if it has room now, else none: a stdout nobody reads (a full pipe)
    must not hold up a shutdown."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        print(line, flush=True)
        return
    try:
        if select.select([], [fd], [], 0)[1]:
            os.write(fd, f"{line}\n".encode()[: select.PIPE_BUF])
    except OSError:
        pass  # stdout is gone: nobody to tell


async def start_handover(handover: HandoverServer) -> None:
    """Listen for a successor; right after a takeover the old process may still hold the path
    for a moment, so try for a while."""
    for _ in range(50):
        try:
            await handover.start()
            return
        except HandoverError:
            await asyncio.sleep(0.1)
    log.warning("hot restart unavailable: %s stays taken", handover.path)


def run_proxy(
    config: Config,
    config_path: str | None,
    *,
    takeover: bool = False,
    handover_path: str | None = None,
    workers: int = 1,
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    inherited = None
    if takeover:
        path = handover_path or default_path(config.listen.host, config.listen.port)
        try:
            inherited = request_takeover(path)
        except HandoverError as exc:
            print(f"turnout: cannot take over: {exc}", flush=True)
            return EXIT_RUNTIME
    return uvloop.run(
        serve(
            config, config_path, handover_path=handover_path, inherited=inherited, workers=workers
        )
    )
