"""How a host joins the farm: a Ray node whose labels say which ISA class it measures.

The dispatcher places each (problem, ISA class) task with a `label_selector` on these labels,
so the label contract below is the interface between a worker host and the driver:

    cpu-isa            "amx" | "avx512" | "avx2"   the class the node's processes measure as
    cpu-isa-emulated   "true" | "false"            "true": an AVX512 host restricted to AVX2
    cpu-cores          physical cores of the host, as a string

`farm worker --address HEAD:6379` runs `ray start` with the labels detected here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shlex
import subprocess
import sys

from farm.errors import UserError
from farm.measure.host import EMULATION_ENV, can_run, native_isa, runnable

NODE_LABELS = ("cpu-isa", "cpu-isa-emulated", "cpu-cores")
NODE_ISAS = ("amx", "avx512", "avx2")

# Every process of a node (raylet, workers, agents) and every driver needs these:
# - oom retries 1: out-of-memory kills otherwise retry without limit, whatever max_retries says.
# Auth is not here: each cluster decides it (the local cluster: token; `farm worker`: --auth-mode).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_task_oom_retries": "1",
}
# How Ray 2.60 takes a token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
AUTH_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Ray 2.60 turns --node-ip-address=127.0.0.1 into the machine's address, and its GCS and raylets
# then listen on every interface. Its single-machine mode (the macOS/Windows default) keeps every
# node IP at 127.0.0.1, and the GCS, raylets, agents and Ray Client server listen on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# `ray start` for a node on loopback. In single-machine mode `ray start --address` refuses to add a
# node; only that check is shown a multi-node view of Ray's constants. And a head starts a Ray Client
# server unless Ray Client looks uninstalled: it does here, unless a port was asked for.
_RAY_START_ON_LOOPBACK = """\
import sys, types
import ray._private.ray_constants as constants
import ray.scripts.scripts as scripts
view = types.ModuleType(constants.__name__)
view.__dict__.update(constants.__dict__)
view.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = view
if not any(a.startswith("--ray-client-server-port") for a in sys.argv[1:]):
    scripts.get_ray_client_dependency_error = lambda: ImportError("Ray Client server not asked for")
sys.argv[0] = "ray"
sys.exit(scripts.main())
"""
# The default object store takes 30% of RAM per node; the farm only moves small records.
DEFAULT_OBJECT_STORE_BYTES = 500 * 10**6


def labels_for(isa: str, emulated: bool, cores: int) -> dict[str, str]:
    if isa not in NODE_ISAS:
        raise UserError(f"unknown ISA class {isa!r}: expected one of {', '.join(NODE_ISAS)}")
    return {"cpu-isa": isa, "cpu-isa-emulated": "true" if emulated else "false", "cpu-cores": str(int(cores))}


def physical_cores() -> int:
    import torch

    return int(torch.cpu.get_capabilities().get("num_physical_cores") or os.cpu_count() or 1)


def detect_labels(isa: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, extra env of `ray start`) for this host measuring as `isa` (None: its own class)."""
    native = native_isa()
    if native not in NODE_ISAS:
        raise UserError(f"this host's ISA class is {native!r}: a farm worker needs AVX2 or better")
    target = isa or native
    if target not in NODE_ISAS:
        raise UserError(f"unknown ISA class {target!r}: expected one of {', '.join(NODE_ISAS)}")
    if not can_run(native, target):
        raise UserError(f"this {native} host cannot measure as {target}; it can measure as: "
                        f"{', '.join(runnable(native))}")
    emulated = target != native
    env = dict(EMULATION_ENV[target]) if emulated else {}
    return labels_for(target, emulated, physical_cores()), env


