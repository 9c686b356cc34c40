"""Split and rollout commands across a fleet: any member takes one, the leader acts on it.

A member that does not lead puts the command under `commands/` (under its lease) and waits for
the leader's answer under `results/`; the leader acts on the command as its own admin API would,
and writes the state, the answer and the command's deletion in one fenced transaction. The
member answers its client once the fleet's state holds the result and it applied it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from proxy.control.changes import ControlError
from proxy.fleet.state import Keys
from proxy.fleet.store import KV, Delete, Op, Put, Store, StoreError

if TYPE_CHECKING:
    from proxy.runtime import Proxy

log = logging.getLogger("turnout.fleet")

COMMAND_TIMEOUT = 3.0


class CommandHost(Protocol):
    """What the command desk needs of its fleet member."""

    name: str
    instance: str
    keys: Keys
    store: Store
    proxy: Proxy
    leading: bool
    leader: str | None
    lease: int
    revision: int

    @property
    def connected(self) -> bool: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...

    def state_pending(self) -> bool: ...

    async def write_state(self, extra: tuple[Op, ...] = ()) -> tuple[bool, int]: ...

    async def until_applied(self, revision: int) -> None: ...


class Commands:
    """One member's commands: those it takes, and (while it leads) those it serves."""

    __slots__ = ("_results", "_taken", "host")

    def __init__(self, host: CommandHost) -> None:
        self.host = host
        self._results: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._taken: set[str] = set()  # command keys this leader serves or served

    async def request(self, kind: str, data: dict[str, Any], by: str) -> dict[str, Any]:
        """Apply a command fleet-wide; the answer once the fleet's state holds it here."""
        host = self.host
        if host.leading:
            done = await self.execute(kind, data, by)
            try:
                written, revision = await host.write_state()
            except StoreError as exc:
                raise ControlError(
                    503,
                    "fleet state not written",
                    f"fleet {host.name}: etcd did not take it ({exc}); this member writes it "
                    "when etcd answers again, if it still leads then",
                ) from exc
            await host.until_applied(revision if written else host.revision)
            return done
        if host.leader is None or not host.connected:
            raise ControlError(
                503,
                "no fleet leader",
                f"fleet {host.name}: no leader can be reached now (etcd "
                f"{'reachable' if host.connected else 'unreachable'}); try again",
            )
        ident = f"{host.instance}.{uuid.uuid4().hex[:12]}"
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._results[ident] = waiter
        body = {"kind": kind, "data": data, "by": by, "from": host.instance}
        try:
            await host.store.put(
                host.keys.commands + ident, json.dumps(body).encode(), lease=host.lease
            )
            async with asyncio.timeout(COMMAND_TIMEOUT):
                result = await waiter
        except (StoreError, TimeoutError) as exc:
            # Withdrawn, so that no later leader acts on a command already answered 503.
            host.spawn(self._withdraw(host.keys.commands + ident))
            why = str(exc) or f"no answer within {COMMAND_TIMEOUT:g}s"
            raise ControlError(
                503,
                "no fleet leader",
                f"fleet {host.name}: the leader ({host.leader}) did not take the command "
                f"({why}); it was withdrawn",
            ) from exc
        finally:
            self._results.pop(ident, None)
        host.spawn(self._withdraw(host.keys.results + ident))
        if "error" in result:
            status = int(result.get("status", 409))
            raise ControlError(status, result["error"], result.get("detail"))
        await host.until_applied(int(result.get("state_revision") or result["_revision"]))
        answer: dict[str, Any] = result.get("answer", {})
        return answer

    def answered(self, ident: str, kv: KV) -> None:
        """The leader's answer to a command this member took."""
        waiter = self._results.pop(ident, None)
        if waiter is not None and not waiter.done():
            try:
                result = json.loads(kv.value)
            except ValueError:
                result = {"error": "unreadable result", "status": 500}
            waiter.set_result(result | {"_revision": kv.mod_revision})

    def take(self, kv: KV) -> None:
        """A command for the leader (this member) to serve, once."""
        if kv.key not in self._taken:
            self._taken.add(kv.key)
            self.host.spawn(self._serve(kv))

    def gone(self, key: str) -> None:
        self._taken.discard(key)

    async def take_pending(self) -> None:
        """Commands put while no member led (or before this one knew it leads)."""
        host = self.host
        self._taken = set()
        try:
            kvs, _ = await host.store.get(host.keys.commands, prefix=True)
        except StoreError:
            return  # the member that sent one gets no answer in time and says so
        for kv in kvs:
            if host.leading:
                self.take(kv)

    async def _withdraw(self, key: str) -> None:
        """Delete a command or result key (else it goes with its lease)."""
        with contextlib.suppress(StoreError):
            await self.host.store.txn([], [Delete(key)], read_on_failure=False)

    async def _serve(self, kv: KV) -> None:
        host = self.host
        _, ident = host.keys.kind(kv.key)
        try:
            body = json.loads(kv.value)
            kind, data, by = str(body["kind"]), dict(body["data"]), str(body["by"])
            answer = await self.execute(kind, data, f"{by} via {body.get('from')}")
            result: dict[str, Any] = {"answer": answer}
        except ControlError as exc:
            result = {"error": exc.error, "status": exc.status, "detail": exc.detail}
        except (ValueError, KeyError, TypeError) as exc:
            result = {"error": "malformed command", "status": 400, "detail": str(exc)}
        if not host.state_pending():
            result["state_revision"] = host.revision
        answer_put = Put(
            host.keys.results + ident, json.dumps(result, default=str).encode(), host.lease
        )
        try:
            await host.write_state((Delete(kv.key), answer_put))
        except (StoreError, ControlError) as exc:
            log.warning("fleet %s: command %s not answered: %s", host.name, ident, exc)

    async def execute(self, kind: str, data: dict[str, Any], by: str) -> dict[str, Any]:
        """Act on a command here, as this member's own admin API would."""
        proxy = self.host.proxy
        if kind == "split":
            rollout = proxy.rollout
            if rollout.steers_split:
                raise ControlError(
                    409,
                    "rollout active",
                    f"an {rollout.strategy} rollout steers the split: pause it first",
                )
            over = data.get("over")
            change = proxy.control.set_split(
                float(data["green"]), None if over is None else float(over), by=by
            )
            return {"split": change.after, "before": change.before}
        if kind == "rollout":
            action = str(data.get("action"))
            fields = data.get("fields") or {}
            change = await proxy.rollout_action(action, dict(fields), by)
            return {"what": change.what, "before": change.before, "after": change.after}
        raise ControlError(400, "unknown command", kind)

    def __repr__(self) -> str:
        return f"<Commands waiting={len(self._results)} served={len(self._taken)}>"
