"""Load-tested cutovers: real users (locust) through a real Turnout while traffic moves.

    python -m loadtests.cutover --scenario eager [--duration 60] [--users 20] [--out DIR]
    python -m loadtests.cutover --scenario all

For one scenario the runner starts sample blue and green upstreams (`turnout upstream`) and the
proxy (`turnout run -c FILE`) as subprocesses, runs locust headless against the proxy with
loadtests/locustfile.py, triggers the scenario's cutover through the admin API a third of the
way in, samples /metrics every 0.5 s and listens to /events, and then reports requests,
failures and latency per phase (before, during, after the cutover), the realised share per
pool over time and the time to rollback. It writes, in DIR:

    NAME.json            the report (phases, checks, events, timeline)
    NAME.png             split, request rate and errors over time
    NAME_timeline.csv    the same per second
    NAME_requests.csv    one line per client request (from the locustfile)
    NAME.html, NAME_stats*.csv   locust's own report and statistics
    logs/NAME-*.log      output of every subprocess, and NAME.yaml, the proxy's config

It exits 1 when a scenario failed a client request it should not have, ended in the wrong
rollout state or could not run, and 0 otherwise (a scenario that cannot run here, such as
`restart` without `turnout run --takeover`, is reported as skipped).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
GRPC_LOCUSTFILE = Path(__file__).with_name("locust_grpc.py")
SAMPLE_EVERY = 0.5
STEPS = (10.0, 50.0, 100.0)
DRAIN_TIMEOUT = 5.0
TERMINAL_STATES = frozenset({"promoted", "rolled_back", "aborted"})
PHASES = ("before", "during", "after")
STREAM_NAME = "/stream"  # the locustfile's name for its slow streamed requests
# No proxy from the environment (http_proxy) between the runner and the admin API.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RunError(Exception):
    """The scenario could not be run as planned."""


# --- scenarios ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    """One cutover under load and what must be true at its end."""

    name: str
    summary: str
    strategy: str = "adaptive"
    expect_state: str | None = None
    expect_split: float | None = None
    initial_split: float = 0.0
    green_error_rate: float = 0.0
    extra_blue: bool = False
    # A non-idempotent request to a failing candidate is not retried, so not shielded.
    allow_post_failures: bool = False
    # Raising the split only ever moves a sticky client blue -> green.
    check_sticky: bool = False
    needs_takeover: bool = False
    # gRPC calls (locust_grpc.py) to grpc_upstream.py servers on h2c pools, health checked
    # with grpc.health.v1; green_error_rate is then the share of unary calls that fail.
    grpc: bool = False


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "eager",
            "POST /rollout/start eager: every green upstream healthy and through the gate, "
            "then the split goes to 100 at once",
            strategy="eager",
            expect_state="promoted",
            expect_split=100.0,
            check_sticky=True,
        ),
        Scenario(
            "lazy-ramp",
            "PUT /split green 100 over a third of the run: a linear ramp",
            strategy="lazy",
            expect_split=100.0,
            check_sticky=True,
        ),
        Scenario(
            "adaptive-good",
            f"POST /rollout/start adaptive with a healthy green: walks {STEPS}, promotes",
            expect_state="promoted",
            expect_split=100.0,
            check_sticky=True,
        ),
        Scenario(
            "adaptive-bad",
            "green answers 20% of ordinary requests with 503; adaptive start must roll back, "
            "GETs shielded by retries on blue",
            expect_state="rolled_back",
            expect_split=0.0,
            green_error_rate=0.2,
            allow_post_failures=True,
        ),
        Scenario(
            "drain-and-reload",
            "drain blue/0, reload a config with a second blue upstream and new weights, "
            "undrain blue/0",
            strategy="lazy",
            expect_state="idle",
            expect_split=0.0,
            extra_blue=True,
        ),
        Scenario(
            "restart",
            "hot restart: a second `turnout run --takeover` takes the listening sockets, "
            "the first drains and exits",
            strategy="lazy",
            expect_state="idle",
            expect_split=50.0,
            initial_split=50.0,
            needs_takeover=True,
        ),
        Scenario(
            "grpc-adaptive-good",
            "gRPC clients (unary, streaming both ways, one channel each) on h2c pools; "
            f"POST /rollout/start adaptive with a healthy green: walks {STEPS}, promotes",
            expect_state="promoted",
            expect_split=100.0,
            grpc=True,
        ),
        Scenario(
            "grpc-adaptive-bad",
            "gRPC clients; green ends 20% of unary calls with INTERNAL; adaptive start must "
            "roll back, every unary call shielded by a retry on blue (0 failed calls)",
            expect_state="rolled_back",
            expect_split=0.0,
            green_error_rate=0.2,
            grpc=True,
        ),
    )
}


# --- processes and HTTP ---------------------------------------------------------------------


def free_port() -> int:
    # A subprocess has to be told its port up front, so bind port 0, read the port and close:
    # another process could take it in between, which is acceptable for a load-test runner.
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class Processes:
    """Every subprocess of a run; `close` stops them all, newest first, on any exit path."""

    def __init__(self, logs: Path, prefix: str) -> None:
        self.logs = logs
        self.prefix = prefix
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_path = self.logs / f"{self.prefix}-{name}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(5.0)
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def http(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(OSError):
            if check():
                return
        time.sleep(0.1)
    raise RunError(f"timed out after {timeout:g}s waiting for {what}")


def answers(url: str) -> Callable[[], bool]:
    return lambda: http("GET", url, timeout=1.0)[0] == 200


def accepts(port: int) -> Callable[[], bool]:
    def connects() -> bool:
        try:
            socket.create_connection((HOST, port), timeout=1.0).close()
        except OSError:
            return False
        return True

    return connects


def has_takeover() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return "--takeover" in out.stdout


# --- observing the proxy --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One scrape of the proxy's /metrics."""

    t: float
    split: float
    state: str
    requests: dict[str, float]
    errors: dict[str, float]
    rescued: float
    retries: float
    rollback_count: float
    rollback_sum: float


