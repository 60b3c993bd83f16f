"""The nightly report: Markdown with PNG plots (matplotlib), one section per ISA class.

Each plot carries the values it draws in its PNG metadata (key `kernel-farm-data`), read
back from the drawn artists, so a test can check that the picture shows the right numbers.
"""

from __future__ import annotations

import json
import os

from farm.tables.diff import key_text, summary
from farm.measure.store import Store

PLOT_DATA_KEY = "kernel-farm-data"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no screen on CI hosts
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={PLOT_DATA_KEY: json.dumps(data)})


def speedup_plot(old: dict | None, new: dict | None, title: str, path: str) -> dict:
    """Grouped bars: speedup of the table's winner over ATen per problem, old vs new."""
    plt = _plt()
    keys = sorted({key_text(e["key"]) for doc in (old, new) if doc for e in doc["entries"]})
    series = {}
    for name, doc in (("shipped", old), ("new", new)):
        index = {key_text(e["key"]): e["speedup_vs_aten"] for e in (doc or {}).get("entries", [])}
        series[name] = [index.get(k, float("nan")) for k in keys]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(keys) + 2), 4.5))
    width = 0.4
    drawn = {}
    for offset, (name, color) in zip((-width / 2, width / 2), (("shipped", "#8c8c8c"), ("new", "#1f77b4"))):
        bars = ax.bar([i + offset for i in range(len(keys))], series[name], width, label=name, color=color)
        drawn[name] = [round(float(b.get_height()), 4) for b in bars]  # what is really drawn
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)), keys, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over ATen (winner)")
    ax.set_title(title)
    ax.legend()
    data = {"keys": keys, **drawn}
    _save(fig, path, data)
    plt.close(fig)
    return data


