"""farm.cluster.localcluster: a real head + labelled workers on this machine, stopped without `ray stop`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from farm.cluster import localcluster
from farm.errors import UserError
from farm.measure.host import native_isa
from farm.cluster.node import RAY_ENV


@pytest.fixture
def state_dir():
    # Short on purpose: Ray's unix sockets live under it (pytest's tmp_path is too long).
    path = tempfile.mkdtemp(prefix="farm-lc-", dir="/tmp")
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


# --- without a cluster -------------------------------------------------------------------------


def test_up_refuses_unknown_or_impossible_workers_before_starting_anything(state_dir):
    with pytest.raises(UserError, match="unknown worker kind"):
        localcluster.up(["native", "sse4"], state_dir)
    impossible = {"avx2": "avx512", "avx512": "amx"}.get(native_isa())
    if impossible:
        with pytest.raises(UserError, match=f"cannot measure as {impossible}"):
            localcluster.up(["native", impossible], state_dir)
    assert not os.path.exists(os.path.join(state_dir, localcluster.STATE_FILE))


def test_up_refuses_a_state_dir_too_long_for_rays_sockets():
    with pytest.raises(UserError, match="characters long"):
        localcluster.up(["native"], "/tmp/" + "x" * 60)


def test_status_and_down_without_a_cluster(state_dir):
    assert localcluster.status(state_dir)["running"] is False
    assert localcluster.down(state_dir) == {"killed": [], "forced": []}
    assert localcluster.main(["--state-dir", state_dir, "status"]) == 1


@pytest.mark.slow
def test_a_failed_up_stops_what_it_started(state_dir, monkeypatch):
    real = localcluster.ray_start_command

    def broken_for_workers(address, labels, **kwargs):
        cmd = real(address, labels, **kwargs)
        return cmd if kwargs.get("head") else cmd + ["--no-such-option"]

    monkeypatch.setattr(localcluster, "ray_start_command", broken_for_workers)
    with pytest.raises(UserError, match="node w1 failed"):
        localcluster.up(["native"], state_dir)
    survivors = [pid for pid in localcluster._all_pids()
                 if state_dir in localcluster._cmdline(pid) and localcluster._alive(pid)]
    assert not survivors, f"a failed up left processes behind: {survivors}"
    assert not os.path.exists(os.path.join(state_dir, localcluster.STATE_FILE))


# --- a real cluster ---------------------------------------------------------------------------


def _alive(pid: int, start: int) -> bool:
    return localcluster._alive(pid, start)


EMULATES_AVX2 = native_isa() in ("avx512", "amx")  # else AVX2 is this host's own class


@pytest.fixture(scope="module")
def cluster():
    import ray

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    path = tempfile.mkdtemp(prefix="farm-lc-", dir="/tmp")
    # A process that looks like Ray to a broad `pkill`/`ray stop`, but is not the cluster's.
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "raylet", "gcs_server",
                              "ray/_private/workers/default_worker.py", f"--temp-dir={path}-other"])
    try:
        with localcluster.local_cluster(state_dir=path) as info:
            ray.init(address=info["address"], log_to_driver=False)
            try:
                yield info, decoy
            finally:
                ray.shutdown()
    finally:
        decoy.kill()
        decoy.wait()
        subprocess.run(["rm", "-rf", path], check=False)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_on(selector: dict) -> dict:
    import ray

    def probe():  # nested: pickled by value, the workers cannot import this test module
        import torch

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "aten_env": os.environ.get("ATEN_CPU_CAPABILITY"),
                "capability": torch.backends.cpu.get_cpu_capability(), "labels": dict(ctx.get_node_labels()),
                "oom_retries": os.environ.get("RAY_task_oom_retries")}

    return ray.get(ray.remote(num_cpus=1)(probe).options(label_selector=selector).remote(), timeout=120)


@pytest.mark.slow
def test_nodes_are_alive_with_their_labels(cluster):
    import ray

    info, _ = cluster
    assert info["start_seconds"] < 90
    by_id = {n["NodeID"]: n for n in ray.nodes()}
    nodes = {n["name"]: n for n in info["nodes"]}
    assert set(nodes) == {"head", "w1", "w2"}
    for node in nodes.values():
        assert by_id[node["node_id"]]["Alive"], node
    assert nodes["head"]["cpus"] == 0 and "cpu-isa" not in nodes["head"]["labels"]
    # The default cluster: an AVX2 node (emulated where the host is AVX512/AMX) and a native one.
    assert by_id[nodes["w1"]["node_id"]]["Labels"]["cpu-isa"] == "avx2"
    assert by_id[nodes["w1"]["node_id"]]["Labels"]["cpu-isa-emulated"] == str(EMULATES_AVX2).lower()
    assert by_id[nodes["w2"]["node_id"]]["Labels"]["cpu-isa"] == native_isa()
    assert by_id[nodes["w2"]["node_id"]]["Labels"]["cpu-isa-emulated"] == "false"
    assert localcluster.status(info["state_dir"])["running"]


@pytest.mark.slow
def test_avx2_task_runs_as_avx2_on_an_avx2_node(cluster):
    info, _ = cluster
    avx2_nodes = {n["node_id"] for n in info["nodes"] if n["labels"].get("cpu-isa") == "avx2"}
    got = _run_on({"cpu-isa": "avx2"})
    assert got["node_id"] in avx2_nodes and got["capability"] == "AVX2"
    # Emulated on AVX512/AMX hosts (ATen restricted by the node's environment); native on AVX2.
    assert got["aten_env"] == ("avx2" if EMULATES_AVX2 else None)
    assert got["labels"]["cpu-isa-emulated"] == str(EMULATES_AVX2).lower()
    assert got["oom_retries"] == "1"


@pytest.mark.slow
def test_native_task_runs_on_the_native_node(cluster):
    info, _ = cluster
    native_nodes = {n["node_id"] for n in info["nodes"] if n["labels"].get("cpu-isa-emulated") == "false"}
    got = _run_on({"cpu-isa": native_isa(), "cpu-isa-emulated": "false"})
    assert got["node_id"] in native_nodes
    assert got["aten_env"] is None and got["capability"] == native_isa().replace("amx", "avx512").upper()


@pytest.mark.slow
def test_down_stops_its_processes_and_nothing_else(cluster):
    import ray

    info, decoy = cluster
    with open(os.path.join(info["state_dir"], localcluster.STATE_FILE)) as f:
        state = json.load(f)
    recorded = [(pid, start) for node in state["nodes"] for pid, start in node["pids"]]
    sessions = {node["session"] for node in state["nodes"]}
    assert len(recorded) >= 6 and all(_alive(pid, start) for pid, start in recorded)
    ray.shutdown()

    result = localcluster.down(info["state_dir"])

    assert not [p for p, s in recorded if _alive(p, s)], "recorded processes survived down"
    leftovers = [pid for pid in localcluster._all_pids()
                 if (st := localcluster._stat(pid)) and st[0] != "Z" and st[1] in sessions]
    assert not leftovers, f"processes of the cluster's sessions survived: {leftovers}"
    assert set(result["killed"]) >= {p for p, _ in recorded}
    assert decoy.poll() is None, "down killed a process it did not start"
    assert localcluster.status(info["state_dir"])["running"] is False
