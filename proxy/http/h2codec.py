"""The HTTP/2 codec both sides speak through: one small interface, two implementations.

Turnout's HTTP/2 endpoints (h2front.py towards clients, h2upstream.py towards upstreams) use
only `Codec`, a subset of ngh2's sans-I/O `Connection`, and its events. Two implementations:

- ngh2 (libnghttp2, the default): about 0.04x the CPU of h2 per proxied gRPC call
  (`python -m loadtests.h2codec`). libnghttp2 validates what it receives (RFC 9113 §8
  messaging, HPACK, CONTINUATION and reset floods) and queues what is sent until the peer's
  window allows it.
- `H2Reference` over h2 (pure Python): the reference the differential tests run Turnout
  against (`TURNOUT_H2_CODEC=h2`, or `use("h2")` before a connection is made).

Flow control is by hand on both: a DATA frame's bytes are credited back to the peer only when
`acknowledge_received_data` says the application took them, so a slow reader throttles its
own stream. Padding is credited by the codec itself.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import ngh2
from hpack.exceptions import HPACKError
from hyperframe.frame import GoAwayFrame
from ngh2 import (
    DataReceived,
    ErrorCode,
    Event,
    GoAwayReceived,
    InformationalResponseReceived,
    NGH2Error,
    RequestReceived,
    ResponseReceived,
    Setting,
    StreamClosed,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

__all__ = [
    "Codec",
    "CodecError",
    "DataReceived",
    "ErrorCode",
    "Event",
    "GoAwayReceived",
    "H2Reference",
    "InformationalResponseReceived",
    "RequestReceived",
    "ResponseReceived",
    "Setting",
    "StreamClosed",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
    "acknowledge",
    "client",
    "goaway_for",
    "queued",
    "server",
    "use",
]

CodecError = NGH2Error  # what every Codec call raises for a stream or connection it cannot use

Fields = Iterable[tuple[bytes, bytes]]


class Codec(Protocol):
    """What Turnout asks of an HTTP/2 connection's state machine."""

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the peer. A connection error is mostly not raised: a GOAWAY with
        its code is queued and the codec stops wanting to read or write once it is sent. When
        it is raised (CodecError: a limit broken mid-frame), the connection is unusable: send
        `goaway_for(exc, ...)` and close."""

    def events(self) -> list[Event]:
        """What the data taken so far produced, oldest first (and forgets them)."""

    def data_to_send(self) -> bytes: ...

    @property
    def want_read(self) -> bool: ...

    @property
    def want_write(self) -> bool: ...

    def send_request(self, headers: Fields, *, end_stream: bool = False) -> int: ...

    def send_response(
        self, stream_id: int, headers: Fields, *, end_stream: bool = False
    ) -> None: ...

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue `data`: it goes out as the peer's windows allow (see queued_body_size)."""

    def send_trailers(self, stream_id: int, headers: Fields) -> None:
        """End the stream with trailers, after what is queued."""

    def end_stream(self, stream_id: int) -> None:
        """End the stream after what is queued."""

    def queued_body_size(self, stream_id: int) -> int:
        """Bytes given to send_data for the stream that the peer's window still holds back."""

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None: ...

    def acknowledge_received_data(self, amount: int, stream_id: int) -> None: ...

    def send_shutdown_notice(self) -> None:
        """The announcing GOAWAY of RFC 9113 §6.8: no new streams, those in flight go on."""

    def send_goaway(
        self, error_code: int = 0, *, last_stream_id: int | None = None, debug_data: bytes = b""
    ) -> None:
        """The final GOAWAY: streams up to `last_stream_id` are still served."""

    @property
    def remote_settings(self) -> dict[int, int]: ...


def _ngh2(role: ngh2.Role, max_header_list: int) -> ngh2.Connection:
    return ngh2.Connection(
        role,
        ngh2.Configuration(
            auto_window_update=False,
            max_inbound_header_list_size=max_header_list,
            # Turnout's own reset budget (h2front) answers first; this one is a backstop.
            stream_reset_rate_limit=(10_000, 1_000),
        ),
    )


