"""Sweeps on a real multi-node Ray cluster on this machine (head + labelled workers)."""

import copy
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml

import kernels
from farm.errors import UserError
from farm.cluster.localcluster import local_cluster
from farm.measure.host import native_isa, runnable
from farm.sweep.spec import parse_spec
from farm.measure.store import Store
from farm.sweep.driver import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every test runs on every x86 host class, with the host's own class as the label.
NATIVE = native_isa()
SERVED = runnable(NATIVE)  # AVX512/AMX: itself + emulated avx2; AVX2: avx2
MISSING = next(isa for isa in ("amx", "avx512") if isa not in SERVED)  # a class this machine cannot serve
# ATen, its control and the template, not the whole minimal grid: what these tests check is where
# tasks run and what is stored, and each candidate left out is a compile less per task.
TINY = {
    "name": "tiny", "isa": SERVED, "threads": [2], "space": "minimal", "candidates": ["cpp"], "weights": ["warm"],
    "timeout_s": 120, "worker_memory_gb": 2,
    "protocol": {"min_rounds": 3, "max_rounds": 5, "extra_rounds_step": 2, "batch_s": 0.002, "warmup_s": 0.01,
                 "processes": 1},
    "problems": [{"model": "t", "layers": {"p": [256, 256]}, "ops": ["int8"], "dtypes": ["bf16"], "m": [1, 32]}],
}


def _spec(**changes):
    doc = copy.deepcopy(TINY)
    doc.update(changes)
    return doc


@pytest.fixture(scope="module")
def mixed_cluster(tmp_path_factory):
    # One node per class this host serves: avx2 (emulated on AVX512/AMX) + native, or native alone.
    workers = tuple(isa for isa in SERVED if isa != NATIVE) + ("native",)
    with local_cluster(workers=workers, state_dir=str(tmp_path_factory.mktemp("cl"))) as info:
        yield info


def test_the_smoke_spec_resolves_to_this_hosts_classes():
    spec = parse_spec(yaml.safe_load(open(os.path.join(ROOT, "jobs", "sweeps", "smoke.yaml"))))
    assert spec.isa == SERVED == ({"avx2": ["avx2"], "avx512": ["avx512", "avx2"], "amx": ["amx", "avx2"]}[NATIVE])
    assert {t.isa for t in spec.tasks} == set(SERVED)
    named = parse_spec(_spec(isa=["host", "avx2"]))  # host next to a class it includes: no duplicate
    assert named.isa == SERVED


@pytest.mark.slow
def test_smoke_sized_sweep_places_every_task_on_its_class_and_writes_every_table(mixed_cluster, tmp_path):
    store_path = str(tmp_path / "r.db")
    result = run(spec_doc=_spec(), address=mixed_cluster["address"], store_path=store_path, out=str(tmp_path / "t"))
    assert result.failed == [] and result.measured == 2 * len(SERVED) and result.skipped_classes == {}
    records = Store(store_path).records(result.run_id)
    assert sorted((r["host"]["isa"], r["problem"]["m"]) for r in records) == sorted(
        (isa, m) for isa in SERVED for m in (1, 32))
    assert all([c["id"] for c in r["candidates"]] == ["aten", "aten~aa", "cpp"] for r in records)  # the spec's candidates
    for r in records:
        assert r["host"]["emulated"] is (r["host"]["isa"] != NATIVE)
        assert r["node"]["aten_env"] == ("avx2" if r["host"]["emulated"] else None)
    assert set(result.tables) == {(isa, kernels.host_vendor(), 2) for isa in SERVED}
    for path in result.tables.values():
        assert os.path.exists(path)
    # A second sweep finds every row fresh and measures nothing.
    again = run(spec_doc=_spec(), address=mixed_cluster["address"], store_path=store_path, out=str(tmp_path / "t"))
    assert again.measured == 0 and again.skipped_fresh == 2 * len(SERVED)


