"""The sample upstream: a small aiohttp service for `turnout upstream`, the demo and tests.

Every response carries `X-Upstream: NAME`. Paths other than the fixed endpoints below are
"ordinary" requests, the only ones subject to the injected latency and error rate:

    GET  /healthz                200 ok (503 when unhealthy)
    GET  /headers[/...]          the raw path and the request headers as received
    GET  /bytes/{n}[?chunked=1]  n bytes, byte i being i % 256, streamed in 64 KiB writes
    GET  /stream?chunks=&interval=&size=   chunks written one by one, interval ms apart
    POST|PUT /sink               consumes the body: {"bytes": n, "sha256": hex}
    POST|PUT /echo               streams the body back, chunked
    GET  /status/{code}          answers that status
    GET  /cut/{n}                declares 2n bytes, sends n, then closes the connection
    GET  /delay/{ms}             answers after ms milliseconds
    GET  /set-cookies            two Set-Cookie headers, a=1 then b=2
    GET  /ws                     WebSocket echo
    GET|POST /_control           read or change the settings at run time
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import random
import signal
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import uvloop
from aiohttp import WSCloseCode, WSMsgType, web

_BLOCK_SIZE: Final = 64 * 1024
# Byte i of every generated body is i % 256, so a reader can check any offset; the block is
# exactly 64 KiB, so the pattern runs on across blocks.
_BLOCK: Final = bytes(range(256)) * (_BLOCK_SIZE // 256)
_JSON: Final = "application/json"
_NO_BODY_STATUSES: Final = frozenset({204, 205, 304})
_MAX_STREAM_CHUNK: Final = 1024 * 1024
_MAX_STREAM_CHUNKS: Final = 1_000_000
_MAX_WAIT_MS: Final = 600_000
_MAX_LATENCY_S: Final = 600.0
_SHUTDOWN_TIMEOUT_S: Final = 5.0
_BACKLOG: Final = 1024


@dataclass(slots=True)
class SampleSettings:
    """Behaviour of a sample upstream; mutable at run time and read on every request."""

    name: str
    error_rate: float = 0.0
    latency: float = 0.0
    error_status: int = 500
    healthy: bool = True


@dataclass(frozen=True, slots=True)
class _Encoded:
    """Response bodies that depend only on the upstream's name, encoded once."""

    name: str
    error_body: bytes
    ok_prefix: bytes

    @classmethod
    def for_name(cls, name: str) -> _Encoded:
        quoted = json.dumps(name).encode()
        return cls(
            name=name,
            error_body=b'{"upstream": %s, "error": "injected"}' % quoted,
            ok_prefix=b'{"upstream": %s, "method": ' % quoted,
        )


def _json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type=_JSON)


def _bad_request(error: str, detail: Any) -> web.HTTPBadRequest:
    body = json.dumps({"error": error, "detail": detail})
    return web.HTTPBadRequest(text=body, content_type=_JSON)


