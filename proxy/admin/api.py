"""The admin API: JSON over HTTP, bearer-token auth, validation, an audit line per mutation."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from proxy.admin import ui
from proxy.admin.client import ADMIN_HEADER
from proxy.config import AdminConfig, Config, parse_duration
from proxy.control.changes import Change, ControlError

if TYPE_CHECKING:
    from proxy.admin.metrics import Metrics
    from proxy.control.changes import Control
    from proxy.control.events import Event, EventBus
    from proxy.control.rollout import RolloutController
    from proxy.http.router import Router
    from proxy.http.serving import Serving

audit_log = logging.getLogger("turnout.audit")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AUTHENTICATED: web.RequestKey[bool] = web.RequestKey("authenticated", bool)
# The dashboard's page and assets carry no data: the page asks for the token itself.
OPEN_PATHS = frozenset({"/healthz", "/readyz", *ui.PATHS})
SSE_HEARTBEAT = 15.0
MAX_BODY = 65536
MAX_JSON_DEPTH = 32  # our bodies are flat objects
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# What a page of another site may send without asking first (CORS "simple" requests): a
# change never comes with one of these, even without a body.
FORM_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})


class AdminSetupError(Exception):
    """The admin listener must not start as configured."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FleetCommands(Protocol):
    """A fleet member as the admin API uses it (proxy/fleet/member.py's FleetMember)."""

    async def command(self, kind: str, data: dict[str, Any], by: str) -> dict[str, Any]: ...


class AdminHost(Protocol):
    """What the admin API serves and changes (runtime.py's Proxy): changes go through its
    Control, its rollout controller or, in a fleet, to the fleet's leader."""

    @property
    def config(self) -> Config: ...
    @property
    def router(self) -> Router: ...
    @property
    def serving(self) -> Serving: ...
    @property
    def control(self) -> Control: ...
    @property
    def rollout(self) -> RolloutController: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def fleet(self) -> FleetCommands | None: ...
    def status(self) -> dict[str, Any]: ...
    async def rollout_action(self, action: str, data: dict[str, Any], by: str) -> Change: ...


def admin_token(proxy: AdminHost) -> str | None:
    token, problem = _token(proxy.config.admin)
    if problem:
        raise AdminSetupError(problem)
    return token


def token_problems(config: Config) -> list[str]:
    """Why the admin API would refuse to start in this environment (for `turnout check`)."""
    _, problem = _token(config.admin)
    return [f"admin: {problem}"] if problem else []


def _token(admin: AdminConfig) -> tuple[str | None, str]:
    raw = os.environ.get(admin.token_env, "")
    if raw and not raw.strip():
        return None, f"{admin.token_env} holds only whitespace: set a token or unset it"
    # The bearer token a client sends is compared without surrounding whitespace.
    token = raw.strip() or None
    if token is None and not is_loopback(admin.host):
        return None, (
            f"the admin API would listen on {admin.host}, which is not loopback, without a token: "
            f"set {admin.token_env} or listen on 127.0.0.1"
        )
    return token, ""


