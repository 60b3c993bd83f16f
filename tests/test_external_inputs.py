"""Inputs from outside the process: records, stores and sweep specs written elsewhere.

Each is refused with a UserError naming the field, and nothing already measured is lost or
rewritten (fast: no compiles, no cluster).
"""

import copy
import gzip
import json
import os
import sqlite3

import pytest

from farm.errors import UserError
from farm.measure.store import STORE_VERSION, Store, read_records
from farm.sweep.spec import load_spec, parse_spec
from farm.tables.commands import run_aggregate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "docs", "llm-records.jsonl.gz")


@pytest.fixture(scope="module")
def shipped():
    with gzip.open(SHIPPED, "rt") as f:
        return [json.loads(line) for line in f]


def _jsonl(tmp_path, records, name="records.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_the_shipped_records_are_read_as_they_are(shipped):
    assert len(read_records([SHIPPED])) == len(shipped) == 100


def test_a_record_from_another_farm_version_is_refused_by_line_and_field(tmp_path, shipped):
    future = dict(copy.deepcopy(shipped[0]), schema=2)
    path = _jsonl(tmp_path, [shipped[1], future])
    with pytest.raises(UserError, match=r"records\.jsonl:2\.schema: record schema 2 is not 1 .*another farm version"):
        read_records([path])
    with pytest.raises(UserError, match=r":2\.schema"):  # it used to be aggregated into a table silently
        run_aggregate([path], None, str(tmp_path / "tables"))
    assert not (tmp_path / "tables").exists()


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r["problem"].pop("threads"), r"record 0\.problem: 'threads' is a required property"),
    (lambda r: r["candidates"][0].update(status="exploded"), r"record 0\.candidates\[0\]\.status: 'exploded'"),
    (lambda r: r["host"].update(isa="sse2"), r"record 0\.host\.isa: 'sse2'"),
])
def test_a_record_missing_or_misspelling_a_field_names_it(tmp_path, shipped, mutate, field):
    record = copy.deepcopy(shipped[0])
    mutate(record)
    path = tmp_path / "one.json"
    path.write_text(json.dumps(record))
    with pytest.raises(UserError, match=field):  # was a KeyError deep in aggregation
        read_records([str(path)])


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_a_store_of_another_version_is_refused_and_left_unchanged(tmp_path, shipped):
    path = str(tmp_path / "other.db")
    store = Store(path)
    run_id = store.start_run("sweep", {"name": "t"})
    assert store.add(run_id, shipped[0])
    store.db.execute("UPDATE meta SET value=? WHERE key='version'", (str(STORE_VERSION + 1),))
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    before = _bytes(path)
    with pytest.raises(UserError, match=f"meta.version: store version '{STORE_VERSION + 1}' is not {STORE_VERSION}"):
        read_records(store=path)
    assert _bytes(path) == before


def test_a_store_from_before_store_versions_is_refused_not_claimed(tmp_path):
    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE measurements (id INTEGER PRIMARY KEY, record TEXT)")
    db.execute("INSERT INTO measurements (record) VALUES ('{\"old\": true}')")
    db.commit()
    db.close()
    before = _bytes(path)
    with pytest.raises(UserError, match="meta.version: missing .*before store versions"):
        Store(path)  # used to stamp it version 1, then fail on a missing column
    assert _bytes(path) == before


def test_a_file_that_is_not_a_store_is_named(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("not sqlite\n" * 200)
    with pytest.raises(UserError, match="notes.db: not a farm store"):
        Store(str(path))


def test_the_store_refuses_a_foreign_record_and_keeps_what_it_has(tmp_path, shipped):
    store = Store(str(tmp_path / "s.db"))
    run_id = store.start_run("sweep", {"name": "t"})
    assert store.add(run_id, shipped[0])
    with pytest.raises(UserError, match=r"record int.*\.schema: record schema 2"):
        store.add(run_id, dict(copy.deepcopy(shipped[1]), schema=2))
    with pytest.raises(UserError, match=r"record: expected a record"):
        store.add(run_id, ["not", "a", "record"])
    assert store.count(run_id) == 1 and store.records(run_id)[0]["problem"] == shipped[0]["problem"]
    store.close()


SPEC = """\
name: dup
isa: [avx512]
problems:
  - model: m
    layers: {q_proj: [64, 64], q_proj: [128, 64]}
    m: [1]
"""


def test_a_spec_with_a_key_given_twice_names_the_key_and_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    with pytest.raises(UserError, match=r"spec.yaml: .*duplicate key 'q_proj' at line 5"):
        load_spec(str(path))  # PyYAML kept the last q_proj silently
    path.write_text(SPEC.replace("m: [1]", "m: [1]\n    m: [2]").replace("q_proj: [128, 64]", "k_proj: [128, 64]"))
    with pytest.raises(UserError, match=r"duplicate key 'm' at line 7"):
        load_spec(str(path))
    path.write_text(SPEC.replace("q_proj: [128, 64]", "k_proj: [128, 64]"))
    assert len(load_spec(str(path)).tasks) == 2


def test_a_spec_with_conflicting_timeouts_names_both_fields():
    doc = {"name": "t", "timeout_s": 10, "protocol": {"timeout_s": 99},
           "problems": [{"layers": {"q": [64, 64]}, "m": [1]}]}
    with pytest.raises(UserError, match=r"spec\.timeout_s: 10 conflicts with spec\.protocol\.timeout_s: 99"):
        parse_spec(doc)
    doc["protocol"]["timeout_s"] = 10  # the same value twice is no conflict
    assert parse_spec(doc).protocol.timeout_s == 10
