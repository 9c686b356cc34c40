"""Worker processes run Turnout, whatever the directory the supervisor was started in holds."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import yaml
from conftest import HOST, SampleFactory, proxy_config
from helpers.processes import ADMIN_API, LISTENING, ProxyProcess


async def test_an_operators_own_proxy_package_does_not_stand_in_for_the_workers(
    sample: SampleFactory, tmp_path: Path
) -> None:
    impostor = tmp_path / "proxy"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise SystemExit('the operator\\'s own proxy/')\n")
    blue = await sample("blue")
    config = tmp_path / "turnout.yaml"
    config.write_text(
        yaml.safe_dump({"admin": {"host": HOST, "port": 0}, **proxy_config([blue.url], [blue.url])})
    )
    log = tmp_path / "turnout.log"
    with log.open("wb") as stderr:
        # As the `turnout` console script starts it: the supervisor never looks in its
        # current directory (-P); its workers must not either.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-P", "-m", "proxy", "run", "-c", str(config), "--workers", "2"),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    process = ProxyProcess(proc, log)
    try:
        process.port = int((await process.wait_line(LISTENING))[2])
        process.admin_port = int((await process.wait_line(ADMIN_API))[2])
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(20):
                while True:
                    async with session.get(process.admin + "/status") as resp:
                        workers = (await resp.json()).get("workers")
                    if workers and all(w["state"] == "ready" for w in workers):
                        break
                    assert "operator's own" not in log.read_text()
                    await asyncio.sleep(0.05)
            async with session.get(process.url + "/") as resp:
                assert resp.status == 200
                assert resp.headers["X-Upstream"] == "blue"
    finally:
        process.signal(signal.SIGTERM)
        await process.exit_code(20)
