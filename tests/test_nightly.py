"""The nightly on a real local cluster: incremental selection, regressions, report, CI workflow."""

import copy
import os
import shlex
import shutil

import pytest
import yaml

import kernels
from farm.cluster.localcluster import local_cluster
from farm.measure.host import native_isa, runnable
from farm.nightly.driver import EXIT_FAILURE, EXIT_OK, EXIT_REGRESSION, EXIT_SKIPPED, run
from farm.nightly.report import read_plot_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_KNOBS = "cpp[tf=1,1,2;cb=1,1,1]"  # K split over threads, one register block per cache block
# Every test runs on every x86 host class, with the host's own class as the label.
NATIVE = native_isa()
SERVED = runnable(NATIVE)  # AVX512/AMX: itself + emulated avx2; AVX2: avx2
MISSING = next(isa for isa in ("amx", "avx512") if isa not in SERVED)
ROWS = 2 * len(SERVED)
SPEC = {
    "name": "nightly-tiny", "isa": SERVED, "threads": [2], "space": "minimal", "candidates": ["cpp"], "weights": ["warm"],
    "timeout_s": 120, "worker_memory_gb": 2,
    "protocol": {"min_rounds": 5, "max_rounds": 9, "extra_rounds_step": 4, "batch_s": 0.003, "warmup_s": 0.01,
                 "processes": 1},
    "problems": [{"model": "t", "layers": {"p": [256, 512]}, "ops": ["int8"], "dtypes": ["bf16"], "m": [1, 32]}],
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workers = tuple(isa for isa in SERVED if isa != NATIVE) + ("native",)
    with local_cluster(workers=workers, state_dir=str(tmp_path_factory.mktemp("nc"))) as info:
        yield info


@pytest.fixture(scope="module")
def first_night(cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("nights")
    empty = base / "shipped"
    empty.mkdir()
    result = run(spec_doc=SPEC, tables_dir=str(empty), out=str(base / "n1"), address=cluster["address"],
                 store_path=str(base / "history.db"))
    return base, result


def _shipped_copy(base, name, edit):
    """The first night's tables in `base/name`, with `edit(native class document)` applied."""
    shipped = base / name
    shutil.copytree(base / "n1" / "tables", shipped)
    path = _native_table(shipped)
    doc = yaml.safe_load(open(path))
    edit(doc)
    yaml.safe_dump(doc, open(path, "w"), sort_keys=False)
    return shipped


def _native_table(folder):
    """The native class's table in `folder`, found by its header (a file's name is for people)."""
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))]
    (path,) = [p for p in paths if yaml.safe_load(open(p))["isa"] == NATIVE]
    return path


def _tables(folder):
    return {name: yaml.safe_load(open(os.path.join(folder, name))) for name in os.listdir(folder)}


@pytest.mark.slow
def test_second_night_in_a_row_measures_nothing_and_reports_no_change(first_night, cluster):
    base, first = first_night
    assert first.exit_code == EXIT_OK, first.failures
    assert sum(s.measure for s in first.selections) == ROWS
    assert all(s.reason == "missing from the shipped table" for s in first.selections)
    assert set(_tables(base / "n1" / "tables")) == {f"{isa}-{kernels.host_vendor()}-t2.yaml" for isa in SERVED}
    second = run(spec_doc=SPEC, tables_dir=str(base / "n1" / "tables"), out=str(base / "n2"),
                 address=cluster["address"], store_path=str(base / "history.db"), race_budget_s=0)  # no racing: below
    assert second.exit_code == EXIT_OK and second.run_id is None
    assert not any(s.measure for s in second.selections)
    assert all(c.kind == "unchanged" for cs in second.changes.values() for c in cs)
    report = (base / "n2" / "report.md").read_text()
    assert f"0 of {ROWS} rows were re-measured" in report and "No change." in report


