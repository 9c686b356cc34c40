"""Latency of ordinary requests while one client floods the proxy with a trailer section that
never ends (a chunked POST whose last chunk is followed by one endless trailer field).

    python -m loadtests.hostile                    # 10 s quiet, then 10 s under the flood
    python -m loadtests.hostile --src /path/to/other/checkout --seconds 5

A sample upstream, the proxy (from --src, default this checkout, run from its Python sources
with TURNOUT_PURE=1 so that two checkouts compare alike) and a flooder run as processes; this
process sends sequential keep-alive GETs and reports their p50 and p99, quiet and under the
flood, and the proxy's RSS before and after. The flooder reconnects whenever the proxy hangs
up, so a proxy that refuses the flood is attacked again and again. Quote ratios, not
absolute figures: the machine's other load shows in them.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtests.bench import HOST, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
FLOOD_HEAD = (
    b"POST /sink HTTP/1.1\r\nHost: flood\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX-Flood: "
)
PROBE = b"GET /headers HTTP/1.1\r\nHost: probe\r\n\r\n"


def flood(port: int, seconds: float) -> None:
    """Send an endless trailer field as fast as the proxy takes it; reconnect when cut."""
    piece = b"v" * 65536
    deadline = time.monotonic() + seconds
    sent = connections = 0
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port)) as sock:
                connections += 1
                sock.settimeout(1.0)
                sock.sendall(FLOOD_HEAD)
                while time.monotonic() < deadline:
                    try:
                        sock.sendall(piece)
                    except TimeoutError:
                        continue  # the proxy reads slowly: keep at it on this connection
                    sent += len(piece)
        except OSError:
            continue
    print(f"flooder: {sent / 2**20:.0f} MiB sent over {connections} connections", flush=True)


def read_response(sock: socket.socket, buf: bytearray) -> None:
    """Read one Content-Length framed response (the sample upstream's /headers)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the proxy closed the probe's connection")
        buf += chunk
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    end = len(head) + 4 + length
    while len(buf) < end:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the proxy closed the probe's connection")
        buf += chunk
    del buf[:end]


def probe(port: int, seconds: float) -> list[float]:
    """Sequential GETs on one keep-alive connection; their latencies in milliseconds."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    with socket.create_connection((HOST, port)) as sock:
        sock.settimeout(60.0)
        buf = bytearray()
        while time.monotonic() < deadline:
            started = time.perf_counter()
            sock.sendall(PROBE)
            read_response(sock, buf)
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def summary(name: str, latencies: list[float]) -> str:
    if len(latencies) < 2:
        # Under a flood the proxy cannot bear, a probe may take longer than the whole run.
        return f"{name}: {len(latencies)} requests, slowest {max(latencies, default=0):.0f} ms"
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return (
        f"{name}: {len(latencies)} requests, p50 {q[49]:.2f} ms, p99 {q[98]:.2f} ms, "
        f"slowest {max(latencies):.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT, help="checkout whose proxy runs")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flood", type=int, help=argparse.SUPPRESS)  # the flooder's own run
    args = parser.parse_args()
    if args.flood:
        flood(args.flood, args.seconds)
        return
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve()), "TURNOUT_PURE": "1"}
    upstream_port, port, admin = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp, "turnout.yaml")
        url = f"http://{HOST}:{upstream_port}"
        config.write_text(
            f"listen: {{host: {HOST}, port: {port}}}\nadmin: {{host: {HOST}, port: {admin}}}\n"
            f"pools:\n  blue: {{upstreams: [{{url: '{url}'}}]}}\n"
            f"  green: {{upstreams: [{{url: '{url}'}}]}}\n"
        )
        try:
            cmd = [sys.executable, "-m", "proxy", "upstream", "--name", "blue"]
            upstream = [*cmd, "--port", str(upstream_port)]
            # Its log would show every flood request the proxy cuts off.
            src = args.src.resolve()  # `-m proxy` imports from the working directory first
            procs.append(subprocess.Popen(upstream, cwd=src, env=env, stderr=subprocess.DEVNULL))
            wait_port(upstream_port)
            cmd = [sys.executable, "-m", "proxy", "run", "-c", str(config)]
            proxy = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.DEVNULL)
            procs.append(proxy)
            wait_port(port)
            probe(port, 1.0)  # warm up
            before = rss_mib(proxy.pid)
            quiet = probe(port, args.seconds)
            cmd = [sys.executable, "-m", "loadtests.hostile", "--flood", str(port)]
            flooder = subprocess.Popen([*cmd, "--seconds", str(args.seconds + 1)], cwd=ROOT)
            procs.append(flooder)
            time.sleep(0.5)  # let the flood get going
            flooded = probe(port, args.seconds)
            flooder.wait(timeout=30)
            after = rss_mib(proxy.pid)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(f"proxy from {args.src.resolve()}")
    print(summary("quiet", quiet))
    print(summary("under the trailer flood", flooded))
    print(f"proxy RSS: {before:.0f} MiB before the flood, {after:.0f} MiB after it")


if __name__ == "__main__":
    main()
