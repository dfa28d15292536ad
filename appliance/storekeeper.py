"""Keeps the store usable while the appliance runs, and says exactly what is wrong when it is not.

Every part that touches SQLite hands its errors to :meth:`StoreKeeper.failed`. A failed write stops
writing: the ingester pauses, and resumes from the committed cursor once a probe (every
``PROBE_EVERY_S``) opens the store for writing again. Reads go on from the reader connection and
from what the parts hold in memory. What is wrong is named in :mod:`appliance.health` ("disk full:
0 bytes free on /data", "data folder is read-only: /data", "database file is corrupt: ..."). Two
kinds of trouble are repaired here:

* a corrupt file (SQLite says so, or the daily ``quick_check`` does) is moved aside, kept and named
  with the time, and a fresh store takes its place: ingest starts over, the history keeper back-fills,
  and the predictions the old file held are reported as lost;
* a write-ahead log deleted while the store is open is folded back into the database through the
  writer's still-open handle, before anything opens the file afresh, and the store is reopened.

Nothing here raises: storage trouble is an event, not the end of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from appliance.health import Conditions
from appliance.store import Store, StoreClosed, StoreRefused

log = logging.getLogger(__name__)

PROBE_EVERY_S = 5.0
#: Free space a full disk must regain before writing is tried again (a commit takes a few pages).
MIN_FREE_BYTES = 256 * 1024
CHECK_EVERY_S = 86_400.0  # quick_check of the whole file: soon after start, then daily
T = TypeVar("T")

Kind = Literal["full", "readonly", "corrupt", "wal", "newer", "locked", "io", "closed"]
_READONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass(frozen=True, slots=True)
class Trouble:
    kind: Kind
    message: str


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def diagnose(exc: BaseException, path: Path) -> Trouble:
    """What a storage error means for the appliance, in words a person can act on."""
    folder = path.parent.resolve()
    if isinstance(exc, StoreRefused):
        return Trouble("newer", str(exc))
    if isinstance(exc, StoreClosed):
        return Trouble("closed", str(exc))
    code = exc.sqlite_errorcode & 0xFF if isinstance(exc, sqlite3.Error) else None
    if code == sqlite3.SQLITE_FULL or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return Trouble("full", f"disk full: {free_bytes(folder)} bytes free on {folder}")
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return Trouble("corrupt", f"database file is corrupt: {exc}")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return Trouble("locked", f"database is locked by another program: {exc}")
    if not os.access(folder, os.W_OK):
        return Trouble("readonly", f"data folder is read-only: {folder}")
    if path.exists() and not os.access(path, os.W_OK):
        return Trouble("readonly", f"database file is read-only: {path}")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM) or (
        isinstance(exc, OSError) and exc.errno in _READONLY_ERRNOS
    ):
        return Trouble("readonly", f"database file cannot be written: {path} ({exc})")
    return Trouble("io", f"storage error: {exc}")


@contextlib.contextmanager
def reported(keeper: StoreKeeper | None) -> Iterator[None]:
    """A storage error inside is handed to ``keeper`` (reported, writes paused) and ends the block;
    a part run without a keeper (tests, tools) raises it instead."""
    try:
        yield
    except sqlite3.Error as exc:
        if keeper is None:
            raise
        keeper.failed(exc)


class StoreKeeper:
    """The writer and reader connections of one store file, kept usable (see the module's doc)."""

    def __init__(self, store: Store, health: Conditions, reader: Store | None = None) -> None:
        self.store, self.reader, self.health = store, reader, health
        #: Told after a corrupt file was replaced by a fresh store (to forget what was derived from it).
        self.on_replaced: list[Callable[[], None]] = []
        self.trouble: Trouble | None = None
        #: Counts the times the store was (re)opened: state read from it before a change is stale.
        self.generation = 0
        self._writable = asyncio.Event()
        if store.is_open:
            self._writable.set()
        self._wake = asyncio.Event()
        self._checked = -CHECK_EVERY_S  # the first quick_check at the first look

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    @property
    def trouble_message(self) -> str | None:
        return self.trouble.message if self.trouble else None

    async def until_writable(self) -> None:
        await self._writable.wait()

    def open(self) -> bool:
        """Open both connections (at start, and to retry); trouble is reported, never raised."""
        try:
            self.store.connect()
        except (sqlite3.Error, StoreRefused, OSError) as exc:
            self._report(diagnose(exc, self.store.path))
            if self.trouble is not None and self.trouble.kind == "corrupt":
                return self._replace_corrupt()
            if self.trouble is not None and self.trouble.kind != "newer":
                self._open_reader()  # a full disk or a read-only folder can still be read
            return False
        self._open_reader()
        self._recovered()
        return True

    def failed(self, exc: BaseException) -> str:
        """A part met a storage error: report it, stop writing until it is dealt with; the message."""
        trouble = diagnose(exc, self.store.path)
        if trouble.kind == "closed":  # a consequence of trouble already reported
            return self.trouble.message if self.trouble else trouble.message
        if trouble.kind == "io" and self.store.is_open and not self.store.wal_path.exists():
            trouble = Trouble("wal", f"write-ahead log {self.store.wal_path.name} was deleted while in use")
        self._report(trouble)
        self._writable.clear()
        self._wake.set()
        return self.trouble.message if self.trouble else trouble.message

    def read(self, fn: Callable[[], T], default: T) -> T:
        """``fn()``, or ``default`` after reporting a storage error (for reads that may go without)."""
        try:
            return fn()
        except sqlite3.Error as exc:
            self.failed(exc)
            return default

    async def run(self) -> None:
        """Probe and repair until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_EVERY_S):  # not wait_for (see Predictor.run)
                    await self._wake.wait()
            self._wake.clear()
            self.tend()
            if self.writable and time.monotonic() - self._checked >= CHECK_EVERY_S:
                self._checked = time.monotonic()
                result = await asyncio.to_thread(self._quick_check)
                if result != "ok":
                    self._report(Trouble("corrupt", f"database file is corrupt: {result}"))
                    self._writable.clear()
                    self.tend()

    def tend(self) -> None:
        """One look: fold a lost write-ahead log back, replace a corrupt file, retry a failed store."""
        if self.writable:
            if self.store.is_open and not self.store.wal_path.exists():
                self._fold_lost_wal()
            return
        kind = self.trouble.kind if self.trouble else None
        if kind == "corrupt":
            self._replace_corrupt()
        elif kind == "wal":
            self._fold_lost_wal()
        elif kind == "full" and (free := free_bytes(self.store.path.parent)) < MIN_FREE_BYTES:
            assert self.trouble is not None
            self.health.problem("storage", self.trouble.message, free_bytes=free)
        else:
            self.open()

    # -- what is done about it ----------------------------------------------------------------------

    def _report(self, trouble: Trouble) -> None:
        if self.trouble is not None and self.trouble.kind == trouble.kind:
            trouble = self.trouble  # the same trouble again: one message (and one log line) for all
        self.trouble = trouble
        detail: dict[str, Any] = {"db": str(self.store.path)}
        if trouble.kind == "full":
            detail["free_bytes"] = free_bytes(self.store.path.parent)
        self.health.problem("storage", trouble.message, **detail)

    def _recovered(self) -> None:
        self.trouble = None
        self.generation += 1
        self.health.ok("storage")
        self._writable.set()

    def _open_reader(self) -> None:
        if self.reader is None:
            return
        try:
            self.reader.connect()
        except sqlite3.Error as exc:
            log.warning("store unreadable", extra={"db": str(self.reader.path), "error": str(exc)})

    def _quick_check(self) -> str:
        """In a worker thread, on a connection of its own: SQLite releases the GIL while it reads."""
        try:
            with Store(self.store.path, readonly=True) as check:
                return check.quick_check()
        except sqlite3.Error as exc:
            return "ok" if diagnose(exc, self.store.path).kind != "corrupt" else str(exc)

    def _fold_lost_wal(self) -> None:
        """The -wal was deleted: its frames live on in the writer's open handle; checkpoint, reopen."""
        wal = self.store.wal_path.name
        if not self.store.is_open:
            self.open()
            return
        try:
            folded = self.store.checkpoint()
        except sqlite3.Error as exc:
            self.failed(exc)
            return
        if not folded:  # a reader holds an older snapshot: try again in a moment
            self._report(Trouble("wal", f"write-ahead log {wal} was deleted while in use"))
            self._writable.clear()
            return
        self.store.close()
        if self.reader is not None:
            self.reader.close()
        self.health.incident(
            "storage",
            f"write-ahead log {wal} was deleted while in use: its commits were saved into the database "
            "and the store reopened",
            db=str(self.store.path),
        )
        self.open()

    def _replace_corrupt(self) -> bool:
        """Move the corrupt file aside (kept, named with the time) and start a fresh store."""
        path = self.store.path
        self.store.close()
        if self.reader is not None:
            self.reader.close()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = path.with_name(f"{path.stem}-corrupt-{stamp}{path.suffix}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = path.with_name(path.name + suffix)
                if src.exists():
                    os.replace(src, aside.with_name(aside.name + suffix))
        except OSError as exc:
            self.health.problem("storage", f"database file is corrupt and cannot be moved aside: {exc}",
                                db=str(path))  # fmt: skip
            return False
        lost = lost_predictions(aside)
        self.trouble = None
        if not self.open():
            return False
        self.health.incident(
            "storage",
            f"database file was corrupt: moved aside to {aside.name}, a fresh store took its place and "
            f"history is back-filled; {'an unknown number of' if lost is None else lost} predictions "
            "kept in it are lost",
            moved_to=str(aside), lost_predictions=lost,
        )  # fmt: skip
        for listener in self.on_replaced:
            listener()
        return True


def lost_predictions(path: Path) -> int | None:
    """How many predictions a set-aside store held, if it can still tell."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            return int(db.execute("SELECT count(*) FROM predictions").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return None
