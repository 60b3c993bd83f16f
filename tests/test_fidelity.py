"""Fidelity: an enforced weight state, independent repeats, the A/A gate (issue 11).

Fast tier: pure functions over hand-made samples and records. Slow tier: real measurements.
"""

import pytest

from farm.measure.manager import measure
from farm.measure.problem import Problem
from farm.measure.record import validate_record
from farm.measure.timing import WEIGHT_STATES


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["warm", "cold", "model"])
def test_each_weight_state_is_enforced_and_recorded(weights, quick_protocol):
    record = measure(Problem("int8", "bf16", 4, 256, 256, threads=2, weights=weights), protocol=quick_protocol,
                     only=["cpp"])
    validate_record(record)
    state = record["protocol"]["weight_state"]
    # The model state times a module calling the kernel on 16 weight copies (64 KiB each here).
    assert state == {"mode": weights, "how": WEIGHT_STATES[weights], "stack": 16 if weights == "model" else 1}
    assert record["problem"]["weights"] == weights
    assert all(c["status"] in ("ok", "unsupported") for c in record["candidates"])
    assert {c["id"] for c in record["candidates"] if c["status"] == "ok"} >= {"aten", "cpp"}
    for c in record["candidates"]:  # the timed calls' page faults, per process and their median
        if c["status"] == "ok":  # one process, or more where the A/A gate or a busy host asked for another
            assert 1 <= len(c["per_process"]) <= (1 + quick_protocol.aa_extra_processes
                                                  + quick_protocol.contention_extra_processes)
            assert all(p["faults_per_call"] >= 0 for p in c["per_process"]) and c["faults_per_call"] >= 0
    # Every process timed each candidate on its own copies of the weights; the model state's stack has its own.
    placements = 1 if weights == "model" else quick_protocol.placements
    assert record["protocol"]["placements"] == quick_protocol.placements >= 2
    assert [p["placements"] for p in record["worker"]["per_process"]] == [placements] * record["worker"]["processes"]


# --- fast tier: pure functions over hand-made samples and records ---------------------------

from farm.measure.protocol import Protocol  # noqa: E402
from farm.measure.record import (aa_gate, build_record, choose_winner, leads_in_process, leads_in_processes,  # noqa: E402
                                 process_offset, quorum)
from farm.measure.timing import aa_off, aa_offset  # noqa: E402
from farm.tables.aggregate import aggregate, combine, decide  # noqa: E402

from tablekit import noisy, record  # noqa: E402

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


def test_the_model_state_stacks_about_64_mib_of_weight_copies_2_to_16():
    from farm.measure.problem import stack_size

    def stack(n, k, op="int8", weights="model"):
        return stack_size(Problem(op, "bf16", 1, n, k, 128 if op == "int4" else None, 2, weights))
    assert stack(4096, 4096) == 4 and stack(2048, 8192, "int4") == 8  # 16 and 8 MiB
    assert stack(256, 256) == 16 and stack(65536, 8192) == 2          # bounded both ways
    assert stack(256, 256, weights="cold") == stack(256, 256, weights="warm") == 1


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


def test_process_level_speedup_weighs_every_process_alike():
    from farm.measure.stats import geomean, process_level

    # One process of 11 rounds at 1.1x, one of 41 at 1.4x: the pooled median is the long process's
    # figure; what one process gets is the geomean of the two.
    short, long = [1.1] * 11, [1.4] * 41
    speedup, (low, high) = process_level([short, long])
    assert speedup == pytest.approx(geomean([1.1, 1.4])) and low == pytest.approx(1.1) and high == pytest.approx(1.4)
    one, ci = process_level([noisy(1.25, 21, spread=0.05)])  # one process: the bootstrap of its rounds
    assert ci[0] < one < ci[1] and ci[1] - ci[0] < 0.1
    assert process_level([[], [1.2, 1.2, 1.2]])[0] == pytest.approx(1.2)


def test_aggregate_carries_what_one_process_measured():
    # Process 1 is 1.5x, processes 0 and 2 1.25x; process 1 ran three times the rounds (a close
    # call the settle rule timed on): the pooled median follows it, the process figure does not.
    rec = _record_of([_process(100, 80, seed=0), _process(150, 100, n=63, seed=10), _process(100, 80, seed=20)])
    cand = next(c for c in rec["candidates"] if c["id"] == CAND)
    assert [p["rounds"] for p in cand["per_process"]] == [21, 63, 21]
    rec["provenance"] = record("h1", "int8", 8, {})["provenance"]
    combined = combine([rec])[CAND]
    assert combined.processes == 3 and combined.speedup == pytest.approx(1.5, rel=0.03)
    assert combined.by_process == pytest.approx((1.25 * 1.5 * 1.25) ** (1 / 3), rel=0.02)
    assert combined.by_process_ci95[0] < combined.by_process < combined.by_process_ci95[1]
    # a record without per-process rounds is one process
    flat = record("h1", "int8", 8, {"aten": noisy(100), CAND: noisy(80)})
    assert combine([flat])[CAND].processes == 1


