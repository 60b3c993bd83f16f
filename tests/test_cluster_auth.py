"""The local cluster is safe by default: token auth with its own token, every listener on loopback,
the user's ~/.ray untouched, and a clean stop (issue 16). Real clusters, started with `up`."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from farm.cluster import localcluster, node
from farm.cluster.relay import job_client
from farm.errors import UserError

pytestmark = pytest.mark.slow

# What README's "Security of the local cluster" names as listening beyond loopback: nothing.
NON_LOOPBACK_ALLOWED: set[str] = set()
BIN = os.path.dirname(sys.executable)

DRIVER = """
import ray
ray.init(address={address!r}, log_to_driver=False, logging_level="ERROR")
print("RESULT", ray.get(ray.remote(num_cpus=1)(lambda: 6 * 7).remote(), timeout=120))
"""


def _home_state(path: str) -> dict[str, str]:
    """Every file under `path` -> its sha256 (empty when `path` does not exist)."""
    state = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                state[full] = hashlib.sha256(f.read()).hexdigest()
    return state


@pytest.fixture(scope="module")
def cluster():
    user_ray = os.path.expanduser("~/.ray")
    before = _home_state(user_ray)
    state_dir = tempfile.mkdtemp(dir="/tmp", prefix="kfa")
    home = tempfile.mkdtemp(dir="/tmp", prefix="kfa-home")
    try:
        info = localcluster.up(("native",), state_dir)
        yield {**info, "home": home}
    finally:
        localcluster.down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        assert _home_state(user_ray) == before, "the user's ~/.ray changed"


def _clean_env(home: str, **extra: str) -> dict[str, str]:
    """A driver's environment with nothing of the caller's Ray settings, HOME a temp dir."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": home, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _run(cmd: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd="/tmp")


def _sessions(state_dir: str) -> set[int]:
    with open(os.path.join(state_dir, localcluster.STATE_FILE)) as f:
        return {n["session"] for n in json.load(f)["nodes"]}


def _cluster_pids(state_dir: str) -> list[int]:
    sessions = _sessions(state_dir)
    return [pid for pid in localcluster._all_pids()
            if (st := localcluster._stat(pid)) and st[0] != "Z" and st[1] in sessions]


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(ip).is_loopback else ip


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_the_token_is_the_clusters_own_and_private(cluster):
    path = cluster["token_file"]
    assert path == os.path.join(cluster["state_dir"], "auth_token")
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(cluster["state_dir"]).st_mode & 0o777 == 0o700
    assert len(node.read_token(path)) == 64
    assert cluster["env"]["RAY_AUTH_MODE"] == "token" and cluster["env"]["RAY_AUTH_TOKEN_PATH"] == path


def test_a_driver_with_the_token_works_and_one_without_is_refused(cluster):
    address, home = cluster["address"], cluster["home"]
    assert address.startswith("127.0.0.1:")
    script = [sys.executable, "-c", DRIVER.format(address=address)]
    ok = _run(script, _clean_env(home, **cluster["env"]))
    assert ok.returncode == 0 and "RESULT 42" in ok.stdout, ok.stderr[-3000:]
    # The caller's own settings (CI exports RAY_AUTH_MODE=disabled) do not reach the cluster.
    without = _clean_env(home, **{**cluster["env"], "RAY_AUTH_MODE": "disabled"})
    refused = _run(script, without)
    assert refused.returncode != 0 and "RESULT" not in refused.stdout
    assert "Unauthenticated" in refused.stderr or "InvalidAuthToken" in refused.stderr, refused.stderr[-3000:]
    wrong_file = os.path.join(home, "wrong_token")
    node.write_token(wrong_file)
    assert node._probe_gcs(address, node.read_token(wrong_file))[0] == "UNAUTHENTICATED"
    assert node._probe_gcs(address, None)[0] == "UNAUTHENTICATED"
    assert node._probe_gcs(address, node.read_token(cluster["token_file"]))[0] == "OK"
    assert not os.path.exists(os.path.join(home, ".ray")), "a driver wrote ~/.ray"