@pytest.mark.slow
def test_sweep_through_the_jobs_api(mixed_cluster, tmp_path):
    from ray.job_submission import JobStatus

    from farm.cluster.relay import job_client

    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(isa=["avx2"], problems=[dict(TINY["problems"][0], m=[8])])))
    client = job_client(mixed_cluster["dashboard"], mixed_cluster["token_file"])  # the cluster's own token
    job = client.submit_job(
        entrypoint=f"python -m jobs.sweep {spec_path} --store {tmp_path / 'job.db'} --out {tmp_path / 'tables'}",
        runtime_env={"working_dir": ROOT},
    )
    deadline = time.time() + 240
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    assert (tmp_path / "tables" / f"avx2-{kernels.host_vendor()}-t2.yaml").exists()
    assert Store(str(tmp_path / "job.db")).count() == 1


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_measures_only_what_is_missing(mixed_cluster, tmp_path):
    spec_path = tmp_path / "resume.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(problems=[dict(TINY["problems"][0], m=[2, 4, 16])], isa=[NATIVE])))
    store_path = str(tmp_path / "resume.db")
    driver = subprocess.Popen([sys.executable, "-m", "farm.cli", "sweep", str(spec_path), "--address",
                               mixed_cluster["address"], "--store", store_path, "--out", str(tmp_path / "t")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while not (os.path.exists(store_path) and Store(store_path).count() >= 1):
        assert driver.poll() is None and time.time() < deadline
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    store = Store(store_path)
    run_id = store.runs()[0]["id"]
    before = {(r["problem"]["m"], r["provenance"]["measured_at"]) for r in store.records(run_id)}
    assert 1 <= len(before) < 3
    result = run(resume=run_id, address=mixed_cluster["address"], store_path=store_path, out=str(tmp_path / "t"))
    assert result.measured == 3 - len(before) and result.skipped_done == len(before)
    after = {(r["problem"]["m"], r["provenance"]["measured_at"]) for r in Store(store_path).records(run_id)}
    assert before <= after and len(after) == 3  # finished rows kept as they were, none duplicated


def _raylet_pid(temp_dir):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "/raylet " in cmd.split(" --")[0] + " " and temp_dir in cmd:
            return int(pid)
    return None


@pytest.mark.slow
def test_a_worker_node_killed_mid_sweep_loses_and_duplicates_nothing(tmp_path):
    import ray
    from ray.util.state import list_tasks

    from farm.cluster.localcluster import status

    state_dir = tempfile.mkdtemp(prefix="fk-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Three tasks on two nodes: the third starts as the first ends, so a task is still running when
    # the first record is in.
    spec = _spec(isa=[NATIVE], problems=[dict(TINY["problems"][0], m=[1, 8, 32])])
    store_path = str(tmp_path / "kill.db")
    with local_cluster(workers=("native", "native"), state_dir=state_dir) as info:
        outcome = {}
        driver = threading.Thread(target=lambda: outcome.update(result=run(
            spec_doc=spec, address=info["address"], store_path=store_path, out=str(tmp_path / "t"))))
        driver.start()
        deadline, killed = time.time() + 180, None
        while killed is None and time.time() < deadline:
            time.sleep(0.5)
            if not ray.is_initialized() or not os.path.exists(store_path) or Store(store_path).count() < 1:
                continue
            running = [t for t in list_tasks(address=info["dashboard"], filters=[("state", "=", "RUNNING")])
                       if t.name.startswith("measure:")]
            if running:
                nodes = {n["node_id"]: n for n in status(state_dir)["nodes"]}
                victim = nodes[running[0].node_id]
                pid = _raylet_pid(os.path.join(state_dir, victim["name"]))
                os.kill(pid, signal.SIGKILL)
                killed = victim["name"]
        assert killed, "no task was seen running on a worker node"
        driver.join(timeout=300)
        assert not driver.is_alive()
    result = outcome["result"]
    assert result.failed == []
    rows = Store(store_path).records(result.run_id)
    assert sorted(r["problem"]["m"] for r in rows) == [1, 8, 32]


BAD_SPECS = {
    "unknown op": ({"problems": [dict(TINY["problems"][0], ops=["int3"])]}, "problems[0].ops: unknown value 'int3'"),
    "group not dividing K": ({"problems": [dict(TINY["problems"][0], ops=["int4"], group_size=96)]}, "group size of 32, 64, 128 or 256"),
    "K not divisible": ({"problems": [dict(TINY["problems"][0], ops=["int4"], group_size=128, layers={"p": [256, 200]})]},
                        "not divisible by the group size 128"),
    "negative M": ({"problems": [dict(TINY["problems"][0], m=[-1])]}, ".m: -1 is outside"),
    "absurd N": ({"problems": [dict(TINY["problems"][0], layers={"p": [10**9, 256]})]}, ".n: 1000000000 is outside"),
    "too big for memory": ({"worker_memory_gb": 0.01, "problems": [dict(TINY["problems"][0], layers={"p": [8192, 8192]})]},
                           "more than worker_memory_gb"),
    "unknown isa": ({"isa": ["avx1024"]}, "isa: unknown value 'avx1024'"),
    "unknown field": ({"colour": "blue"}, "unknown field(s) colour"),
    "bad layers": ({"problems": [dict(TINY["problems"][0], layers={"p": [256]})]}, "layers.p: must be [N, K]"),
    "string threads": ({"threads": ["two"]}, "threads: 'two' is not a int"),
    "bad protocol": ({"protocol": {"min_rounds": 0}}, "protocol.min_rounds"),
    "bad space": ({"space": "everything"}, "space: unknown value 'everything'"),
    "bad candidate": ({"candidates": ["cpp", "cpp[tf=0,1,1]"]}, "candidates: 'cpp[tf=0,1,1]'"),
    "empty candidates": ({"candidates": []}, "candidates: must not be empty"),
    "empty problems": ({"problems": []}, "problems: must be a non-empty list"),
    "missing M": ({"problems": [{k: v for k, v in TINY["problems"][0].items() if k != "m"}]}, ".m: missing"),
}


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_bad_specs_fail_before_scheduling_naming_the_field(name, tmp_path):
    changes, needle = BAD_SPECS[name]
    with pytest.raises(UserError) as err:
        parse_spec(_spec(**changes))
    assert needle in str(err.value)
    # Through the driver: the error comes before any store row or cluster exists.
    with pytest.raises(UserError):
        run(spec_doc=_spec(**changes), address="127.0.0.1:1", store_path=str(tmp_path / "x.db"), out=None)
    assert Store(str(tmp_path / "x.db")).runs() == []


@pytest.mark.slow
def test_a_class_with_no_live_node_is_an_immediate_error(mixed_cluster, tmp_path):
    start = time.time()
    with pytest.raises(UserError, match=f"no live Ray node for ISA class\\(es\\) {MISSING} .*--skip-missing"):
        run(spec_doc=_spec(isa=[MISSING]), address=mixed_cluster["address"], store_path=str(tmp_path / "a.db"), out=None)
    assert time.time() - start < 30
    assert Store(str(tmp_path / "a.db")).records() == []


@pytest.mark.slow
def test_skip_missing_measures_the_served_classes_and_names_the_skipped_one(mixed_cluster, tmp_path, capsys):
    spec = _spec(isa=[NATIVE, MISSING], problems=[dict(TINY["problems"][0], m=[4])])
    result = run(spec_doc=spec, address=mixed_cluster["address"], store_path=str(tmp_path / "s.db"),
                 out=str(tmp_path / "t"), skip_missing=True)
    assert result.skipped_classes == {MISSING: 1} and result.measured == 1 and result.failed == []
    assert set(result.tables) == {(NATIVE, kernels.host_vendor(), 2)}


@pytest.mark.slow
def test_embedded_mode_skips_what_this_host_cannot_serve_with_one_notice_and_ends_in_tables(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=200)
    spec = _spec(isa=[NATIVE, MISSING], problems=[dict(TINY["problems"][0], m=[4])])
    result = run(spec_doc=spec, address=None, store_path=str(tmp_path / "e.db"), out=str(tmp_path / "t"),
                 console=console)
    assert result.skipped_classes == {MISSING: 1} and result.measured == 1 and result.failed == []
    assert set(result.tables) == {(NATIVE, kernels.host_vendor(), 2)} and os.path.exists(result.tables[(NATIVE, kernels.host_vendor(), 2)])
    notices = [line for line in console.export_text().splitlines() if "skipping ISA class" in line]
    assert len(notices) == 1 and MISSING in notices[0]
