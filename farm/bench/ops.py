"""Benchmarks that prove (or disprove) the tables' value, measured side by side in one process.

    farm bench kernels --shapes jobs/sweeps/llm.yaml    default | max-autotune | table | oracle
    farm bench model --model llama-block --quant int4    a decoder block: token latency, compile time
    farm bench roofline                                  bandwidth, peak, each winner's distance

Every variant of a problem is compiled in this process (own code object each), checked
against eager, then timed interleaved with the farm's protocol (shuffled rounds, paired
ratios, bootstrap intervals). Ratios are what to read: absolute times move with the host.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import replace

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kernels.candidates import AA_CONTROL, parse, space

from farm.measure import stats
from farm.measure.compiled import (TOLERANCE, CompiledCandidate, _run_and_get_code, compile_candidate, first_output,
                                   fresh_module, graphs_compiled, relative_error)
from farm.errors import UserError
from farm.measure.problem import Operands, Problem, make_operands, stack_size, validate
from farm.measure.protocol import Protocol
from farm.render import emit
from farm.measure.timing import run_rounds

VARIANTS = ("default", "max-autotune", "table")
# A share of the oracle's lead over max-autotune is reported only where there is a lead to share:
# below 2% (the low end of these hosts' A/A noise) the ratio of two logs is noise over noise.
MIN_LEAD = 0.02


def _noop(**_event) -> None:
    pass


def compile_variant(problem: Problem, operands, variant: str, table: str | None, cache_dir: str) -> CompiledCandidate:
    """Inductor as a user runs it: default config, max-autotune, or default with the table."""
    import kernels
    from kernels import lowering
    from torch._inductor import config

    os.makedirs(cache_dir, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    kernels.uninstall()
    if variant == "table":
        result = kernels.install(table, strict=True)
        if not result.active:
            raise UserError(f"table {table} is not usable here: {result.reason}")
    module = fresh_module(problem, operands)
    lowering.clear_decisions()
    start = time.perf_counter()
    with torch.no_grad(), config.patch(freezing=True, force_disable_caches=True, max_autotune=variant == "max-autotune"):
        fn = torch.compile(module, fullgraph=True, dynamic=False)
        output, _ = _run_and_get_code(fn, operands.x)
    compiled = CompiledCandidate(parse("aten"), fn, time.perf_counter() - start, first_output(output),
                                 decisions=[d.as_dict() for d in lowering.decisions()])
    kernels.uninstall()
    return compiled


def _summary_of(samples: list[float], reference: list[float]) -> dict:
    micro = [t * 1e6 for t in samples]
    speedups = stats.paired_speedups(reference, samples)
    return {"median_us": stats.median(micro), "ci95_us": list(stats.bootstrap_ci(micro)),
            "speedup_vs_default": stats.median(speedups), "speedup_ci95": list(stats.bootstrap_ci(speedups))}


def prepare(problem: Problem, protocol: Protocol) -> tuple[Operands, torch.Tensor]:
    """Validate `problem`, run this process at its thread count, and make its operands and the
    eager reference every compiled variant is checked against."""
    validate(problem)
    torch.set_num_threads(problem.threads)  # a table answers for its own thread count
    operands = make_operands(problem, seed=protocol.seed)
    with torch.no_grad():
        reference = operands.call_eager(problem)
    return operands, reference


def compile_checked(problem: Problem, operands: Operands, reference: torch.Tensor, variant: str, table: str | None,
                    cache_dir: str) -> tuple[CompiledCandidate, float]:
    """compile_variant, then (the compiled variant, its relative error); a wrong result raises."""
    c = compile_variant(problem, operands, variant, table, cache_dir)
    err = relative_error(c.output, reference)
    if err > TOLERANCE[problem.dtype]:
        raise RuntimeError(f"{problem.label()} compiled with the {variant}: wrong result (relative error {err:.3g})")
    return c, err


def time_interleaved(fns: dict, problem: Problem, operands: Operands, protocol: Protocol) -> dict[str, list[float]]:
    """Per-round seconds of every callable, interleaved with the farm's protocol in the problem's
    weight state; a graph compiled while timing means some callable did not run its own kernel."""
    return time_interleaved_counted(fns, problem, operands, protocol)[0]


def time_interleaved_counted(fns: dict, problem: Problem, operands: Operands,
                             protocol: Protocol) -> tuple[dict[str, list[float]], dict[str, float]]:
    """time_interleaved, and each callable's minor page faults per timed call."""
    from farm.measure.host import profile
    from farm.measure.timing import make_flush

    flush = make_flush(profile().l3_bytes) if problem.flushed else None
    before = graphs_compiled()
    with torch.no_grad():
        samples, _, faults = run_rounds(fns, operands.x, protocol, _noop, flush, stack_size(problem))
    if graphs_compiled() != before:
        raise RuntimeError("a variant recompiled while timing: it would not be the kernel it claims")
    return samples, faults


