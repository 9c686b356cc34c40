"""Hostile input to the admin API and the configuration: cross-site requests, deep JSON,
config bombs and odd files, and a stdout nobody reads."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import HOST, SampleFactory, proxy_config, wait_for

from proxy.admin.api import AdminSetupError
from proxy.admin.client import AdminClient
from proxy.config import parse_config
from proxy.http import accesslog
from proxy.http.accesslog import AccessLog, Entry
from proxy.runtime import Proxy

TIMEOUT = 10.0
MEMORY_CAP = 1 << 30
LISTENING = re.compile(r"turnout: proxy listening on http://[^:]+:(\d+)")
ADMIN_API = re.compile(r"turnout: admin API on http://[^:]+:(\d+)")


# --- the admin API and cross-site requests -------------------------------------------------------


class Admin:
    """A running proxy's admin API, called with whatever headers an attacker chooses."""

    def __init__(self, proxy: Proxy, session: aiohttp.ClientSession) -> None:
        self.proxy = proxy
        self.session = session

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.proxy.admin_port}"

    async def call(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, dict[str, Any]]:
        async with asyncio.timeout(TIMEOUT):
            async with self.session.request(
                method,
                self.url + path,
                data=body,
                headers=headers,
                skip_auto_headers=("Content-Type",),
            ) as resp:
                assert resp.content_type == "application/json"
                return resp.status, await resp.json()

    def state(self) -> tuple[float, list[str], list[bool]]:
        router = self.proxy.router
        return (
            self.proxy.spreader.split,
            [u.url for u in router.pools["blue"]],
            [u.draining for u in router.pools["blue"]],
        )


AdminFactory = Callable[..., Awaitable[Admin]]


@pytest.fixture
async def admin_factory(
    sample: SampleFactory, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AdminFactory]:
    monkeypatch.delenv("TURNOUT_ADMIN_TOKEN", raising=False)
    proxies: list[Proxy] = []

    async def make(config_path: str | None = None, **admin: Any) -> Admin:
        blue, green = await sample("blue"), await sample("green")
        data = proxy_config([blue.url], [green.url], admin={"host": HOST, "port": 0, **admin})
        proxy = Proxy(parse_config(data), config_path=config_path)
        proxies.append(proxy)
        await proxy.start()
        await proxy.start_admin()
        return Admin(proxy, session)

    yield make
    for proxy in proxies:
        await proxy.shutdown(timeout=0)


JSON = "application/json"
ADD = json.dumps({"url": "http://127.0.0.1:9"}).encode()
SPLIT = json.dumps({"green": 50}).encode()

