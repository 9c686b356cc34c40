"""A fleet of N separate `turnout run` processes (one worker each) on one local etcd: shift the
split on one member, then on another, and report when every member has applied it. Each
member's /status is polled in turn, so the figures are bounded by the polling, not exact.

    python -m loadtests.fleet_procs --members 10     # needs etcd (apt-get install etcd-server)
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
SHIFTS = (25.0, 0.0, 40.0, 0.0, 60.0, 0.0)  # toward the candidate, then back, three times


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.load(resp)


def put_split(admin: str, green: float) -> None:
    body = json.dumps({"green": green}).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(admin + "/split", data=body, method="PUT", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        resp.read()


def member_config(admin: int, blue: int, green: int, etcd: int, index: int) -> str:
    return f"""
listen: {{host: {HOST}, port: {free_port()}}}
admin: {{host: {HOST}, port: {admin}}}
pools:
  blue: {{upstreams: [{{url: "http://{HOST}:{blue}"}}]}}
  green: {{upstreams: [{{url: "http://{HOST}:{green}"}}]}}
fleet: {{etcd: ["http://{HOST}:{etcd}"], name: bench, instance: m{index}, lease_ttl: 2s}}
"""


def quiet(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_etcd(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    client, peer = free_port(), free_port()
    argv = ["etcd", "--data-dir", str(tmp / "etcd")]
    argv += ["--listen-client-urls", f"http://{HOST}:{client}"]
    argv += ["--advertise-client-urls", f"http://{HOST}:{client}"]
    argv += ["--listen-peer-urls", f"http://{HOST}:{peer}"]
    argv += ["--initial-advertise-peer-urls", f"http://{HOST}:{peer}"]
    argv += ["--initial-cluster", f"default=http://{HOST}:{peer}"]
    return quiet(argv), client


def wait_joined(admins: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            docs = [get(a + "/status") for a in admins]
            fleet = docs[0].get("fleet", {})
            if all(d.get("fleet", {}).get("connected") for d in docs) and len(
                fleet.get("members", [])
            ) == len(admins):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the {len(admins)} members did not join within {timeout:g}s")


def applied_after(admins: list[str], green: float, since: float) -> float:
    """Seconds from `since` until every member's /status shows the split (NaN after 10 s)."""
    pending = set(range(len(admins)))
    while pending and time.monotonic() - since < 10:
        for i in sorted(pending):
            if abs(get(admins[i] + "/status")["split"]["green"] - green) < 0.01:
                pending.discard(i)
    return float("nan") if pending else time.monotonic() - since


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--members", type=int, default=10)
    args = ap.parse_args(argv)
    if not shutil.which("etcd"):
        print("etcd not found: apt-get install etcd-server", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        etcd, etcd_port = start_etcd(tmp)
        procs.append(etcd)
        blue, green = free_port(), free_port()
        for name, port in (("blue", blue), ("green", green)):
            cmd = [sys.executable, "-m", "proxy", "upstream", "--name", name, "--port", str(port)]
            procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        admins = []
        for i in range(args.members):
            admin = free_port()
            path = tmp / f"m{i}.yaml"
            path.write_text(member_config(admin, blue, green, etcd_port, i))
            cmd = [sys.executable, "-m", "proxy", "run", "-c", str(path)]
            procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            admins.append(f"http://{HOST}:{admin}")
        wait_joined(admins)
        print(f"{args.members} members joined the fleet")
        toward: list[float] = []
        back: list[float] = []
        for n, share in enumerate(SHIFTS):
            via = (n * 3 + 1) % args.members
            began = time.monotonic()
            put_split(admins[via], share)
            took = applied_after(admins, share, began)
            (back if share == 0.0 else toward).append(took)
            print(f"split {share:g} via member {via}: every member after {took * 1000:.0f} ms")
        print(
            f"median until every member applied: toward the candidate "
            f"{statistics.median(toward) * 1000:.0f} ms (effective_at is 300 ms ahead), "
            f"back to stable {statistics.median(back) * 1000:.0f} ms"
        )
        return 0
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
