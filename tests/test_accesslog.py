"""The access log: JSON lines checked against the requests sent, sampling, reopening."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from conftest import ProxyFactory, SampleFactory, proxy_config, wait_for

from proxy.http.accesslog import Entry, format_line
from proxy.runtime import Proxy


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def logged(proxy: Proxy, path: Path, count: int) -> list[dict[str, Any]]:
    await wait_for(lambda: len(read_lines(path)) >= count, timeout=10)
    return read_lines(path)


async def test_every_request_is_a_json_line_matching_what_was_sent(
    sample: SampleFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    blue = await sample("blue")
    green = await sample("green")
    path = tmp_path / "access.log"
    proxy = await make_proxy(
        proxy_config([blue.url], [green.url], access_log={"to": str(path), "sample": 1.0})
    )
    sent: list[tuple[str, str, int, str]] = []
    async with aiohttp.ClientSession() as session:
        for i in range(10):
            pool = "green" if i % 3 == 0 else "blue"
            target = f"/item/{i}?q={i}"
            async with session.get(
                f"http://127.0.0.1:{proxy.port}{target}", headers={"X-Turnout-Pool": pool}
            ) as resp:
                body = await resp.read()
                sent.append(("GET", target, resp.status, pool))
                assert len(body) > 0
        async with session.post(f"http://127.0.0.1:{proxy.port}/sink", data=b"x" * 1000) as resp:
            await resp.read()
            sent.append(("POST", "/sink", resp.status, "blue"))
    lines = await logged(proxy, path, len(sent))
    assert len(lines) == len(sent)
    for line, (method, target, status, pool) in zip(lines, sent, strict=True):
        assert line["method"] == method
        assert line["target"] == target
        assert line["status"] == status
        assert line["pool"] == pool
        assert line["upstream"] == (green.url if pool == "green" else blue.url)
        assert line["client"] == "127.0.0.1"
        assert line["attempts"] == 1
        assert line["bytes_out"] > 0
        assert line["duration_ms"] >= line["upstream_ms"] >= 0
        assert {"time", "bytes_in", "reason"} <= line.keys()
    assert lines[-1]["bytes_in"] == 1000


async def test_retries_and_sheds_are_named_in_the_log(
    sample: SampleFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    failing = await sample("failing", error_rate=1.0, error_status=503)
    blue = await sample("blue")
    path = tmp_path / "access.log"
    proxy = await make_proxy(
        proxy_config(
            [failing.url, blue.url],
            [],
            balancer="round_robin",
            access_log={"to": str(path)},
        )
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.get(f"http://127.0.0.1:{proxy.port}/") as resp:
                assert resp.status == 200
    lines = await logged(proxy, path, 4)
    retried = [line for line in lines if line["attempts"] == 2]
    assert retried, lines
    assert all(line["reason"] == "retried: status_503" for line in retried)
    assert all(line["upstream"] == blue.url for line in retried)


async def test_answers_the_proxy_writes_itself_name_their_reason_and_size(
    make_proxy: ProxyFactory, dead_url: Callable[[], str], tmp_path: Path
) -> None:
    # No upstream is reachable: the proxy answers 502/503 itself, JSON bodies of its own.
    path = tmp_path / "access.log"
    data = proxy_config([dead_url()], [], access_log={"to": str(path)}, retries={"attempts": 0})
    data["health_check"] = {"interval": "60s"}
    proxy = await make_proxy(data)
    sizes: list[int] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(f"http://127.0.0.1:{proxy.port}/") as resp:
                assert resp.status in (502, 503)
                sizes.append(len(await resp.read()))
    lines = await logged(proxy, path, 3)
    for line, size in zip(lines, sizes, strict=True):
        assert line["reason"] in ("bad_gateway", "no_upstream"), line
        assert line["bytes_out"] == size > 0


async def test_requests_the_parser_refuses_are_logged_too(
    sample: SampleFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A 400 for ambiguous framing or garbage, a 431 for a huge head: each is a line naming the
    answer and why, with what of the request line was read."""
    blue = await sample("blue")
    path = tmp_path / "access.log"
    proxy = await make_proxy(proxy_config([blue.url], [], access_log={"to": str(path)}))
    sent = [
        b"POST /both HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"\x16\x03\x01 not http at all\r\n\r\n",
        b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    ]
    answers: list[bytes] = []
    for raw in sent:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(raw)
        async with asyncio.timeout(5):
            answers.append(await reader.read(-1))
        writer.close()
    assert [a[:12] for a in answers] == [b"HTTP/1.1 400", b"HTTP/1.1 400", b"HTTP/1.1 431"]
    lines = await logged(proxy, path, 3)
    assert [(x["method"], x["target"], x["status"]) for x in lines] == [
        ("POST", "/both", 400),
        ("", "", 400),
        ("GET", "/big", 431),
    ]
    for line, answer in zip(lines, answers, strict=True):
        assert line["reason"]
        assert line["pool"] is None
        assert line["attempts"] == 0
        assert line["bytes_out"] == len(answer.split(b"\r\n\r\n", 1)[1])


