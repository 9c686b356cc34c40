"""Composition root: build the proxy on uvloop, wire signals, shut down in order."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from .config import Config
from .runtime import Proxy

log = logging.getLogger("turnout")

EXIT_OK = 0
EXIT_RUNTIME = 1


async def serve(config: Config, config_path: str | None) -> int:
    loop = asyncio.get_running_loop()
    proxy = Proxy(config, config_path=config_path)
    try:
        port = await proxy.start()
    except OSError as exc:
        listen = config.listen
        print(f"turnout: cannot listen on {listen.host}:{listen.port}: {exc.strerror or exc}")
        return EXIT_RUNTIME
    print(f"turnout: proxy listening on http://{config.listen.host}:{port}", flush=True)
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting at once")
            for conn in list(proxy.connections):
                conn.abort()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    print("turnout: shutting down, draining requests in flight", flush=True)
    await proxy.shutdown()
    return EXIT_OK


def run_proxy(config: Config, config_path: str | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return uvloop.run(serve(config, config_path))