def bench_problem(problem: Problem, table: str, grid: str = "pruned", protocol: Protocol | None = None) -> dict:
    """All four variants of one problem, timed interleaved in this process."""
    protocol = protocol or Protocol()
    operands, reference = prepare(problem, protocol)
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as workdir:  # the loaded kernels outlive their files
        return _bench_problem_in(workdir, problem, operands, reference, table, grid, protocol)


def _bench_problem_in(workdir: str, problem: Problem, operands: Operands, reference: torch.Tensor, table: str,
                      grid: str, protocol: Protocol) -> dict:
    fns, compile_s, errors, decisions = {}, {}, {}, {}
    for variant in VARIANTS:
        c, err = compile_checked(problem, operands, reference, variant, table, os.path.join(workdir, variant))
        fns[variant], compile_s[variant], errors[variant], decisions[variant] = c.fn, c.compile_s, err, c.decisions
    from kernels import lowering

    for cand in space(problem.threads, grid, problem.op):
        if cand.id == AA_CONTROL:
            continue
        try:
            c = compile_candidate(problem, operands, cand, os.path.join(workdir, f"c{len(fns)}"))
        except Exception:  # unsupported or failing candidates cannot be the oracle
            continue
        finally:
            lowering.unregister()
        if relative_error(c.output, reference) <= TOLERANCE[problem.dtype]:
            fns[cand.id] = c.fn
    samples = time_interleaved(fns, problem, operands, protocol)
    base = samples["default"]
    results = {name: _summary_of(samples[name], base) for name in fns}
    candidates = {k: v for k, v in results.items() if k not in VARIANTS}
    oracle = min(candidates, key=lambda k: candidates[k]["median_us"])
    table_vs_oracle = stats.paired_speedups(samples[oracle], samples["table"])
    table_vs_ma = stats.paired_speedups(samples["max-autotune"], samples["table"])
    oracle_vs_ma = stats.paired_speedups(samples["max-autotune"], samples[oracle])
    aa_noise = results.get("aten", {}).get("speedup_ci95", [1, 1])
    band = max(abs(aa_noise[1] - 1), abs(1 - aa_noise[0]))  # ATen vs default (= ATen) is an A/A pair
    oracle_gain = results[oracle]["speedup_vs_default"]
    table_gain = results["table"]["speedup_vs_default"]
    ratio_ci = stats.bootstrap_ci(table_vs_oracle)
    return {
        "problem": problem.as_dict(),
        "variants": {v: {**results[v], "compile_s": compile_s[v], "max_rel_err": errors[v]} for v in VARIANTS},
        "table_choice": [d["candidate"] for d in decisions["table"]],
        "oracle": {"id": oracle, **results[oracle]},
        "table_vs_oracle": stats.median(table_vs_oracle), "table_vs_oracle_ci95": list(ratio_ci),
        "table_vs_max_autotune": stats.median(table_vs_ma), "table_vs_max_autotune_ci95": list(stats.bootstrap_ci(table_vs_ma)),
        "oracle_vs_max_autotune": stats.median(oracle_vs_ma),
        "oracle_vs_max_autotune_ci95": list(stats.bootstrap_ci(oracle_vs_ma)),
        "noise_band": band,
        "oracle_beats_default": results[oracle]["speedup_ci95"][0] > 1 + band,
        "gain_available": oracle_gain - 1, "gain_captured": table_gain - 1,
        "table_within_noise_of_oracle": _within_noise(oracle, decisions["table"], ratio_ci, band),
        "candidates": candidates,
        "rounds": len(base),
    }


