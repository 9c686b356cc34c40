"""Client commands: `status`, `shift`, `rollout`, `drain`, `undrain`, `reload` over the admin API.

Only the standard library speaks HTTP here, so these commands start fast and never need the
event loop. Every failure becomes one line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from email.message import Message
from http.client import HTTPException, RemoteDisconnected
from typing import Any
from urllib.parse import quote, urlsplit

from proxy.exits import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from proxy.logic.routing import POOLS
from proxy.logic.strategy import STRATEGIES

DEFAULT_ADMIN = "http://127.0.0.1:9901"
ADMIN_ENV = "TURNOUT_ADMIN"
TOKEN_ENV = "TURNOUT_ADMIN_TOKEN"
DEFAULT_TIMEOUT = 10.0
MAX_ANSWER = 32 * 1024 * 1024
MAX_PROBLEMS = 500  # lines of an error answer's problem list shown at most
ROLLOUT_ACTIONS = ("start", "pause", "resume", "promote", "rollback", "abort")

# Every admin API answer carries this header; the client refuses answers without it.
ADMIN_HEADER = "X-Turnout-Admin"


class ClientError(Exception):
    """A client command failed; `exit_code` says how the process should end."""

    def __init__(
        self, message: str, exit_code: int = EXIT_RUNTIME, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status  # the admin API's HTTP status; None when it was never reached

    def __repr__(self) -> str:
        return f"ClientError({self.message!r}, exit_code={self.exit_code}, status={self.status})"


class AdminClient:
    """A blocking JSON client of the admin API, with a timeout on every call."""

    __slots__ = ("_opener", "base_url", "timeout", "token")

    def __init__(self, base_url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT) -> None:
        if token is not None and not _header_safe(token):
            raise ClientError(
                f"{TOKEN_ENV} holds characters that cannot go in an HTTP header", EXIT_USAGE
            )
        self.base_url = base_url.rstrip("/")
        self.token = token or None
        self.timeout = timeout
        # No ProxyHandler entries: the admin API is reached directly, whatever http_proxy says.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        auth = "token" if self.token else "no token"
        return f"<AdminClient {self.base_url} {auth} timeout={self.timeout:g}s>"

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.base_url + path
        headers = {"Accept": "application/json", "User-Agent": "turnout-cli"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
        if method not in ("GET", "HEAD"):
            # The admin API takes changes in JSON only (a cross-site form cannot send that).
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                self._check_admin(resp.headers)
                raw = resp.read(MAX_ANSWER + 1)
        except urllib.error.HTTPError as exc:
            raise self._refused(method, path, exc) from None
        except urllib.error.URLError as exc:
            raise ClientError(self._unreachable(exc.reason)) from None
        except (OSError, HTTPException) as exc:
            raise ClientError(self._unreachable(exc)) from None
        if len(raw) > MAX_ANSWER:
            raise ClientError(f"{method} {path}: the answer is larger than {MAX_ANSWER} bytes")
        return self._decode(method, path, raw)

    def _check_admin(self, headers: Message) -> None:
        """A success from something else (the proxy's own port, forwarding to the application)
        must not pass for one: the operator would believe a change was made."""
        if headers.get(ADMIN_HEADER) is None:
            raise ClientError(
                f"{self.base_url} is not a Turnout admin API (the proxy's own port? the admin "
                "API listens on admin.port, 9901 by default)"
            )

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, TimeoutError):
            return f"no answer from the admin API at {self.base_url} within {self.timeout:g}s"
        if isinstance(reason, RemoteDisconnected):
            return f"the admin API at {self.base_url} closed the connection without answering"
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused (is turnout running?)"
        elif isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror
        else:
            why = str(reason) or type(reason).__name__
        return f"cannot connect to the admin API at {self.base_url}: {why}"

    def _refused(self, method: str, path: str, exc: urllib.error.HTTPError) -> ClientError:
        try:
            raw = exc.read(65536)
        except (OSError, HTTPException):
            raw = b""
        finally:
            exc.close()
        error, detail = _error_fields(raw, exc.reason)
        message = f"{method} {path}: {exc.code} {error}"
        problems = _problem_list(detail)
        if problems:
            # Every problem, one a line as `turnout check` prints them: a refused reload
            # must show the whole list, not the first few hundred characters of it.
            return ClientError(
                _clean(f"{message}: {len(problems)} error(s)")
                + "".join(f"\n  {_clean(problem)}" for problem in problems),
                EXIT_RUNTIME,
                exc.code,
            )
        if detail not in (None, "", error):
            message += f": {_compact(detail, 400)}"
        if exc.code == 401 and not self.token:
            message += f" (set {TOKEN_ENV})"
        return ClientError(_clean(message), EXIT_RUNTIME, exc.code)

    @staticmethod
    def _decode(method: str, path: str, raw: bytes) -> dict[str, Any]:
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ClientError(f"{method} {path}: the admin API did not answer JSON") from None
        if not isinstance(data, dict):
            raise ClientError(f"{method} {path}: the admin API answered {type(data).__name__}")
        return data


def _header_safe(token: str) -> bool:
    return all(0x20 <= ord(c) < 0x7F for c in token)


def _problem_list(detail: Any) -> list[str] | None:
    """A detail that lists problems (an invalid config, an invalid upstream), else None."""
    if isinstance(detail, list) and detail and all(isinstance(d, str) for d in detail):
        return detail[:MAX_PROBLEMS] + (
            [f"... and {len(detail) - MAX_PROBLEMS} more"] if len(detail) > MAX_PROBLEMS else []
        )
    return None


def _error_fields(raw: bytes, reason: object) -> tuple[str, Any]:
    """The `error` and `detail` of an error answer, or its text when it is not the JSON shape."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        text = raw.decode("utf-8", "replace").strip()
        return str(reason or "error"), text[:400] or None
    if isinstance(data, dict) and "error" in data:
        return str(data["error"]), data.get("detail")
    return str(reason or "error"), data


# --- argument types -------------------------------------------------------------------------


def admin_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"invalid admin URL {value!r}: expected e.g. http://127.0.0.1:9901"
        )
    try:
        _ = parts.port  # a bad port raises here
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid admin URL {value!r}: bad port") from None
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"invalid admin URL {value!r}: no query or fragment")
    return value.strip()


