"""Instructions per request: Turnout's work counted by valgrind instead of timed.

    python -m loadtests.instructions                  # this build: 10,000 GETs, 64 connections
    python -m loadtests.instructions --turnout-build before=../old/.venv/bin/python
    python -m loadtests.instructions --annotate 25    # and where the instructions go
    python -m loadtests.instructions --cache-sim      # and simulated cache and branch misses

On a shared or virtual machine, requests/s moves by 10% from one run to the next, and the
hardware counters that would count instructions are often missing. A count of executed
instructions hardly moves (two runs of one build agree within 0.5%), so two builds a few
percent apart can be told apart in one run each. Each build runs as `turnout run` (the
benchmark's config: a 10% split, nginx or the sample upstream behind it) under callgrind.
After a warm-up, the counters are zeroed; h2load sends the requests over HTTP/1.1; then the
count is read. What it counts is the proxy's own work in user space (its Python, llhttp,
uvloop, the allocator), not the kernel's, and not what the work costs in cache misses or
stalls. `--cache-sim` adds callgrind's simulation of a cache hierarchy and branch predictor
(modelled on this machine's, not measured on it; about four times slower): misses and
mispredictions per request, a sign of what the instructions cost. The benchmark
(loadtests.bench) stays the judge of speed.

Needs valgrind and h2load (apt-get install valgrind nghttp2-client). Under valgrind a build
starts in about 15 s and serves some 500 requests/s.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from loadtests.bench import (
    HOST,
    LOAD_CORE,
    PROXY_CORE,
    find_tool,
    free_port,
    nginx_upstream_conf,
    process,
    turnout_conf,
)

SUCCEEDED = re.compile(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded")
EVENTS = re.compile(r"^events: (.+)$", re.M)
TOTALS = re.compile(r"^(?:summary|totals): (.+)$", re.M)
# With --cache-sim: what callgrind's simulated caches and branch predictor saw, summed into
# the figures printed (valgrind's event names).
SIMULATED = {
    "L1 instruction misses": ("I1mr",),
    "L1 data misses": ("D1mr", "D1mw"),
    "last-level misses": ("ILmr", "DLmr", "DLmw"),
    "branch mispredictions": ("Bcm", "Bim"),
}


def send_requests(url: str, requests: int, connections: int) -> None:
    argv = ["h2load", "--h1", "-n", str(requests), "-c", str(min(connections, requests)), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout
    found = SUCCEEDED.search(out)
    if found is None or int(found.group(1)) != requests:
        raise SystemExit(f"instructions: not every request succeeded through {url}:\n{out}")


def count(
    name: str, python: str, conf: Path, port: int, args: argparse.Namespace, tmp: Path
) -> tuple[dict[str, int], Path]:
    """What `python -m proxy run` executed for args.requests requests, by callgrind's event
    names ("Ir": instructions), and the callgrind file that holds it."""
    out = tmp / f"callgrind.{name}"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"]
    argv += ["--compress-strings=no", "--compress-pos=no"]
    if args.cache_sim:
        argv += ["--cache-sim=yes", "--branch-sim=yes"]
    argv += [python, "-P", "-m", "proxy", "run", "-c", str(conf)]
    url = f"http://{HOST}:{port}/b100"
    with process(argv, port, PROXY_CORE, timeout=120.0) as proc:
        send_requests(url, args.warmup, args.connections)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        send_requests(url, args.requests, args.connections)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    dump = out.with_name(out.name + ".1")  # the first dump callgrind_control asked for
    text = dump.read_text(errors="replace") if dump.exists() else ""
    events, totals = EVENTS.search(text), TOTALS.search(text)
    if events is None or totals is None:
        raise SystemExit(f"instructions: callgrind wrote no counts for {name}")
    names, values = events.group(1).split(), [int(v) for v in totals.group(1).split()]
    values += [0] * (len(names) - len(values))  # callgrind may leave trailing zeros out
    return dict(zip(names, values, strict=True)), dump


def annotate(dump: Path, lines: int) -> str:
    """The functions that executed the most instructions themselves, per request."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", str(dump)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+) \(\s*([\d.]+)%\)\s+(.*)$", line)
        # Skip the totals, and the rows a recursion sums twice (above 100% of the program).
        if m and "PROGRAM TOTALS" not in line and float(m.group(2)) <= 50.0:
            where = m.group(3).split(" [")[0].rsplit(":", 1)[-1]
            rows.append(f"  {m.group(2):>6}%  {where}")
    return "\n".join(rows[:lines])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000, help="requests counted")
    ap.add_argument("--warmup", type=int, default=2000, help="requests before counting")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument(
        "--turnout-build",
        action="append",
        default=[],
        metavar="NAME=PYTHON",
        help="another build of Turnout (another checkout's virtualenv python), counted too",
    )
    ap.add_argument("--annotate", type=int, default=0, metavar="N", help="top N functions")
    ap.add_argument(
        "--cache-sim",
        action="store_true",
        help="simulate the caches and branch predictor too (slower): their misses per request",
    )
    args = ap.parse_args(argv)
    if args.requests < 1 or args.warmup < 1 or args.connections < 1:
        ap.error("--requests, --warmup and --connections must be at least 1")
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install valgrind nghttp2-client", file=sys.stderr)
            return 2
    builds = [("turnout", sys.executable)]
    for spec in args.turnout_build:
        name, _, python = spec.partition("=")
        builds.append((name, python))
    with tempfile.TemporaryDirectory(prefix="turnout-instructions-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)  # nginx's workers read the files as an unprivileged user
        blue, green = free_port(), free_port()
        with ExitStack() as upstreams:
            nginx = find_tool("nginx")
            if nginx:
                (tmp / "www").mkdir(mode=0o755)
                (tmp / "www" / "b100").write_bytes(b"x" * 100)
                conf = tmp / "nginx-up.conf"
                conf.write_text(nginx_upstream_conf(tmp / "www", [blue, green], tmp))
                upstreams.enter_context(process([nginx, "-c", str(conf)], blue, LOAD_CORE))
            else:
                for pool, port in (("blue", blue), ("green", green)):
                    sample = [sys.executable, "-m", "proxy", "upstream", "--name", pool]
                    sample += ["--port", str(port)]
                    upstreams.enter_context(process(sample, port, LOAD_CORE))
            counted: list[tuple[str, dict[str, float], Path]] = []
            for name, python in builds:
                port = free_port()
                conf = tmp / f"{name}.yaml"
                conf.write_text(turnout_conf(port, blue, green))
                totals, dump = count(name, python, conf, port, args, tmp)
                figures = {"instructions": totals["Ir"] / args.requests}
                if args.cache_sim:
                    for figure, events in SIMULATED.items():
                        figures[figure] = sum(totals[e] for e in events) / args.requests
                counted.append((name, figures, dump))
                print(
                    f"{name}: {figures['instructions']:,.0f} instructions per request", flush=True
                )
                for figure, value in list(figures.items())[1:]:
                    print(f"{name}: {value:,.0f} {figure} per request", flush=True)
        base = counted[0][1]
        for name, figures, _ in counted[1:]:
            for figure, value in figures.items():
                print(f"turnout / {name}: {base[figure] / value:.3f} ({figure})")
        for name, _, dump in counted if args.annotate else ():
            print(f"\n{name}, instructions executed in each function itself:")
            print(annotate(dump, args.annotate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
