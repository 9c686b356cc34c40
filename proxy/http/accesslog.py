"""The access log: one JSON line per request, written by a thread so the event loop never
waits on a disk or a pipe.

On stdout or stderr the thread writes only when the pipe or terminal has room (whole lines
of at most PIPE_BUF bytes, which a pipe takes at once): with nobody reading, lines pile up in
the bounded queue, then are dropped and counted, and closing gives up after CLOSE_WAIT, so a
stuck reader never holds up a request or a shutdown.

The event loop formats the line (`format_line`, about 4 us) and appends it to a bounded deque
(no lock, no wake-up); the writer thread drains the deque every FLUSH_EVERY seconds and writes
what it holds in one call. The thread does no Python work worth the GIL: formatting there put
the loop and the thread in a tug of war for the one core and ~6 ms on the loop's p99.

A line is built by hand rather than by `json.dumps` of a dict: pools, upstream URLs and
reasons are a handful of strings the proxy made itself (quoted once and cached), and client,
method and target are escaped only when they hold a character JSON must escape.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import select
import stat
import sys
import threading
import time
from collections import deque
from typing import IO

from proxy.config import Config

# time, client, method, target, status, bytes in, bytes out, pool, upstream url, attempts,
# duration (s), upstream time (s), reason
Entry = tuple[
    float, bytes, bytes, bytes, int, int, int, str | None, str | None, int, float, float, str
]

log = logging.getLogger("turnout.access")

QUEUE_LINES = 65536
BATCH = 4096
FLUSH_EVERY = 0.1
CLOSE_WAIT = 1.0  # how long closing waits for a reader of stdout/stderr to take what is queued
QUOTED_CACHE = 1024

_NEEDS_ESCAPE = re.compile(rb"[^\x20-\x21\x23-\x5b\x5d-\x7e]")


def log_problems(config: Config) -> list[str]:
    """Why the configured access log file could not be written, with its YAML path."""
    to = config.access_log.to
    if to in ("off", "stdout", "stderr"):
        return []
    if os.path.isdir(to):
        return [f"access_log.to: {to} is a directory"]
    if os.path.exists(to):
        if not stat.S_ISREG(os.stat(to).st_mode):
            # A FIFO would block the writer, a device or /proc file refuse lines at run time.
            return [f"access_log.to: {to} is not a regular file (or use stdout, stderr)"]
        try:
            # As the log will open it (appending leaves an existing file as it is): a file root
            # may write by its mode can still refuse, e.g. those under /proc.
            with open(to, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            return [f"access_log.to: cannot write {to}: {exc.strerror or exc}"]
        return []
    parent = os.path.dirname(os.path.abspath(to))
    if not os.path.isdir(parent):
        return [f"access_log.to: directory {parent} does not exist"]
    writable = os.access(parent, os.W_OK | os.X_OK)
    return [] if writable else [f"access_log.to: {to} is not writable"]


class AccessLog:
    """`to` is stdout, stderr or a file path; `sample` the share of requests logged."""

    def __init__(self, to: str, sample: float, rng: random.Random | None = None) -> None:
        self.to = to
        self.sample = sample
        self._random = (rng or random.Random()).random
        self._lines: deque[str] = deque()
        self.accepted = 0
        self.refused = 0  # queue full (counted by the event loop)
        self.lost = 0  # queued, then given up on (counted by the writer thread)
        self.written = 0
        self._reopen = threading.Event()
        self._closing = threading.Event()
        self._give_up_at = math.inf
        self._file: IO[str] | None = None
        self._fd: int | None = None
        self._poll = select.poll()
        self._open()
        self._writer = threading.Thread(target=self._run, name="turnout-access-log", daemon=True)
        self._writer.start()

    def wants(self) -> bool:
        """Whether this request is in the sample (decided before an entry is built)."""
        return self.sample >= 1.0 or self._random() < self.sample

    def write(self, entry: Entry) -> None:
        if len(self._lines) < QUEUE_LINES:
            self._lines.append(format_line(entry))
            self.accepted += 1
        else:
            # The writer cannot keep up (a stuck disk or pipe): lose lines, never latency.
            self.refused += 1

    @property
    def dropped(self) -> int:
        """Lines lost: refused with the queue full, or queued and given up on at close."""
        return self.refused + self.lost

    def reopen(self) -> None:
        """Reopen the file (after logrotate moved it), from the writer thread."""
        self._reopen.set()

    def close(self) -> None:
        """Write what is queued, then stop the writer (blocking: call it off the loop). A stdout
        or stderr nobody reads gets CLOSE_WAIT; what it did not take is dropped."""
        self._give_up_at = time.monotonic() + CLOSE_WAIT
        self._closing.set()
        self._writer.join(timeout=CLOSE_WAIT + 1)
        if self.dropped:
            log.warning(
                "access log %s: %d lines dropped, the writer could not keep up",
                self.to,
                self.dropped,
            )
        if self._file is not None and self.to not in ("stdout", "stderr"):
            self._file.close()

    def _open(self) -> None:
        if self.to in ("stdout", "stderr"):
            self._file = sys.stdout if self.to == "stdout" else sys.stderr
            try:
                self._fd = self._file.fileno()
            except (AttributeError, OSError, ValueError):
                return  # replaced by an object without a descriptor (tests): written as a file
            self._file.flush()
            self._poll.register(self._fd, select.POLLOUT)
        else:
            old = self._file
            self._file = open(self.to, "a", encoding="utf-8")  # noqa: SIM115 - owned by the log
            if old is not None:
                old.close()

    def _run(self) -> None:
        lines = self._lines
        while True:
            done = self._closing.wait(FLUSH_EVERY)
            if self._reopen.is_set():
                self._reopen.clear()
                if self.to not in ("stdout", "stderr"):
                    try:
                        self._open()
                    except OSError as exc:
                        log.error("cannot reopen access log %s: %s", self.to, exc)
            while lines:
                self._write([lines.popleft() for _ in range(min(len(lines), BATCH))])
                if self._closing.is_set() and time.monotonic() >= self._give_up_at:
                    self.lost += len(lines)
                    lines.clear()
            if done:
                return

    def _write(self, lines: list[str]) -> None:
        if self._fd is not None:
            self._send(self._fd, lines)
            return
        if self._file is None:
            return
        try:
            self._file.write("".join(lines))
            self._file.flush()
            self.written += len(lines)
        except (OSError, ValueError) as exc:
            log.error("cannot write the access log %s: %s", self.to, exc)

    def _send(self, fd: int, lines: list[str]) -> None:
        """Write to a pipe or terminal in chunks it takes without blocking, once it has room."""
        start = 0
        while start < len(lines):
            end, size = start, 0
            while end < len(lines) and (end == start or size + len(lines[end]) <= select.PIPE_BUF):
                size += len(lines[end])
                end += 1
            chunk = memoryview("".join(lines[start:end]).encode("utf-8", "replace"))
            while chunk:
                if not self._room(fd):
                    self.lost += len(lines) - start
                    return
                try:
                    # One page at a time: a pipe with room for one takes it without blocking.
                    # The count is bound first: mypyc evaluates a call inside a slice bound
                    # twice, which wrote every page twice.
                    sent = os.write(fd, chunk[: select.PIPE_BUF])
                    chunk = chunk[sent:]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    log.error("cannot write the access log to %s: %s", self.to, exc)
                    self.lost += len(lines) - start
                    return
            self.written += end - start
            start = end

    def _room(self, fd: int) -> bool:
        """Wait until `fd` takes a write; False once closing has waited long enough."""
        while not self._poll.poll(FLUSH_EVERY * 1000):
            if self._closing.is_set() and time.monotonic() >= self._give_up_at:
                return False
        return True

    def __repr__(self) -> str:
        return (
            f"<AccessLog to={self.to} sample={self.sample:g} queued={len(self._lines)} "
            f"accepted={self.accepted} written={self.written} dropped={self.dropped}>"
        )


def format_line(entry: Entry) -> str:
    (when, client, method, target, status, bytes_in, bytes_out, pool, upstream, attempts,
     duration, upstream_time, reason) = entry  # fmt: skip
    # The client is an address the socket gave and the method a token the parser checked:
    # neither holds a character JSON escapes. The target may hold anything llhttp lets by.
    return (
        f'{{"time":"{_timestamp(when)}","client":"{client.decode("ascii")}",'
        f'"method":"{method.decode("ascii")}","target":{_json_bytes(target)},"status":{status},'
        f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},"pool":{_quoted(pool)},'
        f'"upstream":{_quoted(upstream)},"attempts":{attempts},'
        f'"duration_ms":{duration * 1000:.3f},"upstream_ms":{upstream_time * 1000:.3f},'
        f'"reason":{_quoted(reason or None)}}}\n'
    )


def _json_bytes(raw: bytes) -> str:
    if _NEEDS_ESCAPE.search(raw) is None:
        return '"' + raw.decode("ascii") + '"'
    return json.dumps(raw.decode("latin-1"))


_quoted_cache: dict[str | None, str] = {None: "null"}


def _quoted(text: str | None) -> str:
    quoted = _quoted_cache.get(text)
    if quoted is None:
        if len(_quoted_cache) >= QUOTED_CACHE:
            _quoted_cache.clear()
            _quoted_cache[None] = "null"
        quoted = _quoted_cache[text] = json.dumps(text)
    return quoted


_second: tuple[int, str] = (-1, "")


def _timestamp(when: float) -> str:
    """ISO 8601 in UTC with milliseconds, as datetime.isoformat gives it; the seconds part is
    formatted once per second (one tuple, replaced whole: two writer threads may share it
    for a moment after a reload)."""
    global _second
    whole, micros = divmod(round(when * 1_000_000), 1_000_000)
    second = _second
    if second[0] != whole:
        second = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{second[1]}.{micros // 1000:03d}+00:00"
