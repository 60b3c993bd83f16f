"""The sweep driver: spec -> tasks on the cluster -> store (row by row) -> per-ISA tables.

The same code runs as `farm sweep` (embedded local cluster when no address is given) and as
`python -m jobs.sweep` under `ray job submit`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from farm.cluster import dispatch
from farm.cluster.node import apply_driver_env
from farm.errors import UserError
from farm.sweep.spec import Spec, Task, load_spec, parse_spec
from farm.measure.store import Store, host_name


@dataclass
class SweepResult:
    run_id: str
    store: str
    measured: int
    skipped_fresh: int
    skipped_done: int
    failed: list[str]
    tables: dict = field(default_factory=dict)
    wall_s: float = 0.0
    overhead: "Overhead | None" = None
    skipped_classes: dict[str, int] = field(default_factory=dict)  # ISA class -> tasks not measured




@contextlib.contextmanager
def connected(address: str | None, isas: list[str]):
    """Connect to a cluster, or start an embedded local one serving `isas` for this run."""
    import ray

    from farm.cluster.node import check_driver_auth

    apply_driver_env()  # usage stats, bounded out-of-memory retries (DESIGN.md traps); auth is the cluster's
    if address:
        check_driver_auth(address)  # a head that refuses our token: say so now, not after Ray's retries
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()
        return
    from farm.cluster.localcluster import local_cluster

    workers = tuple(dict.fromkeys("native" if isa != "avx2" or _native_is_avx2() else "avx2" for isa in isas))
    with local_cluster(workers=workers) as info:
        ray.init(address=info["address"], logging_level="ERROR", log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def served_classes(address: str | None) -> tuple[list[str], str]:
    """(ISA classes this run can measure, who serves them). Embedded: this host's own class and
    what it can emulate; on a cluster (call while connected): the classes of live labelled nodes."""
    if address is None:
        from farm.measure.host import native_isa, runnable

        native = native_isa()
        return runnable(native), f"this {native} host (an embedded cluster serves its own class and the classes it can emulate)"
    return sorted(dispatch.nodes_by_isa(dispatch.live_nodes())), f"the cluster at {address}"


def drop_unserved(tasks: list[Task], address: str | None, skip_missing: bool,
                  console: Console) -> tuple[list[Task], dict[str, int]]:
    """Tasks whose class nobody serves: skipped with one notice (embedded mode, or a cluster with
    --skip-missing), else an error before any work is scheduled."""
    served, who = served_classes(address)
    skipped: dict[str, int] = {}
    for task in tasks:
        if task.isa not in served:
            skipped[task.isa] = skipped.get(task.isa, 0) + 1
    if not skipped:
        return tasks, {}
    what = ", ".join(f"{isa} ({n} task{'s' if n > 1 else ''})" for isa, n in sorted(skipped.items()))
    if address is not None and not skip_missing:
        raise UserError(f"no live Ray node for ISA class(es) {', '.join(sorted(skipped))} on {who} "
                        f"(it serves: {', '.join(served) or 'none'}); start one with `farm worker --isa ...`, "
                        f"or pass --skip-missing to measure the other classes")
    console.print(f"[yellow]skipping ISA class(es) {what}: {who} serves only {', '.join(served) or 'none'}[/yellow]")
    return [t for t in tasks if t.isa in served], skipped


def _native_is_avx2() -> bool:
    from farm.measure.host import native_isa

    return native_isa() == "avx2"


def plan(spec: Spec, store: Store, run_id: str, force: bool) -> tuple[list[Task], int, int]:
    """Tasks still to measure: not done in this run, and (unless forced) not fresh in the store."""
    from kernels.provenance import template_hash, torch_version

    done = store.done(run_id)
    fresh = {} if force else store.latest(torch_version(), template_hash())
    todo, skipped_done, skipped_fresh = [], 0, 0
    for task in spec.tasks:
        if (task.key, task.isa) in done:
            skipped_done += 1
        elif (task.key, task.isa) in fresh:
            skipped_fresh += 1
        else:
            todo.append(task)
    return todo, skipped_done, skipped_fresh


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def execute(tasks: list[Task], spec: Spec, store: Store, run_id: str, max_in_flight: int | None,
            console: Console, on_record=None) -> tuple[int, list[str], float, float]:
    """Submit with bounded concurrency; store each record the moment it arrives."""
    import ray

    by_isa = dispatch.require_classes(sorted({t.isa for t in tasks}), dispatch.live_nodes())
    slots = max_in_flight or dispatch.host_slots(by_isa, spec.isa)
    pending, in_flight, measured, failed = list(tasks), {}, 0, []
    worker_s = compile_timing_s = task_s = 0.0
    submitted: dict = {}
    with _progress(console) as bar:
        job = bar.add_task(f"sweep {spec.name} ({slots} at a time)", total=len(tasks))
        while pending or in_flight:
            while pending and len(in_flight) < slots:
                task = pending.pop(0)
                ref = dispatch.submit(task.problem.as_dict(), task.isa, spec.space, spec.protocol.as_dict(), task.extra,
                                      spec.candidates)
                in_flight[ref] = task
                submitted[ref] = time.perf_counter()
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                task = in_flight.pop(ref)
                task_s += time.perf_counter() - submitted.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as exc:  # node lost beyond retries, or a farm bug: the sweep goes on
                    failed.append(f"{task.isa} {task.key}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    bar.advance(job)
                    continue
                record["label"] = task.label
                if record["host"].get("isa") != task.isa:
                    failed.append(f"{task.isa} {task.key}: measured on a {record['host'].get('isa')} node")
                elif store.add(run_id, record, record.get("node", {}).get("node_id")):
                    measured += 1
                    worker_s += record["worker"]["wall_s"]
                    compile_timing_s += record["worker"]["compile_s"] + record["worker"]["timing_s"]
                    if on_record:
                        on_record(record)
                bar.advance(job)
    return measured, failed, Overhead(task_s, worker_s, compile_timing_s)


@dataclass
class Overhead:
    """Where a sweep's time went: Ray round trips, measurement processes, compile + timing."""

    task_s: float = 0.0  # submit -> result, as the driver saw it
    worker_s: float = 0.0  # measure() wall time on the nodes (process start, imports, all candidates)
    compile_timing_s: float = 0.0  # of which compiling and timing candidates

    def line(self) -> str:
        if not self.task_s:
            return "nothing measured"
        return (f"compile+timing {self.compile_timing_s:.0f} s = {100 * self.compile_timing_s / self.task_s:.0f}% of task time "
                f"({self.task_s:.0f} s); measurement processes {self.worker_s:.0f} s; Ray and scheduling "
                f"{self.task_s - self.worker_s:.0f} s")