def percent(value: str) -> float:
    text = value.strip().removesuffix("%")
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not 0.0 <= number <= 100.0:
        raise argparse.ArgumentTypeError(f"invalid PERCENT {value!r}: expected a number 0..100")
    return number


def duration(value: str) -> str:
    """A ramp duration as the admin API takes it (`30s`, `2m`); a bare number means seconds."""
    # Imported here: the config module pulls in pydantic, paid only when --over is given.
    from proxy.config import parse_duration

    text = value.strip()
    try:
        float(text)
    except ValueError:
        pass
    else:
        text += "s"
    try:
        parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def timeout_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"invalid timeout {value!r}: expected seconds > 0")
    return number


def pool_ref(value: str) -> tuple[str, int | None]:
    """`blue` or `green/1`: a pool, and optionally one upstream's index in it."""
    pool, slash, index = value.strip().partition("/")
    if pool not in POOLS:
        raise argparse.ArgumentTypeError(
            f"invalid POOL[/INDEX] {value!r}: the pool must be blue or green"
        )
    if not slash:
        return pool, None
    if not (index.isascii() and index.isdigit()):
        raise argparse.ArgumentTypeError(
            f"invalid POOL[/INDEX] {value!r}: INDEX must be a whole number, e.g. {pool}/0"
        )
    return pool, int(index)


# --- commands -------------------------------------------------------------------------------


def client_for(args: argparse.Namespace) -> AdminClient:
    return AdminClient(admin_base(args.admin), os.environ.get(TOKEN_ENV) or None, args.timeout)


