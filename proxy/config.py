"""Configuration: immutable pydantic models, durations, YAML loading and the built-in default.

Every model is frozen and forbids unknown keys; sequences are tuples. A bad configuration
is refused as a whole with one :class:`ConfigError` that lists every problem with its YAML
path (``rollout.steps[2]: must be > 25``).
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable
from itertools import pairwise
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainSerializer,
    PrivateAttr,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from proxy.logic.grpcstatus import CODES as GRPC_CODES
from proxy.logic.grpcstatus import DEFAULT_FAILURES as GRPC_DEFAULT_FAILURES
from proxy.logic.strategy import Strategy

__all__ = [
    "DEFAULT_CONFIG_YAML",
    "AccessLogConfig",
    "AdminConfig",
    "BreakerConfig",
    "Config",
    "ConfigError",
    "DrainConfig",
    "FleetConfig",
    "FleetTLS",
    "GateConfig",
    "HealthCheckConfig",
    "LimitsConfig",
    "ListenConfig",
    "PoolConfig",
    "PoolsConfig",
    "RetriesConfig",
    "RolloutConfig",
    "StickyConfig",
    "TLSListen",
    "ThresholdConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "UpstreamTLS",
    "default_config",
    "load_config",
    "parse_config",
    "parse_duration",
    "validation_problems",
]


class ConfigError(Exception):
    """A configuration was refused; ``errors`` holds every problem as ``path: message``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


Loc = tuple[int | str, ...]
Problems = list[tuple[Loc, str]]


def _problems_error(
    title: str, problems: Problems, earlier: ValidationError | None = None
) -> ValidationError:
    """One ValidationError holding pydantic's `earlier` errors and our own `problems`."""
    details = [
        InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"], ctx=e.get("ctx", {}))
        for e in (earlier.errors() if earlier is not None else ())
    ]
    details += [
        InitErrorDetails(
            type=PydanticCustomError("turnout", "{message}", {"message": message}),
            loc=loc,
            input=None,
        )
        for loc, message in problems
    ]
    return ValidationError.from_exception_data(title, details)


def _validate_also(
    title: str, handler: Callable[[Any], Any], value: Any, problems: Problems
) -> Any:
    """Run pydantic's validation of `value`, then report its errors together with `problems`.

    The cross-field `problems` are found on the raw input, so they are reported even when
    items or sibling fields have errors of their own (pydantic skips "after" validators then).
    """
    try:
        result = handler(value)
    except ValidationError as exc:
        raise _problems_error(title, problems, exc) from None
    if problems:
        raise _problems_error(title, problems)
    return result


# --- scalar types --------------------------------------------------------------------------