def _record_with_faults(processes, faults):
    """_record_of, with each process's page faults per timed call of CAND, and a real provenance."""
    final = {cid: {"status": "ok", "compile_s": 1.0} for cid in processes[0]}
    host = {"isa": "avx512", "emulated": False, "capabilities": {}, "cpu": "cpu", "cores": 2, "torch": "t",
            "threads": 2, "l3_bytes": 1 << 25, "hostname": "h1", "vendor": "amd"}
    rec = build_record(host, Problem("int8", "bf16", 128, 256, 256, threads=2), list(processes[0]), final,
                       processes, {}, Protocol(), {}, [{CAND: f, "aten": 0.0} for f in faults])
    rec["provenance"] = record("h1", "int8", 128, {})["provenance"]
    return rec


def test_processes_in_two_allocator_modes_are_kept_apart():
    from farm.measure.record import MAPS_PER_CALL_FAULTS, allocator_mode

    assert allocator_mode(None) is None and allocator_mode(0) == allocator_mode(MAPS_PER_CALL_FAULTS - 1) == "reuses"
    assert allocator_mode(MAPS_PER_CALL_FAULTS) == allocator_mode(8193) == "maps"
    # dq's temporary mapped afresh in two processes (1.2x), reused from the heap in one (2.2x)
    rec = _record_with_faults([_process(120, 100, seed=0), _process(220, 100, seed=10), _process(120, 100, seed=20)],
                              [8193, 0, 8193])
    split = combine([rec])[CAND].by_mode
    assert split["maps"]["processes"] == 2 and split["maps"]["speedup_by_process"] == pytest.approx(1.2, rel=0.02)
    assert split["reuses"]["processes"] == 1 and split["reuses"]["speedup_by_process"] == pytest.approx(2.2, rel=0.02)
    # one mode only, or nothing counted: nothing to keep apart
    assert combine([_record_with_faults([_process(120, 100), _process(120, 100, seed=10)], [0, 5])])[CAND].by_mode is None
    rec["provenance"]["measured_at"] = "2026-11-27T00:00:00+00:00"
    (entry,) = aggregate([rec], rec["provenance"]["torch"], rec["provenance"]["template_hash"]).tables[
        ("avx512", "amd", 2)]["entries"]
    assert entry["allocator_modes"] == split and entry["processes"] == 3


def test_the_farm_is_compared_in_the_delivered_processes_allocator_mode():
    from farm.bench.fidelity import delivered_summary, measured_vs_delivered

    entry = {"winner": "dq", "speedup_vs_aten": 1.23, "speedup_ci95": [1.2, 1.3], "speedup_by_process": 1.39,
             "speedup_by_process_ci95": [1.2, 1.9],
             "allocator_modes": {"maps": {"processes": 3, "speedup_by_process": 1.2},
                                 "reuses": {"processes": 1, "speedup_by_process": 2.18}}}
    got = {"speedup": 1.16, "ci95": [1.14, 1.18], "rounds": 99}
    row = measured_vs_delivered("k", entry, got, delivered_faults=[{"default": 0, "table": 8193}] * 3)
    assert row["farm_mode"] == "maps" and row["farm"] == 1.2 and row["within"]
    assert row["error"] == pytest.approx(1.2 / 1.16 - 1) and row["delivered_modes"] == ["maps"] * 3
    # the figure over all the farm's processes beside it, whatever their modes
    assert row["farm_all_modes"] == 1.39 and not row["within_all_modes"]
    assert row["error_all_modes"] == pytest.approx(1.39 / 1.16 - 1)
    # delivered processes in both modes, none counted, or a farm that did not split: all of the farm's processes
    for faults, split in (([{"default": 0, "table": 8193}, {"default": 0, "table": 0}], entry["allocator_modes"]),
                          (None, entry["allocator_modes"]), ([{"default": 0, "table": 8193}], None)):
        plain = measured_vs_delivered("k", dict(entry, allocator_modes=split), got, delivered_faults=faults)
        assert plain["farm_mode"] is None and plain["farm"] == 1.39 and not plain["within"]
        assert plain["within_all_modes"] == plain["within"]
    summary = delivered_summary([row, plain])
    assert (summary["within"], summary["within_all_modes"], summary["compared_in_mode"]) == (1, 0, 1)


