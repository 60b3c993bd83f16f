"""A multi-node Ray cluster of labelled farm workers on one machine (`infra/local-cluster`).

A head with no CPUs (nothing is measured on it; dashboard and Jobs API on 127.0.0.1) and
worker nodes started one after another, each with its own temp dir, agent port and a small
object store: by default an AVX2-emulating node and a native one.

Safe by default: every listener on 127.0.0.1 (Ray's single-machine mode, node.LOOPBACK_ENV), no
Ray Client server unless a port is asked for, and token auth with a token made for this cluster
in <state dir>/auth_token (mode 0600), never in ~/.ray. Its nodes get it from their environment;
drivers from `cluster_env()` / `as_driver()` (`local_cluster()` does it), shells from
`infra/local-cluster env`, whatever RAY_AUTH_MODE the caller had.

`ray start` daemonizes. Each node's `ray start` runs in a new session, so every process of
that node (raylet, GCS, dashboard, agents, and the workers the raylet forks later) carries
that session id; the state file records them and `down` stops exactly those: worker nodes
first, then the head's raylet, its other processes, and its GCS last (a raylet whose GCS is
gone waits for it instead of exiting). Never `ray stop`: it stops every Ray process on the
machine, other people's included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from farm.errors import UserError
from farm.cluster.node import (LOOPBACK_ENV, NODE_ISAS, RAY_ENV, apply_driver_env, detect_labels, ray_env,
                               ray_process_env, ray_start_command, write_token)

DEFAULT_WORKERS = ("avx2", "native")
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
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
# Per stop stage: a healthy node's processes exit within about 1.5 s of SIGTERM in the right order.
TERM_GRACE_S = 5.0


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


def token_path(state_dir: str) -> str:
    return os.path.join(os.path.abspath(state_dir), TOKEN_FILE)


def cluster_env(state_dir: str) -> dict[str, str]:
    """Environment of every process of the cluster, and of a driver of it (plus RAY_AUTH_TOKEN
    unset: Ray would prefer it to the token file)."""
    return {**RAY_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path(state_dir), **LOOPBACK_ENV}


def as_driver(state_dir: str):
    """`with as_driver(state_dir):` this process's `ray.init` / Jobs API calls use the cluster's
    token and loopback address; the caller's settings come back on exit."""
    return ray_process_env({**cluster_env(state_dir), "RAY_AUTH_TOKEN": None})