def ray_executable() -> str:
    """The `ray` next to this interpreter (a venv need not be on PATH), else the one on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "ray")
    return candidate if os.access(candidate, os.X_OK) else "ray"


def ray_start_command(
    address: str | None,
    labels: dict[str, str],
    *,
    head: bool = False,
    temp_dir: str | None = None,
    object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
    num_cpus: int | None = None,
    dashboard_agent_port: int | None = None,
    port: int | None = None,
    dashboard_port: int | None = None,
    client_server_port: int | None = None,
    loopback: bool = False,
) -> list[str]:
    """`ray start` argv. No --block: the command returns once the node is up and its processes
    live on. Several nodes on one machine each need their own temp dir and agent port.
    `loopback`: every listener on 127.0.0.1 (run it with LOOPBACK_ENV); a head then starts a Ray
    Client server only if `client_server_port` is given."""
    cmd = [sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start"] if loopback else [ray_executable(), "start"]
    if loopback:
        cmd.append("--node-ip-address=127.0.0.1")
    if head:
        cmd += ["--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
        if port is not None:
            cmd.append(f"--port={port}")
        if dashboard_port is not None:
            cmd.append(f"--dashboard-port={dashboard_port}")
        if client_server_port is not None:
            cmd.append(f"--ray-client-server-port={client_server_port}")
    else:
        if not address:
            raise UserError("a worker node needs the head's address (HOST:PORT)")
        cmd.append(f"--address={address}")
    if labels:
        # Hidden from `ray start --help` in 2.60, but parsed and applied.
        cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    cmd.append(f"--object-store-memory={int(object_store_bytes)}")
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if temp_dir is not None:
        cmd.append(f"--temp-dir={temp_dir}")
    if dashboard_agent_port is not None:
        cmd.append(f"--dashboard-agent-listen-port={dashboard_agent_port}")
    cmd.append("--disable-usage-stats")
    return cmd


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of `ray start`; the node's workers inherit it.

    Emulation variables are dropped from the inherited environment and come only from
    `extra`: a native node started from a shell with ATEN_CPU_CAPABILITY=avx2 set would
    otherwise emulate while its labels say it does not. A token file in `extra` drops the
    caller's RAY_AUTH_TOKEN, which Ray would use instead."""
    extra = extra or {}
    dropped = {key for env in EMULATION_ENV.values() for key in env}
    if "RAY_AUTH_TOKEN_PATH" in extra:
        dropped.add("RAY_AUTH_TOKEN")  # Ray would prefer it to the token file given
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(RAY_ENV)
    # Job entrypoints (`ray job submit -- python -m jobs.sweep`) run with the node's PATH:
    # make `python` this interpreter, the one with the project installed.
    bindir = os.path.dirname(sys.executable)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = os.pathsep.join([bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def apply_driver_env() -> None:
    """Give this process (a driver of a farm cluster) the same Ray settings as the nodes.
    Call it before `ray.init(address=...)`: the owner of a task decides its OOM retries.
    Auth stays the caller's (RAY_AUTH_MODE, RAY_AUTH_TOKEN[_PATH]) or the local cluster's."""
    os.environ.update(RAY_ENV)


@contextlib.contextmanager
def ray_process_env(env: dict[str, str]):
    """This process as a driver of one cluster: `env` (None values unset) in os.environ and in
    what Ray has already read of it, restored on exit. Ray reads the single-machine switch at
    import and caches the auth mode and token: both are refreshed here."""
    saved = {key: os.environ.get(key) for key in env}
    _set_env(env)
    try:
        yield
    finally:
        _set_env(saved)


def _set_env(env: dict[str, str | None]) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if "ray" not in sys.modules:
        return  # Ray reads it all when imported
    import ray
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR,
                                                              not ray_constants.IS_WINDOWS_OR_OSX)
    if not ray.is_initialized():  # a connected worker keeps the config it connected with
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


# --- token auth ------------------------------------------------------------------------------


def write_token(path: str) -> str:
    """A new random token in `path`, readable by this user only; returns the path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return path


def read_token(path: str) -> str:
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise UserError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if not token:
        raise UserError(f"the token file {path} is empty")
    return token


def _ray_token() -> tuple[str | None, str]:
    """(token, where it came from) as Ray would find it in this environment."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"], "$RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    where = "$RAY_AUTH_TOKEN_PATH" if os.environ.get("RAY_AUTH_TOKEN_PATH") else path
    return (read_token(path), where) if os.path.exists(path) else (None, "")


def _probe_gcs(address: str, token: str | None, timeout_s: float = 10.0) -> tuple[str, str]:
    """(gRPC status name, details) of asking the GCS at HOST:PORT for its cluster id, with `token`
    as Ray sends it (None: without one). "OK" when the head accepts it."""
    import ray  # noqa: F401  (puts Ray's vendored packages on sys.path)
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""
    return "OK", ""


def _refused(address: str, token: str | None, where: str, who: str, fix: str) -> UserError:
    if token is None:
        return UserError(f"the head at {address} expects a Ray auth token and {who} has none: {fix}")
    return UserError(f"the head at {address} refused {who}'s Ray auth token (from {where}): "
                     f"it is not the cluster's token; {fix}")


def check_head_auth(address: str, token: str | None, where: str = "") -> None:
    """Before `ray start --address`: a UserError saying what to do when the head refuses `token`
    (None: no token) or cannot be reached."""
    code, details = _probe_gcs(address, token)
    if code == "UNAUTHENTICATED":
        raise _refused(address, token, where, "this host",
                       "pass --token-file FILE (a copy of the head's token) or set RAY_AUTH_TOKEN")
    if code != "OK":
        raise UserError(f"cannot reach the head's GCS at {address}: {code} {details}")


