"""`farm aggregate` and `farm table show|check|diff`: thin wrappers over pure functions."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from farm.errors import UserError
from farm.measure.problem import WEIGHT_MODES


def run_aggregate(paths: list[str], store: str | None, out: str, run_id: str | None = None,
                  prefer_weights: str = "model") -> dict[tuple[str, str, int], str]:
    """Write one table per (ISA, vendor, threads) into `out`; returns the paths written."""
    from kernels.provenance import template_hash, torch_version
    from kernels.table import dump

    from farm.tables.aggregate import aggregate, table_name, table_paths
    from farm.measure.store import read_records

    if not paths and not store:
        raise UserError("aggregate: give record files and/or --store")
    records = read_records(paths, store, run_id)
    if not records:
        raise UserError("aggregate: no records to aggregate")
    result = aggregate(records, torch_version(), template_hash(), prefer_weights=prefer_weights)
    if not result.tables:
        raise UserError(f"aggregate: all {len(records)} records are stale (other torch or template source)")
    written = table_paths(out, result.tables)
    for key, path in written.items():
        dump(result.tables[key], path)
    for line in result.skipped:
        print(f"skipped: {line}")
    for line in result.emulation_blind:
        print(f"excluded (emulation cannot restrict its library GEMM): {line}")
    if result.agreement:
        agree = sum(row["agree"] for row in result.agreement)
        print(f"emulated vs native winners on the same keys: {agree} of {len(result.agreement)} agree")
        for row in result.agreement:
            if not row["agree"]:
                print(f"  {table_name((row['isa'], row['vendor'], row['threads']))} {row['key']}: native {row['native']}, "
                      f"emulated {row['emulated']}")
    if result.stale:
        print(f"left out {result.stale} stale record(s)")
    return written


def load_doc(path: str) -> dict:
    import yaml

    from kernels.table import TableError, load

    try:
        load(path)
    except TableError as exc:
        raise UserError(str(exc)) from None
    with open(path) as f:
        return yaml.safe_load(f)


def show(path: str, console: Console | None = None) -> None:
    doc = load_doc(path)
    vendor = f", {doc['vendor']} hosts" if doc.get("vendor") else ", any vendor"
    table = RichTable(title=f"{path}: {doc['isa']}{' (emulated)' if doc['emulated'] else ''}{vendor}, {doc['threads']} threads, "
                            f"torch {doc['torch']}, template {doc['template_hash']}, {len(doc['entries'])} entries",
                      title_justify="left")
    for col in ("op", "dtype", "M", "N", "K", "group", "winner", "us", "speedup", "95% CI", "per process",
                "runner-up", "nearest-M", "note"):
        table.add_column(col)
    for e in doc["entries"]:
        k = e["key"]
        note = e.get("disagreement") or _modes_note(e.get("allocator_modes"))
        per_process = (f"{e['speedup_by_process']:.3f} ({e['processes']})"
                       if e.get("speedup_by_process") is not None else "-")  # tables written before it lack it
        table.add_row(k["op"], k["dtype"], str(k["m"]), str(k["n"]), str(k["k"]), str(k["group_size"] or "-"),
                      escape(e["winner"]), f"{e['median_us']:.1f}", f"{e['speedup_vs_aten']:.3f}",
                      f"[{e['speedup_ci95'][0]:.3f}, {e['speedup_ci95'][1]:.3f}]", per_process,
                      escape(e.get("runner_up") or "-"), "yes" if e["nearest_m_ok"] else "no", escape(note[:60]))
    console = console or Console(width=220)
    console.print(table)
    console.print(escape(rule_summary(doc)))
    console.print(escape(transfer_summary(doc)))


def _modes_note(modes: dict | None) -> str:
    """Where the winner's processes split between allocator modes: each mode's figure."""
    if not modes:
        return ""
    return "allocator modes: " + ", ".join(f"{mode} {m['speedup_by_process']:.2f} ({m['processes']})"
                                           for mode, m in modes.items())


def transfer_summary(doc: dict) -> str:
    """One line per other thread count of the class: what transfer from it measured here."""
    records = doc.get("transfer") or []
    if not records:
        return "thread transfer: no other thread count of this class was aggregated with this table"
    return "\n".join(
        f"thread transfer from {r['from_threads']} threads: {r['keys']} keys measured at both, {r['agree']} with the same "
        f"winner, {r['transferable']} whose {r['from_threads']}-thread winner transfers; regret of those vs this count's "
        f"winner geomean {_percent(r['regret_geomean'])}, worst {_percent(r['regret_worst'])}"
        for r in records)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def rule_summary(doc: dict) -> str:
    """One paragraph on the table's learned rule: its size and its held-out validation."""
    rule = doc.get("rule")
    if not rule:
        return f"rule: none ({doc.get('rule_status', 'not trained')})"
    v = rule["validation"]
    leaves = [n for n in rule["nodes"] if "leaf" in n]
    answers = sorted({str(n["leaf"]) for n in leaves if n["leaf"] is not None})
    depth = v.get("depth")
    if v.get("depth_by_op"):
        leaves_of = v.get("min_leaf_by_op") or {}
        depth = ", ".join(f"{op} {d}" + (f" (leaves >= {leaves_of[op]})" if op in leaves_of else "")
                          for op, d in sorted(v["depth_by_op"].items()))
    left_out = "".join(f"; left out of its domain: {why}" for why in v.get("excluded") or [])
    return (f"rule: {len(rule['nodes'])} nodes, depth {depth}, {len(leaves)} leaves "
            f"({sum(n['leaf'] is None for n in leaves)} unsure; answers {', '.join(answers) or 'none'}), trained on "
            f"{rule['trained_on']['problems']} problems of {', '.join(rule['trained_on']['families'])}. "
            f"{v['method']}: {v['decided']} of {v['held_out_problems']} held-out problems decided, "
            f"{v['losses_vs_default']} slower than the default beyond noise, regret vs the oracle geomean "
            f"{v['regret_geomean']}, p95 {v['regret_p95']}, worst {v['regret_worst']}" + _gain(v) + left_out)