def parse_metrics(text: str, t: float) -> Sample:
    requests = {"blue": 0.0, "green": 0.0}
    errors = {"blue": 0.0, "green": 0.0}
    split, state = 0.0, "unknown"
    rescued = retries = rb_count = rb_sum = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "turnout_requests_total":
                pool = labels.get("pool", "")
                requests[pool] = requests.get(pool, 0.0) + value
                if labels.get("code", "").startswith("5"):
                    errors[pool] = errors.get(pool, 0.0) + value
            elif name == "turnout_split_percent" and labels.get("pool") == "green":
                split = value
            elif name == "turnout_rollout_state" and value == 1.0:
                state = labels.get("state", state)
            elif name == "turnout_rescued_total":
                rescued = value
            elif name == "turnout_retries_total":
                retries += value
            elif name == "turnout_rollback_seconds_count":
                rb_count = value
            elif name == "turnout_rollback_seconds_sum":
                rb_sum = value
    return Sample(t, split, state, requests, errors, rescued, retries, rb_count, rb_sum)


class Sampler(threading.Thread):
    """Scrapes /metrics every SAMPLE_EVERY seconds; a failed scrape (a restart) is skipped."""

    def __init__(self, admin_url: str) -> None:
        super().__init__(name="sampler", daemon=True)
        self.url = admin_url + "/metrics"
        self.samples: list[Sample] = []
        self.failed_scrapes = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                status, body = http("GET", self.url, timeout=2.0)
                if status == 200:
                    self.samples.append(parse_metrics(body.decode(), time.monotonic()))
                else:
                    self.failed_scrapes += 1
            except (OSError, ValueError):
                self.failed_scrapes += 1
            self._halt.wait(SAMPLE_EVERY)

    def stop(self) -> None:
        self._halt.set()
        self.join(5.0)


@dataclass(frozen=True, slots=True)
class SeenEvent:
    t: float
    kind: str
    data: dict[str, Any]


class EventsReader(threading.Thread):
    """Follows GET /events (server-sent events) and notes when each event arrived."""

    def __init__(self, admin_port: int) -> None:
        super().__init__(name="events", daemon=True)
        self.port = admin_port
        self.events: list[SeenEvent] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with suppress(OSError):
                self._follow()
            self._halt.wait(0.5)  # the stream ended (a restart): connect again

    def _follow(self) -> None:
        with socket.create_connection((HOST, self.port), timeout=2.0) as sock:
            # HTTP/1.0: the answer is close-delimited, not chunked, so lines can be read as is.
            # The admin API answers only the names it has (DNS rebinding): its own address.
            sock.sendall(
                b"GET /events HTTP/1.0\r\nHost: %b:%d\r\n\r\n" % (HOST.encode(), self.port)
            )
            sock.settimeout(1.0)
            buffer = b""
            head_done = False
            while not self._halt.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                buffer += data
                if not head_done:
                    head, sep, rest = buffer.partition(b"\r\n\r\n")
                    if not sep:
                        continue
                    if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
                        return
                    buffer, head_done = rest, True
                *blocks, buffer = buffer.split(b"\n\n")
                for block in blocks:
                    self._parse(block.decode("utf-8", "replace"))

    def _parse(self, block: str) -> None:
        kind, data = "", ""
        for line in block.splitlines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        if kind and data:
            with suppress(ValueError):
                self.events.append(SeenEvent(time.monotonic(), kind, json.loads(data)))

    def stop(self) -> None:
        self._halt.set()
        self.join(3.0)


