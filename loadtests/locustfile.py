"""Realistic users for Turnout's load-tested cutovers (run by `python -m loadtests.cutover`).

    locust -f loadtests/locustfile.py --headless -u 20 -r 20 -t 60s --host http://127.0.0.1:8080

The users talk to a proxy in front of Turnout's sample upstreams (`turnout upstream`):

- a mix of GETs and POSTs: ordinary GETs (the sample's error injection applies to them),
  256 KiB bodies (`/bytes/262144`), slow streamed answers (`/stream`, about half a second),
  small bodies POSTed to `/sink` (answered with their length and digest, which are checked)
  and small JSON orders POSTed to an ordinary path (subject to error injection: a POST is not
  retried by the proxy, so a failing candidate answers it);
- one user in three sends a `sid` cookie that stays the same for its whole life, so a proxy
  configured with `sticky: {cookie: sid}` keeps it on one pool;
- a request fails when its status is >= 500, the connection fails, or a body comes back
  short or wrong; a 4xx is recorded but is not a failure.

Every response is also written as one CSV line to the file named by TURNOUT_LOAD_LOG (when set):
`start,method,name,status,upstream,ms,failed,sid`, where `start` is time.monotonic() when the
request was sent (CLOCK_MONOTONIC is one clock for every process on a Linux host, so the
runner lines these up with its own samples) and `upstream` is the response's X-Upstream header
(`-` when there was none, e.g. an error made by the proxy itself).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import uuid
from typing import IO, Any

from locust import between, events, task
from locust.contrib.fasthttp import FastHttpUser

LOG_ENV = "TURNOUT_LOAD_LOG"
LOG_HEADER = "start,method,name,status,upstream,ms,failed,sid\n"
BYTES_SIZE = 262144
STREAM_CHUNKS = 5
STREAM_SIZE = 512
STREAM_PATH = f"/stream?chunks={STREAM_CHUNKS}&interval=100&size={STREAM_SIZE}"
SINK_SIZES = (256, 1024, 4096)

_log: IO[str] | None = None


def _open_log(environment: Any, **_: Any) -> None:
    global _log
    path = os.environ.get(LOG_ENV)
    if path and _log is None:
        # Line-buffered: the runner watches the file grow to know that load has started.
        _log = open(path, "w", buffering=1, encoding="ascii")  # noqa: SIM115
        _log.write(LOG_HEADER)


def _close_log(environment: Any, **_: Any) -> None:
    global _log
    if _log is not None:
        _log.close()
        _log = None


def _record(
    request_type: str,
    name: str,
    response_time: float,
    response: Any,
    exception: BaseException | None,
    context: dict[str, Any],
    **_: Any,
) -> None:
    if _log is None:
        return
    headers = getattr(response, "headers", None)
    upstream = (headers.get("X-Upstream") if headers else None) or "-"
    status = getattr(response, "status_code", 0) or 0
    started = time.monotonic() - response_time / 1000.0
    failed = 1 if exception is not None else 0
    sid = context.get("sid", "")
    _log.write(
        f"{started:.4f},{request_type},{name},{status},{upstream},"
        f"{response_time:.2f},{failed},{sid}\n"
    )


events.init.add_listener(_open_log)  # type: ignore[no-untyped-call]
events.quitting.add_listener(_close_log)  # type: ignore[no-untyped-call]
events.request.add_listener(_record)  # type: ignore[no-untyped-call]


def _judge(resp: Any, expect_length: int | None = None) -> None:
    """Fail on >= 500 or a connection/body error, and on a body of the wrong length."""
    status = resp.status_code or 0
    if status == 0 or status >= 500:
        reason = resp.error if status == 0 else f"HTTP {status}"
        resp.failure(f"{reason}")
        return
    if resp.request_meta.get("exception") is not None and status < 400:
        # The head arrived but reading the body failed: a cut-short body.
        resp.failure(f"body: {resp.request_meta['exception']!r}")
        return
    if expect_length is not None and status == 200:
        length = len(resp.content or b"")
        if length != expect_length:
            resp.failure(f"short body: {length} of {expect_length} bytes")
            return
    resp.success()


class Visitor(FastHttpUser):
    """A client with no cookie: each request is placed by the proxy's split alone."""

    wait_time = between(0.05, 0.25)
    weight = 2
    network_timeout = 30.0
    connection_timeout = 5.0

    sid = ""

    def context(self) -> dict[str, Any]:
        return {"sid": self.sid}

    def _headers(self) -> dict[str, str]:
        return {"Cookie": f"sid={self.sid}"} if self.sid else {}

    @task(12)
    def item(self) -> None:
        path = f"/api/items/{random.randrange(1000)}"
        with self.client.get(
            path, name="/api/items/[id]", headers=self._headers(), catch_response=True
        ) as resp:
            _judge(resp)

    @task(2)
    def download(self) -> None:
        with self.client.get(
            f"/bytes/{BYTES_SIZE}", headers=self._headers(), catch_response=True
        ) as resp:
            _judge(resp, BYTES_SIZE)

    @task(1)
    def stream(self) -> None:
        with self.client.get(
            STREAM_PATH, name="/stream", headers=self._headers(), catch_response=True
        ) as resp:
            _judge(resp, STREAM_CHUNKS * STREAM_SIZE)

    @task(3)
    def upload(self) -> None:
        body: Any = random.randbytes(random.choice(SINK_SIZES))  # the client sends bytes as is
        headers = {**self._headers(), "Content-Type": "application/octet-stream"}
        with self.client.post("/sink", data=body, headers=headers, catch_response=True) as resp:
            _judge(resp)
            if resp.status_code == 200 and not _sink_matches(resp, body):
                resp.failure("the sink saw another body than the one sent")

    @task(2)
    def order(self) -> None:
        order = {"item": random.randrange(1000), "quantity": random.randint(1, 5)}
        with self.client.post(
            "/api/orders", json=order, headers=self._headers(), catch_response=True
        ) as resp:
            _judge(resp)


class StickyVisitor(Visitor):
    """A client with a `sid` cookie for its whole life: `sticky: {cookie: sid}` pins it."""

    weight = 1

    def on_start(self) -> None:
        self.sid = uuid.uuid4().hex[:16]


def _sink_matches(resp: Any, body: bytes) -> bool:
    try:
        answer = resp.json()
    except ValueError:
        return False
    return bool(
        answer.get("bytes") == len(body)
        and answer.get("sha256") == hashlib.sha256(body).hexdigest()
    )
