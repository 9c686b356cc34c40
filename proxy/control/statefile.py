"""The routing state kept across restarts: split, stable pool and rollout in a small JSON
file, written atomically after every change and read back at start.

The configuration's `split` is only the first start's: once a promotion made green stable, a
plain restart must not send every client back to blue. Writes happen off the event loop, at
most one at a time and a few a second (a ramp changes the split ten times a second), with the
last state always written; a file that cannot be written is an error in the log and in
/status, never a failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from proxy.logic.routing import POOLS

log = logging.getLogger("turnout.state")

FORMAT: Final = 1
MAX_SIZE: Final = 65536  # a state file is a few hundred bytes; anything larger is not ours
MIN_GAP: Final = 0.2  # seconds between two writes while changes keep coming


class StateFileError(Exception):
    """The state file cannot be read back as a routing state."""


def resolve(setting: str | None, config_path: str | None) -> str | None:
    """The state file's path: `auto` is beside the configuration file (`turnout.yaml` keeps
    `turnout.state.json`) or, where that folder is read-only (a mounted ConfigMap), in a
    runtime folder ($XDG_RUNTIME_DIR or the temporary one) under a name derived from the
    configuration's path; none without a file. `off` (or null) keeps no state."""
    if setting is None or setting == "off":
        return None
    if setting != "auto":
        return os.path.expanduser(setting)
    if config_path is None:
        return None
    path = Path(config_path).absolute()
    if os.access(path.parent, os.W_OK | os.X_OK):
        return str(path.with_name(f"{path.stem}.state.json"))
    runtime = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / "turnout"
    with contextlib.suppress(OSError):
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return str(runtime / f"{path.stem}-{digest}.state.json")


def read(path: str) -> dict[str, Any] | None:
    """The routing state in `path`, or None when there is no file yet."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_SIZE:
        raise StateFileError(f"{path} is larger than {MAX_SIZE} bytes")
    try:
        state = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFileError(f"{path} is not JSON: {exc}") from None
    if not isinstance(state, dict) or state.get("turnout_state") != FORMAT:
        raise StateFileError(f"{path} is not a Turnout state file (format {FORMAT})")
    split, stable = state.get("split"), state.get("stable")
    if isinstance(split, bool) or not isinstance(split, int | float) or not 0 <= split <= 100:
        raise StateFileError(f"{path}: split must be a number 0..100, not {split!r}")
    if stable not in POOLS:
        raise StateFileError(f"{path}: stable must be blue or green, not {stable!r}")
    return state


def write_atomically(path: str, data: bytes) -> None:
    """Replace `path` with `data` so that a reader (or a crash) sees the old file or the new
    one, never a part: a temporary file beside it, flushed to disk, renamed over it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".turnout-state-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename itself is durable once the folder is.
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class StateFile:
    """Writes what `snapshot` returns to `path` after each `changed()`, coalesced."""

    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self.restored = False
        self.written_at: float | None = None  # wall clock, for people reading /status
        self.error: str | None = None
        self._dirty = False
        self._last: bytes | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> dict[str, Any] | None:
        """The state kept by the last run, or None (no file, or one that cannot be used: then
        the configuration's split applies, and the error is logged and shown)."""
        try:
            state = read(self.path)
        except StateFileError as exc:
            self.error = str(exc)
            log.warning("state file not used, starting from the configuration: %s", exc)
            return None
        return state

    def changed(self) -> None:
        self._dirty = True
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        try:
            while self._dirty:
                self._dirty = False
                data = self._encode()
                if data != self._last:
                    await self._put(data)
                if self._dirty:
                    await asyncio.sleep(MIN_GAP)
        finally:
            self._task = None

    def _encode(self) -> bytes:
        state = {"turnout_state": FORMAT, **self.snapshot()}
        return json.dumps(state, sort_keys=True).encode() + b"\n"

    async def _put(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(write_atomically, self.path, data)
        except OSError as exc:
            error = f"cannot write {self.path}: {exc.strerror or exc}"
            if error != self.error:
                log.error("state file: %s (the routing state will not survive a restart)", error)
            self.error = error
            return
        if self.error is not None:
            log.info("state file %s written again", self.path)
        self._last = data
        self.error = None
        self.written_at = time.time()

    async def close(self) -> None:
        """Write the last change, if one is pending (at shutdown)."""
        task = self._task
        if task is not None:
            self._dirty = True
            await asyncio.shield(task)
        elif self._encode() != self._last:
            await self._put(self._encode())

    def status(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "restored": self.restored,
            "written_at": self.written_at,
            "error": self.error,
        }

    def __repr__(self) -> str:
        return f"<StateFile {self.path} restored={self.restored} error={self.error!r}>"
