"""`farm fidelity SPEC --runs 2`: do the farm's decisions repeat on this host?

    farm fidelity jobs/sweeps/smoke.yaml --runs 2 --json

Measures the spec's problems of this host's ISA class `runs` times through `measure()` (run
after run, so each run is independent: other processes, other moments of the host), then
reports, as pure functions over the records:

- winner agreement on the keys where any run claims a margin beyond noise (a non-default
  winner: the farm's rule lets one win only beyond the interval and the A/A band);
- A/A statistics: how often the control's interval holds 1, how often the gate marked a record
  unreliable;
- between-process spread per key: ATen's per-process medians (how far one process is from
  another) and the best candidate's per-process speedups;
- wall time per problem and the timing share of it.

Not here yet (issue 11): the farm's speedup against the speedup delivered end to end.
"""

from __future__ import annotations

import time
from collections import defaultdict

from kernels.candidates import AA_CONTROL, ATEN

from farm.measure import stats
from farm.measure.store import problem_key
from farm.measure.timing import aa_offset


def _candidate(record: dict, cid: str | None) -> dict | None:
    return next((c for c in record["candidates"] if c["id"] == cid), None)


def claims(record: dict) -> bool:
    """The record claims a margin beyond noise: a candidate other than the default won."""
    return record["winner"] not in (None, ATEN)


def agreement(runs: list[list[dict]]) -> dict:
    """Winner agreement between runs on the keys where any run claims a margin beyond noise."""
    by_key: dict[str, list[str | None]] = defaultdict(list)
    claimed: set[str] = set()
    for records in runs:
        for record in records:
            key = problem_key(record["problem"])
            by_key[key].append(record["winner"])
            if claims(record):
                claimed.add(key)
    complete = {k: w for k, w in by_key.items() if len(w) == len(runs)}
    contested = sorted(k for k in claimed if k in complete)
    agree = [k for k in contested if len(set(complete[k])) == 1]
    return {"keys": len(complete), "claimed_keys": len(contested), "agree": len(agree),
            "agreement": len(agree) / len(contested) if contested else None,
            "all_keys_agree": sum(1 for w in complete.values() if len(set(w)) == 1),
            "disagreeing": {k: complete[k] for k in contested if k not in agree}}


def aa_summary(records: list[dict]) -> dict:
    """How often the A/A control's interval holds 1, and how many records the gate marked."""
    controls = [c for r in records if (c := _candidate(r, AA_CONTROL)) and c.get("speedup_ci95")]
    inside = sum(1 for c in controls if aa_offset(c["speedup_ci95"]) == 0)
    return {"records": len(records), "with_control": len(controls), "control_holds_1": inside,
            "share_holds_1": inside / len(controls) if controls else None,
            "unreliable": sum(1 for r in records if r.get("unreliable")),
            "median_band": stats.median([r["noise"]["band"] for r in records]) if records else None}


def spread(records: list[dict]) -> dict[str, dict]:
    """Per key: ATen's per-process medians over every process of every run (max/min - 1), and
    the best non-default candidate's per-process speedups."""
    by_key: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_key[problem_key(record["problem"])].append(record)
    out = {}
    for key, recs in sorted(by_key.items()):
        aten = [p["median_us"] for r in recs if (c := _candidate(r, ATEN)) for p in c.get("per_process") or []]
        best = _best_candidate(recs)
        speedups = [p["speedup"] for r in recs if (c := _candidate(r, best)) for p in c.get("per_process") or []
                    if p["speedup"] is not None]
        out[key] = {"processes": len(aten), "aten_us": [round(v, 1) for v in aten],
                    "aten_spread": max(aten) / min(aten) - 1 if aten else None,
                    "best": best, "best_speedups": [round(v, 3) for v in speedups],
                    "winners": [r["winner"] for r in recs]}
    return out


def _best_candidate(records: list[dict]) -> str | None:
    """The non-default candidate with the best median speedup over all records of a key."""
    scores: dict[str, list[float]] = defaultdict(list)
    for record in records:
        for c in record["candidates"]:
            if c["status"] == "ok" and c["id"] not in (ATEN, AA_CONTROL) and c["speedup_vs_aten"] is not None:
                scores[c["id"]].append(c["speedup_vs_aten"])
    return max(scores, key=lambda cid: stats.median(scores[cid]), default=None)


