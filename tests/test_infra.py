"""The cluster definitions in infra/ and `farm worker`: labels that follow farm.cluster.node's contract."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from farm import cli
from farm.errors import UserError
from farm.measure.host import native_isa
from farm.cluster.node import (NODE_ISAS, NODE_LABELS, RAY_ENV, detect_labels, labels_for, ray_env,
                       ray_start_command)

INFRA = Path(__file__).resolve().parent.parent / "infra"
# EC2 instance families by the farm class of their CPU (the vec ISA Inductor picks there).
FAMILY_ISA = {
    "c5a": "avx2", "m5a": "avx2", "c6a": "avx2", "m6a": "avx2", "r6a": "avx2",  # AMD Zen 2/3
    "c6i": "avx512", "m6i": "avx512", "r6i": "avx512",  # Intel Ice Lake
    "c7i": "amx", "m7i": "amx", "r7i": "amx",  # Intel Sapphire Rapids
}


def _load(name: str) -> dict:
    with open(INFRA / name) as f:
        return yaml.safe_load(f)


def _check_labels(where: str, labels: dict) -> str:
    assert set(labels) == set(NODE_LABELS), f"{where}: labels {sorted(labels)} are not the contract {NODE_LABELS}"
    assert labels["cpu-isa"] in NODE_ISAS, where
    assert labels["cpu-isa-emulated"] == "false", f"{where}: cloud nodes are native for their class"
    assert re.fullmatch(r"[1-9][0-9]*", labels["cpu-cores"]), where
    assert all(isinstance(v, str) for v in labels.values()), f"{where}: label values must be strings"
    return labels["cpu-isa"]


def _check_instance_types(where: str, isa: str, types: list[str]) -> None:
    assert types, where
    for instance_type in types:
        family = instance_type.split(".")[0]
        assert FAMILY_ISA.get(family) == isa, f"{where}: {instance_type} is not an {isa} machine"


# --- Ray autoscaler (VMs) --------------------------------------------------------------------


def test_ray_cluster_yaml_is_valid_for_the_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load("ray-cluster.yaml")))  # Ray's own schema


def test_ray_cluster_yaml_has_one_labelled_worker_type_per_isa_class():
    config = _load("ray-cluster.yaml")
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert "cpu-isa" not in types[head].get("labels", {}), "the head measures nothing"
    classes = []
    for name, node_type in types.items():
        if name == head:
            continue
        isa = _check_labels(name, node_type["labels"])
        _check_instance_types(name, isa, [node_type["node_config"]["InstanceType"]])
        assert node_type["min_workers"] >= 1, f"{name}: tasks for a class with no live node pend forever"
        classes.append(isa)
    assert sorted(classes) == sorted(NODE_ISAS)


def test_ray_cluster_yaml_start_commands_decide_auth_and_memory():
    config = _load("ray-cluster.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert len(start) == 1, key
        assert "RAY_AUTH_MODE=token" in start[0], f"{key}: auth must be decided explicitly"
        assert "RAY_task_oom_retries=1" in start[0] and "--object-store-memory=" in start[0], key
        assert "--block" not in start[0], key
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    assert any("torch==2.13.0" in c and "whl/cpu" in c for c in config["setup_commands"])


# --- KubeRay -----------------------------------------------------------------------------------


def test_kuberay_manifest_has_one_labelled_group_per_isa_class():
    import ray

    manifest = _load("kuberay-raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    spec = manifest["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] in ("token", "disabled"), "auth must be decided explicitly"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    classes = []
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        # KubeRay >= 1.5 rejects rayStartParams.labels; the structured field is the one.
        assert "labels" not in group["rayStartParams"], name
        isa = _check_labels(name, group["labels"])
        terms = group["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        types = [v for term in terms for expr in term["matchExpressions"]
                 if expr["key"] == "node.kubernetes.io/instance-type" for v in expr["values"]]
        _check_instance_types(name, isa, types)
        for container in group["template"]["spec"]["containers"]:
            res = container["resources"]
            assert res["requests"] == res["limits"], f"{name}: Guaranteed QoS for whole cores"
        classes.append(isa)
    assert sorted(classes) == sorted(NODE_ISAS)


# --- farm.cluster.node -----------------------------------------------------------------------------------


def test_labels_for_follows_the_contract():
    assert labels_for("avx2", True, 8) == {"cpu-isa": "avx2", "cpu-isa-emulated": "true", "cpu-cores": "8"}
    assert tuple(labels_for("amx", False, 2)) == NODE_LABELS
    with pytest.raises(UserError, match="unknown ISA"):
        labels_for("sse4", False, 2)


def test_ray_start_command_for_head_and_worker():
    head = ray_start_command(None, {}, head=True, temp_dir="/tmp/x/head", object_store_bytes=10**8, num_cpus=0,
                             dashboard_agent_port=52400, port=6390, dashboard_port=8266, client_server_port=10001)
    assert head[1:3] == ["start", "--head"]
    for arg in ("--dashboard-host=127.0.0.1", "--include-dashboard=true", "--port=6390", "--num-cpus=0",
                "--object-store-memory=100000000", "--temp-dir=/tmp/x/head", "--dashboard-agent-listen-port=52400"):
        assert arg in head
    worker = ray_start_command("10.0.0.1:6379", labels_for("avx2", True, 2), object_store_bytes=10**8)
    assert "--address=10.0.0.1:6379" in worker
    assert "--labels=cpu-isa=avx2,cpu-isa-emulated=true,cpu-cores=2" in worker
    assert "--block" not in worker and "--head" not in worker
    assert any(a.startswith("--object-store-memory=") for a in worker)
    with pytest.raises(UserError):
        ray_start_command(None, {}, object_store_bytes=10**8)


def test_ray_env_sets_ray_settings_and_drops_inherited_emulation(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = ray_env({})
    assert "ATEN_CPU_CAPABILITY" not in env, "a native node must not inherit the shell's emulation"
    assert all(env[k] == v for k, v in RAY_ENV.items())
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert ray_env({"ATEN_CPU_CAPABILITY": "avx2"})["ATEN_CPU_CAPABILITY"] == "avx2"


def test_detect_labels_native_and_refusals():
    native = native_isa()
    if native not in NODE_ISAS:
        with pytest.raises(UserError, match="AVX2"):
            detect_labels(None)
        return
    labels, env = detect_labels(None)
    assert labels["cpu-isa"] == native and labels["cpu-isa-emulated"] == "false" and env == {}
    impossible = {"avx2": "avx512", "avx512": "amx", "amx": None}[native]
    if impossible:
        with pytest.raises(UserError, match=f"cannot measure as {impossible}"):
            detect_labels(impossible)


@pytest.mark.skipif(native_isa() not in ("avx512", "amx"), reason="emulating AVX2 needs an AVX512 host")
def test_detect_labels_avx2_emulated():
    labels, env = detect_labels("avx2")
    assert labels["cpu-isa"] == "avx2" and labels["cpu-isa-emulated"] == "true"
    assert env == {"ATEN_CPU_CAPABILITY": "avx2"}


# --- farm worker -----------------------------------------------------------------------------------


def test_farm_worker_dry_run_prints_ray_start_with_this_hosts_labels(capsys):
    labels, _ = detect_labels(None)
    assert cli.main(["worker", "--address", "10.0.0.1:6379", "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected = "--labels=" + ",".join(f"{k}={v}" for k, v in labels.items())
    assert "ray start" in out and "--address=10.0.0.1:6379" in out and expected in out
    assert "RAY_AUTH_MODE=disabled" in out and "--object-store-memory=" in out and "--block" not in out


@pytest.mark.skipif(native_isa() not in ("avx512", "amx"), reason="emulating AVX2 needs an AVX512 host")
def test_farm_worker_dry_run_avx2_emulated_command_line():
    """Through the installed `farm` entry point: `worker` registers itself from farm.cluster.node."""
    farm = Path(sys.executable).parent / "farm"
    if not farm.exists():
        pytest.skip("the `farm` entry point is not installed in this environment")
    proc = subprocess.run([str(farm), "worker", "--address", "head:6379", "--isa", "avx2", "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cpu-isa=avx2,cpu-isa-emulated=true" in proc.stdout
    assert "ATEN_CPU_CAPABILITY=avx2" in proc.stdout


def test_farm_worker_refuses_a_class_this_host_cannot_measure(capsys):
    impossible = {"avx2": "avx512", "avx512": "amx"}.get(native_isa())
    if impossible is None:
        pytest.skip("an AMX host can measure every class")
    assert cli.main(["worker", "--address", "h:1", "--isa", impossible, "--dry-run"]) == 2
    assert f"cannot measure as {impossible}" in capsys.readouterr().err