# --- one run --------------------------------------------------------------------------------


@dataclass
class Run:
    """The live parts of one scenario's run."""

    scenario: Scenario
    duration: int
    users: int
    out: Path
    procs: Processes
    ports: dict[str, int]
    config_path: Path
    proxy: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.ports['admin']}"

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        status, raw = http(method, self.admin_url + path, body)
        if status >= 400:
            raise RunError(f"{method} {path} answered {status}: {raw.decode(errors='replace')}")
        self.notes.append(f"{method} {path} {json.dumps(body) if body is not None else ''}")
        return json.loads(raw) if raw else None

    def upstream_url(self, name: str) -> str:
        return f"http://{HOST}:{self.ports[name]}"

    def write_config(self, *, extra_blue: bool) -> None:
        blue: list[dict[str, Any]] = [{"url": self.upstream_url("blue"), "weight": 1}]
        if extra_blue:
            blue.append({"url": self.upstream_url("blue-2"), "weight": 2})
        interval_ms = max(1000, int(self.duration * 1000 / 20))
        # Enough candidate outcomes to judge a step, but reachable at the first step (10%)
        # with few users (each sends about 6 requests a second) in a short run.
        first_step_rate = self.users * 6 * STEPS[0] / 100
        min_requests = max(10, min(30, int(first_step_rate * interval_ms / 1000 * 2)))
        protocol = "h2c" if self.scenario.grpc else "http1"
        config = {
            "listen": {"host": HOST, "port": self.ports["proxy"]},
            "admin": {"host": HOST, "port": self.ports["admin"]},
            "pools": {
                "blue": {"protocol": protocol, "upstreams": blue},
                "green": {"protocol": protocol, "upstreams": [{"url": self.upstream_url("green")}]},
            },
            "split": float(self.scenario.initial_split),
            "sticky": {"cookie": "sid"},
            "health_check": {"interval": "1s", "grpc": self.scenario.grpc},
            "drain": {"timeout": f"{DRAIN_TIMEOUT:g}s"},
            "rollout": {
                "strategy": self.scenario.strategy,
                "steps": list(STEPS),
                "interval": f"{interval_ms}ms",
                # The mix has half-second streams on both pools on purpose: the absolute p99
                # limit is raised above them and the comparison with blue judges latency.
                "threshold": {"min_requests": min_requests, "max_p99": "2s"},
            },
        }
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(self.config_path)  # the proxy never reads a half-written file

    def start_proxy(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.pop("TURNOUT_ADMIN_TOKEN", None)  # loopback admin, no token: the runner is the operator
        argv = [sys.executable, "-m", "proxy", "run", "-c", str(self.config_path), *extra]
        return self.procs.start(name, argv, env)

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proxy is not None and self.proxy.poll() is not None:
                raise RunError(f"the proxy exited with {self.proxy.returncode} (see its log)")
            return http("GET", self.admin_url + "/readyz", timeout=1.0)[0] == 200

        wait_until(ready, timeout, "the proxy's /readyz")


def trigger_rollout(strategy: str) -> Callable[[Run], float | None]:
    def trigger(run: Run) -> float | None:
        run.admin("POST", "/rollout/start", {"strategy": strategy})
        return None

    return trigger


def trigger_ramp(run: Run) -> float | None:
    run.admin("PUT", "/split", {"green": 100, "over": f"{run.duration / 3:.1f}s"})
    return None


def trigger_drain_and_reload(run: Run) -> float | None:
    pause = run.duration / 9
    # blue/0 is the stable pool's only upstream: draining it sends everything to green, which
    # the admin API refuses unless told so.
    run.admin("POST", "/pools/blue/upstreams/0/drain", {"force": True})
    time.sleep(pause)
    run.write_config(extra_blue=True)
    run.admin("POST", "/reload")
    time.sleep(pause)
    run.admin("POST", "/pools/blue/upstreams/0/undrain")
    return time.monotonic()


def trigger_restart(run: Run) -> float | None:
    old = run.proxy
    assert old is not None
    new = run.proxy = run.start_proxy("proxy-2", "--takeover")
    run.notes.append("started `turnout run --takeover`")

    def old_exited() -> bool:
        if new.poll() is not None:
            raise RunError(f"`turnout run --takeover` exited with {new.returncode} (see its log)")
        return old.poll() is not None

    wait_until(old_exited, DRAIN_TIMEOUT + 20.0, "the first proxy to exit after the takeover")
    code = old.returncode
    if code != 0:
        run.problems.append(f"the first proxy exited with {code} after the takeover")
    run.wait_ready()
    return time.monotonic()


TRIGGERS: dict[str, Callable[[Run], float | None]] = {
    "eager": trigger_rollout("eager"),
    "lazy-ramp": trigger_ramp,
    "adaptive-good": trigger_rollout("adaptive"),
    "adaptive-bad": trigger_rollout("adaptive"),
    "drain-and-reload": trigger_drain_and_reload,
    "restart": trigger_restart,
    "grpc-adaptive-good": trigger_rollout("adaptive"),
    "grpc-adaptive-bad": trigger_rollout("adaptive"),
}


def cutover_done(
    scenario: Scenario, events: list[SeenEvent], samples: list[Sample], since: float
) -> float | None:
    """When the cutover ended, from the events (exact) or else the samples (to 0.5 s)."""
    for event in events:
        if event.t < since:
            continue
        if event.kind == "rollout" and event.data.get("after") in TERMINAL_STATES:
            return event.t
        if scenario.name == "lazy-ramp" and event.kind == "split" and event.data.get("ramp"):
            return event.t
    for sample in samples:
        if sample.t < since:
            continue
        if sample.state in TERMINAL_STATES and scenario.expect_state in TERMINAL_STATES:
            return sample.t
        if scenario.name == "lazy-ramp" and sample.split >= 100.0:
            return sample.t
    return None


# --- what the clients saw -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    """One client request, as the locustfile logged it."""

    start: float
    method: str
    name: str
    status: int
    upstream: str
    ms: float
    failed: bool
    sid: str

    @property
    def pool(self) -> str:
        return pool_of(self.upstream)


def pool_of(upstream: str) -> str:
    """The pool of a sample upstream by its name: `blue-2` is in the blue pool."""
    return upstream.split("-")[0] if upstream != "-" else "-"


def read_hits(path: Path) -> list[Hit]:
    hits: list[Hit] = []
    if not path.exists():
        return hits
    with open(path, newline="", encoding="ascii", errors="replace") as f:
        for row in csv.DictReader(f):
            with suppress(KeyError, TypeError, ValueError):
                hits.append(
                    Hit(
                        float(row["start"]),
                        row["method"],
                        row["name"],
                        int(row["status"]),
                        row["upstream"],
                        float(row["ms"]),
                        row["failed"] == "1",
                        row["sid"],
                    )
                )
    hits.sort(key=lambda h: h.start)
    return hits


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class PhaseFigures:
    requests: int
    failed_get: int
    failed_post: int
    status_4xx: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    stream_p99_ms: float | None
    share: dict[str, float]
    seconds: float


def phase_figures(hits: list[Hit], seconds: float) -> PhaseFigures:
    # A /stream answer lasts half a second by design; its latency is reported on its own so
    # that p95 and p99 show what the cutover did to every other request.
    ms = sorted(h.ms for h in hits if h.name != STREAM_NAME)
    stream_ms = sorted(h.ms for h in hits if h.name == STREAM_NAME)
    by_pool: dict[str, int] = {}
    for h in hits:
        if h.pool != "-":
            by_pool[h.pool] = by_pool.get(h.pool, 0) + 1
    answered = sum(by_pool.values())
    share = (
        {p: round(100.0 * n / answered, 2) for p, n in sorted(by_pool.items())} if answered else {}
    )
    return PhaseFigures(
        requests=len(hits),
        failed_get=sum(1 for h in hits if h.failed and h.method != "POST"),
        failed_post=sum(1 for h in hits if h.failed and h.method == "POST"),
        status_4xx=sum(1 for h in hits if 400 <= h.status < 500),
        p50_ms=percentile(ms, 50),
        p95_ms=percentile(ms, 95),
        p99_ms=percentile(ms, 99),
        stream_p99_ms=percentile(stream_ms, 99),
        share=share,
        seconds=round(seconds, 2),
    )


def split_phases(
    hits: list[Hit], t0: float, trigger: float, done: float | None, end: float
) -> dict[str, PhaseFigures]:
    cut = done if done is not None else math.inf
    groups: dict[str, list[Hit]] = {p: [] for p in PHASES}
    for h in hits:
        groups["before" if h.start < trigger else "during" if h.start < cut else "after"].append(h)
    spans = {
        "before": trigger - t0,
        "during": (done if done is not None else end) - trigger,
        "after": max(0.0, end - done) if done is not None else 0.0,
    }
    return {p: phase_figures(groups[p], spans[p]) for p in PHASES}


def sticky_back_flips(hits: Iterable[Hit]) -> int:
    """Sticky clients that went from green back to blue (hits are in order of start)."""
    last: dict[str, str] = {}
    flipped: set[str] = set()
    for h in hits:
        if not h.sid or h.pool not in ("blue", "green"):
            continue
        if last.get(h.sid) == "green" and h.pool == "blue":
            flipped.add(h.sid)
        last[h.sid] = h.pool
    return len(flipped)


@dataclass(slots=True)
class Second:
    """One second of the run, client side (`answered`, failures) and proxy side (the rest)."""

    t: int
    split: float | None = None
    split_peak: float | None = None
    state: str = ""
    answered: dict[str, int] = field(default_factory=dict)  # by upstream name (X-Upstream)
    failed_get: int = 0
    failed_post: int = 0
    rescued: float = 0.0
    upstream_5xx: float = 0.0

    def pool(self, name: str) -> int:
        return sum(n for upstream, n in self.answered.items() if pool_of(upstream) == name)

    @property
    def realised_green(self) -> float | None:
        blue, green = self.pool("blue"), self.pool("green")
        return round(100.0 * green / (blue + green), 2) if blue + green else None


def _increase(prev: float, cur: float) -> float:
    # A counter that went down was reset (a restarted proxy): its new value is the increase.
    return cur - prev if cur >= prev else cur


def timeline(hits: list[Hit], samples: list[Sample], t0: float, end: float) -> list[Second]:
    seconds = [Second(i) for i in range(max(1, math.ceil(end - t0)))]
    n = len(seconds)
    for h in hits:
        i = int(h.start - t0)
        if not 0 <= i < n:
            continue
        sec = seconds[i]
        if h.upstream != "-":
            sec.answered[h.upstream] = sec.answered.get(h.upstream, 0) + 1
        if h.failed and h.method == "POST":
            sec.failed_post += 1
        elif h.failed:
            sec.failed_get += 1
    prev: Sample | None = None
    for s in samples:
        i = int(s.t - t0)
        if 0 <= i < n:
            sec = seconds[i]
            if prev is not None:
                sec.rescued += _increase(prev.rescued, s.rescued)
                sec.upstream_5xx += _increase(sum(prev.errors.values()), sum(s.errors.values()))
            sec.split, sec.state = s.split, s.state
            sec.split_peak = max(s.split, sec.split_peak or 0.0)
        prev = s
    for before, sec in pairwise(seconds):
        if sec.split is None:  # no sample in this second: the split stayed
            sec.split = sec.split_peak = before.split
            sec.state = before.state
    while len(seconds) > 1 and not seconds[-1].answered and not seconds[-1].failed_get:
        seconds.pop()  # locust had stopped
    return seconds


# --- the report -----------------------------------------------------------------------------


@dataclass
class Report:
    scenario: str
    summary: str
    status: str = "passed"  # passed | failed | skipped
    reasons: list[str] = field(default_factory=list)
    duration: int = 0
    users: int = 0
    requests: int = 0
    failed_get: int = 0
    failed_post: int = 0
    cutover_at: float | None = None
    cutover_took: float | None = None
    rollback_seconds: float | None = None
    final: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, Any] = field(default_factory=dict)
    sticky_back_flips: int = 0
    by_upstream: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.status = "failed"
        self.reasons.append(reason)


