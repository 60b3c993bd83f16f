"""The measuring process: compiles every candidate of one problem, checks, times, reports.

Started by farm.measure.manager in a fresh interpreter (so ATen's ISA can be chosen by environment
and a crash or hang costs only this process). It only measures and writes JSON-lines events
to the file descriptor it was given; the manager decides everything else.

    python -m farm.measure.worker JOB.json EVENT_FD
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status_and_message(exc: BaseException) -> tuple[str, str]:
    """unsupported (the lowering said so) or compile_error, with the most specific message."""
    from kernels.lowering import Unsupported
    from kernels.template import KnobsIgnored

    for link in _chain(exc):
        if isinstance(link, (Unsupported, KnobsIgnored)):
            return "unsupported", str(link)[:500]
    root = list(_chain(exc))[-1]
    text = str(root).strip()
    return "compile_error", f"{type(root).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def _check(error: float, tolerance: float, kernel: dict, expect_code: str | None) -> str | None:
    """Why a compiled candidate must not be timed, or None. A repeat process hits the FX graph
    cache, where no lowering runs and no decision is recorded: its generated code must be the
    first process's (same code hash), so it times the same kernel."""
    if error > tolerance:
        return f"max relative error {error:.3g} > tolerance {tolerance}"
    if expect_code is not None and kernel.get("code_sha") != expect_code:
        return f"repeat process generated other code ({kernel.get('code_sha')}) than the first ({expect_code})"
    return None


def run(job: dict, emit) -> None:
    import torch

    from kernels.candidates import ATEN, parse

    from farm.measure import contention, faults
    from farm.measure.compiled import TOLERANCE, compile_candidate, graphs_compiled, relative_error
    from farm.measure.host import apply_emulation, profile
    from farm.measure.problem import Problem, make_operands, placement_count, stack_size
    from farm.measure.protocol import Protocol
    from farm.measure.timing import make_flush, run_rounds

    emit(ev="imported")  # torch and Inductor are loaded: the first phase of a cold host
    problem = Problem.from_dict(job["problem"])
    protocol = Protocol.from_dict(job["protocol"])
    apply_emulation(job.get("isa"))
    # Ray sets OMP_NUM_THREADS=1 in a 1-CPU task: the thread count is always explicit.
    torch.set_num_threads(problem.threads)
    host = profile(problem.threads)
    emit(ev="host", profile=dict(host.as_dict(), niceness=os.getpriority(os.PRIO_PROCESS, 0)))

    operands = make_operands(problem, seed=protocol.seed)
    with torch.no_grad():
        reference = operands.call_eager(problem)
    # Every candidate's placement i runs on the same copy of the weights, so a round's pairs
    # compare kernels, not where each one's weights landed.
    placements = placement_count(problem, protocol.placements, len(job["candidates"]))
    placed = [operands] + [operands.placed_copy() for _ in range(placements - 1)]
    fns = {}
    for index, cid in enumerate(job["candidates"]):
        emit(ev="compile", cand=cid)
        fault = faults.kind_of(cid)
        result = {"ev": "compiled", "cand": cid}
        try:
            if fault:
                faults.before_compile(fault)
            candidate = parse(ATEN) if fault else parse(cid)
            # A repeat process reuses the first process's cache directory of this candidate.
            cache_dir = job.get("cache_dirs", {}).get(cid) or os.path.join(job["cache_root"], f"candidate-{index}")
            compiled = compile_candidate(problem, operands, candidate, cache_dir, wrong=fault == "wrong")
            error = relative_error(compiled.output, reference)
            why_not = _check(error, TOLERANCE[problem.dtype], compiled.kernel, job.get("expect_code", {}).get(cid))
            copies = [compiled.fn]
            for i, other in enumerate(placed[1:], start=1):
                if why_not is not None:
                    break
                # An FX-graph-cache hit: the same code, compiled around its own copy of the weights.
                again = compile_candidate(problem, other, candidate, cache_dir, wrong=fault == "wrong")
                why_not = _check(relative_error(again.output, reference), TOLERANCE[problem.dtype], again.kernel,
                                 compiled.kernel.get("code_sha"))
                why_not = why_not and f"placement {i}: {why_not}"
                copies.append(again.fn)
            result.update(
                status="ok" if why_not is None else "wrong_result", compile_s=compiled.compile_s,
                max_rel_err=error, kernel=compiled.kernel, decisions=compiled.decisions, cache_dir=cache_dir,
                error=why_not, placements=len(copies),
            )
            if why_not is None:
                fns[cid] = copies
        except Exception as exc:  # a failed candidate is data, never the end of the measurement
            status, message = _status_and_message(exc)
            result.update(status=status, error=message, traceback=traceback.format_exc()[-2000:])
        emit(**result)

    flush = make_flush(host.l3_bytes) if problem.flushed else None
    start, graphs_before, before = time.perf_counter(), graphs_compiled(), contention.snapshot()
    with torch.no_grad():
        samples, iters, page_faults = run_rounds(fns, operands.x, protocol, emit, flush, stack_size(problem))
    lost = contention.shares(before, contention.snapshot(), problem.threads)
    if graphs_compiled() != graphs_before:
        raise RuntimeError("a graph was compiled while timing: some callable did not run its own kernel")
    emit(ev="timed", samples=samples, iters=iters, page_faults=page_faults, timing_s=time.perf_counter() - start,
         contention=lost, placements=placements)


def _unnice() -> None:
    """Time at the normal priority where allowed when Ray chose the priority: Ray starts its
    workers at niceness 15, and a measurement at 15 loses its core to any ordinary process of a
    shared host mid-round. A niceness the user chose (`nice farm measure ...`) is kept. The
    record's host profile says which niceness the timing ran at."""
    if "RAY_RAYLET_PID" not in os.environ:  # not under a Ray worker
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass  # lowering niceness needs CAP_SYS_NICE; the record says what it stayed at


def main(argv: list[str]) -> int:
    job_path, fd = argv[0], int(argv[1])
    events = os.fdopen(fd, "w", buffering=1)

    def emit(**event) -> None:
        events.write(json.dumps(event) + "\n")

    with open(job_path) as f:
        job = json.load(f)
    _unnice()
    emit(ev="start", pid=os.getpid())
    try:
        run(job, emit)
    except Exception:  # a bug of the farm itself, not of a candidate: say so, do not blame one
        emit(ev="fatal", error=traceback.format_exc())
        return 1
    emit(ev="done")
    events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