def cost(records: list[dict]) -> dict:
    """Wall time per problem and the share of it spent timing (the evidence)."""
    walls = [r["worker"]["wall_s"] for r in records if r.get("worker")]
    timing = [r["worker"]["timing_s"] for r in records if r.get("worker")]
    return {"wall_s_per_problem": sum(walls) / len(walls) if walls else None,
            "timing_share": sum(timing) / sum(walls) if walls and sum(walls) else None,
            "processes_per_problem": stats.median([r["worker"].get("processes", 1) for r in records]) if records else None}


def report(runs: list[list[dict]]) -> dict:
    """Everything above, from the runs' records (pure)."""
    flat = [r for records in runs for r in records]
    return {"runs": len(runs), "problems": len(runs[0]) if runs else 0, "agreement": agreement(runs),
            "aa": aa_summary(flat), "spread": spread(flat), "cost": cost(flat)}


def run(spec_path: str, runs: int = 2, limit: int | None = None, progress=None) -> tuple[dict, list[list[dict]]]:
    """Measure the spec's problems of this host's ISA class `runs` times; (report, records)."""
    from farm.errors import UserError
    from farm.measure.host import native_isa
    from farm.measure.manager import measure
    from farm.sweep.spec import load_spec

    spec = load_spec(spec_path)
    isa = native_isa()
    tasks = [t for t in spec.tasks if t.isa == isa][:limit]
    if not tasks:
        raise UserError(f"{spec_path}: no problem of this host's ISA class {isa}")
    out: list[list[dict]] = []
    for index in range(runs):
        records = []
        for task in tasks:
            start = time.perf_counter()
            records.append(measure(task.problem, grid=spec.space, protocol=spec.protocol, isa=isa))
            if progress:
                progress(f"run {index + 1}/{runs} {task.key}: {records[-1]['winner']} "
                         f"({time.perf_counter() - start:.1f} s)")
        out.append(records)
    return report(out), out


def render(rep: dict, console) -> None:
    a, aa, c = rep["agreement"], rep["aa"], rep["cost"]
    share = f"{a['agreement']:.0%}" if a["agreement"] is not None else "n/a"
    console.print(f"{rep['runs']} runs x {rep['problems']} problems: winners agree on {a['agree']}/{a['claimed_keys']} "
                  f"claimed keys ({share}); on {a['all_keys_agree']}/{a['keys']} keys in all")
    console.print(f"A/A: control holds 1 in {aa['control_holds_1']}/{aa['with_control']} records; "
                  f"{aa['unreliable']} unreliable; median band {aa['median_band']:.3f}")
    console.print(f"cost: {c['wall_s_per_problem']:.1f} s per problem, timing {c['timing_share']:.1%} of it, "
                  f"{c['processes_per_problem']:g} processes")
    for key, row in rep["spread"].items():
        aten_spread = f"{row['aten_spread']:.1%}" if row["aten_spread"] is not None else "n/a"
        console.print(f"  {key}: winners {row['winners']}, ATen spread {aten_spread} over {row['processes']} "
                      f"processes, {row['best']} per-process speedups {row['best_speedups']}")


def main_args(args) -> int:
    import json

    from rich.console import Console

    from farm.render import emit

    console = Console(stderr=True)
    rep, records = run(args.spec, args.runs, args.limit, console.print)
    if args.records:
        with open(args.records, "w") as f:
            for r in (r for rs in records for r in rs):
                f.write(json.dumps(r) + "\n")
    emit(rep, args.json, render)
    return 0


def register(sub) -> None:
    p = sub.add_parser("fidelity", help="measure a spec's problems twice: do the winners repeat? A/A, spread")
    p.add_argument("spec", help="sweep spec YAML (its problems of this host's ISA class)")
    p.add_argument("--runs", type=int, default=2, help="independent runs of every problem")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--records", default=None, help="also write every record as JSON lines here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=main_args)