# One ASCII number and one unit: `\d` would also take full-width and other Unicode digits.
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION = 7 * 24 * 3600.0  # a week: no timeout or interval of a proxy needs more
MIN_DURATION = 0.001  # below a millisecond a timer only keeps the loop busy
MIN_INTERVAL = 0.01  # a periodic task (a health check) at most 100 times a second
MAX_COUNT = 1_000_000
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_duration(value: object) -> float:
    """Seconds from ``250ms``, ``2s``, ``1.5s``, ``1m``, ``1h`` or a bare number (seconds)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected e.g. 250ms, 2s, 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-") and _DURATION.fullmatch(text[1:]):
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        match = _DURATION.fullmatch(text)
        if match is None:
            raise ValueError(
                f"invalid duration {value!r}: expected a number with a unit ms, s, m or h "
                "(e.g. 250ms, 2s, 1.5s, 1m; one unit, ASCII digits)"
            )
        seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    else:
        raise ValueError(f"invalid duration {value!r}: expected e.g. 250ms, 2s, 1m")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: must be finite")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"invalid duration {value!r}: at most {MAX_DURATION // 3600:.0f}h")
    if 0 < seconds < MIN_DURATION:
        raise ValueError(f"invalid duration {value!r}: 0 or at least 1ms")
    return seconds


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be > 0")
    return seconds


def _interval(value: object) -> float:
    seconds = parse_duration(value)
    if seconds < MIN_INTERVAL:
        raise ValueError(f"interval {value!r} must be at least {MIN_INTERVAL * 1000:g}ms")
    return seconds


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_describe(value)}")
    return value


def _header_token(value: object) -> str:
    text = _string(value)
    if not _TOKEN.fullmatch(text):
        raise ValueError(f"{text!r} is not a valid header name")
    return text


def _readable_file(value: object) -> str:
    text = _string(value)
    if not text:
        raise ValueError("must be a file path, not empty")
    path = os.path.expanduser(text)
    if not os.path.exists(path):
        raise ValueError(f"file not found: {text}")
    if not os.path.isfile(path):
        raise ValueError(f"not a regular file: {text}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable: {text}")
    return path


def _host_name(value: object) -> str:
    text = _string(value)
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:
        port = None
        parts = None
    if (
        parts is None
        or port is not None
        or not parts.hostname
        or parts.netloc != text
        or any(c.isspace() for c in text)
    ):
        raise ValueError(f"{text!r} is not a host name or address (without a port)")
    return parts.hostname.rstrip(".")


def _host_field(value: object) -> str:
    """A Host field's value: a host name or address, with a port or not."""
    text = _string(value)
    try:
        parts = urlsplit(f"//{text}")
        _ = parts.port  # a bad port raises here
    except ValueError:
        parts = None
    if (
        parts is None
        or not parts.hostname
        or parts.netloc != text
        or "@" in text
        or any(c.isspace() or not c.isprintable() for c in text)
    ):
        raise ValueError(f"{text!r} is not a host[:port] for a Host field")
    return text


def _header_value(value: object) -> str:
    text = _string(value)
    if len(text) > 4096 or any(c in "\r\n\0" for c in text) or not text.isascii():
        raise ValueError("a header value must be ASCII, at most 4096 characters, no CR/LF/NUL")
    return text.strip()


# Set by the probe itself, or a framing field a probe must not carry.
_PROBE_OWN_FIELDS = frozenset({"host", "content-length", "transfer-encoding", "connection", "te"})


def _probe_headers(value: object) -> tuple[tuple[str, str], ...]:
    """A mapping of fields a health check adds, kept as (name, value) pairs (hashable, as
    every part of a configuration is)."""
    if not isinstance(value, dict):
        raise ValueError("must be a mapping of field names to values")
    pairs = tuple((_header_token(name), _header_value(text)) for name, text in value.items())
    taken = [name for name, _ in pairs if name.lower() in _PROBE_OWN_FIELDS]
    if taken:
        raise ValueError(f"{taken[0]} cannot be set here (Host: use `host`)")
    return pairs


def _url_path(value: object) -> str:
    text = _string(value)
    if not text.startswith("/") or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} must be a path starting with '/', without spaces")
    return text


def _tls_version(value: object) -> object:
    # YAML reads an unquoted 1.2 as a float.
    if isinstance(value, float) and not isinstance(value, bool):
        return {1.2: "1.2", 1.3: "1.3"}.get(value, value)
    return value


def _log_target(value: object) -> str:
    # YAML 1.1 readers (yaml.safe_load) turn a bare `off` into False.
    if value is False:
        return "off"
    text = _string(value)
    if not text:
        raise ValueError("must be stdout, stderr, off or a file path, not empty")
    return text


def _upstream_protocol(value: object) -> str:
    text = _string(value)
    if text not in ("http1", "h2c", "h2"):
        raise ValueError(f"must be http1, h2c or h2, not {text!r}")
    return text


def _method(value: object) -> str:
    text = _string(value)
    if not _TOKEN.fullmatch(text):
        raise ValueError(f"{text!r} is not a valid HTTP method")
    return text.upper()


def _retry_on(value: object) -> object:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if 500 <= value <= 599:
            return value
        raise ValueError(f"status {value} is not a 5xx status (500..599)")
    if value in ("connect_error", "timeout"):
        return value
    raise ValueError(f"must be connect_error, timeout or a status 500..599, not {_describe(value)}")


