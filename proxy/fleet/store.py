"""The one module that speaks to etcd: its v3 JSON gateway (grpc-gateway) over aiohttp.

A small seam (`Store`) so another engine can follow: leases with a keep-alive the caller
drives, get, put, delete, one compare-and-write transaction, and a watch that never loses an
event. Everything here is I/O; every call has a timeout and raises `StoreError` when etcd cannot
be reached or answers something unexpected.

The gateway speaks JSON: keys and values are base64, int64 fields are strings, and fields at
their zero value are left out (a transaction that failed has no `succeeded`).

The watch resumes after a disconnect from the last event's `mod_revision + 1`, so a break
between two batches of a catch-up skips nothing; when the revision it needs was compacted away
it reads the keys anew and hands the caller that snapshot before going on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp

log = logging.getLogger("turnout.fleet")

CALL_TIMEOUT = 1.0
WATCH_RETRY = 0.1
WATCH_RETRY_MAX = 1.0
WATCH_LINE_LIMIT = 1 << 24


class StoreError(Exception):
    """etcd could not be reached, or answered something this module does not understand."""


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    kv: KV


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Events in revision order; after a compaction, `snapshot` holds every key under the
    watched prefix as of `revision` instead (what was there before is gone)."""

    events: tuple[WatchEvent, ...]
    snapshot: tuple[KV, ...] | None
    revision: int


@dataclass(frozen=True, slots=True)
class Compare:
    """A transaction's condition: the key's create_revision equals `create_revision` (0: the
    key does not exist)."""

    key: str
    create_revision: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    # On failure, the compared keys as they are (the keys of the failure branch's reads).
    found: tuple[KV, ...] = ()


