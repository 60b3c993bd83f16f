"""`farm coverage`: for each of a model's quantized matmuls and each M, what a table decides at
compile time and why, through the real lookup (kernels.table.load_set, set_problems, lookup_set:
one table file, or a directory of tables with thread transfer, as kernels.install() loads them)."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

from kernels.table import TableError, TableSet, load_set, lookup_set, set_problems

from farm.errors import UserError
from farm.zoo.shapes import DEFAULT_MS, ModelDims, Plan, load_zoo, plan

INDUCTOR = "inductor"


@dataclass(frozen=True)
class Decision:
    layer: str
    op: str
    dtype: str
    m: int
    n: int
    k: int
    group_size: int | None
    source: str  # lookup's source: table, table:nearest-m, ... or inductor
    choice: str | None  # the candidate id, None for Inductor's own behaviour
    note: str

    @property
    def decided(self) -> bool:
        return self.source != INDUCTOR


@dataclass
class ModelCoverage:
    model: str
    source: str
    decisions: list[Decision]
    skipped: list[str] = field(default_factory=list)

    @property
    def decided(self) -> int:
        return sum(d.decided for d in self.decisions)

    @property
    def share(self) -> float:
        return self.decided / len(self.decisions) if self.decisions else 0.0

    def by_source(self) -> dict[str, int]:
        return dict(Counter(d.source for d in self.decisions).most_common())

    def summary(self) -> dict:
        return {"model": self.model, "source": self.source, "matmuls": len(self.decisions), "decided": self.decided,
                "share": round(self.share, 4), "by_source": self.by_source(), "skipped": self.skipped}


@dataclass
class TableView:
    """A loaded table set and why this process could not use it at all (empty: it may)."""

    tables: TableSet
    isa: str
    threads: int
    refused: list[str]
    vendor: str | None = None  # the CPU vendor asked for (None: a table file, on a host of its own vendor)

    @property
    def path(self) -> str:
        return self.tables.path

    @property
    def transfer(self) -> bool:
        return not self.refused and self.threads not in self.tables.tables


def open_table(path: str | None, threads: int | None = None, isa: str | None = None,
               vendor: str | None = None) -> TableView:
    """Load as kernels.install() does: rows of another torch release or template source are stale;
    a file is refused whole for another ISA class, vendor, thread count, torch or template; a
    directory (the shipped tables by default) gives its tables of the class and vendor (default:
    this host's), with thread transfer."""
    import kernels
    from kernels.provenance import template_hash, torch_version

    path = path or kernels.TABLES_DIR
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    current_torch, current_hash = torch_version(), template_hash()
    if os.path.isdir(path):
        isa, vendor = isa or kernels.host_isa(), vendor or kernels.host_vendor()
    try:
        tables = load_set(path, isa or "", current_torch, current_hash, vendor)
    except TableError as exc:
        raise UserError(str(exc)) from None
    isa = isa or next(iter(tables.tables.values())).isa  # a file: what it decides on a host of its own class
    return TableView(tables, isa, threads, set_problems(tables, isa, threads, current_torch, current_hash, vendor), vendor)


def decide(view: TableView, p: Plan) -> ModelCoverage:
    decisions = []
    for item in p.planned:
        q = item.problem
        if view.refused:
            choice, source, note = None, INDUCTOR, "table not used: " + "; ".join(view.refused)
        else:
            candidate, source, note = lookup_set(view.tables, view.threads, q.op, q.dtype, q.m, q.n, q.k, q.group_size)
            choice = candidate.id if candidate is not None else None
        decisions.append(Decision(item.layer.name, q.op, q.dtype, q.m, q.n, q.k, q.group_size, source, choice, note))
    return ModelCoverage(p.model.id, p.model.source, decisions, p.skipped)


def model_coverage(view: TableView, model: str | ModelDims, ms=DEFAULT_MS, ops=("int8", "int4"), dtype: str = "bf16",
                   group_size: int | None = 128, fused: bool = False) -> ModelCoverage:
    return decide(view, plan(model, ms, ops, dtype, group_size, view.threads, fused))


def overall(results: list[ModelCoverage]) -> dict:
    total = sum(len(r.decisions) for r in results)
    decided = sum(r.decided for r in results)
    sources = Counter()
    for r in results:
        sources.update(r.by_source())
    return {"models": len(results), "matmuls": total, "decided": decided,
            "share": round(decided / total, 4) if total else 0.0, "by_source": dict(sources.most_common())}


# --- rendering -----------------------------------------------------------------------------

def summary_line(r: ModelCoverage) -> str:
    sources = ", ".join(f"{s} {n}" for s, n in r.by_source().items())
    return f"{r.model}: {r.decided}/{len(r.decisions)} decided by the table ({100 * r.share:.1f}%); {sources}"


def print_decisions(r: ModelCoverage, view: TableView, console) -> None:
    from rich.markup import escape
    from rich.table import Table as RichTable

    table = RichTable(title=f"{r.model} on {view.path} ({view.isa}, {view.threads} threads)", title_justify="left")
    for col in ("layer", "op", "M", "N", "K", "group", "source", "choice", "why"):
        table.add_column(col, justify="right" if col in ("M", "N", "K") else "left")
    for d in r.decisions:
        table.add_row(d.layer, d.op, str(d.m), str(d.n), str(d.k), str(d.group_size or "-"), d.source,
                      escape(d.choice or "-"), escape(d.note))
    console.print(table)


def header_lines(view: TableView) -> list[str]:
    on = f" on {view.vendor} hosts" if view.vendor else ""
    lines = [f"table {t.path}: {t.isa}{'/' + t.vendor if t.vendor else ''}, {t.threads} threads, {len(t.entries)} entries; "
             f"asked for {view.isa}{on} at {view.threads} threads" for t in view.tables.tables.values()]
    if view.transfer:
        lines.append(f"thread transfer: no table for {view.threads} threads; thread-independent choices where "
                     f"the {', '.join(map(str, view.tables.tables))}-thread tables agree")
    lines += [f"refused: {reason}" for reason in view.refused]
    return lines


def cmd_coverage(args: argparse.Namespace) -> int:
    from rich.console import Console

    if bool(args.model) == bool(args.all):
        raise UserError("coverage: name one model (zoo id or config.json path) or give --all")
    if args.check_spec and not args.against:
        raise UserError("coverage: --check-spec needs --against OLD (the table set the new one replaces)")
    if args.sample_spec and args.sample < 1:
        raise UserError(f"coverage: --sample {args.sample}: draw at least one problem per op and M")
    if args.sample_spec and args.sample_max_weights is not None and args.sample_max_weights <= 0:
        raise UserError(f"coverage: --sample-max-weights {args.sample_max_weights:g}: a number of million weights above 0")
    view = open_table(args.table, args.threads, args.isa, args.vendor)
    models = list(load_zoo().values()) if args.all else [args.model]
    results = [model_coverage(view, m, args.m, args.ops, args.dtype, args.group_size, args.fused) for m in models]
    found = None
    if args.against:
        from farm.zoo import changes

        old_view = open_table(args.against, view.threads, view.isa, view.vendor)
        old = [model_coverage(old_view, m, args.m, args.ops, args.dtype, args.group_size, args.fused) for m in models]
        found = changes.changes(old, results)
        if args.check_spec:
            changes.write_check_spec(args.check_spec, changes.to_check(found, args.per_change), view, old_view.path)
    if args.sample_spec:
        from farm.zoo import sample

        cap = round(args.sample_max_weights * 1e6) if args.sample_max_weights is not None else None
        sample.write_sample_spec(args.sample_spec, sample.draw(results, args.sample, args.seed, cap), view, args.seed, cap)
    if args.json:
        doc = {"table": view.path, "isa": view.isa, "vendor": view.vendor, "threads": view.threads, "refused": view.refused,
               "tables": [t.path for t in view.tables.tables.values()], "transfer": view.transfer,
               "m": args.m, "ops": args.ops, "group_size": args.group_size, "fused": args.fused,
               "models": [r.summary() for r in results], "overall": overall(results)}
        if not args.all:
            doc["decisions"] = [asdict(d) for d in results[0].decisions]
        if found is not None:
            doc["changes"] = {"against": args.against, "by_kind": changes.by_kind(found),
                              "problems": [c.as_dict() for c in found]}
        print(json.dumps(doc))
        return 0
    console = Console(width=200)
    for line in header_lines(view):
        console.print(line, markup=False)
    if not args.all:
        print_decisions(results[0], view, console)
    for r in results:
        console.print(summary_line(r), markup=False)
        for line in r.skipped:
            console.print(f"  skipped {line}", markup=False)
    if args.all:
        total = overall(results)
        sources = ", ".join(f"{s} {n}" for s, n in total["by_source"].items())
        console.print(f"overall: {total['decided']}/{total['matmuls']} decided by the table "
                      f"({100 * total['share']:.1f}%) over {total['models']} models; {sources}", markup=False)
    if found is not None:
        kinds = changes.by_kind(found)
        console.print(f"against {args.against}: {sum(k['matmuls'] for k in kinds.values())} matmuls "
                      f"({len(found)} problems) decided differently", markup=False)
        for kind, n in kinds.items():
            console.print(f"  {n['matmuls']:5d} matmuls, {n['problems']:3d} problems: {kind}", markup=False)
        if args.check_spec:
            console.print(f"wrote {args.check_spec}: the problems to compile end to end before the new table ships",
                          markup=False)
    if args.sample_spec:
        console.print(f"wrote {args.sample_spec}: {args.sample} problems per op and M drawn from the matmuls above",
                      markup=False)
    return 0