def test_rescore_compares_a_saved_run_with_this_versions_entries(tmp_path, capsys):
    import json

    from farm.bench.fidelity import rescore

    runs = [_record_with_faults([_process(120, 100, seed=s), _process(220, 100, seed=s + 1)], [8193, 0])
            for s in (0, 10)]
    key = "int8/bf16/m128/n256/k256/g-/t2/warm"
    row = {"key": key, "winner": CAND, "farm": 1.5, "delivered": 1.21, "delivered_ci95": [1.2, 1.22], "rounds": 60,
           "delivered_by_process": [1.2, 1.22], "within": False,
           "delivered_faults_by_process": [{"default": 0, "table": 9000}, {"default": 0, "table": 9000}]}
    saved = {"problems": 1, "delivered": {"mode": "all", "rows": [row], "skipped": []}}
    rep = rescore(saved, runs)
    assert rep["runs"] == 2 and rep["agreement"]["keys"] == 1
    (new,) = rep["delivered"]["rows"]
    # an old row: its delivered processes' geomean is compared, its pooled figure kept beside
    assert new["delivered"] == pytest.approx((1.2 * 1.22) ** 0.5) and new["delivered_pooled"] == 1.21
    # the farm in the delivered processes' allocator mode (both mapped), over all its processes beside
    assert new["farm"] == pytest.approx(1.2, rel=0.02) and new["farm_mode"] == "maps" and new["within"]
    assert new["farm_all_modes"] == pytest.approx((1.2 * 2.2) ** 0.5, rel=0.02) and not new["within_all_modes"]
    assert rep["delivered"]["summary"]["within_all_modes"] == 0 and rep["delivered"]["summary"]["within"] == 1
    with pytest.raises(Exception, match="do not split into runs"):
        rescore({"problems": 2, "delivered": saved["delivered"]}, runs[:1] * 3)
    with pytest.raises(Exception, match="has no record among the records"):
        rescore({"problems": 1, "delivered": {**saved["delivered"], "rows": [dict(row, key="int8/x")]}}, runs)
    # the command line: the same from files; without records or a spec, a clear refusal (exit 2)
    from farm.cli import main

    report_path, records_path = tmp_path / "report.json", tmp_path / "records.jsonl"
    report_path.write_text(json.dumps(saved))
    records_path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert main(["fidelity", "--rescore", str(report_path), "--records", str(records_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["delivered"]["summary"]["within"] == 1
    assert main(["fidelity", "--rescore", str(report_path)]) == 2
    assert main(["fidelity"]) == 2
    assert "name a sweep spec" in capsys.readouterr().err


def test_the_aa_summary_also_reads_the_control_over_processes():
    from farm.bench.fidelity import aa_summary

    # Two processes whose A/A controls sit at 1.03 (41 rounds) and 0.99 (11 rounds): the pooled
    # rounds put the control's interval above 1; over processes it holds 1.
    rec = _record_of([_process(100, 80, aa_us=97, n=41, seed=0), _process(100, 80, aa_us=101, n=11, seed=10)])
    summary = aa_summary([rec])
    assert summary["with_control"] == 1 and summary["control_holds_1"] == 0
    assert summary["control_holds_1_by_process"] == 1


def test_a_lead_in_one_process_only_does_not_win():
    # Pooled, the candidate looks 1.1x faster; in two of three processes it is ATen's equal.
    rec = _record_of([_process(100, 70, seed=0), _process(100, 100, seed=10), _process(100, 100, seed=20)])
    assert rec["winner"] == "aten" and "1 of 3 processes" in rec["winner_rule"]


def test_choose_winner_uses_every_process_band():
    per = [{"process": 0, "speedup": 1.2, "speedup_ci95": [1.15, 1.25]},
           {"process": 1, "speedup": 1.2, "speedup_ci95": [1.15, 1.25]}]
    entries = [{"id": "aten", "status": "ok", "speedup_vs_aten": 1.0, "speedup_ci95": [1.0, 1.0]},
               {"id": CAND, "status": "ok", "speedup_vs_aten": 1.2, "speedup_ci95": [1.15, 1.25], "per_process": per}]
    assert choose_winner(entries, 0.02, [0.0, 0.0])[0] == CAND
    assert choose_winner(entries, 0.02, [0.0, 0.30])[0] == "aten"  # process 1's A/A offset swallows its lead
    assert choose_winner(entries, 0.02, [0.0, 0.0], unreliable="A/A off")[0] == "aten"


def test_a_process_supports_a_lead_by_its_interval_above_its_aa_offset():
    # A wide control that holds 1 adds no offset: the candidate's own interval carries that
    # process's sampling noise (a model-state process of few rounds: bands of 0.1-0.6 measured).
    wide = {"aa_ci95": [0.80, 1.25]}
    assert process_offset(wide) == 0.0 and leads_in_process(1.16, [1.06, 1.25], process_offset(wide))
    off = {"aa_ci95": [1.08, 1.20]}  # ATen twice, 8-20% apart: that process's bias
    assert process_offset(off) == pytest.approx(0.08) and not leads_in_process(1.16, [1.06, 1.25], 0.08)
    assert not leads_in_process(1.16, [0.98, 1.25], 0.0)  # the interval holds 1: no support
    assert process_offset({}) == 0.0 and not leads_in_process(None, None, 0.0)


def test_aa_gate_marks_a_record_unreliable_when_the_control_is_off():
    assert aa_offset((0.97, 1.03)) == 0 and aa_offset((0.701, 0.933)) == pytest.approx(0.067)
    control = {"speedup_vs_aten": 0.778, "speedup_ci95": [0.701, 0.933], "samples_us": [1.0] * 41}
    assert "misses 1 by 0.067" in aa_gate(control, 0.02)
    assert aa_gate({**control, "speedup_ci95": [0.99, 1.01]}, 0.02) is None
    assert aa_gate(None, 0.02) is None
    on = {"aten": [1e-4] * 11, "aten~aa": [1e-4] * 11}
    assert not aa_off(on, 0.02) and aa_off({**on, "aten~aa": [1.3e-4] * 11}, 0.02)


def test_placements_are_bounded_by_memory_and_left_to_the_stack_in_the_model_state():
    from farm.measure.problem import PLACEMENT_BYTES, placement_count

    def count(n, k, weights="cold", candidates=6, wanted=3):
        return placement_count(Problem("int8", "bf16", 1, n, k, None, 2, weights), wanted, candidates)
    assert count(2048, 8192) == 3 and count(2048, 8192, wanted=1) == 1  # 16 MiB x 7 per copy: all three
    assert count(2048, 8192, weights="warm") == 3 and count(2048, 8192, weights="model") == 1
    big = 65536 * 4096  # a 256 MiB lm_head: a copy of it and 6 packed copies pass the budget
    assert big * 7 > PLACEMENT_BYTES and count(65536, 4096) == 1
    assert count(32768, 4096) == 2  # 128 MiB x 7 per copy: room for one more


def test_the_rounds_rotate_through_each_candidates_placements():
    from farm.measure.timing import run_rounds

    calls = []

    def called(name):
        return lambda _x: calls.append(name)
    fns = {"aten": [called("aten0"), called("aten1"), called("aten2")], CAND: called("cand")}
    proto = Protocol(min_rounds=6, max_rounds=6, cold_iters=1, warmup_s=1e-3)
    samples, _, _ = run_rounds(fns, None, proto, lambda **_: None, flush=lambda: calls.append("flush"))
    timed = [c for c, before in zip(calls[1:], calls) if before == "flush"]  # cold: each timed call follows a flush
    assert [c for c in timed if c.startswith("aten")] == ["aten0", "aten1", "aten2"] * 2  # round r: copy r % 3
    assert timed.count("cand") == 6 and all(len(v) == 6 for v in samples.values())


def test_a_lead_is_settled_only_once_the_process_can_show_it_beyond_its_own_noise():
    from farm.measure.timing import lead_settled

    lead, quiet = _process(100, 80, seed=0), 0.05  # a 1.25x lead, a control that holds 1 tightly
    assert lead_settled(lead, quiet)
    wide = {**lead, "aten~aa": [t * 1e-6 for t in ([60, 160] * 11)[:21]]}  # twice the same kernel, 0.6-1.7x apart
    assert not lead_settled(wide, quiet)  # the band swallows the lead: more rounds
    assert lead_settled(wide, 0.30)  # a lead below settle_lead is not worth the rounds
    assert lead_settled(_process(100, 100, seed=0), quiet)  # ATen's equal: nothing to settle
    assert lead_settled({k: v for k, v in lead.items() if k != "aten"}, quiet)  # no ATen: nothing to compare


def _spin(us: float):
    """A real callable that takes `us` microseconds of CPU (a spin, not a sleep: the scheduler's
    wake-up would add its own noise)."""
    import time

    def fn(_x):
        end = time.perf_counter_ns() + int(us * 1000)
        while time.perf_counter_ns() < end:
            pass
    return fn


def test_the_timing_loop_times_on_while_a_lead_is_inside_the_noise():
    import itertools
    from dataclasses import replace

    from farm.measure.timing import run_rounds

    proto = Protocol(min_rounds=5, max_rounds=15, extra_rounds_step=5, batch_s=1e-5, warmup_s=1e-3, settle_lead=0.05)
    swings = itertools.cycle([100, 400, 250, 60, 500])  # a control whose calls swing 0.4-3x around ATen's
    noisy = {"aten": _spin(300), "aten~aa": lambda x: _spin(next(swings))(x), CAND: _spin(150)}
    samples, iters, _ = run_rounds(noisy, None, proto, lambda **_: None)
    assert iters == {cid: 1 for cid in noisy} and len(samples["aten"]) == proto.max_rounds
    samples, _, _ = run_rounds(noisy, None, replace(proto, settle_lead=2.0), lambda **_: None)
    assert len(samples["aten"]) == proto.min_rounds  # the same loop, the lead not worth settling: no extra rounds
    steady = {"aten": _spin(300), "aten~aa": _spin(300), CAND: _spin(150)}
    samples, _, _ = run_rounds(steady, None, proto, lambda **_: None)
    assert len(samples["aten"]) < proto.max_rounds  # a 2x lead over a steady control is settled early
    tied = {**steady, "cpp": _spin(150)}  # the top two overlap: more rounds, whatever settle_lead says
    samples, _, _ = run_rounds(tied, None, replace(proto, settle_lead=2.0), lambda **_: None)
    assert len(samples["aten"]) == proto.max_rounds


def test_an_unreliable_record_never_yields_a_non_default_winner():
    # The control is 25% off in every process, the candidate 1.5x ahead everywhere.
    rec = _record_of([_process(100, 66, aa_us=125, seed=s) for s in (0, 10)])
    assert rec["unreliable"] is True and "A/A control" in rec["unreliable_reason"]
    assert rec["winner"] == "aten" and rec["runner_up"] == CAND and "unreliable" in rec["winner_rule"]
    validate_record(rec)


def test_an_unreliable_record_never_decides_a_table_entry():
    from kernels.provenance import template_hash, torch_version

    samples = {"aten": noisy(100), "aten~aa": noisy(100, seed=1), CAND: noisy(60, seed=2)}
    bad = {**record("h1", "int8", 8, samples), "unreliable": True, "unreliable_reason": "A/A off"}
    result = aggregate([bad], torch_version(), template_hash())
    table = next(iter(result.tables.values()))
    assert table["unreliable_records"] == 1
    (entry,) = table["entries"]
    assert entry["winner"] == "aten" and entry["unreliable"] and entry["runner_up"] == CAND
    # A reliable record of the key decides; the unreliable one is counted, not pooled.
    good = record("h2", "int8", 8, {"aten": noisy(100, seed=3), "aten~aa": noisy(100, seed=4), CAND: noisy(80, seed=5)})
    (entry,) = next(iter(aggregate([bad, good], torch_version(), template_hash()).tables.values()))["entries"]
    assert entry["winner"] == CAND and not entry["unreliable"] and entry["unreliable_records"] == 1
    assert entry["hosts"] == ["h2"]


def test_decide_uses_every_process_of_pooled_records():
    rec = _record_of([_process(100, 70, seed=0), _process(100, 100, seed=10)])
    rec["provenance"]["measured_at"] = "2026-11-26T00:00:00+00:00"
    combined = combine([rec])
    assert combined[CAND].process_leads == [True, False]
    assert decide(combined, 0.02)[0].id == "aten"
    combined[CAND].process_leads = []  # an old record without per-process figures: the pooled rule alone
    assert decide(combined, 0.02)[0].id == CAND


def test_nightly_remeasures_entries_from_unreliable_records_first():
    import datetime as dt

    from farm.nightly.driver import select
    from farm.sweep.spec import parse_spec
    from kernels.provenance import template_hash, torch_version

    from tablekit import entry, table_doc

    spec = parse_spec({"name": "t", "isa": ["avx512"], "threads": [2],
                       "problems": [{"model": "tiny", "layers": {"proj": [256, 256]}, "ops": ["int8"], "m": [1, 8]}]})
    doc = table_doc([entry("int8", "bf16", 1, 256, 256, None, "aten"),
                     entry("int8", "bf16", 8, 256, 256, None, "aten", unreliable=True)], isa="avx512", threads=2)
    now = dt.datetime(2026, 11, 27, tzinfo=dt.timezone.utc)
    chosen = select(spec, {("avx512", "any", 2): doc}, torch_version(), template_hash(), now, 30.0, set(), "amd")
    assert chosen[0].measure and "unreliable" in chosen[0].reason and "/m8/" in chosen[0].key
    assert not chosen[1].measure


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


def test_the_gate_asks_for_another_process_only_while_the_control_is_off():
    from farm.measure.manager import ProcessRun, _control_off

    def run(aa_us):
        return ProcessRun(_process(100, 80, aa_us=aa_us), {}, 0.1, 1.0, 1, 0.0, None)

    assert not _control_off([run(100), run(100)], 0.02)
    assert _control_off([run(125), run(125)], 0.02)
    assert not _control_off([run(125)], 0.5)  # within a wide tolerance


def test_fidelity_report_counts_agreement_on_claimed_keys_only():
    from farm.bench.fidelity import report

    def rec(m, winner, aa_ci=(0.98, 1.02), unreliable=False):
        r = record("h1", "int8", m, {"aten": [100.0] * 5, "aten~aa": [100.0] * 5, CAND: [80.0] * 5})
        r.update(winner=winner, unreliable=unreliable, worker={"wall_s": 10.0, "timing_s": 2.0, "processes": 2})
        r["candidates"][1].update(speedup_ci95=list(aa_ci), speedup_vs_aten=1.0)
        r["candidates"][2].update(speedup_vs_aten=1.25, per_process=[{"process": 0, "speedup": 1.2}, {"process": 1, "speedup": 1.3}])
        r["candidates"][0]["per_process"] = [{"process": 0, "median_us": 100.0}, {"process": 1, "median_us": 120.0}]
        return r

    runs = [[rec(1, CAND), rec(8, "aten"), rec(32, CAND)],
            [rec(1, CAND), rec(8, "aten", aa_ci=(0.9, 0.95), unreliable=True), rec(32, "aten")]]
    rep = report(runs)
    assert rep["agreement"]["claimed_keys"] == 2 and rep["agreement"]["agree"] == 1  # m=8 claims nothing
    assert rep["agreement"]["agreement"] == 0.5 and rep["agreement"]["all_keys_agree"] == 2
    assert rep["aa"]["control_holds_1"] == 5 and rep["aa"]["with_control"] == 6 and rep["aa"]["unreliable"] == 1
    row = next(v for k, v in rep["spread"].items() if "/m1/" in k)
    assert row["aten_spread"] == pytest.approx(0.2) and row["best"] == CAND and row["processes"] == 4
    assert rep["cost"]["timing_share"] == pytest.approx(0.2)


def test_a_disagreement_between_candidates_within_noise_of_each_other_is_a_tie_not_a_flip():
    from farm.bench.fidelity import agreement

    def rec(winner, speedups, band=0.03):
        r = record("h1", "int8", 128, {"aten": [100.0] * 5, "aten~aa": [100.0] * 5, "cpp": [80.0] * 5,
                                       "dq[fp32]": [80.0] * 5})
        r.update(winner=winner, noise={**r["noise"], "band": band})
        for c in r["candidates"]:
            c["speedup_vs_aten"] = speedups.get(c["id"], 1.0)
        return r

    # Two candidates about 1.25x in both runs: each run's winner is within the other run's noise.
    tie = [[rec("cpp", {"cpp": 1.26, "dq[fp32]": 1.24})], [rec("dq[fp32]", {"cpp": 1.24, "dq[fp32]": 1.25})]]
    a = agreement(tie)
    assert a["agree"] == 0 and a["ties"] == 1 and a["agreement_up_to_ties"] == 1.0
    # The same winners, but dq[fp32] far behind in the first run: a real disagreement.
    flip = [[rec("cpp", {"cpp": 1.26, "dq[fp32]": 1.06})], [rec("dq[fp32]", {"cpp": 1.24, "dq[fp32]": 1.25})]]
    assert agreement(flip)["ties"] == 0
    # A candidate against the default is never a tie, however close.
    assert agreement([[rec("cpp", {"cpp": 1.26})], [rec("aten", {"cpp": 1.02})]])["ties"] == 0


# --- measured vs delivered (issue 11): the farm's speedup against the speedup end to end -----


def test_measured_vs_delivered_statistics():
    from farm.bench.fidelity import delivered_speedup, delivered_summary, measured_vs_delivered

    got = delivered_speedup([1e-4] * 11, [8e-5] * 11)  # the table's compile 1.25x faster in every round
    assert got["speedup"] == pytest.approx(1.25) and got["ci95"] == pytest.approx([1.25, 1.25]) and got["rounds"] == 11
    entry = {"winner": CAND, "speedup_vs_aten": 1.39, "speedup_ci95": [1.35, 1.43]}
    far = measured_vs_delivered("k1", entry, {"speedup": 1.0, "ci95": [0.98, 1.02], "rounds": 11})
    near = measured_vs_delivered("k2", entry, {"speedup": 1.42, "ci95": [1.40, 1.44], "rounds": 11})
    assert far["error"] == pytest.approx(0.39) and not far["within"] and not far["intervals_overlap"]
    assert near["error"] == pytest.approx(1.39 / 1.42 - 1) and near["within"] and near["intervals_overlap"]
    summary = delivered_summary([far, near])
    assert summary["within"] == 1 and summary["share_within"] == 0.5 and not summary["meets_target"]
    assert summary["worst"]["key"] == "k1" and delivered_summary([])["share_within"] is None
    assert summary["within_pooled"] is None  # no pooled figures given
    # An entry with the per-process figure is compared by it; the pooled medians beside it.
    by_process = dict(entry, speedup_by_process=1.30, speedup_by_process_ci95=[1.2, 1.4])
    row = measured_vs_delivered("k3", by_process, {"speedup": 1.28, "ci95": [1.25, 1.31], "rounds": 33,
                                                   "pooled": {"speedup": 1.25, "ci95": [1.24, 1.26], "rounds": 33}})
    assert row["farm"] == 1.30 and row["farm_ci95"] == [1.2, 1.4] and row["within"]
    assert row["error_pooled"] == pytest.approx(1.39 / 1.25 - 1) and not row["within_pooled"]
    assert delivered_summary([row, near])["within_pooled"] == 0


@pytest.mark.slow
def test_delivered_speedup_of_a_real_tiny_problem(quick_protocol, tmp_path):
    """`farm fidelity SPEC --delivered all`: a real measurement, its table, and the problem compiled
    with that table and with the default, timed end to end in fresh processes right after the
    key's farm run: the row compares the two speedups."""
    from dataclasses import asdict

    import yaml

    from farm.bench.fidelity import DELIVERED_MAX_ROUNDS, DELIVERED_PLACEMENTS, DELIVERED_PROCESSES, delivered, run
    from farm.measure.stats import geomean
    from farm.measure.host import native_isa
    from farm.sweep.spec import Task

    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny", "isa": "host", "threads": [2], "space": "minimal", "candidates": ["cpp"], "weights": ["warm"],
        "protocol": asdict(quick_protocol),
        "problems": [{"model": "tiny", "layers": {"p": [256, 512]}, "ops": ["int8"], "dtypes": ["bf16"], "m": [32]}]}))
    # Two delivered processes, not the default four: the same steps, half the compiles (CI time).
    rep, ((record,),) = run(str(spec), runs=1, delivered_mode="all", delivered_processes=2)
    assert record["winner"] is not None, record["winner_rule"]
    out = rep["delivered"]
    (row,) = out["rows"]
    assert 0 <= row["delivered_after_s"] < 60  # timed right after the key's farm run
    winner = next(c for c in record["candidates"] if c["id"] == row["winner"])
    # The farm's figure is the table entry's: one record, so what its processes measured, each alike;
    # the pooled one is the winner's own speedup over ATen.
    assert row["farm"] == pytest.approx(geomean([p["speedup"] for p in winner["per_process"]]), abs=1e-4)
    assert row["farm_processes"] == len(winner["per_process"])
    assert row["farm_pooled"] == pytest.approx(winner["speedup_vs_aten"], abs=1e-4)
    assert row["applied"] and row["table_choice"] == [row["winner"]], row  # the table really chose it
    assert row["rounds"] >= quick_protocol.min_rounds and row["weight_state"]["mode"] == "warm"
    lo, hi = row["delivered_ci95"]
    assert 0 < lo <= row["delivered"] <= hi
    assert row["delivered"] == pytest.approx(geomean(row["delivered_by_process"]))
    # each process timed on until its interval allows a 5% comparison (half-width 2.5%), or the cap; pooled
    # over the processes, the pooled interval is at least as narrow (up to resampling)
    lo, hi = row["delivered_pooled_ci95"]
    cap = DELIVERED_MAX_ROUNDS * row["placements"] * row["processes"]
    assert row["rounds"] >= cap or (hi - lo) / 2 / row["delivered_pooled"] <= 0.035, row
    # each process counted its page faults per timed call, for both variants
    assert len(row["delivered_faults_by_process"]) == row["processes"]
    assert all(f["default"] >= 0 and f["table"] >= 0 for f in row["delivered_faults_by_process"])
    # several processes, each variant compiled in several placements in each, the pairs pooled
    assert row["processes"] == 2 == len(row["delivered_by_process"]) and DELIVERED_PROCESSES >= 2
    assert row["placements"] == DELIVERED_PLACEMENTS >= 2
    assert all(len(p) == DELIVERED_PLACEMENTS for p in row["delivered_by_placement"])
    assert min(row["delivered_by_process"]) <= row["delivered"] <= max(row["delivered_by_process"])
    assert row["error"] == pytest.approx(row["farm"] / row["delivered"] - 1)
    assert out["summary"]["keys"] == 1 and out["summary"]["within"] == int(row["within"])
    winners_only = delivered([[record]], [Task(Problem.from_dict(record["problem"]), native_isa(), "tiny.p")],
                             quick_protocol)
    assert (len(winners_only["rows"]), len(winners_only["skipped"])) == ((0, 1) if row["winner"] == "aten" else (1, 0))


