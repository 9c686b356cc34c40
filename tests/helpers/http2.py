"""HTTP/2: a hand-driven client (`RawH2`), and pools whose upstreams speak HTTP/2."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.events
from conftest import HOST, proxy_config, wait_for


class RawH2:
    """A hand-driven HTTP/2 client on h2's state machine, for what real clients never do."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: list[h2.events.Event] = []
        self.goaways: list[tuple[int, int]] = []  # (last stream id, error code)
        self.buffer = b""
        self.closed = False

    @classmethod
    async def open(cls, port: int, **settings: int) -> RawH2:
        reader, writer = await asyncio.open_connection(HOST, port)
        client = cls(reader, writer)
        client.conn.initiate_connection()
        if settings:
            codes = h2.settings.SettingCodes
            client.conn.update_settings({codes[name]: value for name, value in settings.items()})
        client.flush()
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def request(self, path: str, *, end: bool = True) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"t"),
                (b":path", path.encode()),
            ],
            end_stream=end,
        )
        self.flush()
        return stream_id

    async def read(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            self.closed = True
            return False
        # GOAWAY frames are taken out and kept aside: h2's own state machine refuses every
        # frame after one, even those of the streams it lets finish.
        self.buffer += data
        frames = bytearray()
        while len(self.buffer) >= 9:
            size = int.from_bytes(self.buffer[:3], "big") + 9
            if len(self.buffer) < size:
                break
            frame, self.buffer = self.buffer[:size], self.buffer[size:]
            if frame[3] == 0x7:
                last = int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF
                self.goaways.append((last, int.from_bytes(frame[13:17], "big")))
            else:
                frames += frame
        if frames:
            self.events += self.conn.receive_data(bytes(frames))
        self.flush()
        return True

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if not await self.read():
                    return

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def close(self) -> None:
        self.writer.close()


def h2_pools(blue: str, green: str, protocol: str = "h2c", **overrides: Any) -> dict[str, Any]:
    data = proxy_config([blue], [green], **overrides)
    data["pools"]["blue"]["protocol"] = protocol
    data["pools"]["green"]["protocol"] = protocol
    return data


async def up(proxy: Any) -> None:
    """Health checks (over HTTP/2) passed for every upstream."""
    await wait_for(lambda: all(u.healthy for u in proxy.router.upstreams()), timeout=10)
