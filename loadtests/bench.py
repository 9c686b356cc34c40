"""Side-by-side benchmark: direct, Turnout, and (when installed) nginx and HAProxy as proxies.

    python -m loadtests.bench                      # 3 rounds x 10 s, 100 B, 64 and 256 connections
    python -m loadtests.bench --sizes 100,16384,1048576 --rounds 3
    python -m loadtests.bench --rate 8000        # latency at one offered rate, 64 vs 256 conns
    python -m loadtests.bench --scrape 1         # Turnout with /metrics scraped every second too
    python -m loadtests.bench --dashboard        # Turnout with its dashboard open too
    python -m loadtests.bench --slow-clients 200 # normal requests while slow POSTs attack
    python -m loadtests.bench --extra naive="python ../shared/bench/naive_proxy.py --port {port} \
        --upstream {blue}=90 --upstream {green}=10"
    python -m loadtests.bench --h2               # HTTP/2 clients (h2c, h2load), HTTP/1.1 upstreams
    python -m loadtests.bench --h2 --upstream-h2 # HTTP/2 on both sides (h2c upstreams)
    python -m loadtests.bench --grpc             # gRPC unary calls, HTTP/2 on both sides
    python -m loadtests.bench --turnout-build before=../old/.venv/bin/python  # two builds

Needs wrk (apt-get install wrk). The upstream is nginx serving fixed bodies when nginx is
installed (apt-get install nginx), else Turnout's sample upstream (much slower, so the
proxies' ratios to "direct" then say little). HAProxy is measured when installed
(apt-get install haproxy). When Turnout's data path is compiled (see setup.py) the same
Turnout also runs from its Python sources (turnout-py, TURNOUT_PURE=1): what compiling gains.
This script installs nothing. Every proxy runs as one process
pinned to core 1; wrk and the upstream share core 0. Rounds are interleaved and medians
reported; quote the ratios, not the absolute figures.

With --h2 the clients speak HTTP/2 with prior knowledge (h2load from apt-get install
nghttp2-client, 4 connections sharing the --connections streams) to every proxy, which speaks
HTTP/1.1 to the upstream. With --upstream-h2 too the upstream is nginx speaking h2c, every
proxy speaks HTTP/2 to it (Turnout `protocol: h2c`, HAProxy `proto h2`, nginx `grpc_pass`,
its only HTTP/2 client) and "direct" is h2load on nginx itself. --grpc is that with gRPC unary
calls: a POST of a 100-byte message (gRPC framing, `content-type: application/grpc`), answered
by nginx with a 100-byte message and a `grpc-status: 0` trailer (`add_trailer`), so the
upstream costs what a static file does and the proxies' gRPC handling is what differs.

--slow-clients N measures something else: the success rate and p99 of normal requests (a paced
--rate, default 200/s) without and then during an attack of N slow-POST clients on each proxy,
each proxy with its stock timeouts (Turnout's defaults, nginx's, the HAProxy config below).
Each attacker sends a request head and one body byte, then nothing, and connects again a
tenth of a second after the proxy hangs up. The upstreams are then Turnout's sample upstreams,
which read a request body before they answer, as applications do (nginx serving files answers
a POST at once, and the attack would hold nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

from proxy import native

HOST = "127.0.0.1"
PROXY_CORE = "1"
LOAD_CORE = "0"
SIZES = {100: "b100", 16384: "b16k", 1048576: "b1m"}


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rss_mib: float = 0.0  # peak
    idle_mib: float = 0.0  # before the load
    after_mib: float = 0.0  # a second after it
    cpu_us: float = 0.0  # the proxy process's CPU time per request served (user + system)
    requests: int = 0  # completed, any status
    timeouts: int = 0  # not completed within wrk's timeout (counted in errors too)


def free_port() -> int:
    # The benchmark starts third-party servers that need a port number up front.
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(OSError), socket.create_connection((HOST, port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout}s")


def find_tool(name: str) -> str | None:
    path = shutil.which(name)
    if path is None and Path("/usr/sbin", name).exists():
        path = str(Path("/usr/sbin", name))
    return path


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") else argv


@contextmanager
def process(
    argv: list[str], port: int, core: str, timeout: float = 10.0
) -> Iterator[subprocess.Popen[bytes]]:
    log = open(os.devnull, "wb") if os.environ.get("BENCH_QUIET", "1") == "1" else None  # noqa: SIM115
    proc = subprocess.Popen(pinned(core, argv), stdout=log, stderr=log)
    try:
        wait_port(port, timeout)
        yield proc
    finally:
        proc.terminate()
        if proc.poll() not in (None, 0, -15):
            print(f"{argv[0]} exited with {proc.returncode}", file=sys.stderr)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


GRPC_MESSAGE = b"\x00\x00\x00\x00\x64" + b"m" * 100  # a 100-byte message in gRPC's framing


def nginx_upstream_conf(root: Path, ports: list[int], tmp: Path, *, h2: bool = False) -> str:
    listens = "\n".join(f"    listen {HOST}:{p} reuseport{' http2' if h2 else ''};" for p in ports)
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-up.pid;
error_log {tmp}/nginx-up.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/ptemp;
  fastcgi_temp_path {tmp}/f; uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;
  server {{
{listens}
    root {root};
    location /healthz {{ return 200 "ok"; }}
    # A gRPC unary answer from a file: POST allowed (error_page turns 405 into the file).
    location /grpc/ {{
      default_type application/grpc;
      add_trailer grpc-status 0;
      error_page 405 =200 $uri;
    }}
  }}
}}
"""


