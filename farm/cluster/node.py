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
import os
import shlex
import subprocess
import sys

from farm.errors import UserError
from farm.measure.host import EMULATION_ENV, can_run, native_isa, runnable

NODE_LABELS = ("cpu-isa", "cpu-isa-emulated", "cpu-cores")
NODE_ISAS = ("amx", "avx512", "avx2")

# Every process of a node (raylet, workers, agents) and every driver needs these:
# - auth disabled: a local `ray.init()` in 2.60 writes ~/.ray/auth_token and turns token auth
#   on for later clusters; real deployments decide auth explicitly in infra/.
# - oom retries 1: out-of-memory kills otherwise retry without limit, whatever max_retries says.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_task_oom_retries": "1",
}
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
) -> list[str]:
    """`ray start` argv. No --block: the command returns once the node is up and its processes
    live on. Several nodes on one machine each need their own temp dir and agent port."""
    cmd = [ray_executable(), "start"]
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
    otherwise emulate while its labels say it does not."""
    emulation_keys = {key for env in EMULATION_ENV.values() for key in env}
    env = {k: v for k, v in os.environ.items() if k not in emulation_keys}
    env.update(RAY_ENV)
    # Job entrypoints (`ray job submit -- python -m jobs.sweep`) run with the node's PATH:
    # make `python` this interpreter, the one with the project installed.
    bindir = os.path.dirname(sys.executable)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = os.pathsep.join([bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p])
    env.update(extra or {})
    return env


def apply_driver_env() -> None:
    """Give this process (a driver of a farm cluster) the same Ray settings as the nodes.
    Call it before `ray.init(address=...)`: the owner of a task decides its OOM retries."""
    os.environ.update(RAY_ENV)


# --- farm worker ---------------------------------------------------------------------------


def run_worker(address: str, isa: str | None = None, *, num_cpus: int | None = None,
               object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES, temp_dir: str | None = None,
               dashboard_agent_port: int | None = None, auth_mode: str = "disabled",
               dry_run: bool = False, echo=None) -> dict:
    """Join the cluster at `address` as a labelled node; returns the labels, env and command.
    `auth_mode` must be the cluster's ("token": the token comes from RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray reads it). `echo(result)` is called
    before anything starts (the CLI prints the plan with it)."""
    labels, extra = detect_labels(isa)
    extra["RAY_AUTH_MODE"] = auth_mode
    cmd = ray_start_command(address, labels, num_cpus=num_cpus, object_store_bytes=object_store_bytes,
                            temp_dir=temp_dir, dashboard_agent_port=dashboard_agent_port)
    result = {"labels": labels, "env": extra, "command": cmd, "started": False}
    if echo is not None:
        echo(result)
    if dry_run:
        return result
    proc = subprocess.run(cmd, env=ray_env(extra))
    if proc.returncode != 0:
        raise UserError(f"`ray start` failed with exit code {proc.returncode} (its output is above)")
    result["started"] = True
    return result


def _command_line(cmd: list[str], env: dict[str, str]) -> str:
    prefix = [f"{k}={shlex.quote(v)}" for k, v in {**RAY_ENV, **env}.items()]
    return " ".join(prefix + [shlex.quote(part) for part in cmd])


def cmd_worker(args: argparse.Namespace) -> int:
    def echo(result: dict) -> None:
        print("labels: " + ",".join(f"{k}={v}" for k, v in result["labels"].items()))
        print(_command_line(result["command"], result["env"]), flush=True)

    run_worker(args.address, args.isa, num_cpus=args.num_cpus, object_store_bytes=args.object_store_memory,
               temp_dir=args.temp_dir, dashboard_agent_port=args.dashboard_agent_listen_port,
               auth_mode=args.auth_mode, dry_run=args.dry_run, echo=echo)
    return 0


def register(sub) -> None:
    p = sub.add_parser("worker", help="join a Ray cluster as a farm worker node labelled with this host's ISA class",
                       description="Runs `ray start` with the farm's node labels (cpu-isa, cpu-isa-emulated, "
                                   "cpu-cores). The node runs in the background; stop it with `ray stop` on a "
                                   "dedicated host.")
    p.add_argument("--address", required=True, help="the head's GCS address, HOST:PORT (e.g. head:6379)")
    p.add_argument("--isa", default=None, choices=NODE_ISAS,
                   help="measure as this ISA class (default: the host's own; avx2 is emulated on AVX512 hosts)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule here (default: all)")
    p.add_argument("--object-store-memory", type=int, default=DEFAULT_OBJECT_STORE_BYTES,
                   help="object store bytes (default %(default)s; Ray's own default takes 30%% of RAM)")
    p.add_argument("--temp-dir", default=None, help="Ray's temp dir for this node")
    p.add_argument("--dashboard-agent-listen-port", type=int, default=None,
                   help="needed when several nodes share one machine: each its own port")
    p.add_argument("--auth-mode", choices=["disabled", "token"], default=os.environ.get("RAY_AUTH_MODE", "disabled"),
                   help="the cluster's Ray auth mode (default: $RAY_AUTH_MODE, else %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the labels and the command, start nothing")
    p.set_defaults(fn=cmd_worker)
