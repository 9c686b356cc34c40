"""TLS on both sides, with certificates made in the test: HTTPS client -> Turnout -> HTTPS
upstream with mTLS; wrong CA; certificate rotation under load; bad files refused."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web
from conftest import HOST, ProxyFactory, proxy_config
from helpers.tls import write_pair

from proxy.config import parse_config
from proxy.control.changes import ControlError
from proxy.http.tls import TLSSetupError, server_context
from proxy.logic.breaker import BreakerState
from proxy.runtime import Proxy


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def proxy_on_file(data: dict[str, Any], tmp_path: Path) -> tuple[Proxy, Path]:
    """A proxy built from `data` written to a file first, so that a reload reads the file."""
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(data))
    return Proxy(parse_config(data), config_path=str(path)), path


async def https_upstream(
    ca: trustme.CA, name: str, *, client_ca: trustme.CA | None = None
) -> tuple[web.AppRunner, int, list[Any]]:
    """An HTTPS upstream; with client_ca it demands a client certificate signed by it."""
    peers: list[Any] = []

    async def hello(request: web.Request) -> web.Response:
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        peers.append(ssl_object.getpeercert() if ssl_object is not None else None)
        return web.json_response({"upstream": name}, headers={"X-Upstream": name})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=ctx)
    await site.start()
    return runner, int(runner.addresses[0][1]), peers


async def test_https_client_to_https_upstream_with_mtls(
    ca: trustme.CA, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    client_ca = trustme.CA()
    runner, port, peers = await https_upstream(ca, "blue", client_ca=client_ca)
    try:
        ca_path = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        client_cert, client_key = write_pair(client_ca.issue_cert("turnout"), tmp_path, "client")
        listen_cert, listen_key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "listen")
        data = proxy_config([f"https://127.0.0.1:{port}"], [])
        data["pools"]["blue"]["tls"] = {"ca": str(ca_path), "cert": client_cert, "key": client_key}
        data["listen"]["tls"] = {"cert": listen_cert, "key": listen_key}
        proxy = await make_proxy(data)
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{proxy.port}/x", ssl=client_ctx) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["X-Upstream"] == "blue"
        # The upstream saw Turnout's client certificate.
        assert peers[-1] is not None
        subject = dict(x[0] for x in peers[-1]["subject"])
        assert subject.get("organizationName") or peers[-1]["subjectAltName"]
    finally:
        await runner.cleanup()


async def test_forwarded_proto_is_https_behind_a_tls_listener(
    ca: trustme.CA, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    seen: list[str] = []

    async def headers(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Forwarded-Proto", ""))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", headers)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    try:
        cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "listen")
        data = proxy_config([f"http://{HOST}:{runner.addresses[0][1]}"], [])
        data["listen"]["tls"] = {"cert": cert, "key": key}
        proxy = await make_proxy(data)
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{proxy.port}/", ssl=ctx) as resp,
        ):
            assert resp.status == 200
        assert seen[-1] == "https"
    finally:
        await runner.cleanup()


async def test_wrong_ca_is_502_and_opens_the_breaker(
    ca: trustme.CA, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    runner, port, _ = await https_upstream(ca, "blue")
    try:
        other = trustme.CA()
        ca_path = tmp_path / "other-ca.pem"
        other.cert_pem.write_to_path(str(ca_path))
        data = proxy_config(
            [f"https://127.0.0.1:{port}"],
            [],
            retries={"attempts": 0},
            breaker={"consecutive_failures": 3},
        )
        data["pools"]["blue"]["tls"] = {"ca": str(ca_path)}
        proxy = await make_proxy(data)
        # Health checks use the pool's TLS settings, so the upstream never enters rotation.
        upstream = proxy.router.pools["blue"][0]
        assert not upstream.healthy
        snapshot = proxy.health.snapshot()[upstream.key]
        assert snapshot.last_detail is not None
        assert (
            "certificate" in snapshot.last_detail.lower() or "ssl" in snapshot.last_detail.lower()
        )
        # Put it in rotation by hand to see the data path's verdict on every request.
        upstream.healthy = True
        proxy.router.refresh()
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"http://{HOST}:{proxy.port}/") as resp:
                    assert resp.status == 502
                    body = await resp.json()
                    assert "TLS" in body["detail"] or "certificate" in body["detail"]
        assert upstream.breaker.state is BreakerState.OPEN
    finally:
        await runner.cleanup()


async def test_certificate_rotation_under_load_fails_nothing(
    ca: trustme.CA, tmp_path: Path
) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    proxy: Proxy | None = None
    try:
        first = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "first")
        second = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "second")
        data = proxy_config([f"http://{HOST}:{runner.addresses[0][1]}"], [])
        data["listen"]["tls"] = {"cert": first[0], "key": first[1]}
        proxy, path = proxy_on_file(data, tmp_path)
        await proxy.start()
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        results: Counter[Any] = Counter()
        serials: set[int] = set()
        stop = asyncio.Event()

        async def client() -> None:
            # A fresh TLS connection per request: every one makes a handshake and sees the
            # certificate that is current at that moment.
            for _ in range(400):
                if stop.is_set():
                    return
                try:
                    reader, writer = await asyncio.open_connection(HOST, proxy.port, ssl=ctx)
                    serials.add(int(writer.get_extra_info("peercert")["serialNumber"], 16))
                    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    answer = await reader.read(-1)
                    writer.close()
                    results[answer.split(b" ", 2)[1] if answer else b"empty"] += 1
                except (OSError, ssl.SSLError) as exc:
                    results[type(exc).__name__] += 1

        tasks = [asyncio.create_task(client()) for _ in range(4)]
        async with asyncio.timeout(20):
            while sum(results.values()) < 40:
                await asyncio.sleep(0.01)
            data["listen"]["tls"] = {"cert": second[0], "key": second[1]}
            path.write_text(yaml.safe_dump(data))
            await proxy.control.reload()
            seen = sum(results.values())
            while sum(results.values()) < seen + 40:
                await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*tasks)
        assert set(results) == {b"200"}, results
        assert len(serials) == 2  # both certificates were served
    finally:
        if proxy is not None:
            await proxy.shutdown(timeout=1)
        await runner.cleanup()


async def test_reload_with_a_mismatched_pair_changes_nothing(
    ca: trustme.CA, tmp_path: Path
) -> None:
    good = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "good")
    other = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "other")
    data = proxy_config([], [])
    data["listen"]["tls"] = {"cert": good[0], "key": good[1]}
    proxy, path = proxy_on_file(data, tmp_path)
    try:
        data["listen"]["tls"] = {"cert": good[0], "key": other[1]}
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ControlError) as err:
            await proxy.control.reload()
        assert err.value.status == 400
        assert "listen.tls" in str(err.value.detail)
        assert proxy.config.listen.tls is not None
        assert proxy.config.listen.tls.key == good[1]
    finally:
        await proxy.shutdown(timeout=0)


async def test_reload_applies_a_new_min_version_to_new_connections(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """min_version is read at reload like the certificate: a TLS 1.2 client is refused under
    "1.3", let in once the file says "1.2", and refused again after going back to "1.3"."""
    pair = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "listen")
    data = proxy_config([], [])
    data["listen"]["tls"] = {"cert": pair[0], "key": pair[1], "min_version": "1.3"}
    proxy, path = proxy_on_file(data, tmp_path)
    await proxy.start()
    tls12 = ssl.create_default_context()
    ca.configure_trust(tls12)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2

    async def handshake() -> str:
        try:
            _, writer = await asyncio.open_connection(HOST, proxy.port, ssl=tls12)
        except (OSError, ssl.SSLError):  # an alert or a reset, depending on timing
            return "refused"
        version = writer.get_extra_info("ssl_object").version()
        writer.close()
        return str(version)

    try:
        async with asyncio.timeout(10):
            assert await handshake() == "refused"
            for version, expected in (("1.2", "TLSv1.2"), ("1.3", "refused")):
                data["listen"]["tls"]["min_version"] = version
                path.write_text(yaml.safe_dump(data))
                await proxy.control.reload()
                assert await handshake() == expected, version
    finally:
        await proxy.shutdown(timeout=0)


async def test_turning_tls_on_or_off_by_reload_needs_a_restart(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """The listener is created with TLS or without: a reload that turns it on or off says
    that this waits for a restart (and the listener stays as it is)."""
    pair = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "listen")
    data = proxy_config([], [])
    proxy, path = proxy_on_file(data, tmp_path)
    try:
        data["listen"]["tls"] = {"cert": pair[0], "key": pair[1]}
        path.write_text(yaml.safe_dump(data))
        change = await proxy.control.reload()
        assert change.after["restart_needed"] == ["listen.tls"]
        assert proxy.listener_tls is None
        data["listen"].pop("tls")
        path.write_text(yaml.safe_dump(data))
        change = await proxy.control.reload()
        assert "restart_needed" not in change.after
    finally:
        await proxy.shutdown(timeout=0)


def turnout_check(tmp_path: Path, data: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`turnout check` of `data` written as a YAML file, as an operator runs it."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_mismatched_pair_is_refused_at_start(ca: trustme.CA, tmp_path: Path) -> None:
    good = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "good")
    other = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "other")
    data = proxy_config([], [])
    data["listen"]["tls"] = {"cert": good[0], "key": other[1]}
    listen_tls = parse_config(data).listen.tls
    assert listen_tls is not None
    with pytest.raises(TLSSetupError):
        server_context(listen_tls)
    result = turnout_check(tmp_path, data)
    assert result.returncode == 2
    assert "listen.tls" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_cert_file_is_a_config_error(tmp_path: Path) -> None:
    data = proxy_config([], [])
    data["listen"]["tls"] = {"cert": str(tmp_path / "nope.crt"), "key": str(tmp_path / "nope.key")}
    result = turnout_check(tmp_path, data)
    assert result.returncode == 2
    assert "listen.tls.cert" in result.stderr
    assert "listen.tls.key" in result.stderr


async def test_turnout_run_names_the_tls_listener_https(ca: trustme.CA, tmp_path: Path) -> None:
    pair = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "listen")
    data = proxy_config([], [], admin={"host": HOST, "port": 0})
    data["listen"]["tls"] = {"cert": pair[0], "key": pair[1]}
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path),
        "--takeover-socket", str(tmp_path / "handover.sock"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            lines = [await proc.stdout.readline() for _ in range(2)]
            while not lines[-1].startswith(b"turnout: admin API on "):
                lines.append(await proc.stdout.readline())
                assert lines[-1], lines
    finally:
        proc.terminate()
        await proc.wait()
    said = b"".join(lines)
    assert b"turnout: proxy listening on https://127.0.0.1:" in said, said
    assert b"turnout: admin API on http://127.0.0.1:" in said, said