def check(report: Report, scenario: Scenario, hits: list[Hit]) -> None:
    if not hits:
        report.fail("locust logged no requests")
        return
    if report.failed_get:
        report.fail(f"{report.failed_get} failed GET request(s); expected none")
    if report.failed_post and not scenario.allow_post_failures:
        report.fail(f"{report.failed_post} failed POST request(s); expected none")
    state = report.final.get("state")
    if scenario.expect_state is not None and state != scenario.expect_state:
        report.fail(f"the rollout ended {state}; expected {scenario.expect_state}")
    split = report.final.get("split")
    if scenario.expect_split is not None and split != scenario.expect_split:
        report.fail(f"the split ended at {split}; expected {scenario.expect_split:g}")
    if scenario.check_sticky and report.sticky_back_flips:
        report.fail(f"{report.sticky_back_flips} sticky client(s) moved from green back to blue")
    if scenario.extra_blue:
        blue = report.final.get("pools", {}).get("blue", [])
        if len(blue) != 2 or any(u.get("draining") for u in blue):
            report.fail(f"blue should end with 2 upstreams, none draining: {blue}")
        if not report.by_upstream.get("blue-2"):
            report.fail("the upstream added by the reload answered no request")


def build_report(
    run: Run,
    hits: list[Hit],
    samples: list[Sample],
    events: list[SeenEvent],
    t0: float,
    trigger_at: float,
    done: float | None,
    end: float,
    final_status: dict[str, Any],
) -> tuple[Report, list[Second]]:
    scenario = run.scenario
    report = Report(scenario.name, scenario.summary, duration=run.duration, users=run.users)
    report.requests = len(hits)
    report.failed_get = sum(1 for h in hits if h.failed and h.method != "POST")
    report.failed_post = sum(1 for h in hits if h.failed and h.method == "POST")
    report.cutover_at = round(trigger_at - t0, 2)
    report.cutover_took = round(done - trigger_at, 2) if done is not None else None
    last = samples[-1] if samples else None
    if last is not None and last.rollback_count:
        report.rollback_seconds = round(last.rollback_sum / last.rollback_count, 3)
    rollout = final_status.get("rollout", {})
    report.final = {
        "state": rollout.get("state"),
        "split": final_status.get("split", {}).get("green"),
        "stable": final_status.get("stable"),
        "rescued": final_status.get("rescued"),
        "reason": rollout.get("reason"),
        "pools": {
            p: [
                {k: u.get(k) for k in ("url", "weight", "state", "draining", "requests")}
                for u in v.get("upstreams", [])
            ]
            for p, v in final_status.get("pools", {}).items()
        },
    }
    report.phases = {p: asdict(f) for p, f in split_phases(hits, t0, trigger_at, done, end).items()}
    report.sticky_back_flips = sticky_back_flips(hits)
    for h in hits:
        report.by_upstream[h.upstream] = report.by_upstream.get(h.upstream, 0) + 1
    report.notes = run.notes
    report.events = [
        {"t": round(e.t - t0, 3), "kind": e.kind, **e.data}
        for e in events
        if e.kind in ("rollout", "rollout_step", "breach", "split", "ramp", "drain", "reload")
        or e.kind.startswith(("drain", "undrain", "reload"))
    ]
    for reason in run.problems:
        report.fail(reason)
    check(report, scenario, hits)
    return report, timeline(hits, samples, t0, end)


