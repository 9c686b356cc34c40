"""The access log: one JSON line per request, written by a thread from a bounded queue so
the event loop never waits on a disk or a pipe."""

from __future__ import annotations

import json
import logging
import queue
import random
import sys
import threading
from typing import IO, Any

log = logging.getLogger("turnout.access")

QUEUE_LINES = 65536
BATCH = 512
FLUSH_EVERY = 0.2


class AccessLog:
    """`to` is stdout, stderr or a file path; `sample` the share of requests logged."""

    def __init__(self, to: str, sample: float, rng: random.Random | None = None) -> None:
        self.to = to
        self.sample = sample
        self._random = (rng or random.Random()).random
        self._lines: queue.Queue[str | None] = queue.Queue(maxsize=QUEUE_LINES)
        self.dropped = 0
        self.written = 0
        self._reopen = threading.Event()
        self._file: IO[str] | None = None
        self._open()
        self._thread = threading.Thread(target=self._run, name="turnout-access-log", daemon=True)
        self._thread.start()

    def wants(self) -> bool:
        """Whether this request is in the sample (decided before a record is built)."""
        return self.sample >= 1.0 or self._random() < self.sample

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._lines.put_nowait(json.dumps(record, separators=(",", ":")))
        except queue.Full:
            # The writer cannot keep up (a stuck disk or pipe): lose lines, never latency.
            self.dropped += 1

    def reopen(self) -> None:
        """Reopen the file (after logrotate moved it), from the writer thread."""
        self._reopen.set()

    def close(self) -> None:
        self._lines.put(None)
        self._thread.join(timeout=5)
        if self._file is not None and self.to not in ("stdout", "stderr"):
            self._file.close()

    def _open(self) -> None:
        if self.to == "stdout":
            self._file = sys.stdout
        elif self.to == "stderr":
            self._file = sys.stderr
        else:
            old = self._file
            self._file = open(self.to, "a", encoding="utf-8")  # noqa: SIM115 - owned by the log
            if old is not None:
                old.close()

    def _run(self) -> None:
        lines = self._lines
        while True:
            try:
                first = lines.get(timeout=FLUSH_EVERY)
            except queue.Empty:
                first = ""
            batch: list[str] = [] if not first else [first]
            done = first is None
            while not done and len(batch) < BATCH:
                try:
                    line = lines.get_nowait()
                except queue.Empty:
                    break
                if line is None:
                    done = True
                else:
                    batch.append(line)
            if self._reopen.is_set():
                self._reopen.clear()
                if self.to not in ("stdout", "stderr"):
                    try:
                        self._open()
                    except OSError as exc:
                        log.error("cannot reopen access log %s: %s", self.to, exc)
            if batch and self._file is not None:
                try:
                    self._file.write("\n".join(b for b in batch if b) + "\n")
                    self._file.flush()
                    self.written += len(batch)
                except (OSError, ValueError) as exc:
                    log.error("cannot write the access log %s: %s", self.to, exc)
            if done:
                return

    def __repr__(self) -> str:
        return (
            f"<AccessLog to={self.to} sample={self.sample:g} queued={self._lines.qsize()} "
            f"written={self.written} dropped={self.dropped}>"
        )
