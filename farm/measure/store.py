"""The measurement store: SQLite in WAL mode, append-only, one run id per sweep.

Store format history (STORE_VERSION, kept in the meta table):
  1  runs + measurements (one row per run, problem, ISA class and host: a whole record).

A store or record from elsewhere (another farm version, an older schema, not a store at all)
is refused with a UserError naming the field, before anything is written to it.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import sqlite3
import uuid
from contextlib import closing

from farm.errors import UserError

STORE_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, spec TEXT NOT NULL, started_at TEXT NOT NULL,
    ended_at TEXT, status TEXT NOT NULL DEFAULT 'running', hosts TEXT NOT NULL DEFAULT '[]',
    note TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL REFERENCES runs(id),
    problem_key TEXT NOT NULL, isa TEXT NOT NULL, host TEXT NOT NULL, node_id TEXT,
    torch TEXT NOT NULL, template_hash TEXT NOT NULL, measured_at TEXT NOT NULL,
    winner TEXT, record TEXT NOT NULL,
    UNIQUE (run_id, problem_key, isa, host));
CREATE INDEX IF NOT EXISTS measurements_key ON measurements (problem_key, isa);
"""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def host_name(host: dict) -> str:
    """A host's identity in the store and in tables (records before host_id: the hostname)."""
    return host.get("host_id") or host.get("hostname") or host.get("cpu", "?")


def problem_key(problem: dict) -> str:
    """Readable, canonical key of a problem (also what a sweep task is named by)."""
    group = problem.get("group_size") or "-"
    return (f"{problem['op']}/{problem['dtype']}/m{problem['m']}/n{problem['n']}/k{problem['k']}/g{group}"
            f"/t{problem['threads']}/{problem['weights']}")


def check_record(record, where: str = "record") -> dict:
    """A record from outside this process (a file, a store, another node): UserError naming
    the field that is wrong; a record of another schema version is named as such."""
    import jsonschema

    from farm.measure.record import RECORD_SCHEMA_VERSION, validate_record

    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a record (a JSON object), got {type(record).__name__}")
    version = record.get("schema")
    if version != RECORD_SCHEMA_VERSION:
        raise UserError(f"{where}.schema: record schema {version!r} is not {RECORD_SCHEMA_VERSION} "
                        "(written by another farm version; no conversion known)")
    try:
        validate_record(record)
    except jsonschema.ValidationError as exc:
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path)
        raise UserError(f"{where}{field}: {exc.message[:200]}") from None
    return record