@pytest.mark.slow
def test_a_stale_row_is_remeasured_and_the_rest_are_not(first_night, cluster):
    base, _ = first_night
    shipped = _shipped_copy(base, "stale", lambda doc: doc["entries"][0]["provenance"].update(torch="2.12.0+cpu"))
    result = run(spec_doc=SPEC, tables_dir=str(shipped), out=str(base / "n3"), address=cluster["address"],
                 store_path=str(base / "history.db"), race_budget_s=0)
    measured = [s for s in result.selections if s.measure]
    assert len(measured) == 1 and measured[0].isa == NATIVE
    assert measured[0].reason == "torch changed (2.12.0+cpu -> 2.13.0+cpu)"
    assert "torch changed" in (base / "n3" / "report.md").read_text()


@pytest.mark.slow
def test_a_slow_shipped_winner_is_a_significant_regression_with_its_exit_code(first_night, cluster):
    base, _ = first_night
    def slow_down(doc):
        entry = next(e for e in doc["entries"] if e["key"]["m"] == 32)
        entry["winner"], entry["remeasure"] = SLOW_KNOBS, True  # shipped: slow knobs, the fast time

    shipped = _shipped_copy(base, "slowed", slow_down)
    result = run(spec_doc=SPEC, tables_dir=str(shipped), out=str(base / "n4"), address=cluster["address"],
                 store_path=str(base / "history.db"), race_budget_s=0)
    check = next(c for c in result.shipped_checks if c["winner"] == SLOW_KNOBS)
    assert check["kind"] == "regression" and check["ratio"] > 1.2, check
    assert result.exit_code == EXIT_REGRESSION
    assert "**regression**" in (base / "n4" / "report.md").read_text()


@pytest.mark.slow
def test_report_plots_show_the_tables_speedups(first_night):
    base, _ = first_night
    new = yaml.safe_load(open(_native_table(base / "n1" / "tables")))
    data = read_plot_data(str(base / "n1" / "plots" / f"{NATIVE}-{kernels.host_vendor()}-t2-speedup.png"))
    from farm.tables.diff import key_text

    expected = {key_text(e["key"]): round(e["speedup_vs_aten"], 4) for e in new["entries"]}
    assert dict(zip(data["keys"], data["new"])) == expected
    from PIL import Image

    with Image.open(base / "n1" / "plots" / f"{NATIVE}-{kernels.host_vendor()}-t2-speedup.png") as image:
        dark = sum(image.convert("L").histogram()[:200])
        assert image.size[0] > 300 and dark > 2000  # real drawing, not a blank canvas


@pytest.mark.slow
def test_no_live_worker_for_a_class_is_a_failure_exit(cluster, tmp_path):
    spec = copy.deepcopy(SPEC)
    spec["isa"] = [MISSING]
    result = run(spec_doc=spec, tables_dir=str(tmp_path), out=str(tmp_path / "n"), address=cluster["address"])
    assert result.exit_code == EXIT_FAILURE and MISSING in result.failures[0]
    assert MISSING in (tmp_path / "n" / "report.md").read_text()


@pytest.mark.slow
def test_skip_missing_is_its_own_exit_code_and_names_the_class(first_night, cluster, tmp_path):
    base, _ = first_night
    spec = copy.deepcopy(SPEC)
    spec["isa"] = SERVED + [MISSING]
    result = run(spec_doc=spec, tables_dir=str(base / "n1" / "tables"), out=str(tmp_path / "n"),
                 address=cluster["address"], store_path=str(base / "history.db"), skip_missing=True, race_budget_s=0)
    assert result.exit_code == EXIT_SKIPPED and result.skipped_classes == {MISSING: 2}, result.failures
    assert result.failures == []
    import json

    assert json.load(open(tmp_path / "n" / "diff.json"))["skipped_classes"] == {MISSING: 2}
    assert f"- {MISSING}: 2 rows not measured" in (tmp_path / "n" / "report.md").read_text()