def admin_base(given: str | None) -> str:
    """`--admin`, else $TURNOUT_ADMIN, else the default on loopback."""
    if given is not None:
        return given
    value = os.environ.get(ADMIN_ENV, "").strip()
    if not value:
        return DEFAULT_ADMIN
    try:
        return admin_url(value)
    except argparse.ArgumentTypeError as exc:
        raise ClientError(f"{ADMIN_ENV}: {exc}", exit_code=EXIT_USAGE) from None


def guarded(
    name: str, run: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """Turn a command into `func(args) -> exit code` that reports ClientError in one line."""

    def func(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except ClientError as exc:
            print(f"turnout {name}: {exc.message}", file=sys.stderr)
            return exc.exit_code

    func.__name__ = f"cmd_{name}"
    return func


def cmd_status(args: argparse.Namespace) -> int:
    status = client_for(args).request("GET", "/status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return EXIT_OK


def cmd_shift(args: argparse.Namespace) -> int:
    # `shift blue 30` is `shift green 70`: the admin API takes green's share.
    green = args.percent if args.pool == "green" else 100.0 - args.percent
    body: dict[str, Any] = {"green": green}
    if args.over is not None:
        body["over"] = args.over
    answer = client_for(args).request("PUT", "/split", body)
    how = f" over {args.over}" if args.over is not None else ""
    blue = f", blue {_pct(args.percent)}" if args.pool == "blue" else ""
    line = f"split: green {_pct(green)}{blue}{how}"
    if "before" in answer:
        line += f" (was {_split_text(answer['before'])})"
    print(_clean(line))
    return EXIT_OK


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.strategy is not None and args.action != "start":
        print("turnout rollout: --strategy applies only to start", file=sys.stderr)
        return EXIT_USAGE
    body = {"strategy": args.strategy} if args.strategy is not None else None
    answer = client_for(args).request("POST", f"/rollout/{args.action}", body)
    print(_outcome(f"rollout {args.action}", answer))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    try:
        answer = client_for(args).request("POST", "/reload")
    except ClientError as exc:
        if exc.status == 400:  # the file is invalid: a config error, as for `turnout check`
            exc.exit_code = EXIT_USAGE
        raise
    print("\n".join(_reload_lines(answer)))
    return EXIT_OK


def _reload_lines(answer: dict[str, Any]) -> list[str]:
    """`reload: ok`, what changed, and the settings that wait for a restart, in full."""
    before, after = answer.get("before"), answer.get("after")
    later: Any = None
    changes: list[str] = []
    kept: Any = None
    if isinstance(before, dict) and isinstance(after, dict):
        after = dict(after)
        later = after.pop("restart_needed", None)
        kept = after.pop("kept_by_rollout", None)
        for key in dict.fromkeys([*before, *after]):
            if before.get(key) != after.get(key):
                was, now = _compact(before.get(key), 300), _compact(after.get(key), 300)
                changes.append(f"  {_clean(str(key))}: {was} -> {now}")
    elif before != after:
        changes.append(f"  {_compact(before, 300)} -> {_compact(after, 300)}")
    lines = ["reload: ok", *changes]
    if isinstance(later, list) and later:
        names = ", ".join(_text(item) for item in later)
        lines.append(f"  restart needed: {names} (kept as they were until the next restart)")
    if isinstance(kept, dict):
        for key, why in kept.items():
            lines.append(f"  kept by the rollout in progress: {_text(key)} {_compact(why, 300)}")
    return lines


def drain_command(action: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        client = client_for(args)
        pool, index = args.target
        force = getattr(args, "force", False)
        if index is not None:
            indexes = [index]
        else:
            status = client.request("GET", "/status")
            indexes = _pool_indexes(status, pool)
            if action == "drain" and not force:
                _refuse_emptying_stable(status, pool)
        if not indexes:
            print(f"{action}: pool {pool} has no upstreams")
            return EXIT_OK
        body = {"force": True} if force else None
        failed = 0
        for i in indexes:
            path = f"/pools/{quote(pool, safe='')}/upstreams/{i}/{action}"
            try:
                answer = client.request("POST", path, body)
            except ClientError as exc:
                if exc.status is None or len(indexes) == 1:
                    raise
                print(f"turnout {action}: {exc.message}", file=sys.stderr)
                failed += 1
                continue
            print(_outcome(f"{action} {pool}/{i}", answer))
        return EXIT_RUNTIME if failed else EXIT_OK

    return run


def _refuse_emptying_stable(status: dict[str, Any], pool: str) -> None:
    """Draining a whole stable pool would push every request to the candidate: refused here,
    before any upstream is drained, as the admin API refuses the last one."""
    pools = status.get("pools")
    entry = pools.get(pool) if isinstance(pools, dict) else None
    upstreams = entry.get("upstreams") if isinstance(entry, dict) else None
    in_rotation = isinstance(upstreams, list) and any(
        isinstance(u, dict) and u.get("draining") is False for u in upstreams
    )
    split = status.get("split")
    share = split.get(pool) if isinstance(split, dict) else None
    if status.get("stable") != pool or not in_rotation or share == 0:
        return
    candidate = _text(status.get("candidate"))
    raise ClientError(
        f"{pool} is the stable pool: draining all of it would send every request to the"
        f" candidate pool {candidate} (or answer 503 if {candidate} is fenced after a"
        f" rollback). Promote {candidate} or shift the traffic first, or pass --force",
        status=409,
    )


def _pool_indexes(status: dict[str, Any], pool: str) -> list[int]:
    pools = status.get("pools")
    entry = pools.get(pool) if isinstance(pools, dict) else None
    if not isinstance(entry, dict):
        raise ClientError(f"the proxy's /status does not list pool {pool}")
    upstreams = entry.get("upstreams")
    if not isinstance(upstreams, list):
        return []
    indexes: list[int] = []
    for position, upstream in enumerate(upstreams):
        index = upstream.get("index") if isinstance(upstream, dict) else None
        ok = isinstance(index, int) and not isinstance(index, bool) and index >= 0
        indexes.append(index if ok and isinstance(index, int) else position)
    return indexes


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add status, shift, rollout, drain, undrain and reload to the `turnout` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        type=admin_url,
        default=None,
        metavar="URL",
        help=f"admin API of the running proxy (default ${ADMIN_ENV}, else {DEFAULT_ADMIN}); "
        f"the bearer token is read from {TOKEN_ENV}",
    )
    common.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on an admin call after this long (default {DEFAULT_TIMEOUT:g})",
    )

    status = sub.add_parser("status", parents=[common], help="show split, rollout and upstreams")
    status.add_argument("--json", action="store_true", help="print the raw /status JSON")
    status.set_defaults(func=guarded("status", cmd_status))

    shift = sub.add_parser("shift", parents=[common], help="set the share of traffic per pool")
    shift.add_argument(
        "pool", choices=["green", "blue"], metavar="POOL", help="green or blue: whose share"
    )
    shift.add_argument("percent", type=percent, metavar="PERCENT", help="0..100 for that pool")
    shift.add_argument(
        "--over", type=duration, metavar="DURATION", help="ramp linearly, e.g. 30s, 5m"
    )
    shift.set_defaults(func=guarded("shift", cmd_shift))

    rollout = sub.add_parser("rollout", parents=[common], help="drive the rollout")
    rollout.add_argument("action", choices=ROLLOUT_ACTIONS)
    rollout.add_argument("--strategy", choices=STRATEGIES, help="for start")
    rollout.set_defaults(func=guarded("rollout", cmd_rollout))

    for action, what in (("drain", "stop sending new requests to"), ("undrain", "send again to")):
        cmd = sub.add_parser(action, parents=[common], help=f"{what} a pool or one upstream")
        cmd.add_argument(
            "target", type=pool_ref, metavar="POOL[/INDEX]", help="e.g. blue (all) or green/1"
        )
        if action == "drain":
            cmd.add_argument(
                "--force",
                action="store_true",
                help="drain even the stable pool's last upstream in rotation",
            )
        cmd.set_defaults(func=guarded(action, drain_command(action)))

    reload = sub.add_parser("reload", parents=[common], help="re-read the config file")
    reload.set_defaults(func=guarded("reload", cmd_reload))


# --- rendering ------------------------------------------------------------------------------

COLUMNS = (
    "POOL/INDEX",
    "URL",
    "WEIGHT",
    "STATE",
    "BREAKER",
    "IN-FLIGHT",
    "QUEUED",
    "REQUESTS",
    "FAILURES",
)
NUMERIC = frozenset({"WEIGHT", "IN-FLIGHT", "QUEUED", "REQUESTS", "FAILURES"})
WINDOW_COLUMNS = ("REQUESTS", "ERRORS", "ERROR-RATE", "P50", "P99")
KNOWN_KEYS = frozenset(
    {
        "split",
        "stable",
        "candidate",
        "config",
        "listen",
        "ramp",
        "pools",
        "rollout",
        "fleet",
        "fenced",
        "state_file",
    }
)
FLEET_COLUMNS = ("MEMBER", "APPLIED", "LAG", "LAST-SEEN", "ADMIN", "NOTE")
ROLLOUT_KEYS = frozenset({"strategy", "state", "step", "steps", "reason", "windows"})


def format_status(status: dict[str, Any]) -> str:
    """The admin API's /status as a header block and one aligned row per upstream."""
    lines = [f"{label + ':':<11} {value}" for label, value in _header(status)]
    windows = _windows_table(_dict(_dict(status.get("rollout")).get("windows")))
    if windows:
        lines.append("")
        lines.extend(windows)
    members = _fleet_rows(_dict(status.get("fleet")))
    if members:
        lines.append("")
        lines.extend(_table(FLEET_COLUMNS, members, numeric=frozenset({"APPLIED", "LAG"})))
    lines.append("")
    rows = _upstream_rows(_dict(status.get("pools")))
    if rows:
        lines.extend(_table(COLUMNS, rows))
        lines.extend(_failed_checks(_dict(status.get("pools"))))
    else:
        lines.append("(no upstreams)")
    return "\n".join(_clean(line).rstrip() for line in lines)


def _failed_checks(pools: dict[str, Any]) -> list[str]:
    """Why each upstream that is down is: its last health check, under the table."""
    lines = []
    for pool, entry in pools.items():
        upstreams = _dict(entry).get("upstreams")
        for position, u in enumerate(upstreams if isinstance(upstreams, list) else []):
            if isinstance(u, dict) and u.get("healthy") is False and u.get("last_check"):
                index = _text(u.get("index", position))
                lines.append(f"{pool}/{index} down: last check {_text(u['last_check'])}")
    return ["", *lines] if lines else []


def _header(status: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("split", _split_text(status.get("split")))]
    for key in ("stable", "candidate", "config", "listen"):
        if status.get(key) is not None:
            out.append((key, _text(status[key])))
    if status.get("ramp") is not None:
        out.append(("ramp", _ramp_text(status["ramp"])))
    availability = _availability(_dict(status.get("pools")))
    if availability:
        out.append(("available", availability))
    state_file = status.get("state_file")
    if isinstance(state_file, dict):
        out.append(("state", _state_file_text(state_file)))
    fenced = status.get("fenced")
    if isinstance(fenced, dict):
        out.append(("fenced", f"{_text(fenced.get('pool'))}: {_text(fenced.get('reason'))}"))
    fleet = status.get("fleet")
    if isinstance(fleet, dict):
        out.append(("fleet", _fleet_text(fleet)))
    rollout = status.get("rollout")
    if isinstance(rollout, dict):
        out.extend(_rollout_lines(rollout))
    elif rollout is not None:
        out.append(("rollout", _text(rollout)))
    else:
        out.append(("rollout", "none"))
    out.extend((key, _text(status[key])) for key in status if key not in KNOWN_KEYS)
    return out


def _state_file_text(state_file: dict[str, Any]) -> str:
    words = [_text(state_file.get("path"))]
    if state_file.get("restored") is True:
        words.append("restored at start")
    written = state_file.get("written_at")
    if _is_number(written) and _finite(written):
        words.append(f"written {time.strftime('%H:%M:%S', time.localtime(written))}")
    if state_file.get("error"):
        words.append(f"ERROR {_text(state_file['error'])}")
    return ", ".join(words)


def _rollout_lines(rollout: dict[str, Any]) -> list[tuple[str, str]]:
    words = [_text(rollout[k]) for k in ("strategy", "state") if rollout.get(k) is not None]
    if rollout.get("step") is not None:
        step = f"step {_text(rollout['step'])}"
        steps = rollout.get("steps")
        if isinstance(steps, list) and steps:
            step += f" (steps {', '.join(_number(s) for s in steps)})"
        words.append(step)
    out = [("rollout", ", ".join(words) or "-")]
    if rollout.get("reason") not in (None, ""):
        out.append(("reason", _text(rollout["reason"])))
    extra = [k for k in rollout if k not in ROLLOUT_KEYS]
    out.extend((f"rollout.{k}", _text(rollout[k])) for k in extra)
    return out


def _fleet_text(fleet: dict[str, Any]) -> str:
    words = [
        f"{_text(fleet.get('name'))} as {_text(fleet.get('instance'))}",
        "leading" if fleet.get("leading") else f"leader {_text(fleet.get('leader'))}",
        "connected" if fleet.get("connected") else "CUT OFF from etcd",
        f"revision {_text(fleet.get('revision'))}",
    ]
    if fleet.get("fenced_writes"):
        words.append(f"{_text(fleet['fenced_writes'])} fenced write(s)")
    override = fleet.get("override")
    if isinstance(override, dict):
        words.append(f"local override: {_text(override.get('reason'))}")
    return ", ".join(words)


def _fleet_rows(fleet: dict[str, Any]) -> list[list[str]]:
    members = fleet.get("members")
    if not isinstance(members, list):
        return []
    rows = []
    for m in members:
        if not isinstance(m, dict):
            continue
        notes = []
        if m.get("instance") == fleet.get("leader"):
            notes.append("leader")
        if isinstance(m.get("lag"), int) and m["lag"] > 0:
            notes.append("LAGGING")
        if isinstance(m.get("override"), dict):
            notes.append("local override")
        seen = m.get("last_seen")
        rows.append(
            [
                _text(m.get("instance")),
                _number(m.get("applied_revision")),
                _number(m.get("lag")),
                f"{seen:.1f}s ago" if isinstance(seen, int | float) else "-",
                _text(m.get("admin")),
                ", ".join(notes) or "-",
            ]
        )
    return rows


def _windows_table(windows: dict[str, Any]) -> list[str]:
    rows = []
    for pool, window in windows.items():
        w = _dict(window)
        rows.append(
            [
                _text(pool),
                _number(w.get("requests")),
                _number(w.get("errors")),
                _rate(w.get("error_rate")),
                _ms(w.get("p50_ms")),
                _ms(w.get("p99_ms")),
            ]
        )
    return _table(("WINDOW", *WINDOW_COLUMNS), rows, numeric=frozenset(WINDOW_COLUMNS))


def _upstream_rows(pools: dict[str, Any]) -> list[list[str]]:
    rows = []
    for pool, entry in pools.items():
        upstreams = _dict(entry).get("upstreams")
        if not isinstance(upstreams, list):
            continue
        for position, u in enumerate(upstreams):
            if not isinstance(u, dict):
                continue
            index = u.get("index", position)
            rows.append(
                [
                    f"{pool}/{_text(index)}",
                    _text(u.get("url")),
                    _number(u.get("weight")),
                    _state(u),
                    _text(u.get("breaker")),
                    _number(u.get("in_flight")),
                    _number(u.get("queued")),
                    _number(u.get("requests")),
                    _number(u.get("failures")),
                ]
            )
    return rows


def _state(upstream: dict[str, Any]) -> str:
    state = upstream.get("state")
    if state is None:
        healthy = upstream.get("healthy")
        state = "-" if healthy is None else ("up" if healthy else "down")
    words = [_text(state)]
    if not words[0].startswith("drain"):
        for flag in ("drained", "draining"):
            if upstream.get(flag) is True:
                words.append(flag)
                break  # drained implies it was draining; say the stronger word only
    return ",".join(words)


def _availability(pools: dict[str, Any]) -> str:
    parts = []
    for pool, entry in pools.items():
        e = _dict(entry)
        if "available" not in e:
            continue
        upstreams = e.get("upstreams")
        of = f"/{len(upstreams)}" if isinstance(upstreams, list) else ""
        parts.append(f"{pool} {_number(e['available'])}{of}")
    return ", ".join(parts)


def _table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], numeric: frozenset[str] = NUMERIC
) -> list[str]:
    if not rows:
        return []
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]

    def line(cells: Iterable[str]) -> str:
        out = []
        for cell, column, width in zip(cells, columns, widths, strict=True):
            out.append(cell.rjust(width) if column in numeric else cell.ljust(width))
        return "  ".join(out)

    return [line(columns), *(line(r) for r in rows)]