def nginx_proxy_conf(
    port: int, blue: int, green: int, tmp: Path, *, h2: bool = False, upstream_h2: bool = False
) -> str:
    # nginx speaks HTTP/2 to upstreams only as grpc_pass.
    location = (
        "grpc_pass grpc://app;"
        if upstream_h2
        else "proxy_pass http://app;\n      proxy_http_version 1.1;\n"
        '      proxy_set_header Connection "";'
    )
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-proxy.pid;
error_log {tmp}/nginx-proxy.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {tmp}/pbody;
  proxy_temp_path {tmp}/pptemp;
  fastcgi_temp_path {tmp}/pf; uwsgi_temp_path {tmp}/pu; scgi_temp_path {tmp}/ps;
  upstream app {{
    server {HOST}:{blue} weight=90;
    server {HOST}:{green} weight=10;
    keepalive 512;
  }}
  server {{
    listen {HOST}:{port}{" http2" if h2 else ""};
    location / {{
      {location}
    }}
  }}
}}
"""


H2LOAD_RPS = re.compile(r"finished in [\d.]+\w+, ([\d.]+) req/s")
H2LOAD_FAILED = re.compile(r"requests: .*? (\d+) failed, (\d+) errored, (\d+) timeout")
H2_CONNECTIONS = 4


def h2load(url: str, streams: int, duration: int, tmp: Path, grpc: bool = False) -> Result:
    """HTTP/2 load: H2_CONNECTIONS connections carrying `streams` concurrent streams in all;
    latency percentiles from h2load's per-request log (microseconds, third column). With
    `grpc`, every request is a gRPC unary call (see --grpc)."""
    log = tmp / "h2load.log"
    clients = min(H2_CONNECTIONS, streams)
    argv = ["h2load", f"-c{clients}", f"-m{max(1, streams // clients)}", f"-D{duration}"]
    if grpc:
        body = tmp / "grpc-request"
        body.write_bytes(GRPC_MESSAGE)
        argv += [f"--data={body}", "-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv += [f"--log-file={log}", url]
    out = subprocess.run(pinned(LOAD_CORE, argv), capture_output=True, text=True).stdout
    rps_match = H2LOAD_RPS.search(out)
    failed = H2LOAD_FAILED.search(out)
    times = (
        sorted(
            int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.strip()
        )
        if log.exists()
        else []
    )

    def pct(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))] if times else 0.0

    return Result(
        rps=float(rps_match.group(1)) if rps_match else 0.0,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        errors=sum(int(g) for g in failed.groups()) if failed else 0,
    )


def haproxy_conf(
    port: int, blue: int, green: int, *, h2: bool = False, upstream_h2: bool = False
) -> str:
    proto = " proto h2" if upstream_h2 else ""
    return f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind {HOST}:{port}{" proto h2" if h2 else ""}
  default_backend app
backend app
  balance roundrobin
  server blue {HOST}:{blue} weight 90{proto}
  server green {HOST}:{green} weight 10{proto}
"""