def write_timeline_csv(path: Path, seconds: list[Second]) -> None:
    upstreams = sorted({u for s in seconds for u in s.answered})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["t", "split_green", "split_peak", "realised_green", *(f"{u}_rps" for u in upstreams),
             "failed_get", "failed_post", "rescued", "upstream_5xx", "rollout_state"]
        )  # fmt: skip
        for s in seconds:
            w.writerow(
                [s.t, s.split, s.split_peak, s.realised_green,
                 *(s.answered.get(u, 0) for u in upstreams),
                 s.failed_get, s.failed_post, s.rescued, s.upstream_5xx, s.state]
            )  # fmt: skip


def write_chart(path: Path, report: Report, seconds: list[Second]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t + 0.5 for s in seconds]
    fig, (top, mid, low) = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    fig.suptitle(f"{report.scenario}: {report.status}  ({report.users} users, {report.duration} s)")
    top.step(t, [s.split for s in seconds], where="mid", label="split (green %)")
    top.plot(t, [s.realised_green for s in seconds], ".", label="realised green share %")
    top.set_ylabel("green %")
    top.set_ylim(-5, 105)
    colours = {"blue": "tab:blue", "green": "tab:green"}
    for upstream in sorted({u for s in seconds for u in s.answered}):
        mid.plot(
            t,
            [s.answered.get(upstream, 0) for s in seconds],
            "-" if upstream in colours else "--",
            label=f"{upstream} req/s",
            color=colours.get(pool_of(upstream), "grey"),
        )
    mid.plot(t, [sum(s.answered.values()) for s in seconds], label="total", color="grey", lw=0.8)
    mid.set_ylabel("requests/s")
    low.bar(t, [s.failed_get for s in seconds], width=0.9, label="failed GETs", color="tab:red")
    low.bar(
        t,
        [s.failed_post for s in seconds],
        width=0.9,
        bottom=[s.failed_get for s in seconds],
        label="failed POSTs",
        color="tab:orange",
    )
    low.plot(t, [s.rescued for s in seconds], label="rescued by blue/s", color="tab:purple")
    low.plot(t, [s.upstream_5xx for s in seconds], ":", label="5xx answered/s", color="black")
    low.set_ylim(bottom=0, top=max(1.0, low.get_ylim()[1]))
    low.set_ylabel("per second")
    low.set_xlabel("seconds since load started")
    for ax in (top, mid, low):
        if report.cutover_at is not None:
            end = report.cutover_at + (report.cutover_took or 0.0)
            ax.axvspan(
                report.cutover_at, max(end, report.cutover_at + 0.2), color="gold", alpha=0.25
            )
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"


