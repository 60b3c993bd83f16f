"""`farm bench alloc`: what the memory allocator costs a candidate's call, side by side.

A `dq` candidate materialises the dense weight in every call (kernels.candidates.dense_temp_bytes:
up to 4 x N x K bytes), and Inductor allocates that buffer in every call. glibc serves an
allocation above its mmap threshold (dynamic, but never above 32 MiB on 64-bit) with a fresh
mmap and unmaps it on free, so every call faults in, and the kernel zeroes, each 4 KiB page of
it again. Smaller buffers come from the heap once the threshold has risen, and stay mapped.

Each problem's candidates are compiled once (one shared Inductor cache per candidate, so the
other processes hit it) and timed in fresh processes under two allocator settings, alternated
round by round so that host drift falls on both:

- glibc:    the process as it starts (the farm's workers and a user's process alike);
- retained: MALLOC_MMAP_MAX_=0 with the trim threshold and top pad at 1 GiB: every allocation
            comes from the heap and is never given back, so the pages stay mapped between calls.

Each process reports its median time per call and the minor page faults per call (getrusage);
the ratio glibc / retained per round, with its median and range, says what the allocator costs.
ATen's call, which allocates only its output, is the control: its ratio must be ~1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from farm.errors import UserError
from farm.measure import stats

GIB = 1 << 30
SETTINGS = {
    "glibc": {},
    "retained": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(GIB), "MALLOC_TOP_PAD_": str(GIB)},
}
ALLOC_ENV = tuple(sorted({name for env in SETTINGS.values() for name in env}))


def parse_shape(text: str) -> tuple[str, int, int, int]:
    """'int8:128:4096:4096' -> ('int8', 128, 4096, 4096)."""
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in ("int8", "int4") or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        raise UserError(f"--shapes: {text!r} is not OP:M:N:K with OP int8 or int4 and positive M, N, K")
    return parts[0], int(parts[1]), int(parts[2]), int(parts[3])


def child(op: str, m: int, n: int, k: int, group: int | None, candidate: str, threads: int, cache_dir: str,
          samples: int, min_sample_s: float) -> dict:
    """In a fresh process: compile (a cache hit after the first process), then time."""
    import time

    import torch

    from kernels.candidates import parse
    from farm.measure.compiled import compile_candidate
    from farm.measure.problem import Problem, make_operands
    from farm.measure.timing import _time_warm

    torch.set_num_threads(threads)
    problem = Problem(op, "bf16", m, n, k, group, threads=threads)
    operands = make_operands(problem)
    compiled = compile_candidate(problem, operands, parse(candidate), cache_dir)
    fn, x = compiled.fn, operands.x
    with torch.no_grad():
        start, calls = time.perf_counter(), 0
        while calls < 3 or time.perf_counter() - start < min_sample_s:  # warm-up, and calls per sample
            fn(x)
            calls += 1
        # The farm's warm timing: an untimed call, then `calls` timed ones, per sample.
        batches = [_time_warm(fn, x, calls) for _ in range(samples)]
    times = [seconds * 1e6 for seconds, _ in batches]
    faults = sum(batch_faults for _, batch_faults in batches)
    return {"median_us": stats.median(times), "faults_per_call": faults / (samples * calls),
            "calls_per_sample": calls, "kernel": compiled.kernel}


def _run_child(setting: str, args: dict) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ALLOC_ENV}
    env.update(SETTINGS[setting])
    code = ("import json, sys; from farm.bench.alloc import child; "
            "print(json.dumps(child(**json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{setting} process for {args['candidate']} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_alloc(shapes: list[tuple[str, int, int, int]], candidates: list[str], threads: int, rounds: int,
                group: int = 128, samples: int = 15, min_sample_s: float = 0.05) -> dict:
    from kernels.candidates import dense_temp_bytes, parse

    rows = []
    with tempfile.TemporaryDirectory(prefix="farm-alloc-") as caches:
        for op, m, n, k in shapes:
            for cid in candidates:
                args = {"op": op, "m": m, "n": n, "k": k, "group": group if op == "int4" else None,
                        "candidate": cid, "threads": threads, "cache_dir": os.path.join(caches, f"{op}-{m}-{n}-{k}-{cid}"),
                        "samples": samples, "min_sample_s": min_sample_s}
                _run_child("glibc", args)  # compiles into the shared cache; not timed
                runs = {setting: [] for setting in SETTINGS}
                for r in range(rounds):
                    order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
                    for setting in order:
                        runs[setting].append(_run_child(setting, args))
                ratios = [g["median_us"] / t["median_us"] for g, t in zip(runs["glibc"], runs["retained"])]
                rows.append({
                    "op": op, "m": m, "n": n, "k": k, "candidate": cid,
                    "temp_mib": round(dense_temp_bytes(parse(cid), "bf16", n, k) / (1 << 20), 1),
                    "settings": {s: {"median_us": stats.median([p["median_us"] for p in ps]),
                                     "faults_per_call": stats.median([p["faults_per_call"] for p in ps]),
                                     "processes": ps} for s, ps in runs.items()},
                    "glibc_over_retained": {"median": stats.median(ratios), "min": min(ratios), "max": max(ratios),
                                            "rounds": ratios},
                })
    return {"threads": threads, "rounds": rounds, "settings": SETTINGS, "rows": rows}


def render(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"allocator cost per call, {report['threads']} threads, {report['rounds']} process pairs "
                        "(glibc | retained: MALLOC_MMAP_MAX_=0, trim threshold and top pad 1 GiB)", title_justify="left")
    for col in ("op", "M", "N", "K", "candidate", "temp MiB", "glibc us", "faults/call", "retained us",
                "faults/call ", "glibc / retained [min, max]"):
        table.add_column(col, justify="left" if col in ("op", "candidate") else "right")
    for r in report["rows"]:
        g, t, q = r["settings"]["glibc"], r["settings"]["retained"], r["glibc_over_retained"]
        table.add_row(r["op"], str(r["m"]), str(r["n"]), str(r["k"]), r["candidate"], f"{r['temp_mib']:.1f}",
                      f"{g['median_us']:.0f}", f"{g['faults_per_call']:.0f}", f"{t['median_us']:.0f}",
                      f"{t['faults_per_call']:.0f}", f"{q['median']:.3f} [{q['min']:.3f}, {q['max']:.3f}]")
    console.print(table)


def cmd_alloc(args) -> int:
    from farm.measure.manager import check_candidate_ids
    from farm.render import emit

    shapes = [parse_shape(s) for s in args.shapes]
    check_candidate_ids(args.candidates, "--candidates")
    if args.rounds < 1:
        raise UserError("--rounds must be at least 1")
    emit(bench_alloc(shapes, args.candidates, args.threads, args.rounds), args.json, render)
    return 0


def register(sub) -> None:
    p = sub.add_parser("alloc", help="what glibc's per-call mmap of large temporaries costs a candidate (dq's dense weight)")
    p.add_argument("--shapes", nargs="+", required=True, help="OP:M:N:K, e.g. int8:128:4096:4096")
    p.add_argument("--candidates", nargs="+", default=["aten", "dq[fp32]"], help="aten is the control")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="process pairs (glibc, retained), alternated")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_alloc)
