"""HTTP/2 towards upstreams (`pools.<pool>.protocol: h2c | h2`), against a real HTTP/2 server
(hypercorn): requests from HTTP/1.1 and HTTP/2 clients are multiplexed on a few connections
per upstream, bodies stream both ways, health checks speak HTTP/2, faults map as usual, and a
reload that changes a pool's protocol reaches every process."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import httpx
import pytest
import yaml
from conftest import HOST, ProxyFactory, proxy_config, wait_for
from helpers.h2server import H2Factory
from helpers.http2 import h2_pools, up
from helpers.processes import ProcessFactory, all_follow, until

from proxy.config import ConfigError, parse_config


async def test_http11_clients_reach_an_h2c_upstream_multiplexed(
    h2_server: H2Factory, make_proxy: ProxyFactory
) -> None:
    blue, green = await h2_server("blue"), await h2_server("green")
    proxy = await make_proxy(h2_pools(blue.url, green.url))
    await up(proxy)
    url = f"http://{HOST}:{proxy.port}"
    async with aiohttp.ClientSession() as session:

        async def get(i: int) -> dict[str, Any]:
            async with session.get(f"{url}/item/{i}", headers={"X-Custom": "v"}) as resp:
                assert resp.status == 200
                assert resp.headers["X-Upstream"] == "blue"
                return dict(await resp.json())

        answers = await asyncio.gather(*(get(i) for i in range(60)))
    assert sorted(a["path"] for a in answers) == sorted(f"/item/{i}" for i in range(60))
    assert answers[0]["headers"]["x-custom"] == "v"
    assert "connection" not in answers[0]["headers"]
    assert set(blue.versions) == {"2"}
    # Sixty requests, many at once, over very few connections to the upstream.
    assert len(blue.peers) <= 2, blue.peers


async def test_http2_clients_and_bodies_both_ways(
    h2_server: H2Factory, make_proxy: ProxyFactory
) -> None:
    blue, green = await h2_server("blue"), await h2_server("green")
    proxy = await make_proxy(h2_pools(blue.url, green.url, split=50))
    await up(proxy)
    payload = bytes(range(256)) * 4096
    async with httpx.AsyncClient(
        http1=False, http2=True, base_url=f"http://{HOST}:{proxy.port}", timeout=20
    ) as client:
        posted, fetched = await asyncio.gather(
            client.post("/echo", content=payload), client.get("/bytes/3000000")
        )
        assert posted.status_code == 200
        assert posted.content == payload
        assert fetched.status_code == 200
        assert fetched.content == bytes(i % 256 for i in range(3000000))
        answers = await asyncio.gather(*(client.get("/") for _ in range(200)))
    pools = [a.headers["x-upstream"] for a in answers]
    assert abs(pools.count("green") - 100) <= 3, pools.count("green")


async def test_faults_of_an_h2_upstream_map_as_usual(
    h2_server: H2Factory, make_proxy: ProxyFactory
) -> None:
    blue, green = await h2_server("blue"), await h2_server("green")
    proxy = await make_proxy(
        h2_pools(blue.url, green.url, retries={"attempts": 0}, health_check={"interval": "60s"})
    )
    await up(proxy)
    url = f"http://{HOST}:{proxy.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/status/503") as resp:
            assert resp.status == 503  # the upstream's own answer, relayed
        await blue.close()
        async with session.get(url + "/") as resp:
            assert resp.status == 502
            assert (await resp.json())["pool"] == "blue"
    # Health checks speak HTTP/2 too (an HTTP/2-only upstream would refuse HTTP/1.1).
    assert green.probes
    assert set(green.probes) == {"2"}


async def test_h2_over_tls_with_alpn(
    h2_server: H2Factory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    blue = await h2_server("blue", tls=True)
    data = h2_pools(blue.url, blue.url.replace("blue", "blue"), protocol="h2")
    for pool in ("blue", "green"):
        data["pools"][pool]["tls"] = {"ca": str(tmp_path / "ca.pem")}
    proxy = await make_proxy(data)
    await up(proxy)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{HOST}:{proxy.port}/x") as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["path"] == "/x"
    assert set(blue.versions) == {"2"}


def test_the_protocol_must_fit_the_urls() -> None:
    with pytest.raises(ConfigError, match=r"pools\.blue\.upstreams\[0\]\.url: protocol h2 needs"):
        parse_config(h2_pools("http://127.0.0.1:1", "https://127.0.0.1:2", protocol="h2"))
    with pytest.raises(ConfigError, match="protocol h2c needs http://"):
        parse_config(h2_pools("https://127.0.0.1:1", "http://127.0.0.1:2", protocol="h2c"))
    assert parse_config(h2_pools("http://a:1", "http://b:2")).pools.blue.protocol == "h2c"
    assert ssl is not None


async def test_grpc_timeout_is_the_calls_deadline(
    h2_server: H2Factory, make_proxy: ProxyFactory
) -> None:
    """A gRPC call that says `grpc-timeout: 200m` gets DEADLINE_EXCEEDED from Turnout when its
    upstream has not answered by then, well before timeouts.response_headers (30 s), even from
    a client that keeps no deadline of its own. This upstream knows nothing of gRPC deadlines
    (as a hung process), so no deadline but Turnout's can end the call."""
    blue = await h2_server("blue")
    proxy = await make_proxy(h2_pools(blue.url, blue.url))
    await up(proxy)
    message = b"\x00" + (1).to_bytes(4, "big") + b"x"
    headers = {"content-type": "application/grpc", "te": "trailers", "grpc-timeout": "200m"}
    client = httpx.AsyncClient(http1=False, http2=True, timeout=10.0)
    async with client, asyncio.timeout(4):
        resp = await client.post(
            f"http://{HOST}:{proxy.port}/delay/5000", content=message, headers=headers
        )
    assert resp.status_code == 200
    said = unquote(resp.headers["grpc-message"])
    assert resp.headers["grpc-status"] == "4", said
    assert "grpc-timeout of 0.2s passed" in said
    assert blue.versions == ["2"]  # one attempt: the deadline is the call's


