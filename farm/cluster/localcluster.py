"""A multi-node Ray cluster of labelled farm workers on one machine (`infra/local-cluster`).

A head with no CPUs (nothing is measured on it; dashboard and Jobs API on 127.0.0.1) and
worker nodes started one after another, each with its own temp dir, agent port and a small
object store: by default an AVX2-emulating node and a native one.

`ray start` daemonizes. Each node's `ray start` runs in a new session, so every process of
that node (raylet, GCS, dashboard, agents, and the workers the raylet forks later) carries
that session id; the state file records them and `down` kills exactly those. Never
`ray stop`: it stops every Ray process on the machine, other people's included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from farm.errors import UserError
from farm.cluster.node import NODE_ISAS, apply_driver_env, detect_labels, ray_env, ray_start_command

DEFAULT_WORKERS = ("avx2", "native")
STATE_FILE = "cluster.json"
STATE_VERSION = 1
# Records are small; Ray's default object store (30% of RAM per node) would take most of a
# laptop's memory for three nodes. 200 MB is well above Ray's 75 MB minimum.
OBJECT_STORE_BYTES = 200 * 10**6
# One measurement per worker node at a time: concurrent timings on shared cores are noise.
WORKER_CPUS = 1
# Preferred ports (Ray's defaults); a free one is chosen when taken.
GCS_PORT, DASHBOARD_PORT, CLIENT_SERVER_PORT, AGENT_PORT = 6379, 8265, 10001, 52365
# Ray's worker processes take ports 10002-19999 by default; the client server must not.
WORKER_PORT_RANGE = range(10002, 20000)
# Unix sockets live under <temp dir>/session_<date>_<pid>/sockets/; Linux allows 107 bytes.
# 40 leaves room for "/<node>/" + a 42-character session name + "/sockets/plasma_store".
MAX_STATE_DIR_CHARS = 40
START_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 60.0
# gcs_server and the raylet can take seconds to act on SIGTERM; the cluster is disposable.
TERM_GRACE_S = 3.0


@dataclass
class NodeState:
    name: str
    role: str  # "head" or "worker"
    labels: dict[str, str]
    env: dict[str, str]
    temp_dir: str
    command: list[str]
    session: int = 0  # session id of its `ray start` (= that process's pid)
    pids: list[list[int]] = field(default_factory=list)  # [pid, start time in clock ticks]
    node_id: str = ""


def default_state_dir() -> str:
    return os.environ.get("FARM_LOCAL_CLUSTER_DIR") or f"/tmp/farm-cluster-{os.getuid()}"


# --- processes (Linux /proc; psutil is not a dependency) -----------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[3]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _alive(pid: int, start: int | None = None) -> bool:
    """Running (a zombie is dead) and, if `start` is given, still the same process."""
    st = _stat(pid)
    return st is not None and st[0] != "Z" and (start is None or st[2] == start)


def _node_processes(node: NodeState) -> dict[int, int]:
    """pid -> start time of the node's live processes: those in its session, plus any Ray
    process whose command line names its temp dir (should one ever leave the session)."""
    found = {}
    marker = node.temp_dir.rstrip("/")
    for pid in _all_pids():
        st = _stat(pid)
        if st is None or st[0] == "Z" or pid == os.getpid():
            continue
        if node.session and st[1] == node.session:
            found[pid] = st[2]
            continue
        cmd = _cmdline(pid)
        is_ray = "site-packages/ray/" in cmd or cmd.startswith("ray::")
        if is_ray and (f"{marker}/" in cmd or f"={marker} " in cmd + " "):
            found[pid] = st[2]
    return found


# --- ports ----------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like the servers that will bind it: a port in TIME_WAIT after the last cluster is
        # free for them, only a listening socket is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int | None, taken: set[int]) -> int:
    if preferred is not None and preferred not in taken and _port_free(preferred):
        taken.add(preferred)
        return preferred
    while True:  # an ephemeral port: outside Ray's worker port range on Linux defaults
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in taken and port not in WORKER_PORT_RANGE:
            taken.add(port)
            return port


# --- state ----------------------------------------------------------------------------------


def _state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def _load(state_dir: str) -> dict | None:
    try:
        with open(_state_path(state_dir)) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable state file {_state_path(state_dir)}: {exc}") from exc
    if state.get("version") != STATE_VERSION:
        raise UserError(f"{_state_path(state_dir)} has version {state.get('version')}, expected {STATE_VERSION}")
    state["nodes"] = [NodeState(**n) for n in state["nodes"]]
    return state


def _save(state_dir: str, state: dict) -> None:
    data = dict(state, nodes=[asdict(n) for n in state["nodes"]])
    tmp = _state_path(state_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, _state_path(state_dir))


def _live_pids(state: dict) -> list[int]:
    return [pid for node in state["nodes"] for pid, start in node.pids if _alive(pid, start)]


# --- up ---------------------------------------------------------------------------------------


def _worker_specs(workers) -> list[tuple[str, dict, dict]]:
    """(name, labels, env) per requested worker; fails before anything starts."""
    if isinstance(workers, str):
        workers = [w for w in workers.split(",") if w.strip()]
    specs = []
    for i, kind in enumerate(workers, 1):
        kind = kind.strip()
        if kind != "native" and kind not in NODE_ISAS:
            raise UserError(f"unknown worker kind {kind!r}: expected native or one of {', '.join(NODE_ISAS)}")
        labels, env = detect_labels(None if kind == "native" else kind)
        specs.append((f"w{i}", labels, env))
    if not specs:
        raise UserError("a local cluster needs at least one worker")
    return specs


def _start_node(node: NodeState, state_dir: str, state: dict, timeout_s: float) -> None:
    if os.path.exists(node.temp_dir):
        shutil.rmtree(node.temp_dir)  # an earlier run's logs and sessions
    os.makedirs(node.temp_dir)
    log = os.path.join(state_dir, f"{node.name}.start.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(node.command, env=ray_env(node.env), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        node.session = proc.pid
        state["nodes"].append(node)
        _save(state_dir, state)  # before waiting: `down` can clean up even if we die here
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
    node.pids = [[pid, start] for pid, start in sorted(_node_processes(node).items())]
    _save(state_dir, state)
    if rc != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-15:])
        what = "timed out" if rc is None else f"failed with exit code {rc}"
        raise UserError(f"`ray start` for node {node.name} {what}; log {log}:\n{tail}")


def _gcs_address(head: NodeState) -> str:
    """The address the head advertises (Ray resolves 127.0.0.1 to the node's IP anyway)."""
    with open(os.path.join(head.temp_dir, "ray_current_cluster")) as f:
        return f.read().strip()


@contextlib.contextmanager
def _connected(address: str):
    """`ray.init` as a client of the cluster at `address`, unless this process already is one."""
    import ray

    if ray.is_initialized():
        if ray.get_runtime_context().gcs_address != address:
            raise UserError(f"this process is connected to another Ray cluster "
                            f"({ray.get_runtime_context().gcs_address}); cannot inspect {address}")
        yield ray
        return
    apply_driver_env()
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _match_nodes(state: dict, ray_nodes: list[dict]) -> dict[str, dict]:
    """node name -> its ray.nodes() entry, matched by the raylet socket under its temp dir."""
    matched = {}
    for node in state["nodes"]:
        marker = node.temp_dir.rstrip("/") + "/"
        candidates = [n for n in ray_nodes if str(n.get("RayletSocketName", "")).startswith(marker)]
        if candidates:  # a restarted node registers again: prefer the live entry
            matched[node.name] = max(candidates, key=lambda n: bool(n.get("Alive")))
    return matched


def _wait_ready(state: dict, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with _connected(state["address"]) as ray:
        while True:
            matched = _match_nodes(state, ray.nodes())
            missing = []
            for node in state["nodes"]:
                entry = matched.get(node.name)
                labels = (entry or {}).get("Labels") or {}
                if entry and entry.get("Alive") and all(labels.get(k) == v for k, v in node.labels.items()):
                    node.node_id = entry["NodeID"]
                else:
                    missing.append(node.name)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise UserError(f"nodes {', '.join(missing)} not alive with their labels after {timeout_s:.0f} s "
                                f"(see the logs under {os.path.dirname(state['nodes'][0].temp_dir)})")
            time.sleep(0.5)


def up(workers=DEFAULT_WORKERS, state_dir: str | None = None, *, ready_timeout_s: float = READY_TIMEOUT_S,
       object_store_bytes: int = OBJECT_STORE_BYTES) -> dict:
    """Start a head and labelled workers (`workers`: "native", "avx2", "avx512", "amx", or a
    comma-separated string of them). Returns status(); on any failure stops what it started."""
    state_dir = os.path.abspath(state_dir or default_state_dir())
    if len(state_dir) > MAX_STATE_DIR_CHARS:
        raise UserError(f"state dir {state_dir} is {len(state_dir)} characters long: Ray's unix sockets under it "
                        f"would exceed Linux's limit; use one of at most {MAX_STATE_DIR_CHARS}")
    specs = _worker_specs(workers)
    os.makedirs(state_dir, exist_ok=True)
    old = _load(state_dir)
    if old is not None and _live_pids(old):
        raise UserError(f"a local cluster is already up in {state_dir} (GCS {old.get('address')}); "
                        f"run `infra/local-cluster down` first")
    started = time.monotonic()
    taken: set[int] = set()
    gcs, dash = _pick_port(GCS_PORT, taken), _pick_port(DASHBOARD_PORT, taken)
    client = _pick_port(CLIENT_SERVER_PORT, taken)
    state = {"version": STATE_VERSION, "state_dir": state_dir, "address": None,
             "dashboard": f"http://127.0.0.1:{dash}", "nodes": []}
    head_dir = os.path.join(state_dir, "head")
    head = NodeState("head", "head", {}, {}, head_dir, ray_start_command(
        None, {}, head=True, temp_dir=head_dir, object_store_bytes=object_store_bytes, num_cpus=0,
        dashboard_agent_port=_pick_port(AGENT_PORT, taken), port=gcs, dashboard_port=dash,
        client_server_port=client))
    try:
        _start_node(head, state_dir, state, START_TIMEOUT_S)
        state["address"] = _gcs_address(head)
        _save(state_dir, state)
        for name, labels, env in specs:
            temp_dir = os.path.join(state_dir, name)
            cmd = ray_start_command(state["address"], labels, temp_dir=temp_dir, object_store_bytes=object_store_bytes,
                                    num_cpus=WORKER_CPUS, dashboard_agent_port=_pick_port(None, taken))
            _start_node(NodeState(name, "worker", labels, env, temp_dir, cmd), state_dir, state, START_TIMEOUT_S)
        _wait_ready(state, ready_timeout_s)
        # Processes started after `ray start` returned (e.g. the dashboard's helpers).
        for node in state["nodes"]:
            node.pids = [[pid, start] for pid, start in sorted(_node_processes(node).items())]
        state["start_seconds"] = round(time.monotonic() - started, 1)
        _save(state_dir, state)
    except BaseException:
        with contextlib.suppress(Exception):
            down(state_dir)
        raise
    return status(state_dir)


# --- down -------------------------------------------------------------------------------------


def down(state_dir: str | None = None) -> dict:
    """Kill the processes this state dir's cluster started, and nothing else.
    Returns {"killed": [pids], "forced": [pids that needed SIGKILL]}."""
    state_dir = os.path.abspath(state_dir or default_state_dir())
    state = _load(state_dir)
    if state is None:
        return {"killed": [], "forced": []}
    targets: dict[int, int] = {}
    for node in state["nodes"]:
        targets.update({pid: start for pid, start in node.pids if _alive(pid, start)})
        targets.update(_node_processes(node))  # workers forked since `up`
    for pid in targets:
        _signal(pid, targets[pid], signal.SIGTERM)
    remaining = _wait_gone(targets, TERM_GRACE_S)
    for pid in remaining:
        _signal(pid, targets[pid], signal.SIGKILL)
    still = _wait_gone({pid: targets[pid] for pid in remaining}, TERM_GRACE_S)
    if still:
        raise UserError(f"processes {sorted(still)} of the local cluster survived SIGKILL")
    os.remove(_state_path(state_dir))
    return {"killed": sorted(targets), "forced": sorted(remaining)}


def _signal(pid: int, start: int, sig: int) -> None:
    if _alive(pid, start):  # the same process, not a recycled pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(targets: dict[int, int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [pid for pid, start in targets.items() if _alive(pid, start)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


# --- status -----------------------------------------------------------------------------------


def status(state_dir: str | None = None) -> dict:
    """{"running", "state_dir", "address", "dashboard", "nodes": [{name, role, node_id, alive,
    labels, cpus, processes}]}; running is False (and nodes empty) when nothing is up."""
    state_dir = os.path.abspath(state_dir or default_state_dir())
    state = _load(state_dir)
    if state is None or not state.get("address") or not _live_pids(state):
        return {"running": False, "state_dir": state_dir, "address": None, "dashboard": None, "nodes": []}
    with _connected(state["address"]) as ray:
        matched = _match_nodes(state, ray.nodes())
    nodes = []
    for node in state["nodes"]:
        entry = matched.get(node.name, {})
        nodes.append({"name": node.name, "role": node.role, "node_id": entry.get("NodeID", node.node_id),
                      "alive": bool(entry.get("Alive")),
                      "labels": {k: v for k, v in (entry.get("Labels") or {}).items() if not k.startswith("ray.io/")},
                      "cpus": entry.get("Resources", {}).get("CPU", 0), "env": node.env,
                      "processes": sum(_alive(pid, start) for pid, start in node.pids)})
    return {"running": True, "state_dir": state_dir, "address": state["address"], "dashboard": state["dashboard"],
            "start_seconds": state.get("start_seconds"), "nodes": nodes}


@contextlib.contextmanager
def local_cluster(workers=DEFAULT_WORKERS, state_dir: str | None = None, **kwargs):
    """`with local_cluster() as info:` up on entry, down on exit; a temporary state dir
    (removed afterwards) unless one is given. Also sets the driver's Ray environment."""
    own_dir = state_dir is None
    state_dir = state_dir or tempfile.mkdtemp(prefix="farm-lc-", dir="/tmp")
    try:
        info = up(workers, state_dir, **kwargs)
        apply_driver_env()
        try:
            yield info
        finally:
            down(state_dir)
    finally:
        if own_dir:
            shutil.rmtree(state_dir, ignore_errors=True)


# --- command line -----------------------------------------------------------------------------


def _print_status(info: dict) -> None:
    if not info["running"]:
        print(f"no local cluster is up in {info['state_dir']}")
        return
    print(f"GCS address  {info['address']}    (ray.init(address=...), farm worker --address ...)")
    print(f"dashboard    {info['dashboard']}    (Jobs API: RAY_API_SERVER_ADDRESS={info['dashboard']})")
    print(f"state dir    {info['state_dir']}")
    for node in info["nodes"]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(node["labels"].items())) or "-"
        env = " ".join(f"{k}={v}" for k, v in node["env"].items())
        print(f"  {node['name']:5} {node['role']:6} {'alive' if node['alive'] else 'DEAD':5} cpus={node['cpus']:<3g} "
              f"{node['node_id'][:12]:12} {labels} {env}".rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local-cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=None, help=f"default: $FARM_LOCAL_CLUSTER_DIR or {default_state_dir()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start a head and labelled worker nodes")
    p.add_argument("--workers", default=",".join(DEFAULT_WORKERS),
                   help="comma-separated: native, avx2 (emulated on AVX512 hosts), avx512, amx (default %(default)s)")
    p.add_argument("--state-dir", default=argparse.SUPPRESS)
    p = sub.add_parser("down", help="stop the processes `up` started (never `ray stop`)")
    p.add_argument("--state-dir", default=argparse.SUPPRESS)
    p = sub.add_parser("status", help="nodes, labels, liveness and the dashboard address")
    p.add_argument("--state-dir", default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            info = up(args.workers, args.state_dir)
            _print_status(info)
            print(f"up in {info['start_seconds']} s; stop it with: infra/local-cluster down")
        elif args.command == "down":
            result = down(args.state_dir)
            print(f"stopped {len(result['killed'])} processes ({len(result['forced'])} needed SIGKILL)")
        else:
            info = status(args.state_dir)
            _print_status(info)
            return 0 if info["running"] else 1
    except UserError as exc:
        print(f"local-cluster {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
