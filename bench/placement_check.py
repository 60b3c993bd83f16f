"""Same choice, two compiles: is the speed the kernel's or its weights' placement?

Compiles one problem with Inductor's default, with a table, and twice as the forced `cpp`
candidate; prints each one's generated kernel (farm.measure.compiled.kernel_summary) and times
all four interleaved in one process (farm.bench.ops.time_interleaved), paired against the default.

    python bench/placement_check.py OP M N K THREADS WEIGHTS TABLE
    python bench/placement_check.py int8 1 12288 4096 1 model kernels/tables
"""

from __future__ import annotations

import os
import sys
import tempfile
from unittest import mock

import farm.bench.ops as ops
from farm.measure import stats
from farm.measure.compiled import _run_and_get_code, compile_candidate, kernel_summary
from farm.measure.problem import Problem
from farm.measure.protocol import Protocol
from kernels import lowering
from kernels.candidates import parse


def main(argv: list[str]) -> None:
    op, m, n, k, threads, weights, table = argv
    problem = Problem(op, "bf16", int(m), int(n), int(k), 128 if op == "int4" else None, int(threads), weights)
    protocol = Protocol(min_rounds=21, max_rounds=41)
    operands, _ = ops.prepare(problem, protocol)
    work = tempfile.mkdtemp(prefix="placement-check-")
    fns = {}
    for variant in ("default", "table"):
        sources: list[str] = []

        def keep_code(fn, *args):  # compile_variant drops the generated code; keep it here
            output, code = _run_and_get_code(fn, *args)
            sources.extend(code)
            return output, code

        with mock.patch.object(ops, "_run_and_get_code", keep_code):
            compiled = ops.compile_variant(problem, operands, variant, table, os.path.join(work, variant))
        fns[variant] = compiled.fn
        print(variant, sorted({str(d["candidate"]) for d in compiled.decisions}), kernel_summary(sources), flush=True)
    for i in range(2):
        compiled = compile_candidate(problem, operands, parse("cpp"), os.path.join(work, f"cpp-{i}"))
        lowering.unregister()
        fns[f"cpp#{i}"] = compiled.fn
        print(f"cpp#{i}", compiled.kernel, flush=True)
    samples = ops.time_interleaved(fns, problem, operands, protocol)
    for name in fns:
        speedups = stats.paired_speedups(samples["default"], samples[name])
        low, high = stats.bootstrap_ci(speedups)
        print(f"{name}: median {stats.median(samples[name]) * 1e6:.1f} us, over the default "
              f"{stats.median(speedups):.3f} [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main(sys.argv[1:])