def run(spec_path: str | None = None, *, spec_doc: dict | None = None, address: str | None = None,
        store_path: str = "results.db", out: str | None = "tables", resume: str | None = None, force: bool = False,
        max_in_flight: int | None = None, kind: str = "sweep", console: Console | None = None,
        skip_missing: bool = False) -> SweepResult:
    """Run (or resume) a sweep and write its tables. Validates everything before any work."""
    console = console or Console(stderr=True)
    start = time.perf_counter()
    store = Store(store_path)
    try:
        if resume:
            run_info = store.reopen_run(resume)
            spec = parse_spec(run_info["spec"], f"run {resume} spec")
            run_id = resume
        else:
            if spec_doc is None and spec_path is None:
                raise UserError("sweep: give a spec file")
            spec = parse_spec(spec_doc, "spec") if spec_doc is not None else load_spec(spec_path)
            run_id = None
        todo, skipped_done, skipped_fresh = plan(spec, store, run_id or "", force)
        run_id = run_id or store.start_run(kind, spec.raw)
        console.print(f"run {run_id}: {len(todo)} to measure, {skipped_fresh} fresh in the store, "
                      f"{skipped_done} already done in this run")
        measured, failed, overhead, skipped_classes = 0, [], Overhead(), {}
        if todo and address is None:  # before starting nodes that could not serve them
            todo, skipped_classes = drop_unserved(todo, None, skip_missing, console)
        if todo:
            try:
                with connected(address, sorted({t.isa for t in todo})):
                    if address is not None:
                        todo, skipped_classes = drop_unserved(todo, address, skip_missing, console)
                    measured, failed, overhead = execute(todo, spec, store, run_id, max_in_flight, console)
            except BaseException:
                store.end_run(run_id, "failed")  # what was stored stays; --resume finishes it
                raise
        hosts = sorted({host_name(r["host"]) for r in store.records(run_id)})
        store.end_run(run_id, "failed" if failed else "done", hosts)
        tables = write_tables(store, spec, out) if out else {}
    finally:
        store.close()
    return SweepResult(run_id, store_path, measured, skipped_fresh, skipped_done, failed, tables,
                       time.perf_counter() - start, overhead, skipped_classes)