async def test_a_reload_that_changes_a_pools_protocol_reaches_the_upstreams_it_keeps(
    h2_server: H2Factory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """An operator who moves a pool from HTTP/1.1 to h2c and reloads gets HTTP/2 towards the
    same upstreams: a reload replaces an upstream whose protocol changed (its requests in
    flight finish on the old one), rather than keeping it as it was."""
    blue, green = await h2_server("blue"), await h2_server("green")
    proxy = await make_proxy(proxy_config([blue.url], [green.url]))
    await up(proxy)
    old = proxy.router.pools["blue"][0]
    url = f"http://{HOST}:{proxy.port}/"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200
        assert blue.versions == ["1.1"]
        path = tmp_path / "turnout.yaml"
        path.write_text(yaml.safe_dump(h2_pools(blue.url, green.url)))
        proxy.config_path = str(path)
        change = await proxy.control.reload()
        assert change.after["blue"] == [blue.url]
        (new,) = proxy.router.pools["blue"]
        assert new is not old
        assert (new.key, new.url) == ("blue/0", blue.url)
        for _ in range(3):
            async with session.get(url) as resp:
                assert resp.status == 200
    assert blue.versions == ["1.1", "2", "2", "2"]
    await wait_for(lambda: old.drained)
    assert not old.connections


async def test_an_upstream_added_by_the_admin_api_must_fit_the_pools_protocol(
    h2_server: H2Factory, make_proxy: ProxyFactory
) -> None:
    """As the configuration file is checked: an h2c pool speaks cleartext HTTP/2, so an
    https:// upstream added to it is refused with the reason, and nothing is added."""
    blue, green = await h2_server("blue"), await h2_server("green")
    proxy = await make_proxy(h2_pools(blue.url, green.url, admin={"host": HOST, "port": 0}))
    await proxy.start_admin()
    admin = f"http://{HOST}:{proxy.admin_port}"
    async with aiohttp.ClientSession() as session:
        added = {"url": f"https://{HOST}:9"}
        async with session.post(f"{admin}/pools/blue/upstreams", json=added) as resp:
            assert resp.status == 400
            answer = await resp.json()
        assert answer == {
            "error": "invalid upstream",
            "detail": "pool blue: protocol h2c needs http:// URLs",
        }
        async with session.get(f"{admin}/status") as resp:
            shown = (await resp.json())["pools"]["blue"]["upstreams"]
    assert [u["url"] for u in shown] == [blue.url]


async def test_a_protocol_changed_by_reload_reaches_every_worker(
    h2_server: H2Factory, turnout_process: ProcessFactory, tmp_path: Path
) -> None:
    """`turnout run`, alone and with two workers: the file moves blue to h2c, the operator
    reloads, and from then on every request reaches blue over HTTP/2, whichever process serves
    it. No request fails across the change."""
    blue, green = await h2_server("blue"), await h2_server("green")
    process = await turnout_process(proxy_config([blue.url], [green.url]))
    async with aiohttp.ClientSession() as session:

        async def get() -> None:
            # A connection of its own, so the requests spread over the workers as they may.
            async with aiohttp.ClientSession() as fresh, fresh.get(process.url + "/") as resp:
                assert resp.status == 200
                assert resp.headers["X-Upstream"] == "blue"

        await asyncio.gather(*(get() for _ in range(4)))
        assert set(blue.versions) == {"1.1"}
        path = tmp_path / "turnout.yaml"
        path.write_text(
            yaml.safe_dump({"admin": {"host": HOST, "port": 0}, **h2_pools(blue.url, green.url)})
        )
        async with session.post(process.admin + "/reload") as resp:
            assert resp.status == 200, await resp.text()
        doc = await until(session, process, all_follow)
        assert [u["url"] for u in doc["pools"]["blue"]["upstreams"]] == [blue.url]
        seen = len(blue.versions)
        await asyncio.gather(*(get() for _ in range(8)))
    assert set(blue.versions[seen:]) == {"2"}