def _own_dir(state_dir: str) -> None:
    """The state dir (it holds the token) exists, is this user's, and only this user's."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    if os.stat(state_dir).st_uid != os.getuid():
        raise UserError(f"state dir {state_dir} belongs to another user: choose another with --state-dir")
    os.chmod(state_dir, 0o700)


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
        proc = subprocess.Popen(node.command, env=ray_env({**node.env, **cluster_env(state_dir)}), stdout=out,
                                stderr=subprocess.STDOUT,
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
    """The address the head advertises (127.0.0.1:PORT in single-machine mode)."""
    with open(os.path.join(head.temp_dir, "ray_current_cluster")) as f:
        return f.read().strip()


@contextlib.contextmanager
def _connected(state: dict):
    """`ray.init` as a client of the cluster, unless this process already is one."""
    import ray

    address = state["address"]
    if ray.is_initialized():
        if ray.get_runtime_context().gcs_address != address:
            raise UserError(f"this process is connected to another Ray cluster "
                            f"({ray.get_runtime_context().gcs_address}); cannot inspect {address}")
        yield ray
        return
    with as_driver(state["state_dir"]):
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
    with _connected(state) as ray:
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
       object_store_bytes: int = OBJECT_STORE_BYTES, client_server_port: int | None = None) -> dict:
    """Start a head and labelled workers (`workers`: "native", "avx2", "avx512", "amx", or a
    comma-separated string of them), with a new token, all on 127.0.0.1; a Ray Client server
    only with `client_server_port` (another free port if taken). Returns status(); on any
    failure stops what it started."""
    state_dir = os.path.abspath(state_dir or default_state_dir())
    if len(state_dir) > MAX_STATE_DIR_CHARS:
        raise UserError(f"state dir {state_dir} is {len(state_dir)} characters long: Ray's unix sockets under it "
                        f"would exceed Linux's limit; use one of at most {MAX_STATE_DIR_CHARS}")
    specs = _worker_specs(workers)
    _own_dir(state_dir)
    old = _load(state_dir)
    if old is not None and _live_pids(old):
        raise UserError(f"a local cluster is already up in {state_dir} (GCS {old.get('address')}); "
                        f"run `infra/local-cluster down` first")
    started = time.monotonic()
    taken: set[int] = set()
    gcs, dash = _pick_port(GCS_PORT, taken), _pick_port(DASHBOARD_PORT, taken)
    client = None if client_server_port is None else _pick_port(client_server_port, taken)
    state = {"version": STATE_VERSION, "state_dir": state_dir, "address": None,
             "dashboard": f"http://127.0.0.1:{dash}", "token_file": write_token(token_path(state_dir)),
             "client_server": None if client is None else f"ray://127.0.0.1:{client}", "nodes": []}
    head_dir = os.path.join(state_dir, "head")
    head = NodeState("head", "head", {}, {}, head_dir, ray_start_command(
        None, {}, head=True, temp_dir=head_dir, object_store_bytes=object_store_bytes, num_cpus=0,
        dashboard_agent_port=_pick_port(AGENT_PORT, taken), port=gcs, dashboard_port=dash,
        client_server_port=client, loopback=True))
    try:
        _start_node(head, state_dir, state, START_TIMEOUT_S)
        state["address"] = _gcs_address(head)
        _save(state_dir, state)
        for name, labels, env in specs:
            temp_dir = os.path.join(state_dir, name)
            cmd = ray_start_command(state["address"], labels, temp_dir=temp_dir, object_store_bytes=object_store_bytes,
                                    num_cpus=WORKER_CPUS, dashboard_agent_port=_pick_port(None, taken), loopback=True)
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
    """Stop the processes this state dir's cluster started, and nothing else, in stages (see the
    module's docstring): SIGTERM, TERM_GRACE_S to exit, SIGKILL for the rest of that stage.
    Returns {"killed": [pids], "forced": [pids that needed SIGKILL]}."""
    state_dir = os.path.abspath(state_dir or default_state_dir())
    state = _load(state_dir)
    if state is None:
        return {"killed": [], "forced": []}
    killed, forced = [], []
    for stage in _stop_stages(state):
        killed += sorted(stage)
        forced += _stop(stage)
    for path in (_state_path(state_dir), token_path(state_dir)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return {"killed": sorted(killed), "forced": sorted(forced)}


def _stop_stages(state: dict) -> list[dict[int, int]]:
    """pid -> start time per stage: each worker node (last started first), then the head's
    raylet, the head's other processes, its GCS. Recomputed now: workers forked since `up`."""
    stages = []
    heads = [node for node in state["nodes"] if node.role == "head"]
    for node in [n for n in state["nodes"] if n.role != "head"][::-1]:
        stages.append(_live(node))
    for node in heads:
        procs = _live(node)
        raylet = {pid: t for pid, t in procs.items() if _program(pid) == "raylet"}
        gcs = {pid: t for pid, t in procs.items() if _program(pid) == "gcs_server"}
        rest = {pid: t for pid, t in procs.items() if pid not in raylet and pid not in gcs}
        stages += [raylet, rest, gcs]
    return [stage for stage in stages if stage]


def _live(node: NodeState) -> dict[int, int]:
    procs = {pid: start for pid, start in node.pids if _alive(pid, start)}
    procs.update(_node_processes(node))
    return procs


def _program(pid: int) -> str:
    return os.path.basename(_cmdline(pid).split(" ", 1)[0])


def _stop(targets: dict[int, int]) -> list[int]:
    """SIGTERM, then SIGKILL what is left after TERM_GRACE_S; returns the pids that needed it."""
    for pid, start in targets.items():
        _signal(pid, start, signal.SIGTERM)
    remaining = _wait_gone(targets, TERM_GRACE_S)
    for pid in remaining:
        _signal(pid, targets[pid], signal.SIGKILL)
    still = _wait_gone({pid: targets[pid] for pid in remaining}, TERM_GRACE_S)
    if still:
        raise UserError(f"processes {sorted(still)} of the local cluster survived SIGKILL")
    return remaining


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
        time.sleep(0.05)


# --- status -----------------------------------------------------------------------------------


