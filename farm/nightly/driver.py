"""The nightly: re-measure what went stale against the shipped tables, diff, report, exit code.

    farm nightly jobs/sweeps/llm.yaml --tables kernels/tables --out nightly/2026-11-26/
    python -m jobs.nightly ...            (the same, as a CI or `ray job submit` entry point)

Exit codes (for CI): 0 nothing significant, 10 significant regressions, 20 failures (a
candidate that newly fails, a task that failed, an ISA class with no live worker). Failures
win over regressions.

Close calls are raced first (farm.nightly.race): a key whose earlier records leave its winner
within noise of the runner-up, its processes disagreeing, or unreliable is measured before the
other rows, pass after pass, its samples pooled with the earlier records of the same key until
it is decided, five records are pooled (a tie) or --race-budget-s is spent; its new entry is
what the pool decides.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

from rich.console import Console

from kernels.table import VENDORS

from farm.tables.diff import DEFAULT_MIN_CHANGE, Change, diff_tables, summary
from farm.errors import UserError
from farm.nightly.race import DEFAULT_RACE_BUDGET_S, UNRELIABLE_REASON, Race, check_budget, plan, stop_reason
from farm.sweep.spec import Spec, Task, load_spec, parse_spec
from farm.measure.host import record_vendor
from farm.measure.store import Store, host_name, problem_key

# 30: nothing worse happened, but ISA classes were skipped (no node serves them); diff.json and
# the summary line name them, so a partial night is never mistaken for a green one.
EXIT_OK, EXIT_REGRESSION, EXIT_FAILURE, EXIT_SKIPPED = 0, 10, 20, 30
DEFAULT_MAX_AGE_DAYS = 30.0
ANY_VENDOR = "any"  # the vendor key of a shipped table written before tables had one


@dataclass
class Selection:
    isa: str
    key: str
    label: str
    measure: bool
    reason: str
    shipped_winner: str | None
    race: str | None = None  # why the key is raced tonight (farm.nightly.race), None if it is not


@dataclass
class NightlyResult:
    exit_code: int
    run_id: str | None
    out: str
    selections: list[Selection]
    changes: dict[str, list[Change]]
    shipped_checks: list[dict]
    failures: list[str]
    wall_s: float
    tables: dict[str, str] = field(default_factory=dict)
    skipped_classes: dict[str, int] = field(default_factory=dict)  # ISA class -> rows not measured
    races: list[dict] = field(default_factory=list)  # Race.as_dict() of every raced key
    race_budget_s: float = DEFAULT_RACE_BUDGET_S


def _entry_key(task: Task) -> dict:
    p = task.problem
    return {"op": p.op, "dtype": p.dtype, "m": p.m, "n": p.n, "k": p.k, "group_size": p.group_size}


def load_shipped(tables_dir: str) -> dict[tuple[str, str, int], dict]:
    """(isa, vendor, threads) -> table document, for every valid table in `tables_dir` (vendor
    "any" for a table written before tables had one)."""
    import yaml

    from kernels.table import TableError, load

    out = {}
    if not os.path.isdir(tables_dir):
        return out
    for name in sorted(os.listdir(tables_dir)):
        if not name.endswith(".yaml"):
            continue
        path = os.path.join(tables_dir, name)
        try:
            load(path)
        except TableError as exc:
            raise UserError(f"shipped table {exc}") from None
        with open(path) as f:
            doc = yaml.safe_load(f)
        out[(doc["isa"], doc.get("vendor") or ANY_VENDOR, doc["threads"])] = doc
    return out


def shipped_for(shipped: dict[tuple[str, str, int], dict], isa: str, vendor: str, threads: int) -> dict | None:
    """The shipped table that hosts of this class, vendor and thread count use (its own, else one
    written before tables had a vendor)."""
    return shipped.get((isa, vendor, threads)) or shipped.get((isa, ANY_VENDOR, threads))


def _find(doc: dict | None, key: dict) -> dict | None:
    if doc is None:
        return None
    return next((e for e in doc["entries"] if e["key"] == key), None)


def select(spec: Spec, shipped: dict[tuple[str, str, int], dict], torch_version: str, template_hash: str,
           now: dt.datetime, max_age_days: float, remeasure: set[str], vendor: str) -> list[Selection]:
    """Why each task of the spec is (or is not) measured tonight against the tables of `vendor`
    (the hosts that measure), those whose shipped entry came from unreliable records (the A/A
    gate) first. Pure."""
    out = []
    unreliable = UNRELIABLE_REASON
    for task in spec.tasks:
        doc = shipped_for(shipped, task.isa, vendor, task.problem.threads)
        entry = _find(doc, _entry_key(task))
        reason, measure = "fresh", False
        if entry is None:
            reason, measure = "missing from the shipped table", True
        else:
            prov = entry["provenance"]
            age_days = (now - dt.datetime.fromisoformat(prov["measured_at"])).total_seconds() / 86400
            if entry.get("unreliable"):
                reason, measure = unreliable, True
            elif task.key in remeasure or f"{task.isa}:{task.key}" in remeasure or entry.get("remeasure"):
                reason, measure = "marked for re-measurement", True
            elif prov["torch"] != torch_version:
                reason, measure = f"torch changed ({prov['torch']} -> {torch_version})", True
            elif prov["template_hash"] != template_hash:
                reason, measure = f"template source changed ({prov['template_hash']} -> {template_hash})", True
            elif age_days > max_age_days:
                reason, measure = f"older than {max_age_days:g} days ({age_days:.1f})", True
        out.append(Selection(task.isa, task.key, task.label, measure, reason, entry["winner"] if entry else None))
    return sorted(out, key=lambda s: s.reason != unreliable)  # stable: spec order otherwise


def shipped_check(entry: dict, record: dict, min_change: float = DEFAULT_MIN_CHANGE) -> dict:
    """What ships, measured again: the shipped winner's paired speedup over ATen now against the
    shipped one (a slower shipped kernel is a regression even when a new winner hides it).
    Absolute times are reported with ATen's own drift, which says how much the host moved."""
    cand = next((c for c in record["candidates"] if c["id"] == entry["winner"]), None)
    base = {"key": entry["key"], "winner": entry["winner"], "old_us": entry["median_us"],
            "old_speedup": entry["speedup_vs_aten"], "old_speedup_ci95": entry["speedup_ci95"]}
    if cand is None or cand["status"] != "ok":
        return {**base, "kind": "new_failure", "detail": f"shipped winner now {cand['status'] if cand else 'missing'}"}
    aten = next(c for c in record["candidates"] if c["id"] == "aten")
    old_aten_us = entry["median_us"] * entry["speedup_vs_aten"]  # winner time x its speedup = ATen's time
    change = cand["speedup_vs_aten"] / entry["speedup_vs_aten"]
    old_ci, new_ci = entry["speedup_ci95"], cand["speedup_ci95"]
    apart = new_ci[1] < old_ci[0] or new_ci[0] > old_ci[1]
    kind = "unchanged"
    if apart and abs(change - 1) > min_change:
        kind = "regression" if change < 1 else "improvement"
    return {**base, "kind": kind, "new_us": cand["median_us"], "ratio": cand["median_us"] / entry["median_us"],
            "new_speedup": cand["speedup_vs_aten"], "new_speedup_ci95": new_ci, "speedup_change": change,
            "aten_drift": aten["median_us"] / old_aten_us,
            "detail": f"speedup {entry['speedup_vs_aten']:.3f} -> {cand['speedup_vs_aten']:.3f}"}


