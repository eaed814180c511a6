"""The benchmark's results store: one SQLite file in the benchmark folder.

Several processes (shards of a job array, or two benchmarks sharing a folder) write into it at
once: every write is one ``BEGIN IMMEDIATE`` transaction, so a cell's curve and its summary land
together or not at all, and a writer that finds the database busy waits instead of losing its
row. WAL mode lets the report read while shards write. The file must live on a file system with
working POSIX locks (a local disk or a lock-capable cluster file system, not NFS without locks).

A ``partials`` table holds the curves of attacks a worst-case search paused part-way (its
rungs); a store without it gains it when opened. An ``events`` table logs every start and
finish of a cell with host and pid: it is how a resumed benchmark shows that it recomputed no
finished cell.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unrelearn.errors import UnrelearnError

SCHEMA_VERSION = 6
# Schema 4 lets the quality columns be NULL (a world without ground truth, Stable Diffusion's,
# has no retain alignment, precision, FID or KID); schema 5 adds the alternative rate (the
# DiMRA paper's share of forget-prompt images showing the alternative concept); schema 6 the
# manifold distance (the steadiest quality metric). Older stores are migrated in place.
_QUALITY_COLUMNS = ("retain_alignment", "retain_low", "retain_high", "precision", "precision_low", "precision_high",
                    "fid", "kid", "kid_std")  # fmt: skip

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    concept TEXT NOT NULL,
    contender TEXT NOT NULL,
    attack TEXT NOT NULL,
    seed INTEGER NOT NULL,
    spec TEXT NOT NULL,
    summary TEXT NOT NULL,
    wall_seconds REAL NOT NULL,
    host TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS points (
    cell TEXT NOT NULL REFERENCES cells(key),
    step INTEGER NOT NULL,
    forget_rate REAL NOT NULL,
    forget_low REAL NOT NULL,
    forget_high REAL NOT NULL,
    retain_alignment REAL,
    retain_low REAL,
    retain_high REAL,
    precision REAL,
    precision_low REAL,
    precision_high REAL,
    fid REAL,
    kid REAL,
    kid_std REAL,
    alternative_rate REAL,
    alternative_low REAL,
    alternative_high REAL,
    manifold_distance REAL,
    manifold_low REAL,
    manifold_high REAL,
    PRIMARY KEY (cell, step)
);
CREATE TABLE IF NOT EXISTS models (
    key TEXT PRIMARY KEY,
    concept TEXT NOT NULL,
    contender TEXT NOT NULL,
    spec TEXT NOT NULL,
    path TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    concept TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS partials (
    cell TEXT NOT NULL,
    step INTEGER NOT NULL,
    points TEXT NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (cell, step)
);
CREATE TABLE IF NOT EXISTS events (
    time REAL NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    cell TEXT NOT NULL,
    what TEXT NOT NULL
);
"""


@dataclass
class CellResult:
    key: str
    concept: str
    contender: str
    attack: str
    seed: int
    spec: dict[str, Any]
    summary: dict[str, Any]
    points: list[dict[str, Any]]
    wall_seconds: float
    host: str