def _ngh2_server(max_streams: int, max_header_list: int) -> Codec:
    conn = _ngh2(ngh2.Role.SERVER, max_header_list)
    conn.initiate_connection(
        {Setting.MAX_CONCURRENT_STREAMS: max_streams, Setting.MAX_HEADER_LIST_SIZE: max_header_list}
    )
    return conn


def _ngh2_client(window: int) -> Codec:
    conn = _ngh2(ngh2.Role.CLIENT, 65536)
    conn.initiate_connection({Setting.INITIAL_WINDOW_SIZE: window, Setting.ENABLE_PUSH: 0})
    conn.set_local_window_size(window)
    return conn


class H2Reference:
    """`Codec` over h2, the pure-Python state machine: the reference for differential tests.

    h2 sends only what fits the peer's window and raises otherwise, so this keeps each
    stream's unsent data (and its end) and sends it as windows open, as libnghttp2 does."""

    def __init__(self, client_side: bool) -> None:
        config = h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=True
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.max_inbound_frame_size = 16384
        self.queued: dict[int, deque[bytes]] = {}
        self.queued_size: dict[int, int] = {}
        self.endings: dict[int, list[tuple[bytes, bytes]] | None] = {}
        self.pending: list[Event] = []
        self.terminated = False  # a connection error, or the final GOAWAY with one
        self.closing_data = b""  # what goes out before the connection closes

    def initiate(self, settings: dict[h2.settings.SettingCodes, int], window: int = 65535) -> None:
        self.conn.local_settings = h2.settings.Settings(
            client=self.conn.config.client_side, initial_values=settings
        )
        self.conn.initiate_connection()
        if window > 65535:
            self.conn.increment_flow_control_window(window - 65535)

    # receiving ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.terminated:
            return
        try:
            received = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.terminated = True
            out = self.conn.data_to_send()
            if not isinstance(exc, h2.exceptions.DenialOfServiceError) and isinstance(
                exc.__cause__, HPACKError
            ):
                # RFC 9113 §4.3: an undecodable field block is a COMPRESSION_ERROR (the
                # decoder's state is lost); h2 says PROTOCOL_ERROR.
                out = goaway_with_code(out, ErrorCode.COMPRESSION_ERROR)
            self.closing_data = out
            return
        pending = self.pending
        for event in received:
            if isinstance(event, h2.events.RequestReceived):
                pending.append(
                    RequestReceived(
                        event.stream_id, tuple(event.headers), event.stream_ended is not None
                    )
                )
            elif isinstance(event, h2.events.ResponseReceived):
                pending.append(
                    ResponseReceived(
                        event.stream_id, tuple(event.headers), event.stream_ended is not None
                    )
                )
            elif isinstance(event, h2.events.InformationalResponseReceived):
                pending.append(InformationalResponseReceived(event.stream_id, tuple(event.headers)))
            elif isinstance(event, h2.events.TrailersReceived):
                pending.append(TrailersReceived(event.stream_id, tuple(event.headers)))
            elif isinstance(event, h2.events.DataReceived):
                data_ = event.data or b""
                padding = (event.flow_controlled_length or 0) - len(data_)
                if padding:
                    self.conn.acknowledge_received_data(padding, event.stream_id)
                pending.append(DataReceived(event.stream_id, data_, event.stream_ended is not None))
            elif isinstance(event, h2.events.StreamReset):
                self._forget(event.stream_id)
                pending.append(StreamReset(event.stream_id, int(event.error_code)))
                pending.append(StreamClosed(event.stream_id, int(event.error_code), None))
            elif isinstance(event, h2.events.WindowUpdated):
                pending.append(WindowUpdated(event.stream_id, event.delta or 0))
                self._send_queued()
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self._send_queued()
            elif isinstance(event, h2.events.ConnectionTerminated):
                pending.append(
                    GoAwayReceived(
                        event.last_stream_id or 0,
                        int(event.error_code or 0),
                        event.additional_data or b"",
                    )
                )

    def events(self) -> list[Event]:
        events, self.pending = self.pending, []
        return events

    def data_to_send(self) -> bytes:
        if self.terminated:
            out, self.closing_data = self.closing_data, b""
            return out
        data: bytes = self.conn.data_to_send()
        return data

    @property
    def want_read(self) -> bool:
        return not self.terminated

    @property
    def want_write(self) -> bool:
        return not self.terminated or bool(self.closing_data)

    @property
    def remote_settings(self) -> dict[int, int]:
        return dict(self.conn.remote_settings)

    # sending ------------------------------------------------------------------------

    def _check(self) -> None:
        if self.terminated:
            raise ngh2.ConnectionStateError("Connection is terminating")

    def send_request(self, headers: Fields, *, end_stream: bool = False) -> int:
        self._check()
        stream_id: int = self.conn.get_next_available_stream_id()
        try:
            self.conn.send_headers(stream_id, list(headers), end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise ngh2.ConnectionStateError(str(exc)) from exc
        return stream_id

    def send_response(self, stream_id: int, headers: Fields, *, end_stream: bool = False) -> None:
        self._check()
        try:
            self.conn.send_headers(stream_id, list(headers), end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise ngh2.StreamUnavailableError(str(exc)) from exc

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        self._check()
        self._open(stream_id)
        if data:
            self.queued.setdefault(stream_id, deque()).append(data)
            self.queued_size[stream_id] = self.queued_size.get(stream_id, 0) + len(data)
        if end_stream:
            self.endings[stream_id] = None
        self._send_stream(stream_id)

    def send_trailers(self, stream_id: int, headers: Fields) -> None:
        self._check()
        self._open(stream_id)
        self.endings[stream_id] = list(headers)
        self._send_stream(stream_id)

    def end_stream(self, stream_id: int) -> None:
        self._check()
        self._open(stream_id)
        self.endings[stream_id] = None
        self._send_stream(stream_id)

    def queued_body_size(self, stream_id: int) -> int:
        return self.queued_size.get(stream_id, 0)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        self._forget(stream_id)
        try:
            self.conn.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError as exc:
            raise ngh2.StreamUnavailableError(str(exc)) from exc

    def acknowledge_received_data(self, amount: int, stream_id: int) -> None:
        try:
            self.conn.acknowledge_received_data(amount, stream_id)
        except h2.exceptions.ProtocolError as exc:
            raise ngh2.StreamUnavailableError(str(exc)) from exc

    def send_shutdown_notice(self) -> None:
        self._write_goaway(2**31 - 1, 0, b"")

    def send_goaway(
        self, error_code: int = 0, *, last_stream_id: int | None = None, debug_data: bytes = b""
    ) -> None:
        if last_stream_id is None:
            last_stream_id = self.conn.highest_inbound_stream_id
        if error_code:
            self.conn.close_connection(error_code, debug_data, last_stream_id)
            self.closing_data = self.conn.data_to_send()
            self.terminated = True
        else:
            self._write_goaway(last_stream_id, error_code, debug_data)

    def _write_goaway(self, last_stream_id: int, error_code: int, debug_data: bytes) -> None:
        """A GOAWAY beside h2's state machine, which refuses to finish the streams in flight
        once it has sent one itself."""
        self.conn._data_to_send += goaway_frame(last_stream_id, error_code, debug_data)

    # the send queue -------------------------------------------------------------------

    def _open(self, stream_id: int) -> None:
        if stream_id not in self.conn.streams or self.conn.streams[stream_id].closed:
            raise ngh2.StreamUnavailableError("stream does not exist")

    def _forget(self, stream_id: int) -> None:
        self.queued.pop(stream_id, None)
        self.queued_size.pop(stream_id, None)
        self.endings.pop(stream_id, None)

    def _send_queued(self) -> None:
        for stream_id in list(self.queued.keys() | self.endings.keys()):
            self._send_stream(stream_id)

    def _send_stream(self, stream_id: int) -> None:
        conn = self.conn
        pending = self.queued.get(stream_id)
        try:
            while pending:
                window = min(
                    conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size
                )
                if window <= 0:
                    return
                chunk = pending[0]
                if len(chunk) > window:
                    pending[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    pending.popleft()
                self.queued_size[stream_id] -= len(chunk)
                conn.send_data(stream_id, chunk)
            if stream_id in self.endings:
                trailers = self.endings.pop(stream_id)
                if trailers is None:
                    conn.end_stream(stream_id)
                else:
                    conn.send_headers(stream_id, trailers, end_stream=True)
                self._forget(stream_id)
        except h2.exceptions.ProtocolError:
            self._forget(stream_id)  # closed meanwhile (reset by the peer)


def queued(conn: Codec, stream_id: int) -> int:
    """What the peer's window still holds back of the stream's data; 0 for a stream gone."""
    try:
        return conn.queued_body_size(stream_id)
    except CodecError:
        return 0


def acknowledge(conn: Codec, stream_id: int, length: int) -> None:
    """Credit `length` bytes of the stream's data back to the peer (WINDOW_UPDATE as the codec
    sees fit). A stream closed meanwhile raises; the connection's window was credited anyway."""
    try:
        conn.acknowledge_received_data(length, stream_id)
    except CodecError:
        return


def goaway_for(exc: CodecError, last_stream_id: int) -> bytes:
    """The GOAWAY frame for a connection whose codec raised `exc` while reading."""
    if isinstance(exc, ngh2.DenialOfServiceError):
        code = ErrorCode.ENHANCE_YOUR_CALM
    elif isinstance(exc, ngh2.InternalError):
        code = ErrorCode.INTERNAL_ERROR
    else:
        code = ErrorCode.PROTOCOL_ERROR
    return goaway_frame(last_stream_id, code)


def goaway_frame(last_stream_id: int, error_code: int, debug_data: bytes = b"") -> bytes:
    frame = GoAwayFrame(
        0, last_stream_id=last_stream_id, error_code=error_code, additional_data=debug_data
    )
    return bytes(frame.serialize())


def goaway_with_code(data: bytes, code: int) -> bytes:
    """`data` (whole frames) with the error code of its GOAWAY frame replaced by `code`."""
    at = 0
    while at + 9 <= len(data):
        end = at + 9 + int.from_bytes(data[at : at + 3], "big")
        if data[at + 3] == 0x7 and end >= at + 17:
            return data[: at + 13] + code.to_bytes(4, "big") + data[at + 17 :]
        at = end
    return data


def _h2_server(max_streams: int, max_header_list: int) -> Codec:
    conn = H2Reference(client_side=False)
    conn.initiate(
        {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list,
        }
    )
    return conn


def _h2_client(window: int) -> Codec:
    conn = H2Reference(client_side=True)
    conn.initiate(
        {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        },
        window,
    )
    return conn


CODECS = {"ngh2": (_ngh2_server, _ngh2_client), "h2": (_h2_server, _h2_client)}


def use(name: str) -> None:
    """Make new connections on codec `name` ("ngh2" or "h2")."""
    global _in_use
    if name not in CODECS:
        raise ValueError(f"unknown HTTP/2 codec {name!r}: one of {', '.join(CODECS)}")
    _in_use = CODECS[name]


_in_use = CODECS["ngh2"]
use(os.environ.get("TURNOUT_H2_CODEC") or "ngh2")


def server(max_streams: int, max_header_list: int) -> Codec:
    """The codec of a connection from a client, its SETTINGS queued."""
    return _in_use[0](max_streams, max_header_list)


def client(window: int) -> Codec:
    """The codec of a connection to an upstream, its SETTINGS (and `window` for every
    stream and the connection) queued."""
    return _in_use[1](window)