def print_report(report: Report, seconds: list[Second]) -> None:
    p = print
    p(f"\n== {report.scenario}: {report.status.upper()} ==")
    p(f"   {report.summary}")
    if report.status == "skipped":
        for reason in report.reasons:
            p(f"   skipped: {reason}")
        return
    p(
        f"   requests {report.requests}, failed GETs {report.failed_get}, failed POSTs "
        f"{report.failed_post}; cutover at {_fmt(report.cutover_at, ' s')}, took "
        f"{_fmt(report.cutover_took, ' s')}"
    )
    final = report.final
    p(f"   final: rollout {final.get('state')}, split {final.get('split')}, rescued "
      f"{final.get('rescued')}; {final.get('reason')}")  # fmt: skip
    if report.rollback_seconds is not None:
        p(f"   time to rollback (first failed green outcome to split 0): "
          f"{report.rollback_seconds * 1000:.0f} ms")  # fmt: skip
    p("   latency in ms by the time each request was sent; p50/p95/p99 leave out /stream")
    p(f"   {'phase':<7} {'secs':>6} {'reqs':>6} {'fGET':>5} {'fPOST':>5} {'4xx':>4} "
      f"{'p50':>7} {'p95':>7} {'p99':>7} {'stream':>7}  share")  # fmt: skip
    for name, f in report.phases.items():
        share = " ".join(f"{k} {v:.1f}%" for k, v in f["share"].items())
        p(
            f"   {name:<7} {f['seconds']:>6.1f} {f['requests']:>6} {f['failed_get']:>5} "
            f"{f['failed_post']:>5} {f['status_4xx']:>4} {_fmt(f['p50_ms']):>7} "
            f"{_fmt(f['p95_ms']):>7} {_fmt(f['p99_ms']):>7} {_fmt(f['stream_p99_ms']):>7}  {share}"
        )
    step = max(1, math.ceil(len(seconds) / 12))
    p("   over time (from t s: split at the end [peak], realised green share, req/s, failed):")
    for i in range(0, len(seconds), step):
        chunk = seconds[i : i + step]
        blue = sum(s.pool("blue") for s in chunk)
        green = sum(s.pool("green") for s in chunk)
        failed = sum(s.failed_get + s.failed_post for s in chunk)
        realised = 100.0 * green / (blue + green) if blue + green else None
        last, peak = chunk[-1].split, max((s.split_peak or 0.0 for s in chunk), default=0.0)
        split = _fmt(last) + (f" [{peak:.1f}]" if last is not None and peak > last else "")
        p(
            f"     t={chunk[0].t:>4}  split {split:<12} realised {_fmt(realised):>5}  "
            f"{(blue + green) / len(chunk):6.1f} req/s  failed {failed}"
        )
    for reason in report.reasons:
        p(f"   FAILED: {reason}")