# --- value formatting -----------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _number(value: Any) -> str:
    if not _is_number(value):
        return _text(value)
    if isinstance(value, int):
        if abs(value) < 10**18:
            return str(value)
        # str() of a huge int is slow or refused (sys.set_int_max_str_digits); show its size.
        return f"{'-' if value < 0 else ''}~1e{int(value.bit_length() * math.log10(2))}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e15:
        return f"{value:g}"
    if value.is_integer():
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _pct(value: Any) -> str:
    return f"{_number(value)}%" if _is_number(value) else _text(value)


def _rate(value: Any) -> str:
    if _is_number(value) and _finite(value) and abs(value) < 1e12:
        return f"{value * 100:.2f}%"
    return _text(value)


def _ms(value: Any) -> str:
    return f"{_number(value)}ms" if _is_number(value) else _text(value)


def _split_text(split: Any) -> str:
    if _is_number(split):
        return f"green {_pct(split)}"
    if isinstance(split, dict) and split:
        green, blue = split.get("green", ""), split.get("blue", "")
        if (
            _is_number(green)
            and _is_number(blue)
            and _finite(green)
            and abs(green + blue - 100.0) < 1e-6
        ):
            # Rounded once: the two shares shown still add up to 100.
            shown = round(float(green), 2)
            return f"green {_pct(shown)}, blue {_pct(round(100.0 - shown, 2))}"
        return ", ".join(f"{pool} {_pct(share)}" for pool, share in split.items())
    return _text(split)


def _ramp_text(ramp: Any) -> str:
    if not isinstance(ramp, dict):
        return _text(ramp)
    parts = [f"green to {_pct(ramp['target'])}"] if "target" in ramp else []
    remaining = ramp.get("remaining")
    if _is_number(remaining) and _finite(remaining):
        parts[-1:] = [f"{' '.join(parts[-1:])} in {_number(remaining)}s".lstrip()]
    parts.extend(f"{k} {_text(v)}" for k, v in ramp.items() if k != "target" and k != "remaining")
    return ", ".join(parts) or "-"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return _clean(value) or "-"
    if _is_number(value):
        return _number(value)
    return _compact(value, 120)


def _compact(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = _clean(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _outcome(action: str, answer: dict[str, Any]) -> str:
    line = action
    if answer.get("what") and answer["what"] != action:
        line += f": {_text(answer['what'])}"
    if "before" in answer and "after" in answer:
        line += f" ({_compact(answer['before'], 80)} -> {_compact(answer['after'], 80)})"
    elif len(line) == len(action):
        line += ": ok"
    return _clean(line)


def _clean(text: str) -> str:
    """Escape control characters from the server so one value cannot break the layout."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