UPSTREAM_PROTOCOL = "http1"  # --upstream-h2: h2c


def turnout_conf(port: int, blue: int, green: int, admin: int = 0) -> str:
    protocol = UPSTREAM_PROTOCOL
    return f"""
listen: {{host: {HOST}, port: {port}}}
admin: {{host: {HOST}, port: {admin}}}
pools:
  blue: {{protocol: {protocol}, upstreams: [{{url: "http://{HOST}:{blue}"}}]}}
  green: {{protocol: {protocol}, upstreams: [{{url: "http://{HOST}:{green}"}}]}}
split: 10
"""


WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_REQUESTS = re.compile(r"(\d+) requests in ")
WRK_PCT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
WRK_ERR = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)|Socket errors:.*?(\d+) timeout", re.S)
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


# At a fixed offered rate each connection waits an exponentially distributed time (mean
# connections / rate) after each response before its next request, so the arrivals of all
# connections together are close to a Poisson stream of `rate` requests per second, however
# many connections carry them. wrk measures latency from the request's write, without the
# wait. (wrk stays closed-loop per connection: a stall delays that connection's next request.)
PACED_LUA = """
local mean_ms = {mean_ms}
function delay()
  return math.floor(-mean_ms * math.log(1 - math.random()))
end
"""


def wrk(
    url: str, connections: int, duration: int, rate: int = 0, tmp: Path | None = None
) -> Result:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if rate:
        assert tmp is not None
        script = tmp / f"paced-{connections}-{rate}.lua"
        script.write_text(PACED_LUA.format(mean_ms=connections * 1000 / rate))
        argv += ["-s", str(script)]
    argv = pinned(LOAD_CORE, [*argv, url])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps_match = WRK_RPS.search(out)
    pct = {m.group(1): float(m.group(2)) * UNIT_MS[m.group(3)] for m in WRK_PCT.finditer(out)}
    errors = sum(int(g) for m in WRK_ERR.finditer(out) for g in m.groups() if g)
    timeouts = sum(int(m.group(2)) for m in WRK_ERR.finditer(out) if m.group(2))
    requests_match = WRK_REQUESTS.search(out)
    return Result(
        rps=float(rps_match.group(1)) if rps_match else 0.0,
        p50_ms=pct.get("50", 0.0),
        p99_ms=pct.get("99", 0.0),
        errors=errors,
        requests=int(requests_match.group(1)) if requests_match else 0,
        timeouts=timeouts,
    )


@contextmanager
def scraping(url: str | None, every: float) -> Iterator[list[int]]:
    """Read `url` every `every` seconds in a thread while the block runs, as Prometheus
    would; yields a one-item list counting the reads (empty when there is no url)."""
    if url is None:
        yield []
        return
    count = [0]
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(every):
            with suppress(OSError), urllib.request.urlopen(url, timeout=5) as resp:
                resp.read()
                count[0] += 1

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join()


