"""gRPC users for Turnout's load-tested cutovers (run by `python -m loadtests.cutover`).

    locust -f loadtests/locust_grpc.py --headless -u 10 -r 10 -t 60s --host http://127.0.0.1:8080

Each user keeps one grpcio channel (one HTTP/2 connection, so every call's pool is chosen per
call, not per connection) to a proxy in front of `python -m loadtests.grpc_upstream` servers,
and mixes the four kinds of call: mostly unary (`Unary`, the only one the failing candidate
fails), then server-streaming (`Split`), client-streaming (`Sum`) and bidirectional (`Chat`),
each with a deadline. A call fails when its status is not OK or its answer is not the one
expected. Every call is logged to TURNOUT_LOAD_LOG as locustfile.py logs requests: the method
column says `grpc`, the status column holds the gRPC status code, the upstream column the
`x-served-by` trailer (`-` when the proxy answered itself).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent

# Its listeners write TURNOUT_LOAD_LOG. Imported as locust imports it, from this folder (on
# sys.path only when locust runs), hence unknown to the type checker.
import locustfile  # type: ignore[import-not-found]  # noqa: F401
from locust import User, between, task

grpc_gevent.init_gevent()  # grpcio's blocking calls yield to locust's other users

SERVICE = "turnout.Sample"
DEADLINE = 10.0


class Answer:
    """What locustfile's log listener reads from a response."""

    def __init__(self, code: int, served: str) -> None:
        self.status_code = code
        self.headers = {"X-Upstream": served}


def served_by(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "x-served-by":
            return str(value)
    return "-"


class GrpcCaller(User):
    """One client with one channel to the proxy."""

    wait_time = between(0.05, 0.25)

    def on_start(self) -> None:
        target = (self.host or "").removeprefix("http://").rstrip("/")
        self.channel = grpc.insecure_channel(target)
        base = f"/{SERVICE}/"
        self.unary_call = self.channel.unary_unary(base + "Unary")
        self.split_call = self.channel.unary_stream(base + "Split")
        self.sum_call = self.channel.stream_unary(base + "Sum")
        self.chat_call = self.channel.stream_stream(base + "Chat")

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, call: Callable[[], tuple[bool, Any]]) -> None:
        began = time.perf_counter()
        served, code, error, length = "-", 0, None, 0
        try:
            ok, rpc = call()
            served = served_by(rpc.trailing_metadata())
            length = 1
            if not ok:
                error = AssertionError(f"{name}: a wrong answer")
        except grpc.RpcError as exc:
            code = exc.code().value[0] if exc.code() is not None else 2
            served = served_by(exc.trailing_metadata())
            error = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - began) * 1000.0,
            response_length=length,
            response=Answer(code, served),
            exception=error,
            context={"sid": ""},
        )

    @task(12)
    def unary(self) -> None:
        message = random.randbytes(random.choice((10, 100, 1000)))

        def call() -> tuple[bool, Any]:
            answer, rpc = self.unary_call.with_call(message, timeout=DEADLINE)
            return answer.partition(b":")[2] == message, rpc

        self._call("Unary", call)

    @task(2)
    def split(self) -> None:
        ask = b"abcde"

        def call() -> tuple[bool, Any]:
            rpc = self.split_call(ask, timeout=DEADLINE)
            replies = list(rpc)
            return replies == [bytes([b]) * (i + 1) for i, b in enumerate(ask)], rpc

        self._call("Split", call)

    @task(2)
    def sum(self) -> None:
        messages = [random.randbytes(random.randint(1, 200)) for _ in range(5)]

        def call() -> tuple[bool, Any]:
            answer, rpc = self.sum_call.with_call(iter(messages), timeout=DEADLINE)
            return answer == str(sum(map(len, messages))).encode(), rpc

        self._call("Sum", call)

    @task(2)
    def chat(self) -> None:
        messages = [b"hello", b"turnout", b"bye"]

        def call() -> tuple[bool, Any]:
            sent: Iterator[bytes] = iter(messages)
            rpc = self.chat_call(sent, timeout=DEADLINE)
            return list(rpc) == [m.upper() for m in messages], rpc

        self._call("Chat", call)