def json_error(status: int, error: str, detail: Any = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


async def _mark_as_admin(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer says it comes from a Turnout admin API, so that a client pointed at the
    proxy's own port by mistake notices (the application behind it answers there)."""
    response.headers[ADMIN_HEADER] = "1"


def who(request: web.Request) -> str:
    peer = request.remote or "unknown"
    return f"token@{peer}" if request.get(AUTHENTICATED) else peer


def audit(request: web.Request, change: Change) -> None:
    audit_log.info(
        "%s",
        json.dumps(
            {
                "audit": True,
                "who": who(request),
                "what": change.what,
                "request": f"{request.method} {request.path}",
                "before": change.before,
                "after": change.after,
            },
            default=str,
        ),
    )


def _name_and_port(authority: str, scheme: str) -> tuple[str, int] | None:
    """(host name, port) of a Host header or an origin's authority; None if malformed."""
    try:
        parts = urlsplit(f"//{authority}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname.rstrip("."), port or DEFAULT_PORTS.get(scheme, 0)


def foreign_host(request: web.Request, names: frozenset[str]) -> str | None:
    """The Host header when it names something other than this admin API, else None.

    A page on another site that resolves its own name to 127.0.0.1 (DNS rebinding) reaches
    a loopback admin API with that name in Host. Loopback addresses, `localhost`, the address
    the request came in on and the configured names are ours. The port is not compared: an
    SSH or kubectl port-forward changes it, and rebinding cannot forge the name.
    """
    raw = request.headers.get(hdrs.HOST)
    if raw is None:
        return None  # HTTP/1.0 without Host: not a browser
    parsed = _name_and_port(raw, request.scheme)
    if parsed is None:
        return raw
    name = parsed[0]
    if name in names:
        return None
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return raw
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    local = sockname[0] if isinstance(sockname, tuple) else None
    return None if address.is_loopback or name == local else raw


def same_origin(request: web.Request, origin: str) -> bool:
    """Whether an Origin header is this admin API as the client addressed it (scheme://Host)."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    host = request.headers.get(hdrs.HOST)
    if scheme != request.scheme or host is None or parts.path not in ("", "/"):
        return False
    theirs = _name_and_port(parts.netloc, scheme)
    return theirs is not None and theirs == _name_and_port(host, scheme)


def cross_site(request: web.Request, names: frozenset[str] | None) -> web.Response | None:
    """The refusal of a request a web page on another site may have made, else None.

    A browser sends a "simple" cross-site request (a form, or fetch with a text/plain body)
    without asking first: such a request must not change anything. With no token, the Host
    is checked too (`names`), against DNS rebinding.
    """
    if names is not None:
        host = foreign_host(request, names)
        if host is not None:
            return json_error(
                403,
                "forbidden host",
                f"Host {host[:100]!r} is not a name of this admin API: use 127.0.0.1, "
                "localhost, or a name listed in admin.allowed_hosts",
            )
    if request.method in SAFE_METHODS:
        return None
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and not same_origin(request, origin):
        return json_error(
            403,
            "forbidden origin",
            f"a change requested by a page of {origin[:100]!r} is refused: "
            "the admin API takes changes from its own origin only",
        )
    content_type = request.headers.get(hdrs.CONTENT_TYPE)
    mime = request.content_type.lower() if content_type is not None else None
    if mime in FORM_TYPES or (request.body_exists and mime != "application/json"):
        return json_error(
            415,
            "unsupported media type",
            "a change takes a JSON body with Content-Type: application/json (or no body), "
            f"not {(content_type or 'no Content-Type')[:100]!r}",
        )
    return None


def own_names(admin_host: str, allowed_hosts: Iterable[str]) -> frozenset[str]:
    """Host names that mean this admin API (IP addresses are checked as addresses)."""
    return frozenset({"localhost", admin_host.lower().rstrip("."), *allowed_hosts})


def make_middleware(token: str | None, names: frozenset[str]) -> Middleware:
    expected = token.encode() if token else None
    # Without a token, knowing the name is all it takes: a rebound name must be refused.
    # With one, a page of another site cannot send it, so any name the operator uses is fine.
    checked_names = names if expected is None else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = cross_site(request, checked_names)
        if refused is not None:
            return refused
        if expected is not None and request.path not in OPEN_PATHS:
            scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("latin-1", "replace"), expected
            ):
                refused = json_error(401, "unauthorized", "missing or wrong bearer token")
                refused.headers["WWW-Authenticate"] = 'Bearer realm="turnout admin"'
                return refused
            request[AUTHENTICATED] = True
        try:
            return await handler(request)
        except ControlError as exc:
            return json_error(exc.status, exc.error, exc.detail)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            detail = f"{request.method} {request.path}: {exc.reason}"
            answer = json_error(exc.status, exc.reason.lower(), detail)
            if isinstance(exc, web.HTTPMethodNotAllowed):
                answer.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
            return answer
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            logging.getLogger("turnout").exception("admin handler failed")
            return json_error(500, "internal error", "see the proxy log")

    return middleware


async def read_json(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ControlError(413, "body too large", f"at most {MAX_BODY} bytes")
    try:
        raw = await request.read()  # all of it, as framed: nothing acts on half a body
    except web.HTTPRequestEntityTooLarge:
        raise ControlError(413, "body too large", f"at most {MAX_BODY} bytes") from None
    if not raw.strip():
        return {}
    too_deep = ControlError(400, "malformed request", f"JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError(400, "malformed JSON", str(exc)) from exc
    except RecursionError:
        raise too_deep from None  # the decoder recurses once per level
    if nested_deeper(data, MAX_JSON_DEPTH):
        raise too_deep
    if not isinstance(data, dict):
        raise ControlError(400, "malformed request", "the body must be a JSON object")
    return data


async def read_force(request: web.Request) -> bool:
    """The optional `{"force": true}` of a drain or removal that would empty the stable pool."""
    data = await read_json(request)
    allow_keys(data, {"force"})
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise ControlError(400, "invalid force", "force must be true or false")
    return force


def nested_deeper(value: object, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit` in decoded JSON: walked a level at
    a time, without recursion, before anything formats or walks it recursively."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def allow_keys(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ControlError(400, "unknown field", f"unknown field(s): {', '.join(unknown)}")


def number(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ControlError(400, f"invalid {key}", f"{key} must be a number, not {value!r}")
    return float(value)


def whole_number(raw: str) -> int | None:
    """A short run of ASCII digits as an int; None for anything else (str.isdigit() alone
    also passes "²", and int() refuses very long numbers)."""
    if raw.isascii() and raw.isdigit() and len(raw) <= 9:
        return int(raw)
    return None


def index_of(request: web.Request) -> int:
    raw = request.match_info["index"]
    index = whole_number(raw)
    if index is None:
        raise ControlError(404, "unknown upstream", f"no upstream index {raw[:20]!r}")
    return index


class AdminAPI:
    """Handlers of the admin API over one running proxy."""

    def __init__(self, proxy: AdminHost) -> None:
        self.proxy = proxy
        self.control = proxy.control
        self.heartbeat = SSE_HEARTBEAT  # read when built, so a test can shorten it

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        proxy = self.proxy
        candidates = proxy.router.candidates
        # A proxy that is shutting down no longer accepts: a load balancer should look away.
        ready = not proxy.serving.shutting_down and any(candidates[p] for p in candidates)
        body = {
            "ready": ready,
            "shutting_down": proxy.serving.shutting_down,
            "available": {p: len(c) for p, c in candidates.items()},
        }
        return web.json_response(body, status=200 if ready else 503)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.proxy.status(), dumps=lambda o: json.dumps(o, default=str))

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.proxy.metrics.exposition()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def put_split(self, request: web.Request) -> web.Response:
        data = await read_json(request)
        allow_keys(data, {"green", "over"})
        if "green" not in data:
            raise ControlError(400, "missing field", "green is required (0..100)")
        green = number(data, "green")
        over: float | None = None
        if data.get("over") is not None:
            try:
                over = parse_duration(data["over"])
            except ValueError as exc:
                raise ControlError(400, "invalid over", str(exc)) from exc
        fleet = self.proxy.fleet
        if fleet is not None:
            body = {"green": green, "over": over}
            answer = await fleet.command("split", body, who(request))
            audit(request, Change("fleet split", answer.get("before"), answer.get("split")))
            return web.json_response(answer)
        rollout = self.proxy.rollout
        if rollout.steers_split:
            raise ControlError(
                409,
                "rollout active",
                f"an {rollout.strategy} rollout steers the split: pause it first",
            )
        change = self.control.set_split(green, over, by=who(request))
        audit(request, change)
        return web.json_response({"split": change.after, "before": change.before})

    async def add_upstream(self, request: web.Request) -> web.Response:
        data = await read_json(request)
        allow_keys(data, {"url", "weight"})
        if "url" not in data:
            raise ControlError(400, "missing field", "url is required")
        change = await self.control.add_upstream(
            request.match_info["pool"], data["url"], data.get("weight", 1)
        )
        audit(request, change)
        return web.json_response({"added": change.after, "what": change.what}, status=201)

    async def remove_upstream(self, request: web.Request) -> web.Response:
        change = self.control.remove_upstream(
            request.match_info["pool"],
            index_of(request),
            by=who(request),
            force=await read_force(request),
        )
        audit(request, change)
        return web.json_response({"removing": change.before, "what": change.what}, status=202)

    async def drain(self, request: web.Request) -> web.Response:
        pool, index = request.match_info["pool"], index_of(request)
        action = request.match_info["action"]
        if action == "drain":
            force = await read_force(request)
            change = self.control.drain(pool, index, by=who(request), force=force)
        else:
            change = self.control.undrain(pool, index, by=who(request))
        audit(request, change)
        return web.json_response({"what": change.what, "before": change.before, **change.after})

    async def reload(self, request: web.Request) -> web.Response:
        change = await self.control.reload(by=who(request))
        audit(request, change)
        return web.json_response({"reloaded": True, "before": change.before, "after": change.after})

    async def rollout(self, request: web.Request) -> web.Response:
        data = await read_json(request)
        fleet = self.proxy.fleet
        if fleet is not None:
            command = {"action": request.match_info["action"], "fields": data}
            answer = await fleet.command("rollout", command, who(request))
            what = f"fleet {answer.get('what')}"
            audit(request, Change(what, answer.get("before"), answer.get("after")))
            return web.json_response(answer)
        change = await self.proxy.rollout_action(request.match_info["action"], data, who(request))
        audit(request, change)
        return web.json_response(
            {"what": change.what, "before": change.before, "after": change.after}
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        replay = whole_number(request.query.get("replay", "0")) or 0
        # A reconnecting EventSource says the last id it saw: it gets what it missed.
        last_seen = whole_number(request.headers.get("Last-Event-ID", ""))
        stream = self.proxy.events.subscribe(replay=replay, after=last_seen)
        # One pending read of the stream, waited on with a heartbeat: a quiet spell writes a
        # comment and waits again on the same read, never cancelling the subscription.
        pending: asyncio.Future[Event] | None = None
        try:
            await resp.write(b": turnout events\n\n")
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(stream))
                done, _ = await asyncio.wait((pending,), timeout=self.heartbeat)
                if not done:
                    await resp.write(b": keep-alive\n\n")
                    continue
                pending = None
                try:
                    event = done.pop().result()
                except StopAsyncIteration:
                    break
                await resp.write(
                    f"id: {event.seq}\nevent: {event.kind}\ndata: {event.to_json()}\n\n".encode()
                )
        except ConnectionResetError:
            pass  # the reader went away; nothing to tell it
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.wait((pending,))
            await stream.aclose()
        return resp


def build_admin_app(proxy: AdminHost, token: str | None) -> web.Application:
    admin = proxy.config.admin
    names = own_names(admin.host, admin.allowed_hosts)
    app = web.Application(middlewares=[make_middleware(token, names)], client_max_size=MAX_BODY)
    app.on_response_prepare.append(_mark_as_admin)
    api = AdminAPI(proxy)
    r = app.router
    r.add_get("/healthz", api.healthz)
    r.add_get("/readyz", api.readyz)
    r.add_get("/status", api.status)
    r.add_get("/metrics", api.metrics)
    r.add_get("/events", api.events)
    r.add_put("/split", api.put_split)
    r.add_post("/reload", api.reload)
    r.add_post("/rollout/{action:start|pause|resume|promote|rollback|abort}", api.rollout)
    r.add_post("/pools/{pool}/upstreams", api.add_upstream)
    r.add_delete("/pools/{pool}/upstreams/{index}", api.remove_upstream)
    r.add_post("/pools/{pool}/upstreams/{index}/{action:drain|undrain}", api.drain)
    ui.add_routes(r)
    return app