def _shield_entry(value: object) -> object:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if 500 <= value <= 599:
            return value
        raise ValueError(f"status {value} is not a 5xx status (500..599)")
    if isinstance(value, str) and value.strip().lower() == "5xx":
        return "5xx"
    raise ValueError(f"must be a status 500..599 or 5xx, not {_describe(value)}")


def shield_statuses(entries: tuple[int | str, ...]) -> frozenset[int]:
    """The statuses a `rollout.shield` list names (a class names its hundred statuses)."""
    statuses: set[int] = set()
    for entry in entries:
        if entry == "5xx":
            statuses.update(range(500, 600))
        elif isinstance(entry, int):
            statuses.add(entry)
    return frozenset(statuses)


def _upstream_url(value: object) -> str:
    _split_url(_string(value))
    return str(value)


def _split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an upstream URL, or ValueError saying what is wrong."""
    if not url or any(c.isspace() for c in url):
        raise ValueError(f"invalid url {url!r}: empty or contains spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid url {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"invalid url {url!r}: must be http://host:port or https://host:port")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"invalid url {url!r}: must not contain user info")
    if not parts.hostname:
        raise ValueError(f"invalid url {url!r}: no host")
    try:
        parts.hostname.encode("idna")  # as the resolver will
    except UnicodeError:
        raise ValueError(f"invalid url {url!r}: not a valid host name") from None
    if parts.path not in ("", "/"):
        raise ValueError(f"invalid url {url!r}: must not have a path ({parts.path!r})")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"invalid url {url!r}: must not have a query or fragment")
    if port == 0:
        raise ValueError(f"invalid url {url!r}: port must be 1..65535")
    if port is None:
        port = 443 if scheme == "https" else 80
    return scheme, parts.hostname, port


Port = Annotated[int, Strict(), Field(ge=0, le=65535)]
# Counts that size queues and tables, or are divided among workers: bounded so that a typo of
# a few digits is an error at check time rather than an overflow at run time.
Count = Annotated[int, Strict(), Field(ge=1, le=MAX_COUNT)]
Host = Annotated[str, Strict(), Field(min_length=1)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]
Interval = Annotated[float, BeforeValidator(_interval)]
FilePath = Annotated[str, BeforeValidator(_readable_file)]
HeaderName = Annotated[str, BeforeValidator(_header_token)]
HostField = Annotated[str, BeforeValidator(_host_field)]
# Kept as pairs, written back as the mapping it was given (the workers read it again).
ProbeHeaders = Annotated[
    tuple[tuple[str, str], ...],
    BeforeValidator(_probe_headers),
    PlainSerializer(dict, return_type=dict[str, str]),
]
HostName = Annotated[str, BeforeValidator(_host_name)]
UrlPath = Annotated[str, BeforeValidator(_url_path)]
Ratio = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]
Step = Annotated[float, Strict(), Field(gt=0, le=100, allow_inf_nan=False)]
Method = Annotated[str, BeforeValidator(_method)]
RetryOn = Annotated[Literal["connect_error", "timeout"] | int, BeforeValidator(_retry_on)]
# The statuses the rollout's analysis counts as failures: a status 500..599 or the class 5xx.
ShieldEntry = Annotated[Literal["5xx"] | int, BeforeValidator(_shield_entry)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- models ----------------------------------------------------------------------------------


class TLSListen(_Model):
    """Server-side TLS of a listener (the proxy port or the admin port)."""

    cert: FilePath
    key: FilePath
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"


class ListenConfig(_Model):
    """Where clients connect."""

    host: Host = "0.0.0.0"
    port: Port = 8080
    max_connections: Count = 10000
    tls: TLSListen | None = None
    # HTTP/2 from clients beside HTTP/1.1: h2c with prior knowledge, ALPN h2 with tls.
    http2: Annotated[bool, Strict()] = True
    # An HTTP/1.1 request head: its target (414 beyond), its header fields in bytes (name,
    # value and 4 bytes each) and in number (431 beyond).
    max_request_target: Annotated[int, Strict(), Field(ge=256, le=1_048_576)] = 8192
    max_header_bytes: Annotated[int, Strict(), Field(ge=1024, le=1_048_576)] = 32768
    max_header_fields: Annotated[int, Strict(), Field(ge=8, le=10_000)] = 100


class AdminConfig(_Model):
    """The admin API listener; the token is read from the environment variable `token_env`."""

    host: Host = "127.0.0.1"
    port: Port = 9901
    token_env: Annotated[str, Strict(), Field(min_length=1)] = "TURNOUT_ADMIN_TOKEN"
    tls: TLSListen | None = None
    allowed_hosts: tuple[HostName, ...] = ()


class AccessLogConfig(_Model):
    """JSON-lines access log: `to` is stdout, stderr, off or a file path."""

    to: Annotated[str, BeforeValidator(_log_target)] = "off"
    sample: Ratio = 1.0


class UpstreamConfig(_Model):
    """One upstream endpoint of a pool."""

    url: Annotated[str, BeforeValidator(_upstream_url)]
    weight: Annotated[int, Strict(), Field(ge=1, le=1000)] = 1

    _scheme: str = PrivateAttr(default="http")
    _host: str = PrivateAttr(default="")
    _port: int = PrivateAttr(default=0)

    def model_post_init(self, context: Any, /) -> None:
        self._scheme, self._host, self._port = _split_url(self.url)

    @property
    def scheme(self) -> str:
        return self._scheme

    @property
    def host(self) -> str:
        """The host name or address; an IPv6 address comes without brackets."""
        return self._host

    @property
    def port(self) -> int:
        return self._port


class UpstreamTLS(_Model):
    """Client-side TLS towards a pool's https:// upstreams (a CA, and a client pair for mTLS)."""

    ca: FilePath | None = None
    cert: FilePath | None = None
    key: FilePath | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _cert_and_key_together(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        problems: Problems = []
        if isinstance(data, dict):
            has_cert, has_key = data.get("cert") is not None, data.get("key") is not None
            if has_cert and not has_key:
                problems.append((("key",), "required when cert is given"))
            if has_key and not has_cert:
                problems.append((("cert",), "required when key is given"))
        result: Self = _validate_also(cls.__name__, handler, data, problems)
        return result


class PoolHealthCheck(_Model):
    """A pool's own Host and fields for its health checks, over the global ones."""

    host: HostField | None = None
    headers: ProbeHeaders = ()


class PoolConfig(_Model):
    """A named group of upstreams."""

    upstreams: tuple[UpstreamConfig, ...] = ()
    tls: UpstreamTLS | None = None
    # How Turnout speaks to the pool's upstreams: HTTP/1.1, HTTP/2 over plain TCP (prior
    # knowledge) or HTTP/2 over TLS (ALPN h2).
    protocol: Annotated[str, BeforeValidator(_upstream_protocol)] = "http1"
    health_check: PoolHealthCheck | None = None

    @model_validator(mode="after")
    def _schemes_fit_the_protocol(self) -> Self:
        problems: Problems = [
            (("upstreams", index, "url"), problem)
            for index, upstream in enumerate(self.upstreams)
            if (problem := self.unfit(upstream)) is not None
        ]
        if problems:
            raise _problems_error("PoolConfig", problems)
        return self

    def unfit(self, upstream: UpstreamConfig) -> str | None:
        """Why this pool's protocol cannot reach `upstream` (None when it can)."""
        want = {"h2c": "http", "h2": "https"}.get(self.protocol)
        if want is not None and upstream.scheme != want:
            return f"protocol {self.protocol} needs {want}:// URLs"
        return None

    @field_validator("upstreams", mode="wrap")
    @classmethod
    def _no_duplicates(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        seen: dict[tuple[str, str, int], int] = {}
        problems: Problems = []
        for index, item in enumerate(value if isinstance(value, list | tuple) else ()):
            url = item.get("url") if isinstance(item, dict) else None
            try:
                key = _split_url(url) if isinstance(url, str) else None
            except ValueError:
                key = None
            if key is None:
                continue
            if key in seen:
                problems.append(((index, "url"), f"duplicate of upstreams[{seen[key]}]"))
            else:
                seen[key] = index
        return _validate_also("upstreams", handler, value, problems)


class PoolsConfig(_Model):
    """The two pools: blue and green."""

    blue: PoolConfig
    green: PoolConfig


class StickyConfig(_Model):
    """Hash a cookie or a header so a client stays on one pool (the cookie wins)."""

    cookie: HeaderName | None = None
    header: HeaderName | None = None


class TimeoutsConfig(_Model):
    """Timeouts towards upstreams, and inactivity bounds on every phase of an exchange."""

    connect: PositiveDuration = 2.0
    response_headers: PositiveDuration = 30.0
    idle: PositiveDuration = 60.0
    request_headers: PositiveDuration = 10.0
    # No byte moved in the phase for this long ends the exchange (nginx's client_body_timeout
    # and send_timeout, HAProxy's timeout client / server / tunnel).
    client_body: PositiveDuration = 30.0
    client_send: PositiveDuration = 30.0
    upstream_body: PositiveDuration = 30.0
    tunnel_idle: PositiveDuration = 300.0


class LimitsConfig(_Model):
    """Per-upstream admission: in-flight limit, bounded queue, optional rate (requests/s)."""

    max_in_flight: Count = 256
    queue: Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)] = 512
    queue_timeout: PositiveDuration = 1.0
    rate: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] | None = None