# --- host contention: a real busy neighbour on the measuring CPU ----------------------------

BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    pass\n"


@pytest.fixture
def one_cpu():
    """This process (and the workers it starts, which inherit it) on one CPU, restored after."""
    import os

    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    yield cpu
    os.sched_setaffinity(0, before)


@pytest.mark.slow
def test_a_process_timed_beside_a_busy_neighbour_is_replaced_then_the_record_is_unreliable(one_cpu, quick_protocol):
    import os
    import subprocess
    import sys

    from dataclasses import replace

    problem = Problem("int8", "bf16", 4, 256, 256, threads=1)
    # 11 rounds: a timed window of a few scheduler periods, not one
    protocol = replace(quick_protocol, processes=1, contention_extra_processes=1, aa_extra_processes=0,
                       min_rounds=11, max_rounds=11)
    quiet = measure(problem, protocol=protocol, only=["cpp"])
    validate_record(quiet)
    first = quiet["worker"]["per_process"][0]["contention"]
    assert 0 <= first["runqueue_wait"] <= 1 and first["window_s"] > 0  # measured, whatever the host's load
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY], preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))
    try:
        busy = measure(problem, protocol=protocol, only=["cpp"])
    finally:
        neighbour.kill()
        neighbour.wait()
    validate_record(busy)
    per_process = busy["worker"]["per_process"]
    # The scheduler shares the CPU: the timing waited for it (about half of its window), in every process.
    assert len(per_process) == 2 and all(p["contention"]["runqueue_wait"] > 0.1 for p in per_process), per_process
    assert busy["unreliable"] and "host contention" in busy["unreliable_reason"], busy["unreliable_reason"]
    assert busy["winner"] == "aten"  # an unreliable record never yields another winner
    from farm.bench.fidelity import contention_summary

    summary = contention_summary([quiet, busy])
    assert summary["unreliable"] == 1 and summary["processes"] >= 3 and summary["max_lost_share"] > 0.1