def test_ci_workflow_parses_and_calls_an_entry_point_with_arguments_it_accepts():
    import argparse

    from farm.nightly.driver import add_arguments

    workflow = yaml.safe_load(open(os.path.join(ROOT, "infra", "github", "nightly.yml")))
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on` as true
    assert "schedule" in triggers and "workflow_dispatch" in triggers
    steps = workflow["jobs"]["nightly"]["steps"]
    script = next(s["run"] for s in steps if "jobs.nightly" in s.get("run", ""))
    line = next(line for line in script.splitlines() if "python -m jobs.nightly" in line)
    env = {"SPEC": "jobs/sweeps/llm.yaml", "RAY_DASHBOARD": "http://head:8265", "MAX_AGE_DAYS": "30",
           "out": "nightly/2026-11-26"}
    for name, value in env.items():
        line = line.replace(f'"${name}"', value).replace(f"${name}", value)
    argv = shlex.split(line)
    module_index = argv.index("-m") + 1
    assert argv[module_index] == "jobs.nightly"
    import importlib

    assert hasattr(importlib.import_module("jobs.nightly"), "main")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv[module_index + 1:])
    assert os.path.exists(os.path.join(ROOT, args.spec)) and os.path.isdir(os.path.join(ROOT, args.tables))
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and any("create-pull-request" in str(s.get("uses", "")) for s in steps)


# --- racing close calls (issue 11): pure functions over records built by the farm's own build_record

from farm.measure.problem import Problem  # noqa: E402
from farm.measure.protocol import Protocol  # noqa: E402
from farm.measure.record import build_record, poolable, process_samples  # noqa: E402
from farm.nightly import race  # noqa: E402

from tablekit import noisy  # noqa: E402

RIVAL = "cpp[tf=1,2,1]"


def _process(aten_us, rival_us, n=21, seed=0, spread=0.01):
    """One worker process's per-round seconds: ATen, its A/A control, one rival."""
    return {"aten": [t * 1e-6 for t in noisy(aten_us, n, spread, seed)],
            "aten~aa": [t * 1e-6 for t in noisy(aten_us, n, spread, seed + 1)],
            RIVAL: [t * 1e-6 for t in noisy(rival_us, n, spread, seed + 2)]}


def _record(processes, run_id="r1", weights="warm", torch=None):
    host = {"isa": "avx2", "emulated": False, "capabilities": {}, "cpu": "cpu", "cores": 2, "torch": "t",
            "threads": 2, "l3_bytes": 1 << 25, "hostname": "h1"}
    final = {cid: {"status": "ok", "compile_s": 1.0} for cid in processes[0]}
    rec = build_record(host, Problem("int8", "bf16", 8, 256, 256, threads=2, weights=weights), list(processes[0]),
                       final, processes, {}, Protocol(), {})
    rec["provenance"]["run_id"] = run_id
    if torch:
        rec["provenance"]["torch"] = torch
    return rec


def test_a_stored_record_gives_back_each_process_samples():
    procs = [_process(100, 80, seed=0), _process(130, 104, n=15, seed=10)]
    back = process_samples(_record(procs))
    assert sorted(back) == [0, 1]
    for index, proc in enumerate(procs):
        for cid, times in proc.items():
            assert back[index][cid] == pytest.approx([t * 1e6 for t in times])


def test_only_records_of_the_same_key_class_provenance_and_weight_state_pool():
    a = _record([_process(100, 99, seed=0)])
    assert poolable(a, _record([_process(100, 99, seed=5)], run_id="r2")) is None
    assert "torch" in poolable(a, _record([_process(100, 99)], torch="2.12.0+cpu"))
    assert "problem" in poolable(a, _record([_process(100, 99)], weights="cold"))
    emulated = _record([_process(100, 99)])
    emulated["host"]["emulated"] = True
    assert "host class" in poolable(a, emulated)
    unenforced = _record([_process(100, 99)])
    del unenforced["protocol"]["weight_state"]  # a record from before weight states were enforced
    assert "weight state" in poolable(a, unenforced)


def test_confidence_is_decided_beyond_the_noise_and_undecided_within_it():
    clear = race.confidence([_record([_process(100, 80, seed=s) for s in (0, 10)])])
    assert clear["decided"] and clear["leader"] == RIVAL and clear["second"] == "aten" and clear["winner"] == RIVAL
    assert clear["lead"] == pytest.approx(1.25, rel=0.03) and clear["processes_agree"] == clear["processes"] == 2
    close = race.confidence([_record([_process(100, 99.5, seed=s, spread=0.03) for s in (0, 10)])])
    assert not close["decided"] and close["lead_ci95"][0] < 1.02
    assert "within noise of the runner-up" in race.why_race("fresh", close)
    assert race.why_race("fresh", clear) is None and race.why_race("fresh", None) is None
    assert "unreliable" in race.why_race(race.UNRELIABLE_REASON, clear)


def test_disagreeing_processes_are_a_close_call_and_pooling_decides_them():
    # Two processes see the rival 1.25x ahead, a third sees a tie: all must agree among three.
    split = _record([_process(100, 80, seed=0), _process(100, 80, seed=10), _process(100, 100, seed=20)])
    before = race.confidence([split])
    assert not before["decided"] and before["processes_agree"] == 2 and before["processes"] == 3
    assert "processes disagree" in race.why_race("fresh", before)
    # Pooled with two more records where it leads: 4 of 5 processes is enough among five.
    more = [_record([_process(100, 80, seed=s)], run_id=f"r{s}") for s in (30, 40)]
    after = race.confidence([split] + more)
    assert after["decided"] and after["processes"] == 5 and after["rounds"] == 5 * 21
    moved = race.moved(before, after)
    assert moved["share"] == pytest.approx(4 / 5 - 2 / 3) and moved["decided"] == [False, True]


def test_a_race_pools_what_it_may_names_what_it_may_not_and_stops():
    earlier = [_record([_process(100, 99.5, seed=0, spread=0.03)], run_id="night1"),
               _record([_process(100, 99.5, seed=3, spread=0.03)], run_id="old-torch", torch="2.12.0+cpu")]
    r = race.Race("avx2", "k", "t.p", "close", earlier, race.confidence(earlier[:1]))
    r.add_pass(_record([_process(100, 99.5, seed=7, spread=0.03)], run_id="night2"))
    assert [p["run_id"] for p in r.pooled] == ["night1", "night2"] and r.after["rounds"] == 42
    assert [(p["run_id"], "torch" in p["why"]) for p in r.left_out] == [("old-torch", True)]
    assert r.open and r.as_dict()["moved"] is not None
    assert race.stop_reason(10.0, 10.0, 1, 1, budget_s=15.0).startswith("race budget spent")
    assert race.stop_reason(10.0, 10.0, 2, 1, budget_s=15.0) is None  # half the keys left: half the time
    assert race.stop_reason(10.0, 10.0, 1, 0, budget_s=0.0) is None  # nothing left to race
    for seed in range(race.MAX_POOLED - 2):  # a tie: the pool fills up without a decision
        r.add_pass(_record([_process(100, 100, seed=20 + seed, spread=0.03)], run_id=f"night{3 + seed}"))
    assert len(r.pooled) == race.MAX_POOLED and not r.open and "a tie within the noise" in r.outcome
    assert race.why_race("fresh", r.after) is None  # and the next night does not race it again
    r.add_pass(None)
    assert not r.open and "no record" in r.outcome


def test_race_budget_is_validated():
    from farm.errors import UserError

    assert race.check_budget(0) == 0.0 and race.check_budget(90) == 90.0
    for bad in (-1, float("nan"), float("inf"), "10", True):
        with pytest.raises(UserError, match="race_budget_s"):
            race.check_budget(bad)


def test_close_calls_are_planned_first_and_measured_even_when_fresh():
    from farm.nightly.driver import Selection

    sels = [Selection("avx2", "a", "t.a", True, "torch changed", "aten"),
            Selection("avx2", "b", "t.b", False, "fresh", "aten"),
            Selection("avx2", "c", "t.c", False, "fresh", "aten")]
    earlier = {("avx2", "b"): [_record([_process(100, 99.5, spread=0.03)])], ("avx2", "c"): [_record([_process(100, 80)])]}
    planned, races = race.plan(sels, earlier, budget_s=60)
    assert [s.key for s in planned] == ["b", "a", "c"] and set(races) == {("avx2", "b")}
    assert planned[0].measure and planned[0].reason.startswith("close call: winner within noise")
    assert not planned[2].measure  # decided: left alone
    planned, races = race.plan(sels, earlier, budget_s=0)  # racing off
    assert not races and [s.key for s in planned] == ["a", "b", "c"]


@pytest.mark.slow
def test_a_close_call_is_raced_first_and_pooled_with_its_earlier_record(first_night, cluster):
    """A real nightly: the shipped entry of m=32 came from unreliable records, m=1 is new. The
    close call is measured first (although spec order puts it second), its record pooled with
    the first night's, and the report shows how the decision's confidence moved."""
    import json

    from farm.measure.store import Store

    base, first = first_night
    spec = {**SPEC, "isa": [NATIVE]}

    def edit(doc):
        next(e for e in doc["entries"] if e["key"]["m"] == 32)["unreliable"] = True
        doc["entries"] = [e for e in doc["entries"] if e["key"]["m"] != 1]  # a new row: measured, not raced

    shipped = _shipped_copy(base, "close", edit)
    # A budget shorter than a pass: exactly one pass, however the pool comes out.
    result = run(spec_doc=spec, tables_dir=str(shipped), out=str(base / "n5"), address=cluster["address"],
                 store_path=str(base / "history.db"), race_budget_s=0.001)
    assert result.exit_code != EXIT_FAILURE, result.failures
    (raced,) = result.races
    assert "/m32/" in raced["key"] and "unreliable" in raced["why"] and raced["passes"] == 1
    assert raced["outcome"] == "decided" or raced["outcome"].startswith("race budget spent")
    store = Store(str(base / "history.db"))
    try:
        tonight = store.records(result.run_id)
    finally:
        store.close()
    assert [r["problem"]["m"] for r in tonight] == [32, 1]  # the close call first
    # Pooled: the first night's record of the key (unless its own A/A gate marked it) and tonight's.
    sources = {p["run_id"]: p for p in raced["pooled"]}
    assert result.run_id in sources
    earlier_ok = [p for p in raced["pooled"] + raced["left_out"] if p["run_id"] == first.run_id]
    assert len(earlier_ok) == 1
    if earlier_ok[0]["unreliable"]:
        assert "unreliable" in earlier_ok[0]["why"]
    else:
        assert first.run_id in sources
        before, after = raced["before"], raced["after"]
        assert after["rounds"] > before["rounds"] and after["records"] == before["records"] + 1
        # The new table entry is what the pool decided: both nights' runs are its provenance.
        doc = _tables(base / "n5" / "tables")
        entry = next(e for d in doc.values() if d["isa"] == NATIVE for e in d["entries"] if e["key"]["m"] == 32)
        assert {first.run_id, result.run_id} <= set(entry["provenance"]["run_ids"])
        assert raced["moved"] is not None and "processes agreeing" in (base / "n5" / "report.md").read_text()
    report = (base / "n5" / "report.md").read_text()
    assert "## Close calls raced first" in report and raced["key"] in report and first.run_id in report
    assert report.index("## Close calls raced first") < report.index("## What was re-measured and why")
    assert json.load(open(base / "n5" / "diff.json"))["races"][0]["pooled"] == raced["pooled"]
