"""How long a bad candidate keeps its share, by how much traffic it gets.

An adaptive rollout judges the candidate on its own outcomes: a breach needs enough of them
for the sequential test (or the absolute error-rate limit) to be sure, so the time from the
first failed candidate request to the rollback is about that many outcomes divided by the
candidate's request rate. This runs blue, a green that fails a given share of its requests,
and the proxy in one process, paces requests so that green (at the first step, 10%) gets a
given rate, starts the rollout and reports, per rate, the time to rollback (the proxy's own
`turnout_rollback_seconds`) and the candidate outcomes the verdict was reached on.

    python -m loadtests.rollback_time                      # 4, 10, 40, 100 and 400 green req/s
    python -m loadtests.rollback_time --rates 4 40 --error-rate 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from typing import Any

import aiohttp

from proxy.config import parse_config
from proxy.runtime import Proxy
from proxy.tools.sample import SampleSettings, start

HOST = "127.0.0.1"
FIRST_STEP = 10.0  # percent of the requests green gets at the first step
CLIENTS = 8


def config(blue: int, green: int) -> dict[str, Any]:
    return {
        "listen": {"host": HOST, "port": 0},
        "admin": {"host": HOST, "port": 0},
        "pools": {
            "blue": {"upstreams": [{"url": f"http://{HOST}:{blue}"}]},
            "green": {"upstreams": [{"url": f"http://{HOST}:{green}"}]},
        },
        "health_check": {"interval": "1s"},
        "rollout": {
            "strategy": "adaptive",
            "steps": [FIRST_STEP, 50, 100],
            "interval": "10m",  # the first step is held: only a breach ends it
            "fallback": "rollback",
        },
    }


async def paced(url: str, rate: float, stop: asyncio.Event) -> int:
    """Requests at `rate` per second in all, spread over CLIENTS keep-alive sessions, each on
    its own fixed schedule (a slow answer delays only its own session)."""
    sent = 0

    async def client(offset: float) -> None:
        nonlocal sent
        interval = CLIENTS / rate
        async with aiohttp.ClientSession() as session:
            due = time.monotonic() + offset
            while not stop.is_set():
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                due += interval
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url) as resp:
                        await resp.read()
                sent += 1

    await asyncio.gather(*(client(i / rate) for i in range(CLIENTS)))
    return sent


async def one_run(green_rate: float, error_rate: float, limit: float) -> dict[str, Any]:
    blue_runner, blue_port = await start(SampleSettings(name="blue"), HOST, 0)
    green_settings = SampleSettings(name="green", error_rate=error_rate, error_status=500)
    green_runner, green_port = await start(green_settings, HOST, 0)
    proxy = Proxy(parse_config(config(blue_port, green_port)))
    await proxy.start()
    stop = asyncio.Event()
    load = asyncio.create_task(
        paced(f"http://{HOST}:{proxy.port}/", green_rate * 100 / FIRST_STEP, stop)
    )
    try:
        await proxy.rollout_action("start", {"strategy": "adaptive"}, "bench")
        deadline = time.monotonic() + limit
        while proxy.rollout.state.value != "rolled_back" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        figures = proxy.rollout.status().get("figures") or {}
        rolled_back = proxy.rollout.state.value == "rolled_back"
        seconds = proxy.observed.rollback_seconds.snapshot().sum if rolled_back else None
        return {
            "rate": green_rate,
            "rolled_back": rolled_back,
            "seconds": seconds,
            "outcomes": _candidate_requests(figures),
        }
    finally:
        stop.set()
        await load
        await proxy.shutdown(timeout=1.0)
        await blue_runner.cleanup()
        await green_runner.cleanup()


def _candidate_requests(figures: dict[str, Any]) -> int | None:
    """The candidate outcomes of the step the verdict judged."""
    entry = figures.get("candidate")
    if isinstance(entry, dict) and isinstance(entry.get("requests"), int):
        return int(entry["requests"])
    return None


async def main_async(args: argparse.Namespace) -> None:
    print(
        f"green fails {args.error_rate:.0%} of its requests with 500; first step {FIRST_STEP:g}%;"
        f" {args.runs} run(s) per rate"
    )
    print(f"{'green req/s':>12} {'rollback s (median, min-max)':>30} {'outcomes judged':>16}")
    for rate in args.rates:
        runs = [await one_run(rate, args.error_rate, args.limit) for _ in range(args.runs)]
        done = [r for r in runs if r["rolled_back"]]
        if not done:
            print(f"{rate:>12g} {'not rolled back in ' + format(args.limit, 'g') + ' s':>30}")
            continue
        seconds = sorted(r["seconds"] for r in done)
        outcomes = [r["outcomes"] for r in done if r["outcomes"] is not None]
        shown = f"{statistics.median(seconds):.2f} ({seconds[0]:.2f}-{seconds[-1]:.2f})"
        judged = f"{statistics.median(outcomes):g}" if outcomes else "-"
        missed = f"  ({len(runs) - len(done)} not rolled back)" if len(done) < len(runs) else ""
        print(f"{rate:>12g} {shown:>30} {judged:>16}{missed}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[4, 10, 40, 100, 400])
    ap.add_argument("--error-rate", type=float, default=1.0, help="green's failing share")
    ap.add_argument("--runs", type=int, default=3, help="runs per rate")
    ap.add_argument("--limit", type=float, default=60.0, help="seconds to wait for a rollback")
    args = ap.parse_args(argv)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