# --- running a scenario ---------------------------------------------------------------------


def run_scenario(
    scenario: Scenario, duration: int, users: int, out: Path
) -> tuple[Report, list[Second]]:
    if scenario.needs_takeover and not has_takeover():
        report = Report(scenario.name, scenario.summary, status="skipped")
        report.reasons.append(
            "`turnout run --help` has no --takeover option yet (hot restart not implemented)"
        )
        return report, []
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    names = ["blue", "green", "proxy", "admin"] + (["blue-2"] if scenario.extra_blue else [])
    run = Run(
        scenario,
        duration,
        users,
        out,
        Processes(logs, scenario.name),
        {name: free_port() for name in names},
        logs / f"{scenario.name}.yaml",
    )
    try:
        return _run(run)
    except (RunError, OSError) as exc:
        report = Report(scenario.name, scenario.summary, duration=duration, users=users)
        report.fail(f"could not run: {exc}")
        return report, []
    finally:
        run.procs.close()


def _run(run: Run) -> tuple[Report, list[Second]]:
    scenario = run.scenario
    for name in ("blue", "blue-2", "green"):
        if name in run.ports:
            port = str(run.ports[name])
            if scenario.grpc:
                argv = [sys.executable, "-m", "loadtests.grpc_upstream", "--name", name]
                if name == "green" and scenario.green_error_rate:
                    argv += ["--fail-rate", str(scenario.green_error_rate)]
                    run.notes.append(f"green: --fail-rate {scenario.green_error_rate} (INTERNAL)")
                run.procs.start(name, [*argv, "--port", port])
            else:
                argv = [sys.executable, "-m", "proxy", "upstream", "--name", name]
                run.procs.start(name, [*argv, "--port", port])
    for name in ("blue", "blue-2", "green"):
        if name in run.ports:
            up = (
                accepts(run.ports[name])
                if scenario.grpc
                else answers(run.upstream_url(name) + "/healthz")
            )
            wait_until(up, 20.0, f"{name} up")
    if scenario.green_error_rate and not scenario.grpc:
        body = {"error_rate": scenario.green_error_rate, "error_status": 503}
        status, _ = http("POST", run.upstream_url("green") + "/_control", body)
        if status != 200:
            raise RunError(f"green's /_control answered {status}")
        run.notes.append(f"green: {json.dumps(body)}")
    run.write_config(extra_blue=False)
    run.proxy = run.start_proxy("proxy")
    run.wait_ready()

    sampler = Sampler(run.admin_url)
    reader = EventsReader(run.ports["admin"])
    sampler.start()
    reader.start()
    try:
        return _load(run, sampler, reader)
    finally:
        sampler.stop()
        reader.stop()


