"""The nightly on a real local cluster: incremental selection, regressions, report, CI workflow."""

import copy
import os
import shlex
import shutil

import pytest
import yaml

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
    "name": "nightly-tiny", "isa": SERVED, "threads": [2], "space": "minimal", "weights": ["warm"],
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
    doc = yaml.safe_load(open(shipped / f"{NATIVE}.yaml"))
    edit(doc)
    yaml.safe_dump(doc, open(shipped / f"{NATIVE}.yaml", "w"), sort_keys=False)
    return shipped


def _tables(folder):
    return {name: yaml.safe_load(open(os.path.join(folder, name))) for name in os.listdir(folder)}


@pytest.mark.slow
def test_second_night_in_a_row_measures_nothing_and_reports_no_change(first_night, cluster):
    base, first = first_night
    assert first.exit_code == EXIT_OK, first.failures
    assert sum(s.measure for s in first.selections) == ROWS
    assert all(s.reason == "missing from the shipped table" for s in first.selections)
    assert set(_tables(base / "n1" / "tables")) == {f"{isa}-t2.yaml" for isa in SERVED}
    second = run(spec_doc=SPEC, tables_dir=str(base / "n1" / "tables"), out=str(base / "n2"),
                 address=cluster["address"], store_path=str(base / "history.db"))
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
                 store_path=str(base / "history.db"))
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
                 store_path=str(base / "history.db"))
    check = next(c for c in result.shipped_checks if c["winner"] == SLOW_KNOBS)
    assert check["kind"] == "regression" and check["ratio"] > 1.2, check
    assert result.exit_code == EXIT_REGRESSION
    assert "**regression**" in (base / "n4" / "report.md").read_text()


@pytest.mark.slow
def test_report_plots_show_the_tables_speedups(first_night):
    base, _ = first_night
    new = _tables(base / "n1" / "tables")[f"{NATIVE}.yaml"]
    data = read_plot_data(str(base / "n1" / "plots" / f"{NATIVE}-t2-speedup.png"))
    from farm.tables.diff import key_text

    expected = {key_text(e["key"]): round(e["speedup_vs_aten"], 4) for e in new["entries"]}
    assert dict(zip(data["keys"], data["new"])) == expected
    from PIL import Image

    with Image.open(base / "n1" / "plots" / f"{NATIVE}-t2-speedup.png") as image:
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
                 address=cluster["address"], store_path=str(base / "history.db"), skip_missing=True)
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
