"""Deployment records in SQLite: what was asked, what ran before and after, and how it ended."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

State = Literal[
    "queued", "pulling", "deploying", "verifying", "rolling_back",  # under way
    "succeeded", "unchanged", "skipped", "rolled_back", "failed", "interrupted",  # ended
]  # fmt: skip
ENDED: frozenset[str] = frozenset(
    {"succeeded", "unchanged", "skipped", "rolled_back", "failed", "interrupted"}
)

SCHEMA = """
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
"""


class Deployment(BaseModel):
    id: int
    state: State
    trigger_tag: str
    trigger_pushed_at: float
    triggers: int
    requested_at: float
    started_at: float | None = None
    finished_at: float | None = None
    image: str | None = None
    before_image_id: str | None = None
    before_digest: str | None = None
    after_image_id: str | None = None
    after_digest: str | None = None
    rolled_back: bool = False
    health_failed: bool = False
    error: str | None = None


class Records:
    """Written from the deploy thread and read from the server's loop: one lock, short transactions."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            # A deploy cut off by a crash: say so (the receiver queues a deploy to set things right).
            # Queued ones simply run.
            cut = self._db.execute(
                f"UPDATE deployments SET state='interrupted', finished_at=? "
                f"WHERE state NOT IN ('queued', {','.join('?' * len(ENDED))})",
                (time.time(), *sorted(ENDED)),
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
                (tag, pushed_at, time.time()),
            )
            return cur.rowcount == 1

    def queue(self, tag: str, pushed_at: float) -> tuple[Deployment, bool]:
        """The deployment this push joins: the one still queued (coalesced), else a new one."""
        with self._lock:
            row = self._db.execute("SELECT id FROM deployments WHERE state='queued'").fetchone()
            if row:
                self._db.execute("UPDATE deployments SET triggers = triggers + 1 WHERE id=?", (row["id"],))
                return self._get(row["id"]), True
            cur = self._db.execute(
                "INSERT INTO deployments (state, trigger_tag, trigger_pushed_at, requested_at) "
                "VALUES ('queued', ?, ?, ?)",
                (tag, pushed_at, time.time()),
            )
            return self._get(int(cur.lastrowid or 0)), False

    def next_queued(self) -> Deployment | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM deployments WHERE state='queued' ORDER BY id").fetchone()
            return self._get(row["id"]) if row else None

    def update(self, deployment_id: int, **fields: Any) -> Deployment:
        if fields.get("state") in ENDED:
            fields.setdefault("finished_at", time.time())
        columns = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._db.execute(
                f"UPDATE deployments SET {columns} WHERE id=?", (*fields.values(), deployment_id)
            )
            return self._get(deployment_id)

    def failed_before(self, image_id: str) -> bool:
        """Whether this image already failed its health check here (it is not tried again)."""
        with self._lock:
            return bool(
                self._db.execute(
                    "SELECT 1 FROM deployments WHERE after_image_id=? AND health_failed=1 LIMIT 1",
                    (image_id,),
                ).fetchone()
            )

    def recent(self, limit: int = 50) -> list[Deployment]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM deployments ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [Deployment(**dict(r)) for r in rows]

    def _get(self, deployment_id: int) -> Deployment:
        row = self._db.execute("SELECT * FROM deployments WHERE id=?", (deployment_id,)).fetchone()
        return Deployment(**dict(row))
