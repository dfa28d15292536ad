"""Deployment records in SQLite: what was asked, what ran before and after, and how it ended."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

State = Literal[
    "queued", "deferred",  # waiting (a push joins them)
    "pulling", "deploying", "verifying", "rolling_back",  # under way
    "succeeded", "unchanged", "skipped", "rolled_back", "failed", "interrupted",  # ended
]  # fmt: skip
Trigger = Literal["webhook", "poll", "manual", "recovery"]
WAITING: frozenset[str] = frozenset({"queued", "deferred"})
UNDER_WAY: frozenset[str] = frozenset({"pulling", "deploying", "verifying", "rolling_back"})
ENDED: frozenset[str] = frozenset(
    {"succeeded", "unchanged", "skipped", "rolled_back", "failed", "interrupted"}
)

#: Schema versions (``PRAGMA user_version``); the first is the original one, so an existing file migrates.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS deployments (
        id INTEGER PRIMARY KEY,
        state TEXT NOT NULL,
        trigger_tag TEXT NOT NULL,
        trigger_pushed_at REAL NOT NULL,
        triggers INTEGER NOT NULL DEFAULT 1,
        requested_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        image TEXT,
        before_image_id TEXT,
        before_digest TEXT,
        after_image_id TEXT,
        after_digest TEXT,
        rolled_back INTEGER NOT NULL DEFAULT 0,
        health_failed INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE TABLE IF NOT EXISTS pushes (
        tag TEXT NOT NULL,
        pushed_at REAL NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (tag, pushed_at)
    );
    """,
    """
    ALTER TABLE deployments ADD COLUMN trigger TEXT NOT NULL DEFAULT 'webhook';
    ALTER TABLE deployments ADD COLUMN force INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deployments ADD COLUMN deferred_until REAL;
    ALTER TABLE deployments ADD COLUMN clock_unsynced INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deployments ADD COLUMN before_version TEXT;
    ALTER TABLE deployments ADD COLUMN after_version TEXT;
    ALTER TABLE deployments ADD COLUMN images_removed INTEGER;
    ALTER TABLE deployments ADD COLUMN bytes_freed INTEGER;
    """,
)


class Deployment(BaseModel):
    id: int
    state: State
    trigger: Trigger = "webhook"
    trigger_tag: str
    trigger_pushed_at: float
    triggers: int
    requested_at: float
    force: bool = False
    deferred_until: float | None = None
    clock_unsynced: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    image: str | None = None
    before_image_id: str | None = None
    before_digest: str | None = None
    before_version: str | None = None
    after_image_id: str | None = None
    after_digest: str | None = None
    after_version: str | None = None
    rolled_back: bool = False
    health_failed: bool = False
    images_removed: int | None = None
    bytes_freed: int | None = None
    error: str | None = None


class Records:
    """Written from the deploy thread and read from the server's loop: one lock, short transactions."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version > len(MIGRATIONS):
                raise RuntimeError(f"{path} has schema version {version}, newer than {len(MIGRATIONS)}")
            for number in range(version + 1, len(MIGRATIONS) + 1):  # each in one transaction
                self._db.executescript(
                    f"BEGIN; {MIGRATIONS[number - 1]}; PRAGMA user_version = {number}; COMMIT;"
                )
            # A deploy cut off by a crash: say so (the receiver queues a deploy to set things right).
            # Waiting ones simply run.
            cut = self._db.execute(
                f"UPDATE deployments SET state='interrupted', finished_at=? "
                f"WHERE state NOT IN ({','.join('?' * len(WAITING | ENDED))})",
                (self.clock(), *sorted(WAITING | ENDED)),
            )
            self.interrupted = cut.rowcount

    def close(self) -> None:
        self._db.close()

    def remember_push(self, tag: str, pushed_at: float, forget_before: float) -> bool:
        """Record a push; False if this very push (tag, pushed_at) came before: a replay.

        Pushes older than ``forget_before`` are dropped.
        """
        with self._lock:
            self._db.execute("DELETE FROM pushes WHERE pushed_at < ?", (forget_before,))
            cur = self._db.execute(
                "INSERT OR IGNORE INTO pushes (tag, pushed_at, received_at) VALUES (?, ?, ?)",
                (tag, pushed_at, self.clock()),
            )
            return cur.rowcount == 1

    def queue(
        self, tag: str, pushed_at: float, trigger: Trigger = "webhook", *, force: bool = False,
        clock_unsynced: bool = False,
    ) -> tuple[Deployment, bool]:  # fmt: skip
        """The deployment this request joins: the one still waiting (coalesced), else a new one.

        ``force`` (a deploy asked for by hand) makes the waiting one ignore the deploy windows.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM deployments WHERE state IN ('queued', 'deferred') ORDER BY id"
            ).fetchone()
            if row:
                self._db.execute(
                    "UPDATE deployments SET triggers = triggers + 1, force = max(force, ?), "
                    "clock_unsynced = max(clock_unsynced, ?) WHERE id=?",
                    (int(force), int(clock_unsynced), row["id"]),
                )
                return self._get(row["id"]), True
            cur = self._db.execute(
                "INSERT INTO deployments (state, trigger, trigger_tag, trigger_pushed_at, requested_at, "
                "force, clock_unsynced) VALUES ('queued', ?, ?, ?, ?, ?, ?)",
                (trigger, tag, pushed_at, self.clock(), int(force), int(clock_unsynced)),
            )
            return self._get(int(cur.lastrowid or 0)), False

    def next_queued(self) -> Deployment | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM deployments WHERE state IN ('queued', 'deferred') ORDER BY id"
            ).fetchone()
            return self._get(row["id"]) if row else None

    def get(self, deployment_id: int) -> Deployment | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM deployments WHERE id=?", (deployment_id,)).fetchone()
        return Deployment(**dict(row)) if row else None

    def update(self, deployment_id: int, **fields: Any) -> Deployment:
        if fields.get("state") in ENDED:
            fields.setdefault("finished_at", self.clock())
        columns = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._db.execute(
                f"UPDATE deployments SET {columns} WHERE id=?", (*fields.values(), deployment_id)
            )
            return self._get(deployment_id)

    def failed_before(self, image_id: str) -> bool:
        """Whether this image already failed its health check here (it is not tried again)."""
        return self._exists("after_image_id=? AND health_failed=1", image_id)

    def digest_failed(self, digest: str) -> bool:
        """The same, by registry digest: what the poller sees before pulling anything."""
        return self._exists("after_digest=? AND health_failed=1", digest)

    def passed(self, limit: int) -> list[str]:
        """The ``limit`` images that passed their health gate most recently, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT after_image_id FROM deployments WHERE state='succeeded' "
                "AND after_image_id IS NOT NULL GROUP BY after_image_id "
                "ORDER BY max(finished_at) DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [r[0] for r in rows]

    def recent(self, limit: int = 50) -> list[Deployment]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM deployments ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [Deployment(**dict(r)) for r in rows]

    def _exists(self, where: str, *args: object) -> bool:
        with self._lock:
            return bool(self._db.execute(f"SELECT 1 FROM deployments WHERE {where} LIMIT 1", args).fetchone())

    def _get(self, deployment_id: int) -> Deployment:
        row = self._db.execute("SELECT * FROM deployments WHERE id=?", (deployment_id,)).fetchone()
        return Deployment(**dict(row))