def merge(old: dict | None, new: dict | None, measured_keys: set[tuple]) -> dict | None:
    """Shipped table with the re-measured entries replaced (the rest kept as shipped)."""
    if new is None:
        return old
    if old is None:
        return new
    merged = dict(new)
    kept = [e for e in old["entries"] if tuple(sorted(e["key"].items())) not in measured_keys]
    merged["entries"] = sorted(kept + new["entries"], key=lambda e: str(sorted(e["key"].items())))
    merged["hosts"] = {**old.get("hosts", {}), **new.get("hosts", {})}
    merged["run_ids"] = sorted(set(old.get("run_ids", [])) | set(new.get("run_ids", [])))
    return merged


def exit_code(changes: dict[str, list[Change]], checks: list[dict], failures: list[str],
              skipped_classes: dict[str, int] | None = None) -> int:
    kinds = {c.kind for cs in changes.values() for c in cs} | {c["kind"] for c in checks}
    if failures or "new_failure" in kinds:
        return EXIT_FAILURE
    if "regression" in kinds:
        return EXIT_REGRESSION
    if skipped_classes:
        return EXIT_SKIPPED
    return EXIT_OK


def earlier_records(store: Store, tasks: list[Task], shipped: dict[tuple[str, str, int], dict], torch_version: str,
                    template_hash: str, vendor: str) -> dict[tuple[str, str], list[dict]]:
    """(isa, key) -> the stored records that decided the shipped entry (its run ids), or where the
    store lacks them the newest record of the key; only records of tonight's torch and template.
    A key with no shipped entry has nothing earlier to race."""
    by_run: dict[tuple[str, str], list[dict]] = {}
    latest = None
    out = {}
    for task in tasks:
        entry = _find(shipped_for(shipped, task.isa, vendor, task.problem.threads), _entry_key(task))
        if entry is None:
            continue
        found = []
        for run_id in entry["provenance"].get("run_ids") or []:
            if (run_id, task.isa) not in by_run:
                by_run[(run_id, task.isa)] = store.records(run_id, task.isa)
            found += [r for r in by_run[(run_id, task.isa)] if problem_key(r["problem"]) == task.key]
        if not found:
            latest = store.latest(torch_version, template_hash) if latest is None else latest
            found = [latest[(task.key, task.isa)]] if (task.key, task.isa) in latest else []
        found = [r for r in found if (r["provenance"]["torch"], r["provenance"]["template_hash"]) == (torch_version, template_hash)
                 and record_vendor(r["host"]) == vendor]
        if found:
            out[(task.isa, task.key)] = found
    return out


