"""Placing measurement tasks on Ray nodes by ISA class (the driver's Ray side).

Each task measures all candidates of one problem on one node (paired comparison), selected
with Ray's label selector on the node's `cpu-isa` label (see farm/cluster/node.py). Ray leaves a task
whose label no live node has pending forever, so the driver checks live nodes first.
"""

from __future__ import annotations

import os
import socket

from farm.errors import UserError

ISA_LABEL = "cpu-isa"
# A node that dies mid-task: Ray retries on another node of the same class, this many times.
NODE_FAILURE_RETRIES = 3


def live_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def nodes_by_isa(nodes: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for node in nodes:
        isa = (node.get("Labels") or {}).get(ISA_LABEL)
        if isa:
            out.setdefault(isa, []).append(node)
    return out


def require_classes(isas: list[str], nodes: list[dict]) -> dict[str, list[dict]]:
    """Fail at once, naming the classes that no live node serves (instead of pending forever)."""
    by_isa = nodes_by_isa(nodes)
    missing = [isa for isa in isas if isa not in by_isa]
    if missing:
        have = ", ".join(f"{isa} x{len(ns)}" for isa, ns in sorted(by_isa.items())) or "none"
        raise UserError(f"no live Ray node for ISA class(es) {', '.join(missing)} "
                        f"(live labelled nodes: {have}); start one with `farm worker --isa ...`")
    return by_isa


def host_slots(by_isa: dict[str, list[dict]], isas: list[str]) -> int:
    """Concurrent tasks: one per physical host serving the targets. Nodes that share a host
    (a local multi-node cluster) would disturb each other's timings, so they take turns."""
    hosts = {n.get("NodeManagerAddress") for isa in isas for n in by_isa.get(isa, [])}
    return max(1, len(hosts))


def _measure_on_node(problem: dict, isa: str, grid: str, protocol: dict, extra: list[str] | None = None,
                     only: list[str] | None = None) -> dict:
    """Runs on a worker node: the same measurement as `farm measure`, stamped with the node."""
    import ray

    from farm.measure.manager import measure
    from farm.measure.problem import Problem
    from farm.measure.protocol import Protocol

    ctx = ray.get_runtime_context()
    record = measure(Problem.from_dict(problem), grid=grid, protocol=Protocol.from_dict(protocol), isa=isa, extra=extra,
                     only=only)
    record["node"] = {"node_id": ctx.get_node_id(), "hostname": socket.gethostname(), "pid": os.getpid(),
                      "aten_env": os.environ.get("ATEN_CPU_CAPABILITY")}
    return record


def submit(problem: dict, isa: str, grid: str, protocol: dict, extra: list[str] | None = None,
           only: list[str] | None = None):
    """An ObjectRef of the record, placed on a node labelled with `isa` (`only`: ATen, its control
    and these instead of the grid)."""
    import ray

    remote = ray.remote(_measure_on_node).options(
        num_cpus=1,
        label_selector={ISA_LABEL: isa},
        max_retries=NODE_FAILURE_RETRIES,
        retry_exceptions=False,  # a farm bug is not retried; a dead node is
        name=f"measure:{isa}:{problem['op']}:{problem['m']}x{problem['n']}x{problem['k']}",
    )
    return remote.remote(problem, isa, grid, protocol, list(extra or []), list(only or []))