def trend_plot(history: dict[str, list[tuple[str, float]]], title: str, path: str) -> dict:
    """Winner time per night for the keys that changed (last N nightly runs)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = {}
    for key, points in sorted(history.items()):
        (line,) = ax.plot(range(len(points)), [v for _, v in points], marker="o", label=key)
        drawn[key] = [round(float(v), 3) for v in line.get_ydata()]
    ax.set_xlabel("night (oldest first)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("winner median time (us)")
    ax.set_title(title)
    if drawn:
        ax.legend(fontsize=7)
    _save(fig, path, {"series": drawn})
    plt.close(fig)
    return {"series": drawn}


def read_plot_data(path: str) -> dict:
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text[PLOT_DATA_KEY])


def key_history(store: Store, isa: str, keys: set[str], nights: int) -> dict[str, list[tuple[str, float]]]:
    """key -> [(run started, winner median us)] over the last `nights` nightly runs."""
    runs = store.runs("nightly")[-nights:]
    out: dict[str, list[tuple[str, float]]] = {}
    for run in runs:
        for record in store.records(run["id"], isa):
            label = key_text(record["problem"])
            if label not in keys or record.get("winner") is None:
                continue
            winner = next(c for c in record["candidates"] if c["id"] == record["winner"])
            out.setdefault(label, []).append((run["started_at"], winner["median_us"]))
    return out


def _fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:.3f}"


def _confidence_text(c: dict | None) -> str:
    """One decision's confidence: the leader's lead over the second and the processes agreeing."""
    if c is None:
        return "no earlier record"
    if c["lead"] is None:
        return f"table: `{c['winner']}`; {c.get('rule', 'no lead measured')}"
    lo, hi = c["lead_ci95"]
    state = "decided" if c["decided"] else ("unreliable" if c["unreliable"] else "undecided")
    return (f"`{c['leader']}` over `{c['second']}` {c['lead']:.3f} [{lo:.3f}, {hi:.3f}] (band {c['band']:.3f}), "
            f"{c['processes_agree']}/{c['processes']} processes, {c['rounds']} rounds; table: `{c['winner']}`; **{state}**")


def _moved_text(m: dict | None) -> str:
    if m is None:
        return "-"
    low = "winner or runner-up changed" if m["lead_low"] is None else f"lower bound {m['lead_low']:+.3f}"
    return f"{low}; processes agreeing {m['share']:+.0%}" + ("; **winner changed**" if m["winner_changed"] else "")


def race_lines(races: list[dict], budget_s: float) -> list[str]:
    """The racing section: each raced key's confidence before and after, and what was pooled."""
    if not races:
        return []
    lines = ["## Close calls raced first", "",
             f"{len(races)} key(s) raced (budget {budget_s:g} s). Confidence: the fastest candidate's paired lead over "
             "the second per round with its 95% interval, and the processes where that lead is beyond the process's "
             "own A/A band; decided when it is beyond the noise in enough processes.", "",
             "| ISA | problem | why raced | passes | records pooled | before | after | moved | outcome |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in races:
        lines.append(f"| {r['isa']} | `{r['key']}` | {r['why']} | {r['passes']} | {len(r['pooled'])} | "
                     f"{_confidence_text(r['before'])} | {_confidence_text(r['after'])} | {_moved_text(r['moved'])} | "
                     f"{r['outcome']} |")
    lines.append("")
    for r in races:
        if not r["pooled"] and not r["left_out"]:
            continue
        lines.append(f"`{r['key']}` ({r['isa']}), pooled:")
        lines += [f"- {p['source']}: run `{p['run_id']}`, host {p['host']}, {p['measured_at']}, {p['processes']} "
                  f"process(es), {p['rounds']} rounds" for p in r["pooled"]]
        lines += [f"- left out, {p['source']}: run `{p['run_id']}`, host {p['host']}: {p['why']}" for p in r["left_out"]]
        lines.append("")
    return lines


def write_report(result, shipped: dict, new_tables: dict, store: Store, nights: int) -> str:
    """report.md in result.out; returns its path. `shipped` and `new_tables` are keyed by the
    table's name, "isa/vendor/threads", as result.changes is."""
    lines = ["# kernel-farm nightly", "",
             f"Exit code **{result.exit_code}** (0 nothing significant, 10 regressions, 20 failures, 30 ISA classes skipped). "
             f"Run `{result.run_id or 'none: nothing to measure'}`, wall {result.wall_s:.0f} s. "
             f"Raw rows: store `{store.path}`, `diff.json`.", ""]
    if result.failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in result.failures] + [""]
    if result.skipped_classes:
        lines += ["## ISA classes skipped (no node serves them)", ""]
        lines += [f"- {isa}: {n} rows not measured" for isa, n in sorted(result.skipped_classes.items())] + [""]
    lines += race_lines(result.races, result.race_budget_s)
    measured = [s for s in result.selections if s.measure]
    lines += ["## What was re-measured and why", "",
              f"{len(measured)} of {len(result.selections)} rows were re-measured; the rest were fresh.", ""]
    if measured:
        lines += ["| ISA | problem | layer | reason |", "|---|---|---|---|"]
        lines += [f"| {s.isa} | `{s.key}` | {s.label} | {s.reason} |" for s in measured]
        lines.append("")
    for name, changes in sorted(result.changes.items()):
        isa, vendor, threads = name.split("/")
        old = shipped.get(name)
        lines += [f"## {isa}, {vendor} hosts, {threads} threads", "", f"Changes: {summary(changes)}", ""]
        checks = [c for c in result.shipped_checks if (c["isa"], c.get("vendor")) == (isa, vendor)]
        notable = [c for c in checks if c["kind"] != "unchanged"]
        lines += ["### What ships, measured again", ""]
        if notable:
            lines += ["| problem | shipped winner | speedup shipped | speedup now (95% CI) | time now/shipped | ATen drift | verdict |",
                      "|---|---|---|---|---|---|---|"]
            for c in sorted(notable, key=lambda c: c.get("speedup_change") or 0):
                ci = c.get("new_speedup_ci95") or [float("nan")] * 2
                lines.append(f"| {key_text(c['key'])} | `{c['winner']}` | {c['old_speedup']:.3f} | "
                             f"{c.get('new_speedup', float('nan')):.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {_fmt_ratio(c.get('ratio'))} "
                             f"| {_fmt_ratio(c.get('aten_drift'))} | **{c['kind']}** |")
        else:
            drift = [c["aten_drift"] for c in checks if c.get("aten_drift")]
            moved = f" (the host itself moved: ATen x{min(drift):.3f}..x{max(drift):.3f})" if drift else ""
            lines.append(f"No significant change in {len(checks)} re-measured shipped winners{moved}.")
        lines.append("")
        ordered = [c for c in changes if c.kind != "unchanged"]
        lines += ["### Table changes (regressions and improvements first)", ""]
        if ordered:
            lines += ["| kind | problem | old winner | new winner | time new/old | speedup old -> new | detail |",
                      "|---|---|---|---|---|---|---|"]
            for c in ordered:
                lines.append(f"| **{c.kind}** | {c.key} | `{c.old_winner}` | `{c.new_winner}` | {_fmt_ratio(c.ratio)} | "
                             f"{_fmt_ratio(c.old_speedup)} -> {_fmt_ratio(c.new_speedup)} | {c.detail} |")
        else:
            lines.append("No change.")
        lines.append("")
        plot = os.path.join("plots", f"{isa}-{vendor}-t{threads}-speedup.png")
        speedup_plot(old, new_tables.get(name), f"{isa}, {vendor} hosts, {threads} threads: winner speedup over ATen",
                     os.path.join(result.out, plot))
        lines += [f"![speedup over ATen, shipped vs new]({plot})", ""]
        remeasured = {key_text(r["problem"]) for r in store.records(result.run_id, isa)} if result.run_id else set()
        if remeasured:
            history = key_history(store, isa, remeasured, nights)
            if history:
                trend = os.path.join("plots", f"{isa}-{vendor}-t{threads}-trend.png")
                trend_plot(history, f"{isa}: winner time over the last {nights} nights", os.path.join(result.out, trend))
                lines += [f"![trend]({trend})", ""]
        if name in result.tables:
            lines += [f"New table: `{os.path.relpath(result.tables[name], result.out)}`", ""]
    path = os.path.join(result.out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