def _race(tasks: list[Task], races: dict[tuple[str, str], Race], spec: Spec, store: Store, run_id: str,
          budget_s: float, console: Console) -> list[str]:
    """Measure the raced keys pass after pass (the first pass in the nightly's run, each later one
    in a run of kind "race": the store keeps one record per run, key and host), pooling each
    pass, until every key is decided or pools MAX_POOLED records, or the budget is spent.
    Returns the task failures."""
    from farm.sweep.driver import execute

    failures: list[str] = []
    start, todo, index = time.perf_counter(), list(tasks), 1
    while todo:
        pass_start = time.perf_counter()
        pass_run = run_id if index == 1 else store.start_run(
            "race", spec.raw, note=json.dumps({"nightly": run_id, "pass": index, "keys": [t.key for t in todo]}))
        console.print(f"nightly: race pass {index}: {len(todo)} close call(s)")
        _, task_failures, _ = execute(todo, spec, store, pass_run, None, console)
        failures += task_failures
        got = {(r["host"]["isa"], problem_key(r["problem"])): r for r in store.records(pass_run)}
        for task in todo:
            races[(task.isa, task.key)].add_pass(got.get((task.isa, task.key)))
        if index > 1:
            store.end_run(pass_run, "failed" if task_failures else "done", sorted({host_name(r["host"]) for r in got.values()}))
        undecided = [t for t in todo if races[(t.isa, t.key)].open]
        now = time.perf_counter()
        stop = stop_reason(now - start, now - pass_start, len(todo), len(undecided), budget_s)
        if stop:
            for task in undecided:
                races[(task.isa, task.key)].outcome = stop
            break
        todo, index = undecided, index + 1
    return failures


def _aggregate_input(records: list[dict], races: dict[tuple[str, str], Race]) -> list[dict]:
    """Tonight's records, a raced key's replaced by its pool (earlier records and every pass)."""
    raced = {k for k, race in races.items() if race.pool}
    kept = [r for r in records if (r["host"]["isa"], problem_key(r["problem"])) not in raced]
    return kept + [r for k in sorted(raced) for r in races[k].pool]


