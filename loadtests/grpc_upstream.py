"""A gRPC upstream for load tests: a grpcio server with raw-bytes methods (no generated code).

    python -m loadtests.grpc_upstream --name blue --port 50051
    python -m loadtests.grpc_upstream --name green --port 50052 --fail-rate 0.2

Service `turnout.Sample`: `Unary` answers its request prefixed by the server's name, `Split`
streams a reply per byte asked for, `Sum` adds up a client stream's lengths, `Chat` echoes each
message of a bidirectional stream upper-cased. Every call carries the trailing metadata
`x-served-by: NAME`. With --fail-rate, that share of the unary calls ends with --fail-code
(INTERNAL by default) instead: a candidate that fails. grpc.health.v1.Health/Check answers
SERVING. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

SERVICE = "turnout.Sample"
HOST = "127.0.0.1"
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


class Sample:
    def __init__(self, name: str, fail_rate: float, fail_code: grpc.StatusCode) -> None:
        self.name = name
        self.fail_rate = fail_rate
        self.fail_code = fail_code

    def _served(self, context: Any) -> None:
        context.set_trailing_metadata((("x-served-by", self.name),))

    async def unary(self, request: bytes, context: Any) -> bytes:
        self._served(context)
        if self.fail_rate and random.random() < self.fail_rate:
            await context.abort(self.fail_code, f"{self.name} fails this call")
        return self.name.encode() + b":" + request

    async def split(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self._served(context)
        for i in range(len(request)):
            yield bytes([request[i]]) * (i + 1)

    async def sum(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        self._served(context)
        total = 0
        async for message in requests:
            total += len(message)
        return str(total).encode()

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        self._served(context)
        async for message in requests:
            yield message.upper()

    async def check(self, request: bytes, context: Any) -> bytes:
        return SERVING


async def serve(name: str, port: int, fail_rate: float, fail_code: grpc.StatusCode) -> None:
    sample = Sample(name, fail_rate, fail_code)
    server = grpc.aio.server()
    methods = {
        "Unary": grpc.unary_unary_rpc_method_handler(sample.unary),
        "Split": grpc.unary_stream_rpc_method_handler(sample.split),
        "Sum": grpc.stream_unary_rpc_method_handler(sample.sum),
        "Chat": grpc.stream_stream_rpc_method_handler(sample.chat),
    }
    health = {"Check": grpc.unary_unary_rpc_method_handler(sample.check)}
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(SERVICE, methods),
            grpc.method_handlers_generic_handler("grpc.health.v1.Health", health),
        )
    )
    server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    print(f"gRPC sample {name} on {HOST}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--fail-rate", type=float, default=0.0)
    ap.add_argument("--fail-code", default="INTERNAL", choices=[c.name for c in grpc.StatusCode])
    args = ap.parse_args(argv)
    asyncio.run(serve(args.name, args.port, args.fail_rate, grpc.StatusCode[args.fail_code]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