class Store(Protocol):
    """What a fleet member needs of a coordination store."""

    @property
    def connected(self) -> bool: ...

    async def grant(self, ttl: int) -> int: ...

    async def keepalive(self, lease: int) -> int: ...

    async def revoke(self, lease: int) -> None: ...

    async def get(self, key: str, *, prefix: bool = False) -> tuple[list[KV], int]: ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int: ...

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], *, read_on_failure: bool = True
    ) -> TxnResult: ...

    def watch(
        self, key: str, *, prefix: bool, start_revision: int
    ) -> AsyncGenerator[WatchBatch, None]: ...

    async def close(self) -> None: ...


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _range_end(prefix: str) -> str:
    """The end of etcd's range for every key starting with `prefix`."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


def _int(wire: dict[str, Any], key: str) -> int:
    return int(wire.get(key, 0))


def _kv(wire: dict[str, Any]) -> KV:
    return KV(
        key=_unb64(wire.get("key", "")).decode(),
        value=_unb64(wire.get("value", "")),
        create_revision=_int(wire, "create_revision"),
        mod_revision=_int(wire, "mod_revision"),
        lease=_int(wire, "lease"),
    )


def _op(op: Op) -> dict[str, Any]:
    if isinstance(op, Put):
        body: dict[str, Any] = {"key": _b64(op.key), "value": _b64(op.value)}
        if op.lease:
            body["lease"] = str(op.lease)
        return {"request_put": body}
    return {"request_delete_range": {"key": _b64(op.key)}}


def client_tls(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


class EtcdStore:
    """etcd v3 over its JSON gateway; fails over between endpoints in order."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        tls: ssl.SSLContext | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint")
        self.endpoints = tuple(e.rstrip("/") for e in endpoints)
        self.timeout = timeout
        self._tls = tls
        self._current = 0
        self._session: aiohttp.ClientSession | None = None
        self._connected = False

    @property
    def connected(self) -> bool:
        """Whether the last call or watch read reached etcd."""
        return self._connected

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls if self._tls else False, limit=32),
                read_bufsize=1 << 16,
                max_line_size=WATCH_LINE_LIMIT,
                max_field_size=WATCH_LINE_LIMIT,
            )
        return self._session

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the current endpoint, then to each other one, within the call's timeout."""
        last: Exception | None = None
        try:
            async with asyncio.timeout(self.timeout):
                for attempt in range(len(self.endpoints)):
                    index = (self._current + attempt) % len(self.endpoints)
                    url = self.endpoints[index] + path
                    try:
                        async with self._client().post(url, json=body) as resp:
                            raw = await resp.read()
                            status = resp.status
                    except (aiohttp.ClientError, OSError) as exc:
                        last = exc
                        continue
                    self._current = index
                    self._connected = True
                    return self._answer(path, status, raw)
        except TimeoutError:
            last = TimeoutError(f"no answer within {self.timeout:g}s")
        self._connected = False
        raise StoreError(f"etcd unreachable ({', '.join(self.endpoints)}): {last}")

    @staticmethod
    def _answer(path: str, status: int, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"etcd {path}: not JSON ({status})") from exc
        if not isinstance(data, dict):
            raise StoreError(f"etcd {path}: unexpected answer ({status})")
        if status != 200 or "error" in data:
            raise StoreError(f"etcd {path}: {data.get('message') or data.get('error')} ({status})")
        return data

    # leases ------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        lease = _int(data, "ID")
        if not lease:
            raise StoreError(f"etcd refused a lease: {data.get('error') or data}")
        return lease

    async def keepalive(self, lease: int) -> int:
        """Renew a lease; the TTL it has now, 0 when it is gone (expired or revoked)."""
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = data.get("result", data)
        return _int(result, "TTL") if isinstance(result, dict) else 0

    async def revoke(self, lease: int) -> None:
        await self._call("/v3/lease/revoke", {"ID": str(lease)})

    # keys --------------------------------------------------------------------

    async def get(self, key: str, *, prefix: bool = False) -> tuple[list[KV], int]:
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _range_end(key)
        data = await self._call("/v3/kv/range", body)
        kvs = [_kv(kv) for kv in data.get("kvs", ())]
        return kvs, _int(data.get("header", {}), "revision")

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        data = await self._call("/v3/kv/put", body)
        return _int(data.get("header", {}), "revision")

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], *, read_on_failure: bool = True
    ) -> TxnResult:
        """One transaction: `success` when every compare holds, else (optionally) a read of
        the compared keys."""
        body = {
            "compare": [
                {
                    "key": _b64(c.key),
                    "target": "CREATE",
                    "result": "EQUAL",
                    "create_revision": str(c.create_revision),
                }
                for c in compare
            ],
            "success": [_op(op) for op in success],
            "failure": (
                [{"request_range": {"key": _b64(c.key)}} for c in compare]
                if read_on_failure
                else []
            ),
        }
        data = await self._call("/v3/kv/txn", body)
        revision = _int(data.get("header", {}), "revision")
        if data.get("succeeded") is True:
            return TxnResult(True, revision)
        found: list[KV] = []
        for response in data.get("responses", ()):
            found.extend(_kv(kv) for kv in response.get("response_range", {}).get("kvs", ()))
        return TxnResult(False, revision, tuple(found))

    # watch -------------------------------------------------------------------

    async def watch(
        self, key: str, *, prefix: bool, start_revision: int
    ) -> AsyncGenerator[WatchBatch, None]:
        """Every change under `key` from `start_revision` on, in order, until cancelled."""
        next_revision = start_revision
        delay = WATCH_RETRY
        while True:
            try:
                async for batch in self._watch_once(key, prefix, next_revision):
                    delay = WATCH_RETRY
                    if batch.events:
                        next_revision = batch.events[-1].kv.mod_revision + 1
                    elif batch.snapshot is not None:
                        next_revision = batch.revision + 1
                    yield batch
            except _Compacted as exc:
                log.warning("fleet: watch from %d compacted (%s): reading anew", next_revision, exc)
                try:
                    kvs, revision = await self.get(key, prefix=prefix)
                except StoreError:
                    await asyncio.sleep(delay)
                    continue
                next_revision = revision + 1
                yield WatchBatch((), tuple(kvs), revision)
                continue
            except (aiohttp.ClientError, OSError, StoreError, ValueError) as exc:
                self._connected = False
                self._current = (self._current + 1) % len(self.endpoints)
                log.info("fleet: watch interrupted (%s); resuming from %d", exc, next_revision)
            await asyncio.sleep(delay)
            delay = min(WATCH_RETRY_MAX, delay * 2)

    async def _watch_once(
        self, key: str, prefix: bool, start_revision: int
    ) -> AsyncIterator[WatchBatch]:
        create: dict[str, Any] = {"key": _b64(key), "start_revision": str(start_revision)}
        if prefix:
            create["range_end"] = _range_end(key)
        url = self.endpoints[self._current] + "/v3/watch"
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout)
        async with self._client().post(
            url, json={"create_request": create}, timeout=timeout
        ) as resp:
            if resp.status != 200:
                raise StoreError(f"etcd watch: status {resp.status}")
            self._connected = True
            while True:
                line = await resp.content.readline()
                if not line:
                    raise StoreError("etcd closed the watch")
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:
                    raise StoreError(f"etcd watch: {message['error']}")
                result = message.get("result", {})
                self._connected = True
                compacted = _int(result, "compact_revision")
                if compacted:
                    raise _Compacted(f"compacted up to {compacted}")
                if result.get("canceled"):
                    raise StoreError(f"etcd cancelled the watch: {result.get('cancel_reason')}")
                events = tuple(
                    WatchEvent("delete" if ev.get("type") == "DELETE" else "put", _kv(ev["kv"]))
                    for ev in result.get("events", ())
                )
                if events:
                    revision = _int(result.get("header", {}), "revision")
                    yield WatchBatch(events, None, revision)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return f"<EtcdStore {self.endpoints[self._current]} {state}>"


class _Compacted(Exception):
    """The watch's start revision is older than etcd's compaction."""
