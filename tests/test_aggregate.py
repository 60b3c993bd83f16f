"""Aggregation, staleness and diff: pure functions over records and tables."""

import os

import pytest
import yaml

from kernels.provenance import template_hash, torch_version

from farm.measure.store import read_records
from farm.tables.aggregate import aggregate, table_paths
from farm.tables.diff import compare_entries, diff_tables
from tablekit import noisy, record


def _agg(records, **kw):
    return aggregate(records, torch_version(), template_hash(), **kw)


def test_single_host_clear_winner_and_tie_rule():
    fast = record("h1", "int8", 32, {"aten": noisy(100), "aten~aa": noisy(100, seed=1), "cpp": noisy(80, seed=2)})
    close = record("h1", "int8", 64, {"aten": noisy(100), "aten~aa": noisy(100, seed=1), "cpp": noisy(99, seed=2)}, band=0.03)
    result = _agg([fast, close])
    entries = {e["key"]["m"]: e for e in result.tables[("avx512", "other", 2)]["entries"]}
    assert entries[32]["winner"] == "cpp" and 1.2 < entries[32]["speedup_vs_aten"] < 1.3
    assert entries[64]["winner"] == "aten" and entries[64]["runner_up"] == "cpp"
    assert "inside the noise" in entries[64]["rule"]


def test_failed_candidates_never_win_even_if_fast_elsewhere():
    a = record("h1", "int8", 32, {"aten": noisy(100), "cpp": noisy(50)})
    b = record("h2", "int8", 32, {"aten": noisy(100), "cpp": noisy(50)}, statuses={"cpp": "wrong_result"})
    entry = _agg([a, b]).tables[("avx512", "other", 2)]["entries"][0]
    assert entry["winner"] == "aten" and entry["failed"] == ["cpp"]


def test_two_hosts_that_disagree_are_flagged_and_the_result_is_deterministic():
    h1 = record("host-a", "int8", 32, {"aten": noisy(100), "cpp": noisy(70), "cpp[tf=2,1,1]": noisy(90)})
    h2 = record("host-b", "int8", 32, {"aten": noisy(100), "cpp": noisy(95), "cpp[tf=2,1,1]": noisy(75)})
    first = _agg([h1, h2]).tables[("avx512", "other", 2)]["entries"]
    second = _agg([h2, h1]).tables[("avx512", "other", 2)]["entries"]
    assert first == second
    assert first[0]["disagreement"].startswith("hosts pick different winners")
    assert "host-a: cpp" in first[0]["disagreement"] and "host-b: cpp[tf=2,1,1]" in first[0]["disagreement"]
    assert first[0]["hosts"] == ["host-a", "host-b"]


def test_stale_records_are_left_out():
    fresh = record("h1", "int8", 32, {"aten": noisy(100), "cpp": noisy(80)})
    stale = record("h1", "int8", 64, {"aten": noisy(100), "cpp": noisy(80)})
    stale["provenance"]["torch"] = "2.12.0+cpu"
    result = _agg([fresh, stale])
    assert result.stale == 1 and [e["key"]["m"] for e in result.tables[("avx512", "other", 2)]["entries"]] == [32]


def test_nearest_m_is_safe_only_when_the_neighbours_regret_is_small():
    same = {m: record("h1", "int8", m, {"aten": noisy(100), "cpp": noisy(80)}) for m in (16, 32)}
    differ = record("h1", "int8", 64, {"aten": noisy(100), "cpp": noisy(130)})
    entries = {e["key"]["m"]: e for e in _agg([*same.values(), differ]).tables[("avx512", "other", 2)]["entries"]}
    assert entries[16]["nearest_m_ok"] is True and abs(entries[16]["nearest_m_regret"]) < 0.03
    # cpp wins at 32 but loses 30% at 64: its regret there is large.
    assert entries[32]["nearest_m_ok"] is False and entries[32]["nearest_m_regret"] > 0.2
    assert entries[64]["winner"] == "aten" and entries[64]["nearest_m_ok"] is False


def test_cold_weights_are_preferred_when_both_were_measured():
    warm = record("h1", "int8", 1, {"aten": noisy(100), "cpp": noisy(80)}, weights="warm")
    cold = record("h1", "int8", 1, {"aten": noisy(100), "cpp": noisy(120)}, weights="cold")
    entry = _agg([warm, cold]).tables[("avx512", "other", 2)]["entries"][0]
    assert entry["weights"] == "cold" and entry["winner"] == "aten"


def _table(samples):
    recs = [record("h1", "int8", 32, samples)]
    return _agg(recs).tables[("avx512", "other", 2)]


def test_diff_reports_regressions_flips_and_ties():
    old = _table({"aten": noisy(100), "cpp": noisy(80, seed=3), "cpp[tf=2,1,1]": noisy(90, seed=4)})
    slower = _table({"aten": noisy(100), "cpp": noisy(95, seed=3), "cpp[tf=2,1,1]": noisy(97, seed=4)})
    changes = diff_tables(old, slower)
    assert changes[0].kind == "regression" and changes[0].ratio > 1.1
    flipped = _table({"aten": noisy(100), "cpp": noisy(90, seed=3), "cpp[tf=2,1,1]": noisy(60, seed=4)})
    assert diff_tables(old, flipped)[0].kind in ("flip", "improvement")
    new_e = dict(old["entries"][0], winner="cpp[tf=2,1,1]", runner_up="cpp", runner_up_ci95=[1.2, 1.3],
                 speedup_ci95=[1.22, 1.28])
    assert compare_entries(old["entries"][0], new_e).kind == "tie"


def test_a_flip_to_a_candidate_tied_with_the_winner_is_a_tie():
    tied = _table({"aten": noisy(100), "cpp": noisy(80, seed=3), "cpp[tf=2,1,1]": noisy(80.5, seed=4),
                   "cpp[cb=1,16,64]": noisy(95, seed=5)})
    entry = tied["entries"][0]
    other = next(c for c in ("cpp", "cpp[tf=2,1,1]") if c != entry["winner"])
    assert other in entry["within_noise"] and "cpp[cb=1,16,64]" not in entry["within_noise"]
    flipped = dict(entry, winner=other, within_noise=[entry["winner"]])
    assert compare_entries(entry, flipped).kind == "tie"


@pytest.mark.slow
def test_every_shipped_table_is_what_aggregate_rebuilds_from_the_shipped_records():
    # The raw records are the source of truth: a shipped table that they do not rebuild is a
    # hand-edited or stale one (issue 9, item 6).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "table-sources.txt")) as f:
        sources = [os.path.join(root, line.strip()) for line in f if line.strip() and not line.startswith("#")]
    result = aggregate(read_records(sources), torch_version(), template_hash())
    shipped_dir = os.path.join(root, "kernels", "tables")
    names = sorted(n for n in os.listdir(shipped_dir) if n.endswith(".yaml"))
    rebuilt_names = {os.path.basename(path): key for key, path in table_paths(shipped_dir, result.tables).items()}
    assert set(names) <= set(rebuilt_names), names
    # What does not ship: only a table whose every record is emulated (no native host of its class
    # and vendor to agree with: the Xeon's emulated AVX2 records).
    assert all(all(h["emulated"] for h in result.tables[key]["hosts"].values())
               for name, key in rebuilt_names.items() if name not in names)
    for name in names:
        with open(os.path.join(shipped_dir, name)) as f:
            shipped = yaml.safe_load(f)
        rebuilt = result.tables[rebuilt_names[name]]
        for field in ("vendor", "entries", "rule", "transfer"):
            assert yaml.safe_load(yaml.safe_dump(rebuilt[field])) == shipped[field], (name, field)
