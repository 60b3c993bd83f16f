"""Human-readable views of records and tables (rich), kept apart from the data they show."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _interval(pair, spec: str = ".1f") -> str:
    return "-" if not pair else f"[{format(pair[0], spec)}, {format(pair[1], spec)}]"


def _contention(worker: dict) -> str:
    """Per process, the CPU time other work took from its timing (x: not used)."""
    def lost(figures: dict | None) -> float | None:  # farm.measure.contention.lost_share, read back
        if not figures or figures.get("runqueue_wait") is None:
            return None
        return figures["runqueue_wait"] + (figures.get("steal") or 0.0)

    shares = [(lost(p.get("contention")), p.get("used", True)) for p in worker.get("per_process", [])]
    if not any(share is not None for share, _ in shares):
        return ""
    return "; CPU time lost to other work per process: " + ", ".join(
        ("?" if share is None else f"{share:.1%}") + ("" if used else " (x)") for share, used in shares)


def record_table(record: dict) -> Table:
    p, host = record["problem"], record["host"]
    group = f" group={p['group_size']}" if p["group_size"] else ""
    emulated = " (emulated)" if host.get("emulated") else ""
    title = (f"{p['op']} {p['dtype']} M={p['m']} N={p['n']} K={p['k']}{group}, {p['threads']} threads, "
             f"{p['weights']} weights on {host.get('isa')}{emulated}")
    table = Table(title=title, title_justify="left")
    for name, justify in (("candidate", "left"), ("status", "left"), ("median us", "right"), ("95% CI us", "right"),
                          ("speedup vs aten", "right"), ("95% CI", "right"), ("compile s", "right"),
                          ("faults/call", "right"), ("note", "left")):
        table.add_column(name, justify=justify)
    for c in record["candidates"]:
        mark = " *" if c["id"] == record["winner"] else ""
        note = escape((c.get("error") or "")[:90])
        table.add_row(escape(c["id"] + mark), c["status"], _fmt(c["median_us"]), _interval(c["ci95_us"]),
                      _fmt(c["speedup_vs_aten"], ".3f"), _interval(c["speedup_ci95"], ".3f"), _fmt(c["compile_s"], ".2f"),
                      _fmt(c.get("faults_per_call"), ".0f"), note)
    noise = record["noise"]
    table.caption = (f"winner: {escape(str(record['winner']))} ({escape(record['winner_rule'])}); A/A noise band ±{noise['band']:.3f}; "
                     f"{record['protocol']['rounds']} rounds; worker wall {record['worker']['wall_s']:.1f} s"
                     + _contention(record["worker"]))
    table.caption_justify = "left"
    return table


def print_record(record: dict, console: Console | None = None) -> None:
    # Wide enough for every column when piped (rich defaults to 80 columns off a terminal).
    (console or Console(width=200)).print(record_table(record))


def emit(report: dict, as_json: bool, render_fn) -> None:
    """A bench report as one JSON object, or through its rich renderer."""
    import json

    if as_json:
        print(json.dumps(report))
    else:
        render_fn(report, Console(width=220))