def status(state_dir: str | None = None) -> dict:
    """{"running", "state_dir", "address", "dashboard", "token_file", "client_server", "env" (a
    driver's: cluster_env), "nodes": [{name, role, node_id, alive, labels, cpus, processes}]};
    running is False (and nodes empty) when nothing is up."""
    state_dir = os.path.abspath(state_dir or default_state_dir())
    state = _load(state_dir)
    if state is None or not state.get("address") or not _live_pids(state):
        return {"running": False, "state_dir": state_dir, "address": None, "dashboard": None, "token_file": None,
                "client_server": None, "env": {}, "nodes": []}
    with _connected(state) as ray:
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
            "token_file": state.get("token_file"), "client_server": state.get("client_server"),
            "env": cluster_env(state_dir), "start_seconds": state.get("start_seconds"), "nodes": nodes}


@contextlib.contextmanager
def local_cluster(workers=DEFAULT_WORKERS, state_dir: str | None = None, **kwargs):
    """`with local_cluster() as info:` up on entry, down on exit; a temporary state dir
    (removed afterwards) unless one is given. Inside, this process is a driver of the cluster
    (`as_driver`: its token, loopback); info["env"] is the same for driver subprocesses."""
    own_dir = state_dir is None
    state_dir = state_dir or tempfile.mkdtemp(prefix="farm-lc-", dir="/tmp")
    try:
        info = up(workers, state_dir, **kwargs)
        apply_driver_env()
        try:
            with as_driver(state_dir):
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
    print(f"GCS address  {info['address']}    (loopback only; drivers: eval \"$(infra/local-cluster env)\")")
    print(f"dashboard    {info['dashboard']}    (Jobs API: RAY_API_SERVER_ADDRESS={info['dashboard']})")
    print(f"token        {info['token_file']}    (token auth: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=...)")
    if info.get("client_server"):
        print(f"Ray Client   {info['client_server']}")
    print(f"state dir    {info['state_dir']}")
    for node in info["nodes"]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(node["labels"].items())) or "-"
        env = " ".join(f"{k}={v}" for k, v in node["env"].items())
        print(f"  {node['name']:5} {node['role']:6} {'alive' if node['alive'] else 'DEAD':5} cpus={node['cpus']:<3g} "
              f"{node['node_id'][:12]:12} {labels} {env}".rstrip())


def _print_env(state_dir: str) -> int:
    """Shell lines that make `ray job submit`, `ray.init()` and `farm sweep --address` use the cluster."""
    state = _load(state_dir)
    if state is None or not state.get("address"):
        print(f"no local cluster is up in {state_dir}", file=sys.stderr)
        return 1
    env = {**cluster_env(state_dir), "RAY_ADDRESS": state["address"], "RAY_API_SERVER_ADDRESS": state["dashboard"]}
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    print("unset RAY_AUTH_TOKEN")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local-cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=None, help=f"default: $FARM_LOCAL_CLUSTER_DIR or {default_state_dir()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start a head and labelled worker nodes (token auth, on 127.0.0.1)")
    p.add_argument("--workers", default=",".join(DEFAULT_WORKERS),
                   help="comma-separated: native, avx2 (emulated on AVX512 hosts), avx512, amx (default %(default)s)")
    p.add_argument("--ray-client-server-port", type=int, default=None,
                   help=f"also start a Ray Client server on 127.0.0.1 (e.g. {CLIENT_SERVER_PORT}); default: none")
    p.add_argument("--state-dir", default=argparse.SUPPRESS)
    p = sub.add_parser("down", help="stop the processes `up` started (never `ray stop`)")
    p.add_argument("--state-dir", default=argparse.SUPPRESS)
    p = sub.add_parser("status", help="nodes, labels, liveness, the dashboard address and the token file")
    p.add_argument("--state-dir", default=argparse.SUPPRESS)
    p = sub.add_parser("env", help="print `export` lines for a shell that drives the cluster (eval \"$(... env)\")")
    p.add_argument("--state-dir", default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            info = up(args.workers, args.state_dir, client_server_port=args.ray_client_server_port)
            _print_status(info)
            print(f"up in {info['start_seconds']} s; stop it with: infra/local-cluster down")
        elif args.command == "down":
            started = time.monotonic()
            result = down(args.state_dir)
            print(f"stopped {len(result['killed'])} processes in {time.monotonic() - started:.1f} s "
                  f"({len(result['forced'])} needed SIGKILL)")
        elif args.command == "env":
            return _print_env(os.path.abspath(args.state_dir or default_state_dir()))
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