def _int_param(value: str | None, field: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise _bad_request("invalid parameter", {field: "must be an integer"}) from None
    if not low <= number <= high:
        raise _bad_request("invalid parameter", {field: f"must be between {low} and {high}"})
    return number


def _pattern(size: int) -> bytes:
    repeats = -(-size // _BLOCK_SIZE)
    return (_BLOCK * repeats)[:size]


async def _write_pattern(resp: web.StreamResponse, n: int) -> None:
    # Bounded memory: one shared 64 KiB block, and write() waits while the transport is paused.
    full, rest = divmod(n, _BLOCK_SIZE)
    for _ in range(full):
        await resp.write(_BLOCK)
    if rest:
        await resp.write(_BLOCK[:rest])


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _validate_control(payload: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Split a /_control body into the changes to apply and the problems found."""
    if not isinstance(payload, dict):
        return {}, {"body": "must be a JSON object"}
    changes: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for key, value in payload.items():
        if key == "error_rate":
            rate = _number(value)
            if rate is None or not 0.0 <= rate <= 1.0:
                problems[key] = "must be a number between 0 and 1"
            else:
                changes[key] = rate
        elif key == "latency":
            seconds = _number(value)
            if seconds is None or not 0.0 <= seconds <= _MAX_LATENCY_S:
                problems[key] = f"must be a number of seconds between 0 and {_MAX_LATENCY_S:g}"
            else:
                changes[key] = seconds
        elif key == "error_status":
            if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
                problems[key] = "must be an integer between 400 and 599"
            else:
                changes[key] = value
        elif key == "healthy":
            if not isinstance(value, bool):
                problems[key] = "must be true or false"
            else:
                changes[key] = value
        else:
            problems[str(key)] = "unknown field"
    return changes, problems


class _SampleService:
    """Request handlers of one sample upstream, sharing its settings and seeded random."""

    __slots__ = ("_encoded", "_random", "_sockets", "settings")

    def __init__(self, settings: SampleSettings, seed: int | None) -> None:
        self.settings = settings
        self._random = random.Random(seed)
        self._encoded = _Encoded.for_name(settings.name)
        self._sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<_SampleService {self.settings!r} websockets={len(self._sockets)}>"

    def snapshot(self) -> dict[str, Any]:
        return dataclasses.asdict(self.settings)

    def _current(self) -> _Encoded:
        encoded = self._encoded
        name = self.settings.name
        if encoded.name != name:  # settings are plain mutable fields: follow a renamed upstream
            encoded = self._encoded = _Encoded.for_name(name)
        return encoded

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Upstream"] = self.settings.name

    async def on_shutdown(self, app: web.Application) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutdown")

    async def ordinary(self, request: web.Request) -> web.Response:
        if request.body_exists:
            async for _ in request.content.iter_any():
                pass
        settings = self.settings
        if settings.latency > 0.0:
            await asyncio.sleep(settings.latency)
        encoded = self._current()
        rate = settings.error_rate
        if rate > 0.0 and self._random.random() < rate:
            return web.Response(
                status=settings.error_status, body=encoded.error_body, content_type=_JSON
            )
        body = b'%s%s, "path": %s}' % (
            encoded.ok_prefix,
            json.dumps(request.method).encode(),
            json.dumps(request.raw_path).encode(),
        )
        return web.Response(body=body, content_type=_JSON)

    async def healthz(self, request: web.Request) -> web.Response:
        if self.settings.healthy:
            return web.Response(text="ok")
        return web.Response(status=503, text="unhealthy")

    async def headers(self, request: web.Request) -> web.Response:
        pairs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
        return _json_response(
            {"upstream": self.settings.name, "raw_path": request.raw_path, "headers": pairs}
        )

    async def bytes_(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") == "1":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = n
        await resp.prepare(request)
        await _write_pattern(resp, n)
        return resp

    async def stream(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        chunks = _int_param(query.get("chunks"), "chunks", 5, 0, _MAX_STREAM_CHUNKS)
        interval = _int_param(query.get("interval"), "interval", 100, 0, _MAX_WAIT_MS)
        size = _int_param(query.get("size"), "size", 16, 1, _MAX_STREAM_CHUNK)
        chunk = _pattern(size)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(chunks):
            # The socket is TCP_NODELAY and write() hands the chunk to the transport at once,
            # so each chunk leaves before the pause that follows it.
            await resp.write(chunk)
            await asyncio.sleep(interval / 1000)
        return resp

    async def sink(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        total = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            total += len(chunk)
        return _json_response({"bytes": total, "sha256": digest.hexdigest()})

    async def echo(self, request: web.Request) -> web.StreamResponse:
        content_type = request.headers.get("Content-Type", "application/octet-stream")
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        return resp

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if not 200 <= code <= 599:
            raise _bad_request("invalid parameter", {"code": "must be between 200 and 599"})
        if code in _NO_BODY_STATUSES:
            return web.Response(status=code)
        return _json_response({"upstream": self.settings.name, "status": code}, status=code)

    async def cut(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = 2 * n
        await resp.prepare(request)
        await _write_pattern(resp, n)
        resp.force_close()
        transport = request.transport
        if transport is not None:
            # close(), not abort(): the n bytes already written still reach the client, then
            # the connection ends early, which the client must see as a cut-short body.
            transport.close()
        return resp

    async def delay(self, request: web.Request) -> web.Response:
        ms = _int_param(request.match_info["ms"], "ms", 0, 0, _MAX_WAIT_MS)
        await asyncio.sleep(ms / 1000)
        return _json_response({"upstream": self.settings.name, "delay_ms": ms})

    async def set_cookies(self, request: web.Request) -> web.Response:
        resp = web.Response(text="cookies")
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        return resp

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            self._sockets.discard(ws)
        return ws

    async def get_control(self, request: web.Request) -> web.Response:
        return _json_response(self.snapshot())

    async def post_control(self, request: web.Request) -> web.Response:
        try:
            payload = await request.json()
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad_request("invalid JSON", str(exc)) from None
        changes, problems = _validate_control(payload)
        if problems:
            raise _bad_request("invalid control", problems)
        self._apply(changes)
        return _json_response(self.snapshot())

    def _apply(self, changes: Mapping[str, Any]) -> None:
        # All fields were validated first, so a rejected body changes nothing.
        for key, value in changes.items():
            setattr(self.settings, key, value)


def make_app(settings: SampleSettings, seed: int | None = None) -> web.Application:
    """Build the sample upstream's application; `seed` fixes the injected errors' sequence."""
    service = _SampleService(settings, seed)
    app = web.Application()
    app.on_response_prepare.append(service.on_prepare)
    app.on_shutdown.append(service.on_shutdown)
    router = app.router
    router.add_get("/healthz", service.healthz)
    router.add_get("/headers", service.headers)
    router.add_get("/headers/{tail:.*}", service.headers)
    router.add_get(r"/bytes/{n:\d+}", service.bytes_)
    router.add_get("/stream", service.stream)
    for method in ("POST", "PUT"):
        router.add_route(method, "/sink", service.sink)
        router.add_route(method, "/echo", service.echo)
    router.add_get(r"/status/{code:\d+}", service.status)
    router.add_get(r"/cut/{n:\d+}", service.cut)
    router.add_get(r"/delay/{ms:\d+}", service.delay)
    router.add_get("/set-cookies", service.set_cookies)
    router.add_get("/ws", service.websocket)
    router.add_get("/_control", service.get_control)
    router.add_post("/_control", service.post_control)
    # Registered last: the router tries the endpoints above first, and a known path with
    # another method falls through to here as an ordinary request.
    router.add_route("*", "/{tail:.*}", service.ordinary)
    return app


async def start(settings: SampleSettings, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening on host:port (0 picks a free port); return the runner and bound port."""
    runner = web.AppRunner(
        make_app(settings), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=_BACKLOG)
        await site.start()
        bound = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(bound)


async def _serve(settings: SampleSettings, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        runner, bound = await start(settings, host, port)
        try:
            print(
                f"turnout upstream {settings.name} listening on http://{host}:{bound}",
                flush=True,
            )
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(settings: SampleSettings, host: str, port: int) -> None:
    """Serve on uvloop until SIGINT or SIGTERM, then stop cleanly."""
    uvloop.run(_serve(settings, host, port))