async def test_sampling_is_honoured_within_statistical_bounds(
    sample: SampleFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    blue = await sample("blue")
    path = tmp_path / "access.log"
    share, total = 0.2, 1000
    proxy = await make_proxy(
        proxy_config([blue.url], [], access_log={"to": str(path), "sample": share}), seed=7
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(total):
            async with session.get(f"http://127.0.0.1:{proxy.port}/") as resp:
                await resp.read()
    log = proxy.access_log
    assert log is not None
    await wait_for(lambda: log.written == log.accepted)
    count = len(read_lines(path))
    assert count == log.written
    sigma = math.sqrt(total * share * (1 - share))
    assert abs(count - total * share) < 5 * sigma, count


async def test_reopen_writes_to_a_new_file_after_rotation(
    sample: SampleFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    blue = await sample("blue")
    path = tmp_path / "access.log"
    proxy = await make_proxy(proxy_config([blue.url], [], access_log={"to": str(path)}))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{proxy.port}/before") as resp:
            await resp.read()
        await logged(proxy, path, 1)
        rotated = tmp_path / "access.log.1"
        path.rename(rotated)
        proxy.reopen_logs()
        async with session.get(f"http://127.0.0.1:{proxy.port}/after") as resp:
            await resp.read()
    lines = await logged(proxy, path, 1)
    assert [line["target"] for line in lines] == ["/after"]
    assert [line["target"] for line in read_lines(rotated)] == ["/before"]


async def test_log_off_writes_nothing(
    sample: SampleFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    blue = await sample("blue")
    proxy = await make_proxy(proxy_config([blue.url], [], access_log={"to": "off"}))
    assert proxy.access_log is None


def test_lines_are_json_whatever_the_target_holds() -> None:
    """The writer builds lines by hand: any target bytes, reason and upstream still give one
    valid JSON object per line with the same values json.dumps would give."""
    when = datetime(2026, 3, 1, 23, 59, 59, 987000, tzinfo=UTC).timestamp()
    targets = [b"/plain?a=1&b=2", b'/q"uote', b"/back\\slash", b"/caf\xe9", b"/tab\there", b"/\x7f"]
    for target in targets:
        for reason, upstream, pool in (("", "http://u:1", "blue"), ('retried: "x"', None, None)):
            entry: Entry = (
                when, b"10.0.0.1", b"GET", target, 503, 12, 345, pool, upstream, 2,
                0.0123456, 0.001, reason,
            )  # fmt: skip
            line = format_line(entry)
            assert line.endswith("\n")
            assert line.count("\n") == 1
            assert json.loads(line) == {
                "time": "2026-03-01T23:59:59.987+00:00",
                "client": "10.0.0.1",
                "method": "GET",
                "target": target.decode("latin-1"),
                "status": 503,
                "bytes_in": 12,
                "bytes_out": 345,
                "pool": pool,
                "upstream": upstream,
                "attempts": 2,
                "duration_ms": 12.346,
                "upstream_ms": 1.0,
                "reason": reason or None,
            }