def test_the_contention_settings_are_validated_with_the_protocol():
    from farm.errors import UserError

    assert Protocol.from_dict({"max_contention": 0.1, "contention_extra_processes": 0}).max_contention == 0.1
    with pytest.raises(UserError, match="protocol.max_contention: must be a share"):
        Protocol.from_dict({"max_contention": 0})
    with pytest.raises(UserError, match="protocol.contention_extra_processes: must be an integer >= 0"):
        Protocol.from_dict({"contention_extra_processes": -1})


def test_the_placements_are_validated_with_the_protocol():
    from farm.errors import UserError

    assert Protocol.from_dict({"placements": 1}).placements == 1 and Protocol().placements == 3
    for bad in (0, -1, 2.0, True):
        with pytest.raises(UserError, match="protocol.placements: must be a positive integer"):
            Protocol.from_dict({"placements": bad})


def test_fewer_than_two_delivered_processes_is_refused_before_any_measurement(tmp_path, monkeypatch):
    import yaml

    from farm.bench import fidelity
    from farm.errors import UserError

    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"name": "tiny", "isa": "host", "threads": [2], "space": "minimal", "problems": [
        {"model": "tiny", "layers": {"p": [256, 512]}, "ops": ["int8"], "dtypes": ["bf16"], "m": [32]}]}))
    monkeypatch.setattr("farm.measure.manager.measure", lambda *a, **k: pytest.fail("measured before the refusal"))
    with pytest.raises(UserError, match="--delivered-processes: 1; .* at least 2"):
        fidelity.run(str(spec), runs=1, delivered_mode="all", delivered_processes=1)