class Store:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Autocommit: each row is durable as it arrives (a killed driver loses nothing).
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            fresh = self._check_version()  # before any write: a foreign store is left as it is
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
            if fresh:
                self.db.execute("INSERT INTO meta VALUES ('version', ?)", (str(STORE_VERSION),))
        except (UserError, sqlite3.DatabaseError) as exc:
            self.db.close()
            if isinstance(exc, UserError):
                raise
            raise UserError(f"{path}: not a farm store ({exc})") from None

    def _check_version(self) -> bool:
        """True for an empty database (a new store); UserError for any other version."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return True
        row = self.db.execute("SELECT value FROM meta WHERE key='version'").fetchone() if "meta" in tables else None
        if row is None:
            raise UserError(f"{self.path}: meta.version: missing (tables {', '.join(sorted(tables))}): a store from "
                            "before store versions, or not a farm store; left unchanged")
        if row[0] != str(STORE_VERSION):
            raise UserError(f"{self.path}: meta.version: store version {row[0]!r} is not {STORE_VERSION} "
                            "(written by another farm version; no migration known); left unchanged")
        return False

    def close(self) -> None:
        self.db.close()

    def start_run(self, kind: str, spec: dict, run_id: str | None = None, note: str = "") -> str:
        run_id = run_id or f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.db.execute("INSERT INTO runs (id, kind, spec, started_at, note) VALUES (?, ?, ?, ?, ?)",
                        (run_id, kind, json.dumps(spec, sort_keys=True), now(), note))
        return run_id

    def reopen_run(self, run_id: str) -> dict:
        run = self.run(run_id)
        self.db.execute("UPDATE runs SET status='running', ended_at=NULL WHERE id=?", (run_id,))
        return run

    def end_run(self, run_id: str, status: str, hosts: list[str] | None = None) -> None:
        self.db.execute("UPDATE runs SET ended_at=?, status=?, hosts=? WHERE id=?",
                        (now(), status, json.dumps(sorted(hosts or [])), run_id))

    def run(self, run_id: str) -> dict:
        row = self.db.execute("SELECT id, kind, spec, started_at, ended_at, status, hosts, note FROM runs WHERE id=?",
                              (run_id,)).fetchone()
        if row is None:
            raise UserError(f"{self.path}: no run {run_id!r} in this store")
        keys = ("id", "kind", "spec", "started_at", "ended_at", "status", "hosts", "note")
        run = dict(zip(keys, row))
        run["spec"], run["hosts"] = json.loads(run["spec"]), json.loads(run["hosts"])
        return run

    def runs(self, kind: str | None = None) -> list[dict]:
        ids = [r[0] for r in self.db.execute(
            "SELECT id FROM runs WHERE ?1 IS NULL OR kind=?1 ORDER BY started_at, id", (kind,))]
        return [self.run(i) for i in ids]

    def add(self, run_id: str, record: dict, node_id: str | None = None) -> bool:
        """Store one record; False when this (run, problem, ISA, host) is already stored.
        A record that is not of this farm's schema is refused (UserError naming the field)."""
        check_record(record, f"record {problem_key(record['problem']) if _has_problem(record) else ''}".strip())
        record = dict(record, provenance=dict(record["provenance"], run_id=run_id))
        prov, host = record["provenance"], record["host"]
        try:
            self.db.execute(
                "INSERT INTO measurements (run_id, problem_key, isa, host, node_id, torch, template_hash,"
                " measured_at, winner, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, problem_key(record["problem"]), host["isa"], host_name(host), node_id,
                 prov["torch"], prov["template_hash"], prov["measured_at"], record.get("winner"), json.dumps(record)))
        except sqlite3.IntegrityError:
            return False
        return True

    def records(self, run_id: str | None = None, isa: str | None = None) -> list[dict]:
        rows = self.db.execute(
            "SELECT record FROM measurements WHERE (?1 IS NULL OR run_id=?1) AND (?2 IS NULL OR isa=?2) ORDER BY id",
            (run_id, isa))
        return [json.loads(r[0]) for r in rows]

    def done(self, run_id: str) -> set[tuple[str, str]]:
        """(problem_key, isa) pairs already measured in this run."""
        return {(k, i) for k, i in self.db.execute("SELECT problem_key, isa FROM measurements WHERE run_id=?", (run_id,))}

    def latest(self, torch_version: str, template_hash: str) -> dict[tuple[str, str], dict]:
        """The newest fresh record per (problem_key, isa): what a later sweep may skip."""
        out = {}
        for key, isa, measured_at, record in self.db.execute(
                "SELECT problem_key, isa, measured_at, record FROM measurements WHERE torch=? AND template_hash=?"
                " ORDER BY measured_at, id", (torch_version, template_hash)):
            out[(key, isa)] = json.loads(record)
        return out

    def count(self, run_id: str | None = None) -> int:
        return self.db.execute("SELECT COUNT(*) FROM measurements WHERE ?1 IS NULL OR run_id=?1", (run_id,)).fetchone()[0]


def _has_problem(record) -> bool:
    try:
        problem_key(record["problem"])
        return True
    except (KeyError, TypeError):
        return False


def open_store(path: str) -> Store:
    return Store(path)


def read_records(paths: list[str] | None = None, store: str | None = None, run_id: str | None = None) -> list[dict]:
    """Records from `farm measure --json` files (an object, a list, or JSON lines; .gz too) and/or a store."""
    records: list[dict] = []
    for path in paths or []:
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                text = f.read()
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror})") from None
        try:
            data = json.loads(text)
            records += [check_record(r, f"{path}: record {i}") for i, r in enumerate(data if isinstance(data, list) else [data])]
        except json.JSONDecodeError:
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(check_record(json.loads(line), f"{path}:{lineno}"))
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path}:{lineno}: not a JSON record ({exc.msg})") from None
    if store:
        if not os.path.exists(store):
            raise UserError(f"{store}: no such store")
        with closing(Store(store)) as db:
            records += [check_record(r, f"{store}: record {i}") for i, r in enumerate(db.records(run_id))]
    return records
