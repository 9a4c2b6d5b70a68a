"""SQLite storage for feedback: items to show, and every rating with who/when/what was shown.

Safe with many raters at once:
  * WAL journal, a fresh connection per operation (so per request thread), `busy_timeout`;
  * every write runs in `BEGIN IMMEDIATE` (the write lock is taken up front, no upgrade deadlock);
  * each submission carries a page-generated id with a UNIQUE constraint, so a retried POST is a
    no-op that reports "duplicate"; undo requests carry their own id the same way;
  * a partial UNIQUE index allows one live (not undone) rating per rater and item.

Undo never deletes: it stamps `undone_at`, and exports skip such rows.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rlhf.feedback.candidates import Item

SCHEMA_VERSION = 1
COMPARE_CHOICES = ("A", "B", "tie", "both_bad")
RATE_CHOICES = ("1", "2", "3", "4", "5", "up", "down")
CHOICES = {"compare": COMPARE_CHOICES, "rate": RATE_CHOICES}
_SUBMISSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id          TEXT PRIMARY KEY,
    mode        TEXT NOT NULL CHECK (mode IN ('compare', 'rate')),
    prompt      TEXT NOT NULL,
    responses   TEXT NOT NULL,          -- JSON list, 2 (compare) or 1 (rate)
    indices     TEXT NOT NULL,          -- JSON list: positions in the candidate row
    model       TEXT,
    checkpoint  TEXT,
    added_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ratings (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    submission_id  TEXT NOT NULL UNIQUE,
    rater          TEXT NOT NULL,
    created_at     TEXT NOT NULL,       -- UTC, ISO 8601
    mode           TEXT NOT NULL CHECK (mode IN ('compare', 'rate')),
    item_id        TEXT NOT NULL,
    prompt         TEXT NOT NULL,
    shown          TEXT NOT NULL,       -- JSON list of the responses in the order shown (A, B)
    shown_order    TEXT NOT NULL,       -- JSON list: their positions in the candidate row
    choice         TEXT NOT NULL,       -- compare: A|B|tie|both_bad; rate: 1..5|up|down
    model          TEXT,
    checkpoint     TEXT,
    undone_at      TEXT,
    undone_by      TEXT UNIQUE          -- submission id of the undo request
);
CREATE UNIQUE INDEX IF NOT EXISTS ratings_one_live
    ON ratings (rater, item_id) WHERE undone_at IS NULL;
CREATE INDEX IF NOT EXISTS ratings_by_rater ON ratings (rater, mode, id);
"""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def valid_submission_id(value: str) -> bool:
    return isinstance(value, str) and _SUBMISSION_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class RatingRow:
    id: int
    submission_id: str
    rater: str
    created_at: str
    mode: str
    item_id: str
    prompt: str
    shown: tuple[str, ...]
    shown_order: tuple[int, ...]
    choice: str
    model: str | None
    checkpoint: str | None
    undone_at: str | None


@dataclass(frozen=True)
class Outcome:
    """What a write did. status: saved | duplicate | already_rated | undone | nothing_to_undo."""

    status: str
    rating_id: int | None = None
    item_id: str | None = None


def check_judgement(submission_id: str, item: Item, choice: str, order: Iterable[int]) -> tuple[int, ...]:
    """The rules every store applies before recording a judgement; -> `order` as a tuple.

    Raises ValueError: a malformed submission id, a choice not of the item's mode, or an
    `order` that is not a permutation of the item's responses."""
    if not valid_submission_id(submission_id):
        raise ValueError("submission id must be 8-64 characters of [A-Za-z0-9_-]")
    if choice not in CHOICES[item.mode]:
        raise ValueError(f"choice {choice!r} is not valid in {item.mode} mode")
    order = tuple(order)
    if sorted(order) != list(range(len(item.responses))):
        raise ValueError(f"order {order} is not a permutation of the item's responses")
    return order