def _load(run: Run, sampler: Sampler, reader: EventsReader) -> tuple[Report, list[Second]]:
    scenario, out, name = run.scenario, run.out, run.scenario.name
    hits_path = out / f"{name}_requests.csv"
    hits_path.unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "locust", "-f",
        str(GRPC_LOCUSTFILE if scenario.grpc else LOCUSTFILE), "--headless",
        "-u", str(run.users), "-r", str(run.users), "-t", f"{run.duration}s",
        "--host", f"http://{HOST}:{run.ports['proxy']}",
        "--csv", str(out / name), "--csv-full-history", "--html", str(out / f"{name}.html"),
        "--only-summary", "--stop-timeout", "3",
    ]  # fmt: skip
    locust = run.procs.start("locust", argv, {**os.environ, "TURNOUT_LOAD_LOG": str(hits_path)})

    def started() -> bool:
        if locust.poll() is not None:
            raise RunError(f"locust exited with {locust.returncode} (see its log)")
        return hits_path.exists() and hits_path.stat().st_size > 60

    wait_until(started, 30.0, "locust's first request")
    t0 = time.monotonic()
    time.sleep(run.duration / 3)
    trigger_at = time.monotonic()
    done: float | None = None
    try:
        done = TRIGGERS[name](run)
    except (RunError, OSError) as exc:  # OSError: the admin API did not answer
        run.problems.append(f"cutover: {exc}")
    try:
        code = locust.wait(run.duration + 60.0)
    except subprocess.TimeoutExpired:
        raise RunError("locust did not end in time") from None
    end = time.monotonic()
    if run.proxy is not None and run.proxy.poll() is not None:
        run.problems.append(f"the proxy exited during the run with {run.proxy.returncode}")
    if code not in (0, 1):  # 1 only says that some request failed; the checks judge those
        run.problems.append(f"locust exited with {code}")
    final_status: dict[str, Any] = {}
    try:
        status, raw = http("GET", run.admin_url + "/status")
        if status != 200:
            run.problems.append(f"GET /status answered {status} at the end")
        else:
            final_status = json.loads(raw)
    except OSError as exc:
        run.problems.append(f"GET /status at the end: {exc}")
    time.sleep(SAMPLE_EVERY)  # one more scrape after the load
    if done is None:
        done = cutover_done(scenario, reader.events, sampler.samples, trigger_at)
    hits = read_hits(hits_path)
    report, seconds = build_report(
        run, hits, sampler.samples, reader.events, t0, trigger_at, done, end, final_status
    )
    (out / f"{name}.json").write_text(
        json.dumps({**asdict(report), "timeline": [asdict(s) for s in seconds]}, indent=1)
    )
    write_timeline_csv(out / f"{name}_timeline.csv", seconds)
    write_chart(out / f"{name}.png", report, seconds)
    return report, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.cutover",
        description="Cutovers under locust load through a real Turnout, with a report per run.",
    )
    parser.add_argument("--scenario", required=True, choices=[*SCENARIOS, "all"])
    parser.add_argument("--duration", type=int, default=60, help="seconds of load (>= 6)")
    parser.add_argument("--users", type=int, default=20, help="locust users (default 20)")
    parser.add_argument("--out", type=Path, default=Path("cutover-results"), help="report dir")
    args = parser.parse_args(argv)
    if args.duration < 6 or args.users < 1:
        parser.error("--duration must be >= 6 and --users >= 1")
    # SIGTERM unwinds like Ctrl-C, so every `finally` stops its subprocesses.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(SCENARIOS.values()) if args.scenario == "all" else [SCENARIOS[args.scenario]]
    reports: list[Report] = []
    for scenario in chosen:
        print(f"-- {scenario.name}: {args.users} users for {args.duration} s", flush=True)
        report, seconds = run_scenario(scenario, args.duration, args.users, out)
        reports.append(report)
        print_report(report, seconds)
    print("\n== summary ==")
    for r in reports:
        extra = f" ({'; '.join(r.reasons)})" if r.reasons else ""
        print(f"   {r.scenario:<17} {r.status:<8} requests {r.requests:>6}  failed GET "
              f"{r.failed_get} POST {r.failed_post}{extra}")  # fmt: skip
    print(f"   reports in {out}")
    return 1 if any(r.status == "failed" for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