def run(spec_path: str | None = None, *, spec_doc: dict | None = None, tables_dir: str = "kernels/tables",
        out: str = "nightly", address: str | None = None, store_path: str | None = None,
        max_age_days: float = DEFAULT_MAX_AGE_DAYS, remeasure: set[str] | None = None,
        min_change: float = DEFAULT_MIN_CHANGE, history: int = 14, console: Console | None = None,
        skip_missing: bool = False, race_budget_s: float = DEFAULT_RACE_BUDGET_S, vendor: str | None = None) -> NightlyResult:
    """The whole nightly; returns what happened (exit_code for CI). `vendor`: the CPU vendor of
    the hosts that measure (default this host's), whose tables decide what is stale; every
    record still goes into its own host's vendor's table."""
    import kernels
    from kernels.provenance import template_hash, torch_version
    from kernels.table import dump

    from farm.tables.aggregate import aggregate, table_paths
    from farm.nightly.report import write_report
    from farm.sweep.driver import connected, drop_unserved, execute

    console = console or Console(stderr=True)
    start = time.perf_counter()
    race_budget_s = check_budget(race_budget_s)
    spec = parse_spec(spec_doc, "spec") if spec_doc is not None else load_spec(spec_path)
    shipped = load_shipped(tables_dir)
    now = dt.datetime.now(dt.timezone.utc)
    vendor = vendor or kernels.host_vendor()
    selections = select(spec, shipped, torch_version(), template_hash(), now, max_age_days, remeasure or set(), vendor)
    os.makedirs(out, exist_ok=True)
    store = Store(store_path or os.path.join(out, "nightly.db"))
    failures: list[str] = []
    run_id = None
    try:
        earlier = earlier_records(store, spec.tasks, shipped, torch_version(), template_hash(), vendor)
        selections, races = plan(selections, earlier, race_budget_s)
        by_key = {(t.isa, t.key): t for t in spec.tasks}
        # Selection order, raced keys first: they are measured first (a separate pass, below).
        tasks = [replace(by_key[(s.isa, s.key)], extra=(s.shipped_winner,) if s.shipped_winner else (), reason=s.reason)
                 for s in selections if s.measure]
        console.print(f"nightly: {len(tasks)} of {len(spec.tasks)} rows to measure, {len(races)} close call(s) raced first")
        records: list[dict] = []
        skipped_classes: dict[str, int] = {}
        if tasks and address is None:  # an embedded cluster serves this host's classes only
            tasks, skipped_classes = drop_unserved(tasks, None, skip_missing, console)
        if tasks:
            run_id = store.start_run("nightly", spec.raw, note=json.dumps([asdict(s) for s in selections if s.measure]))
            try:
                with connected(address, sorted({t.isa for t in tasks})):
                    if address is not None:
                        tasks, skipped_classes = drop_unserved(tasks, address, skip_missing, console)
                    raced = [t for t in tasks if (t.isa, t.key) in races]
                    rest = [t for t in tasks if (t.isa, t.key) not in races]
                    if raced:
                        failures += _race(raced, races, spec, store, run_id, race_budget_s, console)
                    if rest:
                        _, task_failures, _ = execute(rest, spec, store, run_id, None, console)
                        failures += task_failures
            except UserError as exc:  # e.g. an ISA class with no live worker: a failure CI must see
                failures.append(str(exc))
            records = store.records(run_id)
            store.end_run(run_id, "failed" if failures else "done", sorted({host_name(r["host"]) for r in records}))
        agg_records = _aggregate_input(records, races)
        result = aggregate(agg_records, torch_version(), template_hash()) if agg_records else None
        new_tables = result.tables if result else {}
        changes, checks, written = {}, [], {}
        paths = table_paths(os.path.join(out, "tables"), set(shipped) | set(new_tables))
        for table_key in sorted(paths):
            isa, table_vendor, threads = table_key
            # A vendor's first table grows from the one written before tables had a vendor.
            shipped_doc = shipped_for(shipped, *table_key) if table_key in new_tables else shipped[table_key]
            measured_keys = {tuple(sorted(e["key"].items())) for e in new_tables.get(table_key, {}).get("entries", [])}
            merged = merge(shipped_doc, new_tables.get(table_key), measured_keys)
            if merged is None:
                continue
            name = f"{isa}/{table_vendor}/{threads}"
            dump(merged, paths[table_key])
            written[name] = paths[table_key]
            changes[name] = diff_tables(shipped_doc or {"entries": []}, merged, min_change)
            for record in records:  # tonight's own measurement (a raced key's first pass), not the pool
                if (record["host"]["isa"], record_vendor(record["host"]), record["problem"]["threads"]) != table_key:
                    continue
                entry = _find(shipped_doc, {k: record["problem"][k] for k in ("op", "dtype", "m", "n", "k", "group_size")})
                if entry is not None:
                    checks.append({"isa": isa, "vendor": table_vendor, **shipped_check(entry, record, min_change)})
        code = exit_code(changes, checks, failures, skipped_classes)
        race_rows = [race.as_dict() for race in races.values()]
        nightly = NightlyResult(code, run_id, out, selections, changes, checks, failures, time.perf_counter() - start,
                                written, skipped_classes, race_rows, race_budget_s)
        with open(os.path.join(out, "diff.json"), "w") as f:
            json.dump({"exit_code": code, "run_id": run_id, "failures": failures, "skipped_classes": skipped_classes,
                       "summary": {k: summary(v) for k, v in changes.items()},
                       "changes": {k: [c.as_dict() for c in v if c.kind != "unchanged"] for k, v in changes.items()},
                       "shipped_checks": checks, "selection": [asdict(s) for s in selections],
                       "race_budget_s": race_budget_s, "races": race_rows}, f, indent=1)
        write_report(nightly, {f"{i}/{v}/{t}": d for (i, v, t), d in shipped.items()},
                     {f"{i}/{v}/{t}": d for (i, v, t), d in new_tables.items()}, store, history)
    finally:
        store.close()
    nightly.wall_s = time.perf_counter() - start
    return nightly