CROSS_SITE: list[tuple[str, str, bytes | None, dict[str, str], int, str]] = [
    # A "simple" request a page of any site may send without asking first.
    ("POST", "/pools/blue/upstreams", ADD, {"Content-Type": "text/plain"}, 415, "media type"),
    ("PUT", "/split", SPLIT, {"Content-Type": "text/plain;charset=UTF-8"}, 415, "media type"),
    (
        "POST",
        "/pools/blue/upstreams/0/drain",
        b"",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "media type",
    ),
    ("POST", "/reload", b"", {"Content-Type": "multipart/form-data; boundary=x"}, 415, "media"),
    ("PUT", "/split", SPLIT, {}, 415, "media type"),  # a body without a type
    # A foreign origin, even with a JSON body (a preflight would ask first; be sure anyway).
    (
        "PUT",
        "/split",
        SPLIT,
        {"Content-Type": JSON, "Origin": "http://evil.example"},
        403,
        "forbidden origin",
    ),
    ("POST", "/pools/blue/upstreams/0/drain", None, {"Origin": "null"}, 403, "forbidden origin"),
    ("POST", "/reload", None, {"Origin": "http://127.0.0.1:1"}, 403, "forbidden origin"),
    # DNS rebinding: a name of another site that resolves to 127.0.0.1.
    (
        "POST",
        "/pools/blue/upstreams",
        ADD,
        {"Content-Type": JSON, "Host": "evil.example"},
        403,
        "host",
    ),
    ("POST", "/pools/blue/upstreams/0/drain", None, {"Host": "evil.example:9901"}, 403, "host"),
    ("GET", "/status", None, {"Host": "evil.example"}, 403, "forbidden host"),
    ("GET", "/status", None, {"Host": "127.0.0.1.evil.example"}, 403, "forbidden host"),
    ("GET", "/status", None, {"Host": "10.1.2.3"}, 403, "forbidden host"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "error"),
    CROSS_SITE,
    ids=[f"{m} {p} {sorted(h.items())}" for m, p, _, h, _, _ in CROSS_SITE],
)
async def test_cross_site_requests_are_refused_and_change_nothing(
    admin_factory: AdminFactory,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    admin = await admin_factory()
    before = admin.state()
    got, answer = await admin.call(method, path, body, **headers)
    assert got == status, answer
    assert set(answer) == {"error", "detail"}
    assert error in answer["error"]
    assert answer["detail"]
    assert admin.state() == before


async def test_the_admin_api_own_origin_and_names_are_accepted(
    admin_factory: AdminFactory,
) -> None:
    admin = await admin_factory(allowed_hosts=["turnout.internal"])
    port = admin.proxy.admin_port
    # As a page the admin API served itself calls it (same origin, JSON).
    own = {"Origin": f"http://{HOST}:{port}", "Content-Type": JSON}
    assert (await admin.call("PUT", "/split", json.dumps({"green": 5}).encode(), **own))[0] == 200
    assert admin.proxy.spreader.split == 5.0
    for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.2", "turnout.internal:19901"):
        origin = f"http://{host}"
        status, answer = await admin.call(
            "PUT",
            "/split",
            json.dumps({"green": 6}).encode(),
            Host=host,
            Origin=origin,
            **{"Content-Type": "application/json; charset=utf-8"},
        )
        assert status == 200, (host, answer)
    # No body, no Content-Type: how curl -X POST and the CLI's bodiless commands look.
    assert (await admin.call("POST", "/pools/green/upstreams/0/drain"))[0] == 200
    assert admin.proxy.router.pools["green"][0].draining
    assert (await admin.call("POST", "/rollout/start", b"", **{"Content-Type": JSON}))[0] == 200
    assert (await admin.call("POST", "/rollout/pause"))[0] == 200


async def test_with_a_token_any_name_may_be_used_but_not_a_foreign_origin(
    admin_factory: AdminFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_TURNOUT_TOKEN", "s3cret")
    admin = await admin_factory(token_env="TEST_TURNOUT_TOKEN")
    auth = {"Authorization": "Bearer s3cret", "Content-Type": JSON}
    # A page of another site cannot send the token: the name the operator uses does not matter.
    status, _ = await admin.call("PUT", "/split", SPLIT, Host="turnout.example", **auth)
    assert status == 200
    status, answer = await admin.call(
        "PUT", "/split", b'{"green": 7}', Origin="http://x.example", **auth
    )
    assert (status, answer["error"]) == (403, "forbidden origin")
    assert admin.proxy.spreader.split == 50.0


async def test_the_cli_sends_json_and_passes(
    admin_factory: AdminFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy import cli

    admin = await admin_factory()
    for argv in (
        ["rollout", "start", "--strategy", "lazy"],
        ["rollout", "pause"],
        ["drain", "green/0"],
    ):
        code = await asyncio.to_thread(cli.main, [*argv, "--admin", admin.url])
        assert code == 0, capsys.readouterr()
    assert admin.proxy.router.pools["green"][0].draining


async def test_the_cli_says_json_even_without_a_body() -> None:
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Turnout-Admin: 1\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, HOST, 0)
    async with server:
        client = AdminClient(f"http://{HOST}:{server.sockets[0].getsockname()[1]}", None)
        for method, path in (("POST", "/rollout/pause"), ("POST", "/reload"), ("GET", "/status")):
            await asyncio.to_thread(client.request, method, path)
    pause, reload, status = (head.lower() for head in heads)
    assert b"\r\ncontent-type: application/json\r\n" in pause
    assert b"\r\ncontent-type: application/json\r\n" in reload
    assert b"content-type" not in status


@pytest.mark.parametrize("token", [" ", "\t\n"])
async def test_a_whitespace_only_token_refuses_to_start(
    admin_factory: AdminFactory, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    monkeypatch.setenv("TEST_TURNOUT_TOKEN", token)
    with pytest.raises(AdminSetupError, match="TEST_TURNOUT_TOKEN holds only whitespace"):
        await admin_factory(token_env="TEST_TURNOUT_TOKEN")


async def test_deep_json_is_a_400_not_a_traceback(
    admin_factory: AdminFactory, caplog: pytest.LogCaptureFixture
) -> None:
    admin = await admin_factory()
    for body in (
        b'{"green": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b'{"url": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}",
        # Within what the decoder takes, beyond what an error message may format.
        b'{"green": ' + b"[" * 900 + b"]" * 900 + b"}",
    ):
        status, answer = await admin.call("PUT", "/split", body, **{"Content-Type": JSON})
        assert status == 400, answer
        assert "nested deeper than" in answer["detail"]
    # Brackets inside strings are text, not nesting.
    status, answer = await admin.call(
        "POST",
        "/pools/blue/upstreams",
        json.dumps({"url": "[" * 100}).encode(),
        **{"Content-Type": JSON},
    )
    assert (status, answer["error"]) == (400, "invalid upstream")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- configuration bombs and odd files -----------------------------------------------------------

BASE = proxy_config(["http://127.0.0.1:9001"], ["http://127.0.0.1:9002"])


def base_yaml(**overrides: Any) -> str:
    return yaml.safe_dump({**BASE, "admin": {"host": HOST, "port": 0}, **overrides})


def alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def turnout(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`turnout ARGS` under a 1 GiB memory cap and a timeout."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cap_memory,
        env={k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_TOKEN"},
        check=False,
    )


BOMBS: list[tuple[str, str, str]] = [
    ("alias bomb", alias_bomb(9), "expands to more than 100,000 values"),
    ("flow nesting", "x: " + "[" * 3_000 + "]" * 3_000 + "\n", "nested deeper than 64 levels"),
    (
        "block nesting",
        "".join(f"{' ' * i}k:\n" for i in range(1_000)) + " " * 1_000 + "k: 1\n",
        "nested deeper than 64 levels",
    ),
    ("huge integer", base_yaml() + "split: " + "1" * 5_000 + "\n", "integer longer than 32"),
    ("huge hex integer", base_yaml() + "split: 0x" + "f" * 5_000 + "\n", "integer longer than 32"),
    ("huge file", base_yaml() + "#" * (2 << 20) + "\n", "larger than 1 MiB"),
    (
        "tiny interval",
        base_yaml(health_check={"interval": 1.0e-300}),
        "health_check.interval: invalid duration 1e-300: 0 or at least 1ms",
    ),
    (
        "sub-10ms interval",
        base_yaml(health_check={"interval": "5ms"}),
        "health_check.interval: interval '5ms' must be at least 10ms",
    ),
    (
        "full-width digits",
        base_yaml(drain={"timeout": "\uff11s"}),
        "drain.timeout: invalid duration",
    ),
    ("compound duration", base_yaml(drain={"timeout": "1h1m"}), "drain.timeout: invalid duration"),
    (
        "/proc access log",
        base_yaml(access_log={"to": "/proc/version"}),
        "cannot write /proc/version",
    ),
    ("device access log", base_yaml(access_log={"to": "/dev/null"}), "is not a regular file"),
    (
        "admin off loopback without a token",
        base_yaml(admin={"host": "0.0.0.0", "port": 0}),
        "admin: the admin API would listen on 0.0.0.0, which is not loopback, without a token",
    ),
]


@pytest.mark.parametrize(("text", "message"), [b[1:] for b in BOMBS], ids=[b[0] for b in BOMBS])
@pytest.mark.parametrize("command", ["check", "run"])
def test_config_bombs_exit_2_fast_with_a_clear_error(
    tmp_path: Path, command: str, text: str, message: str
) -> None:
    path = tmp_path / "turnout.yaml"
    path.write_text(text)
    started = time.monotonic()
    done = turnout(command, "-c", str(path))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 20  # refused, not worked through


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "directory"])
def test_only_regular_files_are_read(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        path = str(tmp_path / "turnout.yaml")
        os.mkfifo(path)  # nobody will ever write: reading it would wait forever
    elif kind == "directory":
        path = str(tmp_path)
    else:
        path = kind
    for command in ("check", "run"):
        done = turnout(command, "-c", path, timeout=20)
        assert done.returncode == 2, done.stderr
        assert f"{path}: cannot read: " in done.stderr
        assert "Traceback" not in done.stderr


async def test_a_bomb_at_reload_is_a_400_and_changes_nothing(
    admin_factory: AdminFactory, tmp_path: Path
) -> None:
    path = tmp_path / "turnout.yaml"
    admin = await admin_factory(config_path=str(path))
    before = admin.state()
    for text in (alias_bomb(9), "x: " + "[" * 3_000 + "]" * 3_000, "split: " + "9" * 5_000):
        path.write_text(text)
        status, answer = await admin.call("POST", "/reload")
        assert (status, answer["error"]) == (400, "invalid config"), answer
        assert "invalid YAML" in answer["detail"][0]
    assert admin.state() == before


# --- a stdout nobody reads ------------------------------------------------------------------------

ENTRY: Entry = (
    0.0,
    b"127.0.0.1",
    b"GET",
    b"/x",
    200,
    0,
    2,
    "blue",
    "http://b:1",
    1,
    0.001,
    0.0,
    "",
)


def unread_pipe() -> tuple[int, int]:
    """A pipe of one page that nobody reads: (read end, write end)."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    return read_end, write_end


def pending(read_end: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(read_end, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


async def test_an_unread_stdout_drops_and_counts_lines_and_close_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_end, write_end = unread_pipe()
    stdout = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(accesslog, "CLOSE_WAIT", 0.2)
    log = AccessLog("stdout", 1.0)
    try:
        # The queue, a batch the writer took, and 1,000 more than both.
        total = accesslog.QUEUE_LINES + accesslog.BATCH + 1000
        for _ in range(total):
            log.write(ENTRY)  # never waits, whatever the pipe does
        await wait_for(lambda: pending(read_end) > 3000)
        assert log.refused >= 1000
        started = time.monotonic()
        await asyncio.to_thread(log.close)
        assert time.monotonic() - started < 5
        assert not log._writer.is_alive()
        assert log.written + log.dropped == total
        assert log.written * len(accesslog.format_line(ENTRY)) <= 4096
    finally:
        stdout.close()
        os.close(read_end)


async def test_a_read_stdout_gets_every_line_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many pages through a pipe someone reads: no line lost, none written twice."""
    read_end, write_end = os.pipe()
    stdout = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)

    reader = asyncio.create_task(asyncio.to_thread(drain))
    log = AccessLog("stdout", 1.0)
    total = 5000  # about 1.2 MB: hundreds of pages
    try:
        for i in range(total):
            log.write((*ENTRY[:3], f"/line/{i}".encode(), *ENTRY[4:]))
        await asyncio.to_thread(log.close)
    finally:
        stdout.close()
    async with asyncio.timeout(30):
        await reader
    os.close(read_end)
    targets = [json.loads(line)["target"] for line in received.decode().splitlines()]
    assert targets == [f"/line/{i}" for i in range(total)]
    assert (log.written, log.dropped) == (total, 0)


async def test_dropped_lines_are_a_metric(
    admin_factory: AdminFactory, monkeypatch: pytest.MonkeyPatch, session: aiohttp.ClientSession
) -> None:
    read_end, write_end = unread_pipe()
    stdout = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(accesslog, "CLOSE_WAIT", 0.2)
    admin = await admin_factory()
    proxy = admin.proxy
    try:
        proxy.access_log = AccessLog("stdout", 1.0)
        for _ in range(accesslog.QUEUE_LINES + accesslog.BATCH + 500):
            proxy.access_log.write(ENTRY)
        async with session.get(admin.url + "/metrics") as resp:
            text = await resp.text()
        (line,) = [x for x in text.splitlines() if x.startswith("turnout_access_log_dropped_total")]
        assert float(line.split()[-1]) >= 500
    finally:
        if proxy.access_log is not None:
            await asyncio.to_thread(proxy.access_log.close)
        proxy.access_log = None
        stdout.close()
        os.close(read_end)


async def test_sigterm_completes_when_nobody_reads_stdout(
    sample: SampleFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    blue = await sample("blue")
    data = proxy_config(
        [blue.url],
        [blue.url],
        admin={"host": HOST, "port": 0},
        access_log={"to": "stdout"},
        drain={"timeout": "3s"},
    )
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(data))
    read_end, write_end = unread_pipe()
    log = (tmp_path / "turnout.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "-c",
        str(path),
        "--takeover-socket",
        str(tmp_path / "handover.sock"),
        stdout=write_end,
        stderr=log,
        env={k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_TOKEN"},
    )
    os.close(write_end)
    try:
        said = b""
        async with asyncio.timeout(30):
            while not (LISTENING.search(said.decode()) and ADMIN_API.search(said.decode())):
                chunk = await asyncio.to_thread(os.read, read_end, 4096)
                assert chunk, (tmp_path / "turnout.log").read_text()
                said += chunk
        port = int(LISTENING.search(said.decode())[1])  # type: ignore[index]
        # From here on nobody reads: 300 lines (80 KB) are far more than the one-page pipe
        # holds, so most of them wait in the proxy.
        for _ in range(300):
            async with session.get(f"http://{HOST}:{port}/x") as resp:
                assert resp.status == 200
                await resp.read()
        await wait_for(lambda: pending(read_end) > 0)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(3 + 5):  # drain.timeout, and a margin for a loaded machine
            code = await proc.wait()
        assert code == 0
        text = (tmp_path / "turnout.log").read_text()
        assert "lines dropped" in text
        assert "Traceback" not in text
        assert "Fatal Python error" not in text
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        os.close(read_end)