def spec_records(store: Store, spec: Spec) -> list[dict]:
    """The newest fresh record of each of the spec's tasks, whichever run measured it."""
    from kernels.provenance import template_hash, torch_version

    latest = store.latest(torch_version(), template_hash())
    return [latest[(t.key, t.isa)] for t in spec.tasks if (t.key, t.isa) in latest]


def write_tables(store: Store, spec: Spec, out: str) -> dict:
    from kernels.provenance import template_hash, torch_version
    from kernels.table import dump

    from farm.tables.aggregate import aggregate, table_paths

    records = spec_records(store, spec)
    if not records:
        return {}
    result = aggregate(records, torch_version(), template_hash())
    written = table_paths(out, result.tables)
    for key, path in written.items():
        result.tables[key]["sweep"] = spec.name
        dump(result.tables[key], path)
    return written


def add_arguments(p) -> None:
    p.add_argument("spec", nargs="?", help="sweep spec YAML (not needed with --resume)")
    p.add_argument("--address", default=None, help="Ray cluster address (auto, HOST:6379, ray://...); "
                   "default: an embedded local cluster started for this run")
    p.add_argument("--store", default="results.db", help="SQLite store (created if missing)")
    p.add_argument("--out", default="tables", help="directory for the per-ISA tables")
    p.add_argument("--resume", default=None, metavar="RUN", help="finish run RUN: measure only what it is missing")
    p.add_argument("--force", action="store_true", help="re-measure rows that are fresh in the store")
    p.add_argument("--max-in-flight", type=int, default=None, help="concurrent tasks (default: one per host)")
    p.add_argument("--skip-missing", action="store_true", help="with --address: skip ISA classes no live node serves "
                   "(default: fail at once); an embedded cluster always skips what this host cannot serve")


def main_args(args) -> int:
    if not args.spec and not args.resume:
        raise UserError("sweep: give a spec file or --resume RUN")
    result = run(args.spec, address=args.address, store_path=args.store, out=args.out, resume=args.resume,
                 force=args.force, max_in_flight=args.max_in_flight, skip_missing=args.skip_missing)
    console = Console(stderr=True)
    console.print(f"run {result.run_id}: measured {result.measured}, fresh skipped {result.skipped_fresh}, "
                  f"failed {len(result.failed)}; wall {result.wall_s:.1f} s; {result.overhead.line()}")
    for line in result.failed:
        console.print(f"  failed: {line}")
    for isa, count in sorted(result.skipped_classes.items()):
        console.print(f"  skipped: {isa} ({count} tasks, no node of that class)")
    for (isa, vendor, threads), path in result.tables.items():
        console.print(f"  table {path} ({isa}, {vendor} hosts, {threads} threads)")
    return 1 if result.failed else 0


def register(sub) -> None:
    p = sub.add_parser("sweep", help="measure a sweep spec on a Ray cluster and write per-ISA tables")
    add_arguments(p)
    p.set_defaults(fn=main_args)