def check_driver_auth(address: str) -> None:
    """Before `ray.init(address=HOST:PORT)`: a UserError when the head refuses the token this
    process would send (Ray's own error comes after a long wait and does not say so)."""
    if not re.fullmatch(r"[\w.-]+:\d+", address) or os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true"):
        return  # auto, ray://, or a TLS head: Ray's own checks
    mode = os.environ.get("RAY_AUTH_MODE", "")
    token, where = _ray_token() if mode.lower() != "disabled" else (None, "")
    if mode.lower() != "token" and not (mode == "" and token):
        token = None  # Ray sends a token only in token mode (unset: when it finds one)
    if _probe_gcs(address, token)[0] == "UNAUTHENTICATED":
        raise _refused(address, token, where, "this driver",
                       "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                       "(a local cluster's: eval \"$(infra/local-cluster env)\")")


# --- farm worker ---------------------------------------------------------------------------


def run_worker(address: str, isa: str | None = None, *, num_cpus: int | None = None,
               object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES, temp_dir: str | None = None,
               dashboard_agent_port: int | None = None, auth_mode: str | None = None,
               token_file: str | None = None, dry_run: bool = False, echo=None) -> dict:
    """Join the cluster at `address` as a labelled node; returns the labels, env and command.
    `auth_mode` must be the cluster's (None: token with `token_file`, else $RAY_AUTH_MODE, else
    token if RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is set, else disabled); with "token" the token comes
    from `token_file`, else from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as
    Ray reads it. Before starting anything the head is asked whether it accepts this host's
    token. `echo(result)` is called before anything starts (the CLI prints the plan with it)."""
    labels, extra = detect_labels(isa)
    mode = worker_auth_mode(auth_mode, token_file)
    extra["RAY_AUTH_MODE"] = mode
    if token_file:
        extra["RAY_AUTH_TOKEN_PATH"] = os.path.abspath(token_file)
    cmd = ray_start_command(address, labels, num_cpus=num_cpus, object_store_bytes=object_store_bytes,
                            temp_dir=temp_dir, dashboard_agent_port=dashboard_agent_port)
    result = {"labels": labels, "env": extra, "command": cmd, "started": False}
    if echo is not None:
        echo(result)
    if dry_run:
        return result
    _check_worker_auth(address, mode, token_file)
    proc = subprocess.run(cmd, env=ray_env(extra))
    if proc.returncode != 0:
        raise UserError(f"`ray start` failed with exit code {proc.returncode} (its output is above)")
    result["started"] = True
    return result


def worker_auth_mode(auth_mode: str | None, token_file: str | None) -> str:
    if token_file and auth_mode == "disabled":
        raise UserError("--token-file needs --auth-mode token (a token is only sent in token mode)")
    if auth_mode or token_file:
        return auth_mode or "token"
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"]
    return "token" if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") else "disabled"


def _check_worker_auth(address: str, mode: str, token_file: str | None) -> None:
    """Fail fast, with what to do, where `ray start` would wait and then fail obscurely."""
    if os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true"):
        return  # a TLS head does not answer a plain gRPC probe
    if token_file:
        token, where = read_token(token_file), token_file
    elif mode == "token":
        token, where = _ray_token()
        if token is None:
            raise UserError("--auth-mode token but this host has no token: pass --token-file FILE "
                            "(a copy of the head's token) or set RAY_AUTH_TOKEN")
    else:
        token, where = None, ""
    check_head_auth(address, token, where)


def _command_line(cmd: list[str], env: dict[str, str]) -> str:
    prefix = [f"{k}={shlex.quote(v)}" for k, v in {**RAY_ENV, **env}.items()]
    return " ".join(prefix + [shlex.quote(part) for part in cmd])


def cmd_worker(args: argparse.Namespace) -> int:
    def echo(result: dict) -> None:
        print("labels: " + ",".join(f"{k}={v}" for k, v in result["labels"].items()))
        print(_command_line(result["command"], result["env"]), flush=True)

    run_worker(args.address, args.isa, num_cpus=args.num_cpus, object_store_bytes=args.object_store_memory,
               temp_dir=args.temp_dir, dashboard_agent_port=args.dashboard_agent_listen_port,
               auth_mode=args.auth_mode, token_file=args.token_file, dry_run=args.dry_run, echo=echo)
    return 0


def register(sub) -> None:
    p = sub.add_parser("worker", help="join a Ray cluster as a farm worker node labelled with this host's ISA class",
                       description="Runs `ray start` with the farm's node labels (cpu-isa, cpu-isa-emulated, "
                                   "cpu-cores). The node runs in the background; stop it with `ray stop` on a "
                                   "dedicated host. The head is first asked whether it accepts this host's token.")
    p.add_argument("--address", required=True, help="the head's GCS address, HOST:PORT (e.g. head:6379)")
    p.add_argument("--isa", default=None, choices=NODE_ISAS,
                   help="measure as this ISA class (default: the host's own; avx2 is emulated on AVX512 hosts)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule here (default: all)")
    p.add_argument("--object-store-memory", type=int, default=DEFAULT_OBJECT_STORE_BYTES,
                   help="object store bytes (default %(default)s; Ray's own default takes 30%% of RAM)")
    p.add_argument("--temp-dir", default=None, help="Ray's temp dir for this node")
    p.add_argument("--dashboard-agent-listen-port", type=int, default=None,
                   help="needed when several nodes share one machine: each its own port")
    p.add_argument("--auth-mode", choices=["disabled", "token"], default=None,
                   help="the cluster's Ray auth mode (default: token with --token-file, else $RAY_AUTH_MODE, "
                        "else token if $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH is set, else disabled)")
    p.add_argument("--token-file", default=None,
                   help="a file holding the cluster's auth token (given to `ray start` as RAY_AUTH_TOKEN_PATH)")
    p.add_argument("--dry-run", action="store_true", help="print the labels and the command, start nothing")
    p.set_defaults(fn=cmd_worker)