class ResultStore:
    """Rows of finished cells, models and reference evaluations, keyed by the hash of their settings."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Two processes opening a new store at once can see "database is locked" from the switch
        # to WAL, which SQLite reports without waiting on its busy timeout: retried, not fatal.
        deadline = time.monotonic() + 300
        self._db: sqlite3.Connection | None = None
        while True:
            try:
                self._open()
                return
            except sqlite3.DatabaseError as error:
                if self._db is not None:
                    self._db.close()
                retry = isinstance(error, sqlite3.OperationalError) and "locked" in str(error) and time.monotonic() < deadline
                if not retry:
                    raise UnrelearnError(f"{str(self.path)!r} is not a usable results store ({error}); choose another --out") from None
                time.sleep(0.2)

    def _open(self) -> None:
        # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE), so a
        # writer takes the write lock before it reads what it is about to change.
        self._db = sqlite3.connect(self.path, timeout=300, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._write() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            found = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if found is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(found[0]) in (3, 4, 5):
                if int(found[0]) == 3:
                    _migrate_3_to_4(db)
                if int(found[0]) <= 4:
                    _migrate_4_to_5(db)
                _migrate_5_to_6(db)
            elif int(found[0]) != SCHEMA_VERSION:
                raise UnrelearnError(
                    f"{str(self.path)!r} holds results of store schema {found[0]}, this unrelearn writes schema "
                    f"{SCHEMA_VERSION}; use a new --out folder"
                )

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- metadata -------------------------------------------------------------------------
    def set_meta(self, name: str, value: Any) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, json.dumps(value, sort_keys=True)))

    def update_meta(self, name: str, update: Callable[[Any], Any]) -> None:
        """Replace ``name``'s value by ``update(current value or None)`` in one transaction, so that
        processes updating parts of one entry at once do not undo each other."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
            value = update(None if row is None else json.loads(row[0]))
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, json.dumps(value, sort_keys=True)))

    def meta(self, name: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def meta_items(self, prefix: str) -> list[tuple[str, Any]]:
        """(name without ``prefix``, value) of every metadata entry whose name starts with ``prefix``."""
        rows = self._db.execute("SELECT name, value FROM meta WHERE substr(name, 1, ?) = ? ORDER BY name", (len(prefix), prefix))
        return [(name[len(prefix) :], json.loads(value)) for name, value in rows]

    # -- cells ----------------------------------------------------------------------------
    def finished_keys(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT key FROM cells")}

    def log(self, cell: str, what: str) -> None:
        with self._write() as db:
            db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (time.time(), socket.gethostname(), os.getpid(), cell, what))

    def events(self, cell: str | None = None) -> list[tuple[str, str]]:
        query = "SELECT cell, what FROM events" + (" WHERE cell = ?" if cell else "") + " ORDER BY rowid"
        return list(self._db.execute(query, (cell,) if cell else ()))

    def add_cell(self, result: CellResult, event: str = "finished") -> None:
        """The cell, its curve and its finish event (or ``event``: where a merged cell came from) in one transaction."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (result.key, result.concept, result.contender, result.attack, result.seed,
                 json.dumps(result.spec, sort_keys=True), json.dumps(result.summary, sort_keys=True),
                 result.wall_seconds, result.host, time.time()),
            )  # fmt: skip
            db.execute("DELETE FROM points WHERE cell = ?", (result.key,))
            db.executemany(
                "INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(result.key, p["step"], p["forget_rate"], *p["forget_rate_ci"], p["retain_alignment"],
                  *(p["retain_alignment_ci"] or (None, None)), p["precision"], *(p["precision_ci"] or (None, None)), p["fid"],
                  p["kid"], p["kid_std"], p.get("alternative_rate"), *(p.get("alternative_rate_ci") or (None, None)),
                  p.get("manifold_distance"), *(p.get("manifold_distance_ci") or (None, None)))
                 for p in result.points],
            )  # fmt: skip
            db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (time.time(), socket.gethostname(), os.getpid(), result.key, event))

    def cells(self) -> list[CellResult]:
        points: dict[str, list[dict[str, Any]]] = {}
        for row in self._db.execute("SELECT * FROM points ORDER BY cell, step"):
            points.setdefault(row[0], []).append({
                "step": row[1], "forget_rate": row[2], "forget_rate_ci": [row[3], row[4]],
                "retain_alignment": row[5], "retain_alignment_ci": [row[6], row[7]], "precision": row[8],
                "precision_ci": [row[9], row[10]], "fid": row[11], "kid": row[12], "kid_std": row[13],
                "alternative_rate": row[14], "alternative_rate_ci": [row[15], row[16]],
                "manifold_distance": row[17], "manifold_distance_ci": [row[18], row[19]],
            })  # fmt: skip
        return [
            CellResult(
                key, concept, contender, attack, seed, json.loads(spec), json.loads(summary), points.get(key, []), wall, host
            )
            for key, concept, contender, attack, seed, spec, summary, wall, host, _ in self._db.execute(
                "SELECT * FROM cells ORDER BY concept, contender, attack, seed"
            )
        ]

    def add_partial(self, cell: str, step: int, points: list[dict[str, Any]]) -> None:
        """The curve of ``cell``'s attack paused at ``step`` (a rung of a worst-case search)."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO partials VALUES (?, ?, ?, ?)", (cell, step, json.dumps(points), time.time()))
            db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                       (time.time(), socket.gethostname(), os.getpid(), cell, f"paused at {step}"))  # fmt: skip

    def partials(self) -> dict[tuple[str, int], list[dict[str, Any]]]:
        """(cell, step) -> the curve up to that step, of every paused attack."""
        return {(cell, step): json.loads(points) for cell, step, points in self._db.execute("SELECT cell, step, points FROM partials")}

    # -- models and reference evaluations -------------------------------------------------
    def add_model(self, key: str, concept: str, contender: str, spec: dict, path: str, record: dict) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?)",
                (key, concept, contender, json.dumps(spec, sort_keys=True), path, json.dumps(record, sort_keys=True, default=str)),
            )

    def model(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT path, record FROM models WHERE key = ?", (key,)).fetchone()
        return None if row is None else {"path": row[0], "record": json.loads(row[1])}

    def models(self) -> list[dict[str, Any]]:
        return [
            {"key": k, "concept": c, "contender": n, "spec": json.loads(s), "path": p, "record": json.loads(r)}
            for k, c, n, s, p, r in self._db.execute("SELECT * FROM models ORDER BY concept, contender")
        ]

    def add_evaluation(self, key: str, model: str, concept: str, metrics: dict) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?)",
                       (key, model, concept, json.dumps(metrics, sort_keys=True, default=str)))  # fmt: skip

    def evaluation(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT metrics FROM evaluations WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def evaluations(self) -> dict[str, dict[str, Any]]:
        """key -> the model and concept an evaluation is of, and its metrics."""
        return {key: {"model": model, "concept": concept, "metrics": json.loads(metrics)}
                for key, model, concept, metrics in self._db.execute("SELECT * FROM evaluations ORDER BY key")}  # fmt: skip


def _migrate_3_to_4(db: sqlite3.Connection) -> None:
    """Drop NOT NULL from the quality columns of ``points`` (SQLite cannot alter a column: the
    table is rebuilt with its rows, inside the caller's transaction)."""
    (create,) = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'points'").fetchone()
    for column in _QUALITY_COLUMNS:
        create = create.replace(f"{column} REAL NOT NULL", f"{column} REAL")
    db.execute("ALTER TABLE points RENAME TO points_schema3")
    db.execute(create)
    db.execute("INSERT INTO points SELECT * FROM points_schema3")
    db.execute("DROP TABLE points_schema3")


def _migrate_4_to_5(db: sqlite3.Connection) -> None:
    """Add the alternative-rate columns (NULL in the rows written before them)."""
    for column in ("alternative_rate", "alternative_low", "alternative_high"):
        db.execute(f"ALTER TABLE points ADD COLUMN {column} REAL")


def _migrate_5_to_6(db: sqlite3.Connection) -> None:
    """Add the manifold-distance columns (NULL in the rows written before them)."""
    for column in ("manifold_distance", "manifold_low", "manifold_high"):
        db.execute(f"ALTER TABLE points ADD COLUMN {column} REAL")
    db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (str(SCHEMA_VERSION),))


def parts_of_others(presets: dict[str, dict[str, Any]]) -> set[str]:
    """Presets whose cells a larger grid preset also holds (a part run first: a shard of the grid,
    the urgent rows). A halving search prunes its grid, so it contains no other preset."""
    grids = {name: set(entry["cells"]) for name, entry in presets.items() if entry.get("halving") is None}
    return {name for name, entry in presets.items()
            if any(other != name and set(entry["cells"]) < cells for other, cells in grids.items())}  # fmt: skip


def select_presets(recorded: dict[str, dict[str, Any]], names: list[str] | None, folder: str | Path) -> dict[str, dict[str, Any]]:
    """The presets of ``recorded`` named in ``names`` (every one where none is named); a name the
    folder does not hold is one error line listing those it does."""
    if not names:
        return recorded
    if unknown := [name for name in names if name not in recorded]:
        raise UnrelearnError(f"{str(folder)!r} holds no preset {', '.join(map(repr, unknown))}; "
                             f"it holds {', '.join(sorted(recorded)) or 'none'}")  # fmt: skip
    return {name: recorded[name] for name in names}