class BreakerConfig(_Model):
    """Per-upstream circuit breaker."""

    consecutive_failures: Annotated[int, Strict(), Field(ge=1)] = 5
    failure_ratio: Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)] = 0.5
    min_requests: Annotated[int, Strict(), Field(ge=1)] = 20
    window: PositiveDuration = 10.0
    open_for: PositiveDuration = 5.0
    half_open_requests: Annotated[int, Strict(), Field(ge=1)] = 3


class HealthCheckConfig(_Model):
    """Active health checks of every upstream."""

    path: UrlPath = "/healthz"
    interval: Interval = 2.0
    timeout: PositiveDuration = 1.0
    healthy_after: Annotated[int, Strict(), Field(ge=1)] = 2
    unhealthy_after: Annotated[int, Strict(), Field(ge=1)] = 3
    # gRPC's grpc.health.v1.Health/Check instead of a GET of `path` (HTTP/2 pools only).
    grpc: Annotated[bool, Strict()] = False
    service: Annotated[str, Strict(), Field(max_length=256)] = ""
    # What the checks (and the rollout gate) send as Host, instead of the upstream URL's
    # host:port (an app that checks Host, e.g. Django's ALLOWED_HOSTS), and fields to add.
    host: HostField | None = None
    headers: ProbeHeaders = ()