def test_nothing_of_the_cluster_listens_beyond_loopback(cluster):
    import ray  # noqa: F401  (Ray vendors psutil)
    import psutil

    listening = []
    for pid in _cluster_pids(cluster["state_dir"]):
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        listening += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    assert len({pid for pid, _, _ in listening}) >= 4, listening  # GCS, dashboard, raylets, agents
    exposed = [(pid, ip, port, localcluster._program(pid)) for pid, ip, port in listening
               if not _is_loopback(ip) and localcluster._program(pid) not in NON_LOOPBACK_ALLOWED]
    assert not exposed, f"listening beyond loopback: {exposed}"
    gcs_port = int(cluster["address"].rsplit(":", 1)[1])
    assert gcs_port in {port for _, _, port in listening}
    assert not any(port == localcluster.CLIENT_SERVER_PORT for _, _, port in listening), "a Ray Client server"
    ip = _non_loopback_ip()
    if ip:  # through the machine's address nothing answers, not even a TCP handshake
        for port in {port for _, _, port in listening}:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((ip, port)) != 0, f"{ip}:{port} accepts connections"


def test_ray_job_submit_with_the_token_works_and_without_fails(cluster):
    home = cluster["home"]
    submit = [os.path.join(BIN, "ray"), "job", "submit", "--address", cluster["dashboard"], "--", "echo", "hello"]
    ok = _run(submit, _clean_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=cluster["token_file"]))
    assert ok.returncode == 0 and "hello" in ok.stdout, (ok.stdout + ok.stderr)[-3000:]
    refused = _run(submit, _clean_env(home, RAY_AUTH_MODE="disabled"))
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()
    # The relay's client sends the cluster's token whatever this process's RAY_AUTH_MODE.
    from ray.job_submission import JobStatus

    client = job_client(cluster["dashboard"], cluster["token_file"])
    job = client.submit_job(entrypoint="echo relayed")
    deadline = time.time() + 120
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline
        time.sleep(1)
    assert "relayed" in client.get_job_logs(job)
    assert not os.path.exists(os.path.join(home, ".ray"))


def test_farm_worker_says_when_the_head_expects_a_token_it_does_not_have(cluster, monkeypatch, tmp_path):
    address = cluster["address"]
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    with pytest.raises(UserError, match="expects a Ray auth token and this host has none"):
        node.run_worker(address, auth_mode="disabled")
    wrong = node.write_token(str(tmp_path / "wrong"))
    with pytest.raises(UserError, match="refused this host's Ray auth token"):
        node.run_worker(address, token_file=wrong)
    started = {}
    monkeypatch.setattr(node.subprocess, "run", lambda cmd, env: started.update(cmd=cmd, env=env)
                        or subprocess.CompletedProcess(cmd, 0))
    result = node.run_worker(address, token_file=cluster["token_file"])
    assert result["started"] and started["env"]["RAY_AUTH_MODE"] == "token"
    assert started["env"]["RAY_AUTH_TOKEN_PATH"] == cluster["token_file"]


def test_down_stops_everything_with_sigterm_alone(cluster):
    state_dir = cluster["state_dir"]
    pids = _cluster_pids(state_dir)
    sessions = _sessions(state_dir)
    assert len(pids) >= 6
    started = time.monotonic()
    result = localcluster.down(state_dir)
    assert time.monotonic() - started < 4 * 2 * localcluster.TERM_GRACE_S
    assert result["forced"] == [], f"a healthy cluster needed SIGKILL for {result['forced']}"
    # Ray starts and reaps idle worker processes on its own: one listed above may be gone before
    # down() lists the cluster again (seen in CI), so the check is that down() stopped at least
    # the cluster's long-lived processes and that nothing of its sessions is left.
    assert len(result["killed"]) >= 6 and set(result["killed"]) & set(pids)
    left = [pid for pid in localcluster._all_pids()
            if (st := localcluster._stat(pid)) and st[0] != "Z" and st[1] in sessions]
    assert not left, f"processes survived down: {left}"
    assert not os.path.exists(cluster["token_file"]), "the token outlives its cluster"