@contextmanager
def dashboard_open(admin: str | None) -> Iterator[list[int]]:
    """What an open dashboard (`GET /ui`) asks of the admin API while the block runs: the page
    and its assets once, `/status` every second and one `/events` stream held open; yields a
    one-item list counting the /status reads (empty when there is no admin URL)."""
    if admin is None:
        yield []
        return
    count = [0]
    stop = threading.Event()

    def poll() -> None:
        for path in ("/ui", "/ui/app.js", "/ui/style.css", "/ui/icon.svg"):
            with suppress(OSError), urllib.request.urlopen(admin + path, timeout=5) as resp:
                resp.read()
        while not stop.wait(1.0):
            with suppress(OSError), urllib.request.urlopen(admin + "/status", timeout=5) as resp:
                resp.read()
                count[0] += 1

    def stream() -> None:
        with suppress(OSError), urllib.request.urlopen(admin + "/events?replay=100") as resp:
            while not stop.is_set() and resp.read1(65536):
                pass

    threads = [threading.Thread(target=t, daemon=True) for t in (poll, stream)]
    for thread in threads:
        thread.start()
    try:
        yield count
    finally:
        stop.set()
        threads[0].join()
        # The stream thread ends at the next event or keep-alive, or with the process.


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far, user and system (less noisy than req/s on a busy host)."""
    with suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM)."""
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", default="64,256")
    ap.add_argument("--sizes", default="100", help="response sizes: 100,16384,1048576")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="NAME=COMMAND, another proxy; {port}, {blue}, {green} are substituted",
    )
    ap.add_argument(
        "--turnout-variant",
        action="append",
        default=[],
        metavar="NAME=YAML",
        help="another Turnout run with YAML lines added to its config, e.g. "
        "log='access_log: {to: /tmp/access.log}'; {tmp} is a scratch directory",
    )
    ap.add_argument(
        "--turnout-build",
        action="append",
        default=[],
        metavar="NAME=PYTHON",
        help="another build of Turnout (another checkout's virtualenv python, e.g. "
        "before=../old/.venv/bin/python) with the same config: before/after in one run",
    )
    ap.add_argument("--only", help="comma-separated targets to measure (e.g. turnout,haproxy)")
    ap.add_argument("--h2", action="store_true", help="HTTP/2 clients (h2load) instead of wrk")
    ap.add_argument(
        "--upstream-h2", action="store_true", help="HTTP/2 (h2c) to the upstream too (see above)"
    )
    ap.add_argument(
        "--grpc", action="store_true", help="gRPC unary calls, HTTP/2 on both sides (see above)"
    )
    ap.add_argument(
        "--rate",
        type=int,
        default=0,
        help="offer this many requests/s in all (paced connections) instead of as many as "
        "possible: compares latency across --connections at the same offered load",
    )
    ap.add_argument(
        "--slow-clients",
        type=int,
        default=0,
        metavar="N",
        help="measure normal requests without and during an attack of N slow-POST clients "
        "(see above) instead of throughput",
    )
    ap.add_argument(
        "--scrape",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also measure a Turnout whose /metrics is read every SECONDS (metrics on vs off)",
    )
    ap.add_argument(
        "--dashboard",
        action="store_true",
        help="also measure a Turnout with its dashboard open: /status read every second and "
        "an /events stream held, as the page does (page open vs closed)",
    )
    args = ap.parse_args(argv)
    if args.grpc:
        args.h2 = args.upstream_h2 = True
    if args.upstream_h2:
        args.h2 = True
        global UPSTREAM_PROTOCOL
        UPSTREAM_PROTOCOL = "h2c"
    if args.h2 and not shutil.which("h2load"):
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    if not args.h2 and not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    conns = [int(c) for c in args.connections.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        if size not in SIZES:
            print(f"--sizes: choose among {sorted(SIZES)}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="turnout-bench-") as tmpname:
        tmp = Path(tmpname)
        if args.slow_clients:
            return run_slow(args, conns[0], tmp)
        return run(args, conns, sizes, tmp)


def run(args: argparse.Namespace, conns: list[int], sizes: list[int], tmp: Path) -> int:
    # nginx's workers run as an unprivileged user: the files must be readable by anyone.
    tmp.chmod(0o755)
    root = tmp / "www"
    root.mkdir(mode=0o755)
    for size, name in SIZES.items():
        (root / name).write_bytes(b"x" * size)
    blue, green = free_port(), free_port()
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    haproxy = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    direct = not args.h2 or args.upstream_h2  # h2load speaks only HTTP/2
    targets: dict[str, tuple[list[str], int] | None] = {"direct": None} if direct else {}
    port = free_port()
    (tmp / "turnout.yaml").write_text(turnout_conf(port, blue, green))
    turnout_cmd = [sys.executable, "-m", "proxy", "run", "-c", str(tmp / "turnout.yaml")]
    targets["turnout"] = (turnout_cmd, port)
    # A compiled build runs from its sources once any of them changed since the install:
    # say which one is measured.
    print(f"turnout: {native.describe()}", file=sys.stderr, flush=True)
    if native.BUILD == "compiled":
        # The same Turnout from its Python sources: what compiling the data path gains.
        port = free_port()
        (tmp / "turnout-py.yaml").write_text(turnout_conf(port, blue, green))
        source_cmd = ["env", "TURNOUT_PURE=1", *turnout_cmd[:-1], str(tmp / "turnout-py.yaml")]
        targets["turnout-py"] = (source_cmd, port)
    scrapes: dict[str, str] = {}
    if args.scrape:
        # The same Turnout, its /metrics read every `--scrape` seconds while wrk runs.
        port, admin = free_port(), free_port()
        (tmp / "turnout-scraped.yaml").write_text(turnout_conf(port, blue, green, admin))
        targets["turnout-scraped"] = (
            [sys.executable, "-m", "proxy", "run", "-c", str(tmp / "turnout-scraped.yaml")],
            port,
        )
        scrapes["turnout-scraped"] = f"http://{HOST}:{admin}/metrics"
    dashboards: dict[str, str] = {}
    if args.dashboard:
        # The same Turnout, its dashboard open while wrk runs.
        port, admin = free_port(), free_port()
        (tmp / "turnout-dashboard.yaml").write_text(turnout_conf(port, blue, green, admin))
        targets["turnout-dashboard"] = (
            [sys.executable, "-m", "proxy", "run", "-c", str(tmp / "turnout-dashboard.yaml")],
            port,
        )
        dashboards["turnout-dashboard"] = f"http://{HOST}:{admin}"
    for spec in args.turnout_variant:
        name, _, extra = spec.partition("=")
        port = free_port()
        conf = tmp / f"turnout-{name}.yaml"
        conf.write_text(turnout_conf(port, blue, green) + extra.replace("{tmp}", str(tmp)) + "\n")
        targets[f"turnout-{name}"] = (
            [sys.executable, "-m", "proxy", "run", "-c", str(conf)],
            port,
        )
    for spec in args.turnout_build:
        name, _, python = spec.partition("=")
        port = free_port()
        conf = tmp / f"turnout-{name}.yaml"
        conf.write_text(turnout_conf(port, blue, green))
        # -P: the other build's own package, not this checkout's from the current directory.
        argv = [python, "-P", "-m", "proxy", "run", "-c", str(conf)]
        targets[f"turnout-{name}"] = (argv, port)
    if nginx:
        port = free_port()
        (tmp / "nginx-proxy.conf").write_text(
            nginx_proxy_conf(port, blue, green, tmp, h2=args.h2, upstream_h2=args.upstream_h2)
        )
        targets["nginx"] = ([nginx, "-c", str(tmp / "nginx-proxy.conf")], port)
    else:
        print("nginx not installed (apt-get install nginx): skipped", file=sys.stderr)
    if haproxy:
        port = free_port()
        (tmp / "haproxy.cfg").write_text(
            haproxy_conf(port, blue, green, h2=args.h2, upstream_h2=args.upstream_h2)
        )
        targets["haproxy"] = ([haproxy, "-f", str(tmp / "haproxy.cfg")], port)
    else:
        print("haproxy not installed (apt-get install haproxy): skipped", file=sys.stderr)
    for spec in args.extra:
        name, _, cmd = spec.partition("=")
        port = free_port()
        argv = shlex.split(
            cmd.format(port=port, blue=f"http://{HOST}:{blue}", green=f"http://{HOST}:{green}")
        )
        targets[name] = (argv, port)

    if args.only:
        keep = set(args.only.split(","))
        targets = {name: spec for name, spec in targets.items() if name in keep}
    if nginx:
        (tmp / "nginx-up.conf").write_text(
            nginx_upstream_conf(root, [blue, green], tmp, h2=args.upstream_h2)
        )
        upstream_cmds = [([nginx, "-c", str(tmp / "nginx-up.conf")], blue)]
        paths = {size: "/" + name for size, name in SIZES.items()}
        if args.grpc:
            (root / "grpc").mkdir(mode=0o755)
            (root / "grpc" / "Call").write_bytes(GRPC_MESSAGE)
            paths = dict.fromkeys(sizes, "/grpc/Call")
    else:
        upstream_cmds = [
            ([sys.executable, "-m", "proxy", "upstream", "--name", n, "--port", str(p)], p)
            for n, p in (("blue", blue), ("green", green))
        ]
        paths = {size: f"/bytes/{size}" for size in SIZES}

    results: dict[tuple[str, int, int], list[Result]] = {}
    with (
        process(upstream_cmds[0][0], upstream_cmds[0][1], LOAD_CORE),
        process(*upstream_cmds[1], LOAD_CORE) if len(upstream_cmds) > 1 else nullcontext(),
    ):
        order = list(targets.items())
        for rnd in range(args.rounds):
            # Each round starts with the next target: whatever favours the first (or the last)
            # one measured in a round falls on each in turn.
            for name, spec in order[rnd % len(order) :] + order[: rnd % len(order)]:
                ctx = process(spec[0], spec[1], PROXY_CORE) if spec else nullcontext()
                with ctx as proc:
                    port = spec[1] if spec else blue
                    for size in sizes:
                        for c in conns:
                            url = f"http://{HOST}:{port}{paths[size]}"
                            idle, cpu = 0.0, 0.0
                            if isinstance(proc, subprocess.Popen):
                                idle, cpu = rss_mib(proc.pid), cpu_seconds(proc.pid)
                            with (
                                scraping(scrapes.get(name), args.scrape) as scraped,
                                dashboard_open(dashboards.get(name)) as polled,
                            ):
                                if args.h2:
                                    res = h2load(url, c, args.duration, tmp, args.grpc)
                                else:
                                    res = wrk(url, c, args.duration, args.rate, tmp)
                            if scraped:
                                print(f"  /metrics read {scraped[0]} times", file=sys.stderr)
                            if polled:
                                print(f"  /status read {polled[0]} times", file=sys.stderr)
                            if isinstance(proc, subprocess.Popen):
                                served = res.rps * args.duration
                                used = cpu_seconds(proc.pid) - cpu
                                res.cpu_us = used / served * 1e6 if served else 0.0
                                res.rss_mib = rss_mib(proc.pid, "VmHWM")
                                time.sleep(1.0)
                                res.idle_mib, res.after_mib = idle, rss_mib(proc.pid)
                            results.setdefault((name, size, c), []).append(res)
                            print(
                                f"round {rnd + 1} {name:>8} {size:>8}B c={c:<4} "
                                f"{res.rps:9.0f} req/s p50 {res.p50_ms:6.2f} ms "
                                f"p99 {res.p99_ms:6.2f} ms cpu {res.cpu_us:5.0f} us/req",
                                file=sys.stderr,
                                flush=True,
                            )
    report(results, list(targets), sizes, conns)
    return 0


def report(
    results: dict[tuple[str, int, int], list[Result]],
    names: list[str],
    sizes: list[int],
    conns: list[int],
) -> None:
    def med(name: str, size: int, c: int) -> Result:
        rs = results[(name, size, c)]
        return Result(
            rps=statistics.median(r.rps for r in rs),
            p50_ms=statistics.median(r.p50_ms for r in rs),
            p99_ms=statistics.median(r.p99_ms for r in rs),
            errors=sum(r.errors for r in rs),
            rss_mib=max(r.rss_mib for r in rs),
            idle_mib=min(r.idle_mib for r in rs),
            after_mib=max(r.after_mib for r in rs),
            cpu_us=statistics.median(r.cpu_us for r in rs),
        )

    # Ratios are to this checkout's Turnout, or to the first Turnout measured (--only).
    base = next((n for n in names if n.startswith("turnout")), names[0])
    print(
        "| target | size | conns | req/s | p50 ms | p99 ms | errors | RSS MiB idle/peak/after "
        f"| CPU µs/req | {base}/this |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for c in conns:
            t = med(base, size, c)
            for name in names:
                r = med(name, size, c)
                ratio = t.rps / r.rps if r.rps else 0.0
                print(
                    f"| {name} | {size} | {c} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                    f"{r.errors} | {r.idle_mib:.0f}/{r.rss_mib:.0f}/{r.after_mib:.0f} | "
                    f"{r.cpu_us:.0f} | {ratio:.2f} |"
                )
    if len(conns) > 1:
        low, high = conns[0], conns[-1]
        print(f"\np99 growth from {low} to {high} connections (p99 at {high} / p99 at {low}):")
        for size in sizes:
            for name in names:
                a, b = med(name, size, low), med(name, size, high)
                growth = b.p99_ms / a.p99_ms if a.p99_ms else 0.0
                print(f"  {name:>12} {size:>8}B  {growth:.2f}x")


# -- slow clients ------------------------------------------------------------------------------

SLOW_HEAD = b"POST /sink HTTP/1.1\r\nHost: bench\r\nContent-Length: 1000000\r\n\r\nx"


class SlowClients:
    """`n` slow-POST clients on an event loop in a thread of their own; counts the connections
    the proxy hung up on (answered 408, cut or refused)."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.n = n
        self.open = 0
        self.hung_up = 0
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        tasks = [asyncio.create_task(self._attacker()) for _ in range(self.n)]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _attacker(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(HOST, self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.open += 1
            try:
                writer.write(SLOW_HEAD)
                with suppress(OSError):
                    await reader.read(-1)  # nothing more is sent: until the proxy hangs up
            finally:
                self.open -= 1
                writer.close()
            self.hung_up += 1
            await asyncio.sleep(0.1)

    def __enter__(self) -> SlowClients:
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while self.open < self.n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the last heads reach an upstream
        return self

    def __exit__(self, *exc: object) -> None:
        stop = self._stop
        if stop is not None:
            self._loop.call_soon_threadsafe(stop.set)
        self._thread.join()
        self._loop.close()


def run_slow(args: argparse.Namespace, connections: int, tmp: Path) -> int:
    """Normal requests' success rate and p99 without and during a slow-POST attack."""
    blue, green = free_port(), free_port()
    targets: dict[str, tuple[list[str], int]] = {}
    port = free_port()
    (tmp / "turnout.yaml").write_text(turnout_conf(port, blue, green))
    targets["turnout"] = (
        [sys.executable, "-m", "proxy", "run", "-c", str(tmp / "turnout.yaml")],
        port,
    )
    nginx, haproxy = find_tool("nginx"), find_tool("haproxy")
    if nginx:
        port = free_port()
        (tmp / "nginx-proxy.conf").write_text(nginx_proxy_conf(port, blue, green, tmp))
        targets["nginx"] = ([nginx, "-c", str(tmp / "nginx-proxy.conf")], port)
    if haproxy:
        port = free_port()
        (tmp / "haproxy.cfg").write_text(haproxy_conf(port, blue, green))
        targets["haproxy"] = ([haproxy, "-f", str(tmp / "haproxy.cfg")], port)
    if args.only:
        keep = set(args.only.split(","))
        targets = {name: spec for name, spec in targets.items() if name in keep}
    rate = args.rate or 200
    n = args.slow_clients
    upstreams = [
        [sys.executable, "-m", "proxy", "upstream", "--name", name, "--port", str(p)]
        for name, p in (("blue", blue), ("green", green))
    ]
    rows: list[tuple[str, int, Result, int]] = []
    with process(upstreams[0], blue, LOAD_CORE), process(upstreams[1], green, LOAD_CORE):
        for rnd in range(args.rounds):
            for name, (argv, port) in targets.items():
                url = f"http://{HOST}:{port}/bytes/100"
                with process(argv, port, PROXY_CORE):
                    for attackers in (0, n):
                        with SlowClients(port, attackers) if attackers else nullcontext() as att:
                            res = wrk(url, connections, args.duration, rate, tmp)
                            hung_up = att.hung_up if isinstance(att, SlowClients) else 0
                        rows.append((name, attackers, res, hung_up))
                        print(
                            f"round {rnd + 1} {name:>8} slow={attackers:<4} "
                            f"{success(res):6.2f}% ok p99 {res.p99_ms:8.2f} ms "
                            f"hung up {hung_up}",
                            file=sys.stderr,
                            flush=True,
                        )
    print(
        f"normal GETs at {rate}/s on {connections} connections for {args.duration} s; "
        f"N slow-POST clients"
    )
    print("| target | slow clients | success % | p50 ms | p99 ms | attackers hung up on |")
    print("|---|---|---|---|---|---|")
    for name in targets:
        for attackers in (0, n):
            runs = [(r, h) for t, a, r, h in rows if t == name and a == attackers]
            print(
                f"| {name} | {attackers} "
                f"| {statistics.median(success(r) for r, _ in runs):.2f} "
                f"| {statistics.median(r.p50_ms for r, _ in runs):.2f} "
                f"| {statistics.median(r.p99_ms for r, _ in runs):.2f} "
                f"| {statistics.median(h for _, h in runs):.0f} |"
            )
    return 0


def success(res: Result) -> float:
    """The share of normal requests answered 2xx/3xx, in percent (one not answered within
    wrk's timeout is a failure too)."""
    total = res.requests + res.timeouts
    failed = res.errors  # non-2xx/3xx answers and timeouts
    return 100.0 * (total - failed) / total if total else 0.0


if __name__ == "__main__":
    sys.exit(main())