class RetriesConfig(_Model):
    """Which failed requests are retried, how often, within which budget."""

    attempts: Annotated[int, Strict(), Field(ge=0, le=10)] = 2
    budget: Ratio = 0.2
    # The floor of the budget: this many retries per second are allowed whatever the ratio.
    min_per_second: Annotated[float, Strict(), Field(ge=0, le=MAX_COUNT, allow_inf_nan=False)] = (
        10.0
    )
    methods: tuple[Method, ...] = ("GET", "HEAD", "OPTIONS")
    on: tuple[RetryOn, ...] = ("connect_error", 502, 503, 504)

    @field_validator("methods", "on")
    @classmethod
    def _dedupe(cls, items: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(dict.fromkeys(items))


class DrainConfig(_Model):
    """How long draining connections (e.g. WebSockets) get before they are closed."""

    timeout: Duration = 30.0


def _grpc_code(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 16:
        return next(name for name, code in GRPC_CODES.items() if code == value)
    text = _string(value).upper()
    if text not in GRPC_CODES:
        raise ValueError(f"{value!r} is not a gRPC status code (a name such as UNAVAILABLE)")
    return text


class GrpcConfig(_Model):
    """gRPC calls (content-type application/grpc): which grpc-status codes count as the
    server's failure for the analysis, the shield and retries."""

    failures: tuple[Annotated[str, BeforeValidator(_grpc_code)], ...] = GRPC_DEFAULT_FAILURES


class ThresholdConfig(_Model):
    """Limits green must stay within for an adaptive rollout to advance."""

    max_error_rate: Ratio = 0.01
    max_p99: PositiveDuration = 0.5
    max_p99_ratio: Annotated[float, Strict(), Field(ge=1, allow_inf_nan=False)] = 1.5
    min_requests: Annotated[int, Strict(), Field(ge=1)] = 50


class GateConfig(_Model):
    """Checked on every green upstream before each rollout step."""

    # None: the health check's path (Config.gate_path), so that fixing health_check.path
    # alone does not leave every rollout blocked on a path the app does not serve.
    path: UrlPath | None = None
    expect_status: Annotated[int, Strict(), Field(ge=100, le=599)] = 200


class RolloutConfig(_Model):
    """How a rollout moves the split from the stable pool to the candidate."""

    strategy: Strategy = "adaptive"
    steps: Annotated[tuple[Step, ...], Field(min_length=1)] = (1.0, 5.0, 25.0, 50.0, 100.0)
    interval: Duration = 10.0
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    fallback: Literal["rollback", "pause"] = "rollback"
    gate: GateConfig = Field(default_factory=GateConfig)
    shield: tuple[ShieldEntry, ...] = ("5xx",)

    @field_validator("shield")
    @classmethod
    def _dedupe(cls, items: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(dict.fromkeys(items))

    @field_validator("steps", mode="wrap")
    @classmethod
    def _increasing_to_100(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        items = list(value) if isinstance(value, list | tuple) else []
        # Order is checked between items that are valid on their own; the others have errors.
        valid = [
            (index, float(step))
            for index, step in enumerate(items)
            if isinstance(step, int | float) and not isinstance(step, bool) and 0 < step <= 100
        ]
        problems: Problems = [
            ((index,), f"must be > {previous:g}")
            for (_, previous), (index, step) in pairwise(valid)
            if step <= previous
        ]
        if valid and valid[-1][0] == len(items) - 1 and valid[-1][1] != 100:
            problems.append(((len(items) - 1,), "the last step must be 100"))
        return _validate_also("steps", handler, value, problems)


def _etcd_url(value: object) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid etcd endpoint {text!r}: must be http(s)://host:port")
    try:
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError as exc:
        raise ValueError(f"invalid etcd endpoint {text!r}: {exc}") from None
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError(f"invalid etcd endpoint {text!r}: must not have a path or query")
    return text.rstrip("/")


def _fleet_name(value: object) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", text):
        raise ValueError(
            f"invalid name {text!r}: 1-63 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return text


EtcdURL = Annotated[str, BeforeValidator(_etcd_url)]
FleetName = Annotated[str, BeforeValidator(_fleet_name)]


class FleetTLS(_Model):
    """TLS towards etcd: a CA, and a client pair for mTLS."""

    ca: FilePath | None = None
    cert: FilePath | None = None
    key: FilePath | None = None


class FleetConfig(_Model):
    """Many instances following one rollout through an etcd v3 cluster."""

    etcd: Annotated[tuple[EtcdURL, ...], Field(min_length=1)] = ("http://127.0.0.1:2379",)
    name: FleetName = "default"
    instance: FleetName | None = None
    lease_ttl: Annotated[float, BeforeValidator(_positive_duration), Field(ge=1, le=60)] = 3.0
    partition_policy: Literal["hold", "local_rollback"] = "local_rollback"
    tls: FleetTLS | None = None


class Config(_Model):
    """The whole configuration of one Turnout process: an immutable snapshot."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig)
    pools: PoolsConfig
    split: Annotated[float, Strict(), Field(ge=0, le=100, allow_inf_nan=False)] = 0.0
    balancer: Literal["round_robin", "random", "least_request"] = "least_request"
    sticky: StickyConfig = Field(default_factory=StickyConfig)
    # null turns forcing a pool off: the header then passes to the upstream like any other.
    override_header: HeaderName | None = "X-Turnout-Pool"
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig)
    retries: RetriesConfig = Field(default_factory=RetriesConfig)
    drain: DrainConfig = Field(default_factory=DrainConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    fleet: FleetConfig | None = None
    # Where the routing state (split, stable pool, rollout) is kept across restarts: `auto`
    # beside the configuration file, a path, or `off` (null). Not used with `fleet`.
    state_file: Annotated[str, Strict(), Field(min_length=1, max_length=4096)] | None = "auto"

    @property
    def gate_path(self) -> str:
        """The path the rollout gate asks: its own, else the health check's."""
        return self.rollout.gate.path or self.health_check.path

    @model_validator(mode="after")
    def _grpc_checks_need_http2(self) -> Self:
        if self.health_check.grpc:
            problems: Problems = [
                (("pools", name, "protocol"), "health_check.grpc needs protocol h2c or h2")
                for name in ("blue", "green")
                if getattr(self.pools, name).protocol == "http1"
            ]
            if problems:
                raise _problems_error("Config", problems)
        return self

    @model_validator(mode="after")
    def _listeners_apart(self) -> Self:
        listen, admin = self.listen, self.admin
        wildcard = ("0.0.0.0", "::")
        same_host = listen.host == admin.host or listen.host in wildcard or admin.host in wildcard
        if listen.port != 0 and listen.port == admin.port and same_host:
            problem = (("admin", "port"), f"same as listen.port ({listen.port})")
            raise _problems_error("Config", [problem])
        return self


# --- errors ----------------------------------------------------------------------------------

_TYPE_MESSAGES = {
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "literal_error": "must be {expected}",
}
_BOUND_MESSAGES = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _format_loc(loc: Loc) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path or "(top level)"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _messages(error: Any) -> Problems:
    loc: Loc = tuple(error["loc"])
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    if kind == "missing":
        return [(loc, "required")]
    if kind == "extra_forbidden":
        return [(loc, "unknown key")]
    if kind == "value_error":
        return [(loc, str(ctx.get("error")))]
    if kind == "turnout":
        return [(loc, str(error["msg"]))]
    if kind in _TYPE_MESSAGES:
        message = _TYPE_MESSAGES[kind].format(**ctx)
        return [(loc, f"{message}, not {_describe(error.get('input'))}")]
    if kind in _BOUND_MESSAGES:
        key, op = _BOUND_MESSAGES[kind]
        return [(loc, f"must be {op} {_number(ctx[key])}")]
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return [(loc, "must not be empty")]
    if kind == "finite_number":
        return [(loc, "must be a finite number")]
    return [(loc, str(error["msg"]).removeprefix("Value error, "))]


def validation_problems(exc: ValidationError) -> list[str]:
    """`path: message` lines of a model's ValidationError, worded as `turnout check` words them."""
    return [
        f"{_format_loc(loc)}: {message}"
        for error in exc.errors()
        for loc, message in _messages(error)
    ]


# --- parsing and loading -----------------------------------------------------------------------


def _string_keys(
    value: object, path: tuple[object, ...] = (), inside: frozenset[int] = frozenset()
) -> object:
    """A copy of parsed YAML whose mapping keys are all strings, so every key gets a path.

    YAML 1.1 readers turn the key ``on`` into True; under ``retries`` it means ``on``. An
    alias that contains itself (``a: &a [*a]``) is an error, not an endless structure.
    """
    if isinstance(value, dict | list | tuple):
        if id(value) in inside:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
            raise ConfigError(
                [f"{where.lstrip('.') or '(top level)'}: a YAML alias that contains itself"]
            )
        inside = inside | {id(value)}
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            if key is True and path == ("retries",) and "on" not in value:
                name = "on"
            elif isinstance(key, bool) or key is None:
                name = {True: "true", False: "false", None: "null"}[key]
            else:
                name = str(key)
            out[name] = _string_keys(item, (*path, name), inside)
        return out
    if isinstance(value, list | tuple):
        return [_string_keys(item, (*path, index), inside) for index, item in enumerate(value)]
    return value


def parse_config(data: object) -> Config:
    """Validate already-parsed YAML data; ConfigError lists every problem with its path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping, not {_describe(data)}"])
    try:
        return Config.model_validate(_string_keys(data))
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc)) from None


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


# A configuration is a few hundred values, nested a few levels: these bounds are far above any
# real file and refuse bombs (alias expansion, deep nesting, huge numbers) before they cost.
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 64
MAX_VALUES = 100_000
MAX_INT_CHARS = 32


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (only true/false, so `off` stays a string); duplicate keys refused;
    nesting, alias expansion and integer length bounded."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # The composer recurses once per level: without a bound, [[[[... ends in RecursionError.
        if self._depth >= MAX_NESTING:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"nested deeper than {MAX_NESTING} levels",
                self.peek_event().start_mark,  # type: ignore[no-untyped-call]
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        # Aliases share nodes, so a small document may stand for an exponential tree of values:
        # count the tree as it would be built (each shared node once) before building any of it.
        if node is not None and _expanded_size(node, {}, set()) > MAX_VALUES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"the document expands to more than {MAX_VALUES:,} values (YAML aliases?)",
                node.start_mark,
            )
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_INT_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer longer than {MAX_INT_CHARS} characters", node.start_mark
            )
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKeyError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], inside: set[int]) -> int:
    """How many values `node` stands for with every alias expanded; stops counting past
    MAX_VALUES. An alias that contains itself counts once (it is reported later, with its path)."""
    key = id(node)
    known = sizes.get(key)
    if known is not None:
        return known
    if key in inside or not isinstance(node, yaml.CollectionNode):
        return 1
    inside.add(key)
    total = 1
    children = (
        [part for pair in node.value for part in pair]
        if isinstance(node, yaml.MappingNode)
        else node.value
    )
    for child in children:
        total += _expanded_size(child, sizes, inside)
        if total > MAX_VALUES:
            break
    inside.discard(key)
    sizes[key] = total
    return total


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        if isinstance(exc, _DuplicateKeyError):
            raise ConfigError([f"{where}: {exc.problem}"]) from None
        problem = exc.problem or exc.context or "cannot parse"
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None


def _read_text(source: str) -> str:
    """A configuration file's text: a regular file of at most MAX_CONFIG_BYTES. Opened without
    blocking, so a FIFO is refused rather than waited on, and never read past the bound."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as file:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise ConfigError([f"{source}: cannot read: {kind}"])
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: larger than {MAX_CONFIG_BYTES >> 20} MiB"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: {exc.reason}"]) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML configuration file."""
    source = os.fspath(path)
    data = _load_yaml(_read_text(source), source)
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"{source}: top level must be a mapping, not {_describe(data)}"])
    return parse_config(data)


DEFAULT_CONFIG_YAML = """\
# Turnout built-in default configuration: used when no -c FILE is given and
# config/turnout.yaml does not exist. Every key left out takes its default.
listen:
  host: 0.0.0.0
  port: 8080
admin:
  host: 127.0.0.1
  port: 9901
pools:
  blue:
    upstreams:
      - url: http://127.0.0.1:9001
  green:
    upstreams:
      - url: http://127.0.0.1:9002
"""


def default_config() -> Config:
    """The built-in default configuration (DEFAULT_CONFIG_YAML)."""
    return parse_config(_load_yaml(DEFAULT_CONFIG_YAML, "<built-in default>"))
