"""Fidelity: an enforced weight state, independent repeats, the A/A gate (issue 11).

Fast tier: pure functions over hand-made samples and records. Slow tier: real measurements.
"""

import pytest

from farm.measure.manager import measure
from farm.measure.problem import Problem
from farm.measure.record import validate_record
from farm.measure.timing import WEIGHT_STATES


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["warm", "cold"])
def test_each_weight_state_is_enforced_and_recorded(weights, quick_protocol):
    record = measure(Problem("int8", "bf16", 4, 256, 256, threads=2, weights=weights), protocol=quick_protocol,
                     only=["cpp"])
    validate_record(record)
    state = record["protocol"]["weight_state"]
    assert state == {"mode": weights, "how": WEIGHT_STATES[weights]}
    assert record["problem"]["weights"] == weights
    assert all(c["status"] in ("ok", "unsupported") for c in record["candidates"])


# --- fast tier: pure functions over hand-made samples and records ---------------------------

from farm.measure.protocol import Protocol  # noqa: E402
from farm.measure.record import build_record, choose_winner, leads_in_processes, quorum  # noqa: E402
from farm.tables.aggregate import combine, decide  # noqa: E402

from tests.tablekit import noisy  # noqa: E402

CAND = "cpp[tf=1,2,1]"


def _process(aten_us, cand_us, aa_us=None, n=21, seed=0):
    """One process's samples (seconds): ATen, its A/A control and one candidate, per round."""
    out = {"aten": [t * 1e-6 for t in noisy(aten_us, n, seed=seed)],
           "aten~aa": [t * 1e-6 for t in noisy(aa_us or aten_us, n, seed=seed + 1)],
           CAND: [t * 1e-6 for t in noisy(cand_us, n, seed=seed + 2)]}
    return out


def _record_of(processes, protocol=Protocol()):
    final = {cid: {"status": "ok", "compile_s": 1.0} for cid in processes[0]}
    host = {"isa": "avx512", "emulated": False, "capabilities": {}, "cpu": "cpu", "cores": 2, "torch": "t",
            "threads": 2, "l3_bytes": 1 << 25, "hostname": "h1"}
    return build_record(host, Problem("int8", "bf16", 8, 256, 256, threads=2), list(processes[0]),
                        final, processes, {}, protocol, {})


def test_quorum_is_every_process_or_all_but_one_from_five():
    assert [quorum(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 3, 4, 4, 7]
    assert leads_in_processes([True, True]) and not leads_in_processes([True, False])
    assert leads_in_processes([True, True, True, True, False]) and not leads_in_processes([True] * 3 + [False] * 2)


def test_a_record_of_several_processes_keeps_each_process_figures():
    rec = _record_of([_process(100, 80, seed=0), _process(130, 104, seed=10), _process(100, 80, seed=20)])
    validate_record(rec)
    cand = next(c for c in rec["candidates"] if c["id"] == CAND)
    assert [p["process"] for p in cand["per_process"]] == [0, 1, 2]
    assert [p["rounds"] for p in cand["per_process"]] == [21, 21, 21] and rec["protocol"]["rounds"] == 63
    assert len(cand["samples_us"]) == 63  # pooled, still paired round by round with ATen's
    assert cand["per_process"][1]["median_us"] == pytest.approx(104, rel=0.02)
    assert all(p["speedup"] == pytest.approx(1.25, rel=0.03) for p in cand["per_process"])
    assert len(rec["processes"]) == 3 and all(p["band"] < 0.05 for p in rec["processes"])
    assert rec["winner"] == CAND and "3 of 3 processes" in rec["winner_rule"]


def test_a_lead_in_one_process_only_does_not_win():
    # Pooled, the candidate looks 1.1x faster; in two of three processes it is ATen's equal.
    rec = _record_of([_process(100, 70, seed=0), _process(100, 100, seed=10), _process(100, 100, seed=20)])
    assert rec["winner"] == "aten" and "1 of 3 processes" in rec["winner_rule"]


def test_choose_winner_uses_every_process_band():
    per = [{"process": 0, "speedup": 1.2, "speedup_ci95": [1.15, 1.25]},
           {"process": 1, "speedup": 1.2, "speedup_ci95": [1.15, 1.25]}]
    entries = [{"id": "aten", "status": "ok", "speedup_vs_aten": 1.0, "speedup_ci95": [1.0, 1.0]},
               {"id": CAND, "status": "ok", "speedup_vs_aten": 1.2, "speedup_ci95": [1.15, 1.25], "per_process": per}]
    assert choose_winner(entries, 0.02, [0.02, 0.02])[0] == CAND
    assert choose_winner(entries, 0.02, [0.02, 0.30])[0] == "aten"  # process 1's noise swallows its lead


def test_decide_uses_every_process_of_pooled_records():
    rec = _record_of([_process(100, 70, seed=0), _process(100, 100, seed=10)])
    rec["provenance"]["measured_at"] = "2026-11-26T00:00:00+00:00"
    combined = combine([rec])
    assert combined[CAND].process_leads == [True, False]
    assert decide(combined, 0.02)[0].id == "aten"
    combined[CAND].process_leads = []  # an old record without per-process figures: the pooled rule alone
    assert decide(combined, 0.02)[0].id == CAND


def test_a_repeat_must_find_the_first_process_code():
    from farm.measure.worker import _check

    assert _check(0.0, 1e-2, {"code_sha": "abc"}, "abc") is None
    assert _check(0.0, 1e-2, {"code_sha": "abc"}, None) is None  # the first process: nothing to compare
    assert "other code" in _check(0.0, 1e-2, {"code_sha": "def"}, "abc")
    assert "relative error" in _check(0.5, 1e-2, {"code_sha": "abc"}, "abc")


@pytest.mark.slow
def test_repeat_processes_reuse_the_cache_and_time_the_same_kernels(quick_protocol):
    from dataclasses import replace

    record = measure(Problem("int8", "bf16", 32, 256, 256, threads=2), protocol=replace(quick_protocol, processes=2),
                     only=["cpp"])
    validate_record(record)
    worker = record["worker"]
    assert worker["processes"] >= 2 and len(record["processes"]) == worker["processes"]
    # FX-graph-cache hits: a repeat compiles far less than the first process did.
    assert worker["repeat_compile_s"] < worker["per_process"][0]["compile_s"]
    cands = {c["id"]: c for c in record["candidates"]}
    for cid in ("aten", "aten~aa", "cpp"):
        assert cands[cid]["status"] == "ok", cands[cid]
        assert len(cands[cid]["per_process"]) == worker["processes"]
        assert len(cands[cid]["samples_us"]) == record["protocol"]["rounds"] == sum(record["protocol"]["rounds_per_process"])
    # The kernel summary is the first process's (a repeat's lowering does not run); the repeat's
    # code hash was checked against it, or the candidate would be wrong_result.
    assert cands["cpp"]["kernel"]["template"] and not cands["aten"]["kernel"]["template"]