def _within_noise(oracle: str, table_decisions: list[dict], ratio_ci: tuple[float, float], band: float) -> bool:
    """The table picked the oracle itself, or oracle/table time is within the A/A noise of 1."""
    chosen = {d["candidate"] or "aten" for d in table_decisions}  # no entry: Inductor's default, ATen
    return oracle in chosen or ratio_ci[1] >= 1 - band


def summarize(rows: list[dict]) -> dict:
    """The issues' targets, computed over all problems, and per op and M (`by_group`)."""
    summary = _summary_of_rows(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["problem"]["op"], r["problem"]["m"]), []).append(r)
    if len(groups) > 1:
        summary["by_group"] = {f"{op} M={m}": _summary_of_rows(groups[op, m], brief=True) for op, m in sorted(groups)}
    return summary


def _summary_of_rows(rows: list[dict], brief: bool = False) -> dict:
    table_vs_default = [r["variants"]["table"]["speedup_vs_default"] for r in rows]
    table_vs_ma = [r["table_vs_max_autotune"] for r in rows]
    slower = [r for r in rows if r["variants"]["table"]["speedup_ci95"][1] < 1 - r["noise_band"]
              or r["table_vs_max_autotune_ci95"][1] < 1 - r["noise_band"]]
    gains = [r for r in rows if r["oracle_beats_default"]]
    captured = [r["gain_captured"] / r["gain_available"] for r in gains if r["gain_available"] > 0]
    out = {
        "problems": len(rows),
        "geomean_table_vs_default": stats.geomean(table_vs_default),
        "geomean_table_vs_max_autotune": stats.geomean(table_vs_ma),
        "worst_table_vs_default": min(table_vs_default),
        "problems_slower_beyond_noise": len(slower),
    }
    if all("oracle_vs_max_autotune" in r for r in rows):  # reports written before it lack the field
        oracle_vs_ma = stats.geomean([r["oracle_vs_max_autotune"] for r in rows])
        out["geomean_oracle_vs_max_autotune"] = oracle_vs_ma
        # of the oracle's lead over max-autotune, the share the table keeps (in geomean, log scale)
        out["share_of_oracle_lead_over_max_autotune_captured"] = (
            math.log(out["geomean_table_vs_max_autotune"]) / math.log(oracle_vs_ma)
            if oracle_vs_ma > 1 + MIN_LEAD else None)
    out["geomean_oracle_vs_default"] = stats.geomean([r["oracle"]["speedup_vs_default"] for r in rows])
    if brief:
        return out
    compile_default = [r["variants"]["default"]["compile_s"] for r in rows]
    return {
        **out,
        "problems_with_gain_available": len(gains),
        "geomean_gain_available": stats.geomean([1 + r["gain_available"] for r in gains]) if gains else None,
        "geomean_gain_captured": stats.geomean([1 + r["gain_captured"] for r in gains]) if gains else None,
        "min_share_of_gain_captured": min(captured) if captured else None,
        "share_within_noise_of_oracle": sum(bool(r["table_within_noise_of_oracle"]) for r in rows) / len(rows),
        "compile_table_over_default": stats.geomean([r["variants"]["table"]["compile_s"] / d for r, d in zip(rows, compile_default)]),
        "compile_max_autotune_over_default": stats.geomean([r["variants"]["max-autotune"]["compile_s"] / d
                                                            for r, d in zip(rows, compile_default)]),
    }