def _gain(v: dict) -> str:
    """Tables built before the gain fields have none."""
    if "speedup_geomean" not in v:
        return ""
    captured = "n/a (no oracle gain)" if v.get("gain_captured") is None else f"{100 * v['gain_captured']:.0f}%"
    return (f"; over all held-out problems (default where unsure) {v['speedup_geomean']}x of the oracle's "
            f"{v['oracle_geomean']}x: {captured} of its gain captured")


def check(path: str) -> list[str]:
    """Problems that would make compile-time use fall back to Inductor (empty: usable here)."""
    import torch

    import kernels
    from kernels.provenance import template_hash, torch_version
    from kernels.table import TableError, incompatibilities, load

    try:
        table = load(path, torch_version(), template_hash())
    except TableError as exc:
        return [str(exc)]
    problems = incompatibilities(table, kernels.host_isa(), torch.get_num_threads(), torch_version(), template_hash(),
                                 kernels.host_vendor())
    stale = [e for e in table.entries.values() if e.stale]
    if stale:
        problems.append(f"{len(stale)} of {len(table.entries)} entries are stale")
    return problems


def cmd_aggregate(args: argparse.Namespace) -> int:
    written = run_aggregate(args.records, args.store, args.out, args.run, args.prefer_weights)
    for (isa, vendor, threads), path in written.items():
        print(f"wrote {path} ({isa}, {vendor} hosts, {threads} threads)")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    if args.action == "show":
        for path in args.paths:
            show(path)
        return 0
    if args.action == "check":
        status = 0
        for path in args.paths:
            problems = check(path)
            print(f"{path}: " + ("ok" if not problems else "NOT usable here:\n  " + "\n  ".join(problems)))
            status = status or (1 if problems else 0)
        return status
    from farm.tables.diff import diff_tables, summary

    if len(args.paths) != 2:
        raise UserError("table diff: give exactly two tables, OLD and NEW")
    changes = diff_tables(load_doc(args.paths[0]), load_doc(args.paths[1]), args.min_change)
    if args.json:
        print(json.dumps({"summary": summary(changes), "changes": [c.as_dict() for c in changes]}, indent=1))
    else:
        for c in changes:
            if c.kind == "unchanged":
                continue
            ratio = f" time x{c.ratio:.3f}" if c.ratio else ""
            print(f"{c.kind:12} {c.key}: {c.old_winner} -> {c.new_winner}{ratio} {c.detail}")
        print("summary:", summary(changes))
    return 0


def register(sub) -> None:
    p = sub.add_parser("aggregate", help="measurement records -> one table per ISA class, CPU vendor and thread count")
    p.add_argument("records", nargs="*", help="files of `farm measure --json` records")
    p.add_argument("--store", default=None, help="a sweep's SQLite store")
    p.add_argument("--run", default=None, help="only this run of the store")
    p.add_argument("--out", required=True, help="directory for <isa>-<vendor>-t<threads>.yaml")
    p.add_argument("--prefer-weights", default="model", choices=WEIGHT_MODES,
                   help="the weight state whose records decide a key measured in several (then model, cold, warm)")
    p.set_defaults(fn=cmd_aggregate)

    p = sub.add_parser("table", help="show, check or diff autotune tables")
    p.add_argument("action", choices=["show", "check", "diff"])
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true", help="diff: machine-readable output")
    p.add_argument("--min-change", type=float, default=0.03, help="diff: smallest relative time change reported")
    p.set_defaults(fn=cmd_table)