def test_the_settle_lead_is_validated_with_the_protocol():
    from farm.errors import UserError

    assert Protocol.from_dict({"settle_lead": 0.1}).settle_lead == 0.1 and Protocol().settle_lead == 0.05
    for bad in (-0.01, float("nan"), "5%", True):
        with pytest.raises(UserError, match="protocol.settle_lead: must be a finite number >= 0"):
            Protocol.from_dict({"settle_lead": bad})


def test_contention_shares_come_from_the_schedulers_counters():
    import time

    from farm.measure import contention

    before = contention.snapshot()
    end = time.perf_counter() + 0.2
    while time.perf_counter() < end:  # this process's own work is not contention
        pass
    figures = contention.shares(before, contention.snapshot(), threads=1)
    assert figures["window_s"] >= 0.2 and 0 <= figures["runqueue_wait"] <= 1 and 0 <= figures["steal"] <= 1
    assert contention.lost_share(figures) == figures["runqueue_wait"] + figures["steal"]
    assert contention.lost_share(None) is None and contention.lost_share({"runqueue_wait": None}) is None


@pytest.mark.parametrize("lost, used, unreliable", [
    ([0.01, 0.01], [True, True], False),                       # quiet: the two processes asked for
    ([0.30, 0.01, 0.02], [False, True, True], False),          # one disturbed process replaced
    ([0.30, 0.30, 0.30, 0.30], [True] * 4, True),              # busy throughout: 2 replacements, then unreliable
])
def test_disturbed_processes_are_replaced_and_not_used(monkeypatch, lost, used, unreliable):
    """The policy over hand-made processes (the real neighbour is the slow test above): each
    process's samples lead 1.25x; `lost` is the share of CPU time other work took from each."""
    from farm.measure import manager
    from farm.measure.manager import ProcessRun

    started = []

    def fake_process(index, owed, final, problem, protocol, isa, workdir):
        for cid in owed:
            final.setdefault(cid, {"status": "ok", "compile_s": 1.0})
        started.append(index)
        return ProcessRun(_process(100, 80, seed=index), {}, 0.1, 1.0, 1, 0.0, None,
                          contention={"runqueue_wait": lost[index], "steal": 0.0, "window_s": 0.1})

    monkeypatch.setattr(manager, "_run_process", fake_process)
    record = manager.measure(Problem("int8", "bf16", 32, 256, 256, threads=2), protocol=Protocol(processes=2),
                             only=[CAND])
    assert started == list(range(len(lost)))
    assert [p["used"] for p in record["worker"]["per_process"]] == used
    assert record["unreliable"] == unreliable
    assert record["winner"] == ("aten" if unreliable else CAND)
    assert len(record["processes"]) == sum(used)


def test_a_measurement_removes_the_working_directory_it_made(monkeypatch, tmp_path):
    """Each measurement's Inductor caches and worker logs are spent once its record is built; one
    the caller names is the caller's to keep."""
    import os

    from farm.measure import manager
    from farm.measure.manager import ProcessRun

    seen = []

    def fake_process(index, owed, final, problem, protocol, isa, workdir):
        for cid in owed:
            final.setdefault(cid, {"status": "ok", "compile_s": 1.0})
        seen.append(workdir)
        assert os.path.isdir(workdir)
        return ProcessRun(_process(100, 80, seed=index), {}, 0.1, 1.0, 1, 0.0, None)

    monkeypatch.setattr(manager, "_run_process", fake_process)
    problem = Problem("int8", "bf16", 32, 256, 256, threads=2)
    manager.measure(problem, protocol=Protocol(processes=2), only=[CAND])
    assert len(seen) == 2 and not os.path.exists(seen[0])
    manager.measure(problem, protocol=Protocol(processes=1), only=[CAND], workdir=str(tmp_path))
    assert seen[-1] == str(tmp_path) and tmp_path.is_dir()
