"""Hot restart: a new Turnout takes the listening sockets over from a running one.

The running process listens on a UNIX socket. A new process (`turnout run --takeover`)
connects and asks; the old one answers with its routing state (split, stable pool, ramp,
rollout, the admin API's changes to the upstreams) and the listening sockets themselves
(SCM_RIGHTS), so connections waiting in the accept queue are never lost. Once the new
process serves, it says so, and the old one stops accepting (proxy and admin API) and
drains as on SIGTERM. Either may be a supervisor with workers (`--workers`): the new one says
it serves once its workers do, and the old one's workers drain and exit with it.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("turnout.handover")

ASK = b"takeover\n"
READY = b"ready\n"
RELEASED = b"released\n"
MAX_STATE = 65536
TIMEOUT = 10.0
# How long the running process waits for its successor to serve: the successor checks every
# upstream once and starts its workers (each within 30 s) before it says so.
SERVING_TIMEOUT = 60.0


class HandoverError(Exception):
    """The takeover could not happen (no running Turnout, or it did not answer)."""


@dataclass
class Inherited:
    """What a new process receives from the one it replaces."""

    proxy_socket: socket.socket
    admin_socket: socket.socket | None
    state: dict[str, Any]
    channel: socket.socket  # to say READY on


def default_path(host: str, port: int) -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return str(Path(base) / f"turnout-{os.getuid()}-{host}-{port}.sock")


def _send_fds(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def _recv_fds(sock: socket.socket, max_fds: int = 4) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, ancdata, _, _ = sock.recvmsg(MAX_STATE, socket.CMSG_SPACE(max_fds * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return msg, list(fds)


def request_takeover(path: str) -> Inherited:
    """Called by the new process before it starts its loop (blocking, bounded)."""
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.settimeout(TIMEOUT)
    try:
        channel.connect(path)
        channel.sendall(ASK)
        msg, fds = _recv_fds(channel)
    except OSError as exc:
        channel.close()
        raise HandoverError(f"no running turnout answered on {path}: {exc}") from exc
    if not fds:
        channel.close()
        raise HandoverError(f"the running turnout on {path} sent no sockets")
    try:
        state = json.loads(msg)
    except ValueError as exc:
        channel.close()
        raise HandoverError(f"unreadable state from {path}") from exc
    proxy_socket = socket.socket(fileno=fds[0])
    admin_socket = socket.socket(fileno=fds[1]) if len(fds) > 1 else None
    return Inherited(proxy_socket, admin_socket, state, channel)


async def confirm_serving(channel: socket.socket) -> None:
    """Tell the old process we serve and wait until it has released the takeover path."""
    loop = asyncio.get_running_loop()
    channel.setblocking(False)
    try:
        async with asyncio.timeout(TIMEOUT):
            await loop.sock_sendall(channel, READY)
            await loop.sock_recv(channel, len(RELEASED))
    except (TimeoutError, OSError) as exc:
        log.warning("the old process did not confirm the takeover: %s", exc)
    finally:
        channel.close()


class HandoverServer:
    """In the running process: waits for a successor on a UNIX socket."""

    def __init__(
        self,
        path: str,
        sockets: Callable[[], list[socket.socket]],
        state: Callable[[], dict[str, Any]],
        on_handed_over: Callable[[], Awaitable[None]],
    ) -> None:
        self.path = path
        self._sockets = sockets
        self._state = state
        self._on_handed_over = on_handed_over
        self._server: asyncio.AbstractServer | None = None
        self._busy = False

    async def start(self) -> None:
        _clear_stale(self.path)
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine = False
        try:
            async with asyncio.timeout(TIMEOUT):
                ask = await reader.readline()
            if ask != ASK or self._busy:
                return
            mine = self._busy = True
            async with asyncio.timeout(SERVING_TIMEOUT):
                raw = writer.get_extra_info("socket")
                fds = [s.fileno() for s in self._sockets()]
                payload = json.dumps(self._state()).encode()
                # The transport's socket object is a thin wrapper: send on a duplicate.
                dup = socket.socket(fileno=os.dup(raw.fileno()))
                try:
                    _send_fds(dup, payload, fds)
                finally:
                    dup.close()
                log.info("listening sockets sent to a new process; waiting for it to serve")
                ready = await reader.readline()
            if ready == READY:
                log.info("the new process serves: draining and exiting")
                # Free the path and stop what must not answer twice before saying so: the
                # successor listens on the path next, and takes the admin API from then on.
                await self.close()
                await self._on_handed_over()
                writer.write(RELEASED)
                await writer.drain()
            else:
                log.warning("the new process went away before serving; carrying on")
        except (TimeoutError, OSError) as exc:
            log.warning("takeover abandoned: %s", exc)
        finally:
            if mine:
                self._busy = False
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            _remove(self.path)


def _alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _clear_stale(path: str) -> None:
    """Remove the socket file of a process that is gone; a live one would have answered."""
    if Path(path).exists():
        if _alive(path):
            raise HandoverError(f"another turnout listens for takeovers on {path}")
        _remove(path)


def _remove(path: str) -> None:
    Path(path).unlink(missing_ok=True)