def _problems_from(shapes: str | None, threads: int, limit: int | None, isa: str | None = None,
                   ms: list[int] | None = None) -> list[Problem]:
    """The spec's problems for ISA class `isa` (None: all), optionally only the M buckets `ms`."""
    from farm.sweep.spec import load_spec

    if shapes is None:
        return [Problem("int8", "bf16", 32, 4096, 4096, threads=threads)]
    tasks = [t for t in load_spec(shapes).tasks if (isa is None or t.isa == isa) and (not ms or t.problem.m in ms)]
    if not tasks:
        raise UserError(f"--shapes {shapes}: no problem for ISA class {isa}" + (f" with M in {ms}" if ms else ""))
    problems = list(dict.fromkeys(replace(t.problem, threads=threads) for t in tasks))
    return problems[:limit] if limit else problems


def render_kernels(report: dict, console: Console) -> None:
    table = Table(title="farm bench kernels: speedup over Inductor's default (paired, 95% CI)", title_justify="left")
    for col in ("problem", "max-autotune", "table", "oracle", "table choice", "table/oracle", "compile s def|MA|table"):
        table.add_column(col)
    for r in report["rows"]:
        p, v = r["problem"], r["variants"]
        fmt = lambda d: f"{d['speedup_vs_default']:.3f} [{d['speedup_ci95'][0]:.2f},{d['speedup_ci95'][1]:.2f}]"  # noqa: E731
        table.add_row(f"{p['op']} {p['dtype']} M={p['m']} N={p['n']} K={p['k']}", fmt(v["max-autotune"]), fmt(v["table"]),
                      f"{escape(r['oracle']['id'])} {r['oracle']['speedup_vs_default']:.3f}",
                      escape(",".join(c or "inductor" for c in r["table_choice"])), f"{r['table_vs_oracle']:.3f}",
                      f"{v['default']['compile_s']:.1f}|{v['max-autotune']['compile_s']:.1f}|{v['table']['compile_s']:.1f}")
    console.print(table)
    console.print_json(json.dumps(report["summary"]))


def cmd_kernels(args) -> int:
    import kernels

    table = args.table or kernels.shipped_table(threads=args.threads)
    protocol = Protocol(min_rounds=args.rounds, max_rounds=max(args.rounds, 21))
    rows = []
    isa = None if args.isa == "all" else (args.isa or kernels.host_isa())
    for problem in _problems_from(args.shapes, args.threads or torch.get_num_threads(), args.limit, isa, args.m):
        rows.append(bench_problem(problem, table, args.grid, protocol))
        Console(stderr=True).print(f"benched {problem.label()}")
    report = {"table": table, "rows": rows, "summary": summarize(rows)}
    emit(report, args.json, render_kernels)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: kernels vs default/max-autotune/oracle, a model block, roofline")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    k = bench_sub.add_parser("kernels", help="per problem: default | max-autotune | table | oracle")
    k.add_argument("--shapes", default=None, help="a sweep spec whose problems to bench (default: int8 M=32 N=K=4096)")
    k.add_argument("--table", default=None, help="table to bench (default: the shipped one for this host)")
    k.add_argument("--grid", default="pruned", choices=["minimal", "pruned", "exhaustive"])
    k.add_argument("--threads", type=int, default=None)
    k.add_argument("--rounds", type=int, default=11)
    k.add_argument("--limit", type=int, default=None, help="bench only the first N problems")
    k.add_argument("--isa", default=None, help="bench the spec's problems of this ISA class (default: this host's; 'all')")
    k.add_argument("--m", type=int, nargs="+", default=None, help="only these M buckets")
    k.add_argument("--json", action="store_true")
    k.set_defaults(fn=cmd_kernels)
    from farm.bench import alloc, compile_time, decode, fidelity, fuzz, model as bench_model, roofline

    bench_model.register(bench_sub)
    roofline.register(bench_sub)
    decode.register(bench_sub)
    fuzz.register(bench_sub)
    compile_time.register(bench_sub)
    alloc.register(bench_sub)
    fidelity.register(sub)  # a top-level command: `farm fidelity SPEC`