class FeedbackStore:
    def __init__(self, path: str | os.PathLike, busy_timeout_ms: int = 30_000):
        self.path = Path(path)
        self.busy_timeout_ms = int(busy_timeout_ms)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: feedback DB schema v{version} is newer than this code")
            conn.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )

    # ------------------------------------------------------------------------- connections

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A new connection (autocommit; use `_write` for transactions), closed afterwards."""
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
        finally:
            conn.close()

    # ------------------------------------------------------------------------------- items

    def add_items(self, items: Iterable[Item]) -> int:
        """Insert items not stored yet; -> how many were new."""
        now = utc_now()
        rows = [
            (it.id, it.mode, it.prompt, _dumps(it.responses), _dumps(it.indices), it.model, it.checkpoint, now)
            for it in items
        ]
        with self.connect() as conn, _write(conn):
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            return conn.total_changes - before

    def load_items(self, mode: str) -> list[Item]:
        """Every stored item of `mode`, in the order it was first added."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT id, mode, prompt, responses, indices, model, checkpoint FROM items "
                "WHERE mode = ? ORDER BY rowid",
                (mode,),
            ).fetchall()
        return [
            Item(r[0], r[1], r[2], tuple(json.loads(r[3])), tuple(json.loads(r[4])), r[5], r[6])
            for r in rows
        ]

    # ----------------------------------------------------------------------------- ratings

    def record(self, *, submission_id: str, rater: str, item: Item, choice: str, order: Iterable[int]) -> Outcome:
        """Store one judgement of `item` by `rater`; `order` is the display order (e.g. (1, 0)).

        Idempotent per `submission_id`: a repeat returns status "duplicate" and stores nothing.
        If the rater already has a live rating of this item -> "already_rated", nothing stored.
        """
        order = check_judgement(submission_id, item, choice, order)
        shown = [item.responses[k] for k in order]
        shown_order = [item.indices[k] for k in order]
        with self.connect() as conn, _write(conn):
            row = conn.execute(
                "SELECT id, item_id FROM ratings WHERE submission_id = ?", (submission_id,)
            ).fetchone()
            if row:
                return Outcome("duplicate", row[0], row[1])
            row = conn.execute(
                "SELECT id FROM ratings WHERE rater = ? AND item_id = ? AND undone_at IS NULL",
                (rater, item.id),
            ).fetchone()
            if row:
                return Outcome("already_rated", row[0], item.id)
            cur = conn.execute(
                "INSERT INTO ratings (submission_id, rater, created_at, mode, item_id, prompt, shown,"
                " shown_order, choice, model, checkpoint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    submission_id, rater, utc_now(), item.mode, item.id, item.prompt,
                    _dumps(shown), _dumps(shown_order), choice, item.model, item.checkpoint,
                ),
            )
            return Outcome("saved", cur.lastrowid, item.id)

    def undo_last(self, *, submission_id: str, rater: str, mode: str) -> Outcome:
        """Mark `rater`'s most recent live rating in `mode` as undone (idempotent per id)."""
        if not valid_submission_id(submission_id):
            raise ValueError("submission id must be 8-64 characters of [A-Za-z0-9_-]")
        with self.connect() as conn, _write(conn):
            row = conn.execute(
                "SELECT id, item_id FROM ratings WHERE undone_by = ?", (submission_id,)
            ).fetchone()
            if row:
                return Outcome("duplicate", row[0], row[1])
            row = conn.execute(
                "SELECT id, item_id FROM ratings WHERE rater = ? AND mode = ? AND undone_at IS NULL "
                "ORDER BY id DESC LIMIT 1",
                (rater, mode),
            ).fetchone()
            if not row:
                return Outcome("nothing_to_undo")
            conn.execute(
                "UPDATE ratings SET undone_at = ?, undone_by = ? WHERE id = ?",
                (utc_now(), submission_id, row[0]),
            )
            return Outcome("undone", row[0], row[1])

    def rated_item_ids(self, rater: str, mode: str) -> set[str]:
        """Items `rater` has a live rating for."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT item_id FROM ratings WHERE rater = ? AND mode = ? AND undone_at IS NULL",
                (rater, mode),
            ).fetchall()
        return {r[0] for r in rows}

    def ratings(self, *, include_undone: bool = False) -> list[RatingRow]:
        """All ratings in the order they were made."""
        where = "" if include_undone else " WHERE undone_at IS NULL"
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT id, submission_id, rater, created_at, mode, item_id, prompt, shown, shown_order,"
                f" choice, model, checkpoint, undone_at FROM ratings{where} ORDER BY id"
            ).fetchall()
        return [
            RatingRow(
                r[0], r[1], r[2], r[3], r[4], r[5], r[6], tuple(json.loads(r[7])),
                tuple(json.loads(r[8])), r[9], r[10], r[11], r[12],
            )
            for r in rows
        ]


@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """`BEGIN IMMEDIATE` ... `COMMIT` (or `ROLLBACK` on error)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _dumps(value) -> str:
    return json.dumps(list(value), ensure_ascii=False)