def add_arguments(p) -> None:
    p.add_argument("spec", help="sweep spec YAML whose rows the nightly keeps fresh")
    p.add_argument("--tables", default="kernels/tables", help="the shipped tables to compare against")
    p.add_argument("--out", required=True, help="directory for new tables, diff.json, report.md and plots")
    p.add_argument("--address", default=None, help="Ray cluster (HOST:6379 or auto); default: embedded local cluster")
    p.add_argument("--store", default=None, help="SQLite store kept across nights (history); default OUT/nightly.db")
    p.add_argument("--max-age-days", type=float, default=DEFAULT_MAX_AGE_DAYS, help="re-measure rows older than this")
    p.add_argument("--remeasure", action="append", default=[], help="problem key (or ISA:key) to re-measure; repeatable")
    p.add_argument("--min-change", type=float, default=DEFAULT_MIN_CHANGE, help="smallest relative change that counts")
    p.add_argument("--history", type=int, default=14, help="nights shown in the trend")
    p.add_argument("--skip-missing", action="store_true", help="with --address: skip ISA classes no live node "
                   "serves (exit 30 when nothing worse happened) instead of failing")
    p.add_argument("--vendor", default=None, choices=VENDORS, help="CPU vendor of the hosts that measure, whose "
                   "shipped tables decide what is stale (default: this host's)")
    p.add_argument("--race-budget-s", type=float, default=DEFAULT_RACE_BUDGET_S,
                   help="seconds the night may spend racing close calls (re-measured first, pooled with their earlier "
                        f"records until decided); the first pass always runs; 0: no racing (default {DEFAULT_RACE_BUDGET_S:g})")


def _forwarded(args) -> list[str]:
    """The arguments again, for the same nightly run as a Ray job (driving the cluster from inside)."""
    out = [args.spec, "--tables", args.tables, "--max-age-days", str(args.max_age_days),
           "--min-change", str(args.min_change), "--history", str(args.history), "--address", "auto",
           "--race-budget-s", str(args.race_budget_s)]
    if args.vendor:
        out += ["--vendor", args.vendor]
    if args.store:
        out += ["--store", args.store]
    for key in args.remeasure:
        out += ["--remeasure", key]
    if args.skip_missing:
        out.append("--skip-missing")
    return out


def main_args(args) -> int:
    if args.address and args.address.startswith(("http://", "https://")):
        from farm.cluster.relay import submit_and_fetch

        here = os.path.abspath(__file__)  # <checkout>/farm/nightly/driver.py
        root = os.path.dirname(os.path.dirname(os.path.dirname(here)))
        return submit_and_fetch(args.address, "jobs.nightly", _forwarded(args), args.out, root)
    result = run(args.spec, tables_dir=args.tables, out=args.out, address=args.address, store_path=args.store,
                 max_age_days=args.max_age_days, remeasure=set(args.remeasure), min_change=args.min_change,
                 history=args.history, skip_missing=args.skip_missing, race_budget_s=args.race_budget_s,
                 vendor=args.vendor)
    console = Console(stderr=True)
    label = {EXIT_OK: "nothing significant", EXIT_REGRESSION: "significant regressions", EXIT_FAILURE: "failures",
             EXIT_SKIPPED: "ISA classes skipped: " + ", ".join(sorted(result.skipped_classes))}
    console.print(f"nightly: {label[result.exit_code]} (exit {result.exit_code}); report {os.path.join(result.out, 'report.md')}; "
                  f"wall {result.wall_s:.1f} s")
    for line in result.failures:
        console.print(f"  failure: {line}")
    return result.exit_code


def register(sub) -> None:
    p = sub.add_parser("nightly", help="re-measure stale rows, diff against shipped tables, report (CI exit codes)")
    add_arguments(p)
    p.set_defaults(fn=main_args)
