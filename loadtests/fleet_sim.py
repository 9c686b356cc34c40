"""A fleet of simulated members publishing outcomes to one local etcd, as Turnout members do.

Each simulated member holds a lease (renewed every TTL/3) and puts its outcome report under it
every 250 ms; one watcher, as the leader, reads every report by watch. Prints the puts per
second reached against the target, the watcher's lag from put to event, and etcd's CPU use:

    python -m loadtests.fleet_sim --members 1000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import uvloop

from proxy.fleet.store import EtcdStore
from proxy.tools.fleet_demo import start_etcd

REPORT_EVERY = 0.25
TTL = 3
SESSIONS = 16  # client connections pools shared by the simulated members


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _member(store: EtcdStore, index: int, stop: asyncio.Event, counts: list[int]) -> None:
    # Members start spread over one period, as real ones do.
    await asyncio.sleep(REPORT_EVERY * index / max(1, len(counts)))
    lease = 0
    while not lease and not stop.is_set():
        try:
            lease = await store.grant(TTL)
        except Exception:
            await asyncio.sleep(REPORT_EVERY)
    key = f"/turnout/sim/outcomes/m{index}"
    next_renew = time.monotonic() + TTL / 3
    while not stop.is_set():
        body: dict[str, object] = {
            "pools": {"green": {"requests": 12, "errors": 0, "latency": {"310": 12}}},
            "sent": time.time(),
        }
        try:
            await store.put(key, json.dumps(body).encode(), lease=lease)
            counts[index] += 1
            if time.monotonic() >= next_renew:
                await store.keepalive(lease)
                next_renew = time.monotonic() + TTL / 3
        except Exception:
            pass  # counted as missing
        await asyncio.sleep(REPORT_EVERY)


async def simulate(members: int, duration: float) -> dict[str, float]:
    etcd = await start_etcd()
    stores = [EtcdStore([etcd.url], timeout=2.0) for _ in range(SESSIONS)]
    watcher = EtcdStore([etcd.url])
    lags: list[float] = []
    stop = asyncio.Event()
    counts = [0] * members

    async def watch() -> None:
        async for batch in watcher.watch("/turnout/sim/outcomes/", prefix=True, start_revision=1):
            now = time.time()
            for event in batch.events:
                if event.kind == "put":
                    lags.append(now - json.loads(event.kv.value)["sent"])

    try:
        watching = asyncio.create_task(watch())
        cpu0, t0 = _cpu_seconds(etcd.proc.pid), time.monotonic()
        client0 = time.process_time()
        tasks = [
            asyncio.create_task(_member(stores[i % SESSIONS], i, stop, counts))
            for i in range(members)
        ]
        await asyncio.sleep(duration)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - t0
        cpu = _cpu_seconds(etcd.proc.pid) - cpu0
        client = time.process_time() - client0
        watching.cancel()
    finally:
        for s in [*stores, watcher]:
            await s.close()
        await etcd.stop()
    lags.sort()
    return {
        "members": members,
        "target_puts_per_s": members / REPORT_EVERY,
        "puts_per_s": sum(counts) / elapsed,
        "etcd_cpu_percent": 100.0 * cpu / elapsed,
        "simulator_cpu_percent": 100.0 * client / elapsed,
        "watch_lag_p50_ms": 1000 * lags[len(lags) // 2] if lags else float("nan"),
        "watch_lag_p99_ms": 1000 * lags[int(len(lags) * 0.99)] if lags else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args()
    result = uvloop.run(simulate(args.members, args.duration))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
