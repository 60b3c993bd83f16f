"""Measure every candidate of one problem on this host: the manager side.

The manager starts a worker process (farm.measure.worker), reads its events, and turns a crash or a
hang into that candidate's status: it kills the worker, records the culprit and starts a new
worker for the candidates still owed a measurement. Timing is paired, so only samples of the
final worker's rounds are used.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from kernels.candidates import AA_CONTROL, ATEN, LIBRARY_GEMM_KINDS, CandidateError, parse, small_m_int8_path, space

from farm.measure import contention
from farm.measure import faults as fault_mod
from farm.errors import UserError
from farm.measure.host import EMULATION_BLIND_SPOT, EMULATION_ENV, ISA_CLASSES, can_run, native_isa, runnable
from farm.measure.problem import Problem, validate
from farm.measure.protocol import Protocol
from farm.measure.record import build_record

FAILED = ("compile_error", "crash", "timeout", "wrong_result", "unsupported")


@dataclass
class Attempt:
    """What one worker process reported before it finished, crashed or was killed."""

    host: dict | None = None
    compiled: dict[str, dict] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    iters: dict[str, int] = field(default_factory=dict)
    page_faults: dict[str, float] = field(default_factory=dict)  # minor page faults per timed call
    contention: dict | None = None  # farm.measure.contention.shares over the timed window
    placements: int = 1  # weight placements each candidate was timed on
    timing_s: float = 0.0
    outcome: str = "done"  # done | crash | timeout
    culprit: str | None = None
    detail: str = ""
    wall_s: float = 0.0


def check_candidate_ids(ids: list[str], where: str = "candidates") -> None:
    """A UserError naming `where` and the first id that is not a candidate, before any work."""
    for cid in ids:
        try:
            parse(cid)
        except CandidateError as exc:
            raise UserError(f"{where}: {exc}") from None


def candidate_ids(problem: Problem, grid: str = "pruned", only: list[str] | None = None,
                  extra: list[str] | None = None) -> list[str]:
    """The grid's ids, or ATen + its control + `only`; then any `extra` not already there."""
    check_candidate_ids([*(only or []), *(extra or [])])
    ids = [c.id for c in space(problem.threads, grid, problem.op)]
    if only:
        ids = [ATEN, AA_CONTROL] + [c for c in only if c not in (ATEN, AA_CONTROL)]
    return ids + [c for c in dict.fromkeys(extra or []) if c not in ids]


def _pre_unsupported(problem: Problem, ids: list[str], isa: str | None = None) -> dict[str, dict]:
    """Candidates known to be meaningless before compiling (reported, not dropped)."""
    out = {}
    if isa is not None and isa != native_isa():
        for cid in ids:
            if not fault_mod.kind_of(cid) and parse(cid).kind in LIBRARY_GEMM_KINDS:
                out[cid] = {"status": "unsupported", "error": f"emulated {isa}: {EMULATION_BLIND_SPOT}", "compile_s": None}
    if small_m_int8_path(problem.op, problem.dtype, problem.m):
        for cid in ids:
            if cid.startswith("cpp[") and parse(cid).knobs.has_blocking():  # nt alone applies there
                out[cid] = {"status": "unsupported", "error": (
                    "knobs have no effect: Inductor renders int8 x bf16 with M < 16 through "
                    "SMALL_M_GEMM_TEMPLATE, which has no thread or cache blocking"), "compile_s": None}
    return out


def _worker_env(isa: str | None, threads: int) -> dict:
    env = dict(os.environ)
    env.update(EMULATION_ENV.get(isa or "", {}))
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile pool: one core each is ours
    return env


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _run_worker(job: dict, workdir: str, timeout_s: float, log_path: str, process: int = 0) -> Attempt:
    """One worker process, its events read until it finishes, crashes or hangs. A repeat's events
    (process > 0) go to the phase log as "p<process>:<event>": the plain names stay the first
    process's, which compiles and checks every candidate."""
    job_path = os.path.join(workdir, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "farm.measure.worker", job_path, str(write_fd)],
            pass_fds=(write_fd,), env=_worker_env(job.get("isa"), job["problem"]["threads"]),
            stdout=log, stderr=log, start_new_session=True,
        )
    os.close(write_fd)
    attempt, current, buffer, finished = Attempt(), None, b"", False
    try:
        while not finished:
            ready, _, _ = select.select([read_fd], [], [], timeout_s)
            if not ready:
                attempt.outcome, attempt.culprit = "timeout", current
                attempt.detail = f"no progress for {timeout_s:.0f} s"
                os.killpg(proc.pid, signal.SIGKILL)
                break
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                attempt.outcome, attempt.culprit = "crash", current
                attempt.detail = f"worker died ({_signal_name(proc.wait())})"
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = json.loads(line)
                _log_phase(event if not process else {**event, "ev": f"p{process}:{event['ev']}"}, start)
                if event["ev"] == "done":
                    finished = True
                    break
                current = _apply_event(attempt, event, current)
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    attempt.wall_s = time.perf_counter() - start
    return attempt


# Bulky event fields that a phase log does not need.
_PHASE_LOG_DROP = ("profile", "samples", "kernel", "decisions", "traceback")


def _log_phase(event: dict, start: float) -> None:
    """Append the worker's event, timestamped, to $FARM_PHASE_LOG (where the time of a slow or
    lost measurement went: interpreter start, imports, each compile, each timing round)."""
    path = os.environ.get("FARM_PHASE_LOG")
    if not path:
        return
    import datetime as dt

    line = {"utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "elapsed_s": round(time.perf_counter() - start, 3),
            **{k: v for k, v in event.items() if k not in _PHASE_LOG_DROP}}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def _apply_event(attempt: Attempt, event: dict, current: str | None) -> str | None:
    kind = event["ev"]
    if kind == "host":
        attempt.host = event["profile"]
    elif kind in ("compile", "run"):
        return event["cand"]
    elif kind == "compiled":
        attempt.compiled[event["cand"]] = {k: v for k, v in event.items() if k not in ("ev", "cand")}
        return None
    elif kind == "fatal":
        raise RuntimeError(f"the measurement worker failed (a farm bug, not a candidate's):\n{event['error']}")
    elif kind == "timed":
        attempt.samples, attempt.iters, attempt.timing_s = event["samples"], event["iters"], event["timing_s"]
        attempt.page_faults = event.get("page_faults", {})
        attempt.contention = event.get("contention")
        attempt.placements = event.get("placements", 1)
        return None
    return current


def _log_tail(path: str, chars: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def check_isa(isa: str | None) -> None:
    """Fail before any work when this host cannot run (or emulate) the ISA class asked for."""
    if isa is None:
        return
    if isa not in ISA_CLASSES:
        raise UserError(f"--isa: unknown ISA class {isa!r} (expected one of {', '.join(ISA_CLASSES)})")
    native = native_isa()
    if not can_run(native, isa):
        raise UserError(f"--isa {isa}: this host is {native} and can run only {', '.join(runnable(native))}")


@dataclass
class ProcessRun:
    """One independent worker process's timing (the samples of its final attempt)."""

    samples: dict[str, list[float]]
    iters: dict[str, int]
    timing_s: float
    wall_s: float
    attempts: int
    compile_s: float
    host: dict | None
    page_faults: dict[str, float] = field(default_factory=dict)  # minor page faults per timed call
    contention: dict | None = None
    placements: int = 1

    def disturbed(self, protocol: Protocol) -> bool:
        """Other work took more than protocol.max_contention of the CPU time this timing was owed."""
        lost = contention.lost_share(self.contention)
        return lost is not None and lost > protocol.max_contention


def _job(problem: Problem, protocol: Protocol, isa: str | None, owed: list[str], cache_root: str,
         reuse: dict[str, dict] | None) -> dict:
    job = {"problem": problem.as_dict(), "protocol": protocol.as_dict(), "isa": isa,
           "candidates": owed, "cache_root": cache_root}
    if reuse:  # a repeat: the first process's cache directories, and the code it must find there
        job["cache_dirs"] = {cid: reuse[cid]["cache_dir"] for cid in owed if reuse[cid].get("cache_dir")}
        job["expect_code"] = {cid: (reuse[cid].get("kernel") or {}).get("code_sha") for cid in owed}
    return job


def _still_owed(owed: list[str], final: dict[str, dict], repeat: bool) -> list[str]:
    """The first process owes what has no result yet; a repeat owes what is still ok."""
    if repeat:
        return [cid for cid in owed if final[cid]["status"] == "ok"]
    return [cid for cid in owed if cid not in final]


def _run_process(index: int, owed: list[str], final: dict[str, dict], problem: Problem, protocol: Protocol,
                 isa: str | None, workdir: str) -> ProcessRun:
    """Run worker process `index` until it finishes; a crash or hang becomes the culprit's status
    in `final` and a new worker measures the rest. Process 0 compiles afresh and fills `final`;
    a repeat reuses process 0's cache directories, and any failure there is the candidate's."""
    repeat, attempts = index > 0, []
    reuse = {cid: final[cid] for cid in owed} if repeat else None
    where = f" (repeat process {index})" if repeat else ""
    while owed:
        tag = f"p{index}-{len(attempts)}" if repeat else str(len(attempts))
        job = _job(problem, protocol, isa, owed, os.path.join(workdir, f"inductor-{tag}"), reuse)
        log_path = os.path.join(workdir, f"worker-{tag}.log")
        attempt = _run_worker(job, workdir, protocol.timeout_s, log_path, index)
        attempts.append(attempt)
        for cid, result in attempt.compiled.items():
            if result["status"] != "ok":
                final[cid] = {**result, "error": f"{result.get('error')}{where}"}
            elif not repeat and attempt.outcome == "done":
                final[cid] = result
        if attempt.outcome == "done":
            break
        if attempt.culprit is None:
            raise RuntimeError(f"measurement worker failed outside any candidate: {attempt.detail}\n{_log_tail(log_path)}")
        final[attempt.culprit] = {"status": attempt.outcome, "compile_s": None,
                                  "error": f"{attempt.detail} while running {attempt.culprit}{where}",
                                  "log_tail": _log_tail(log_path)}
        owed = _still_owed(owed, final, repeat)
    last = attempts[-1] if attempts else Attempt()
    compile_s = sum((r.get("compile_s") or 0.0) for a in attempts for r in a.compiled.values())
    host = next((a.host for a in reversed(attempts) if a.host), None)
    return ProcessRun(last.samples, last.iters, last.timing_s, sum(a.wall_s for a in attempts), len(attempts),
                      compile_s, host, last.page_faults, last.contention, last.placements)


def _control_off(runs: list[ProcessRun], tolerance: float) -> bool:
    """The A/A gate over all processes so far: paired control ratios pooled across them."""
    from farm.measure.timing import aa_off

    pooled: dict[str, list[float]] = {ATEN: [], AA_CONTROL: []}
    for run in runs:
        if ATEN in run.samples and AA_CONTROL in run.samples:
            pooled[ATEN] += run.samples[ATEN]
            pooled[AA_CONTROL] += run.samples[AA_CONTROL]
    return bool(pooled[ATEN]) and aa_off(pooled, tolerance)


def measure(problem: Problem, grid: str = "pruned", protocol: Protocol | None = None, isa: str | None = None,
            only: list[str] | None = None, faults: list[str] | None = None, workdir: str | None = None,
            extra: list[str] | None = None) -> dict:
    """Measure all candidates of `problem` in protocol.processes independent worker processes
    (the A/A gate may add protocol.aa_extra_processes); returns the record (farm.measure.record).
    A process whose timing lost more than protocol.max_contention of its CPU time to other work
    is replaced by another (up to protocol.contention_extra_processes) and its samples are not
    used; where too few undisturbed processes remain, the record is unreliable."""
    protocol = protocol or Protocol()
    validate(problem)
    check_isa(isa)
    ids = candidate_ids(problem, grid, only, extra) + [fault_mod.fault_id(kind) for kind in faults or []]
    final: dict[str, dict] = _pre_unsupported(problem, ids, isa)
    owned = workdir is None  # ours to remove: the caches and logs are spent once the record is built
    workdir = workdir or tempfile.mkdtemp(prefix="farm-measure-")
    try:
        return _measure_in(workdir, problem, ids, final, protocol, isa)
    finally:
        if owned:  # left behind, every measurement kept its Inductor caches in /tmp (1394 directories here)
            shutil.rmtree(workdir, ignore_errors=True)


def _measure_in(workdir: str, problem: Problem, ids: list[str], final: dict[str, dict], protocol: Protocol,
                isa: str | None) -> dict:
    """measure()'s processes in `workdir`: the first, repeats, the gate's and contention's extras; the record."""
    start = time.perf_counter()
    runs = [_run_process(0, [cid for cid in ids if cid not in final], final, problem, protocol, isa, workdir)]
    aa_extra = 0
    while True:
        ok = [cid for cid in ids if final.get(cid, {}).get("status") == "ok"]
        clean = [r for r in runs if not r.disturbed(protocol)]
        if not ok:
            break
        if len(clean) < protocol.processes:
            if len(runs) >= protocol.processes + protocol.contention_extra_processes:
                break  # the host stays busy: the record says so below
        elif aa_extra < protocol.aa_extra_processes and _control_off(clean, protocol.aa_tolerance):
            aa_extra += 1  # the gate's second step: another process only while the control is off
        else:
            break
        runs.append(_run_process(len(runs), ok, final, problem, protocol, isa, workdir))
    host = next((r.host for r in runs if r.host), None)
    # attempts: workers started until every candidate was compiled and timed once (the first process).
    attempts, repeat_attempts = runs[0].attempts, sum(r.attempts for r in runs[1:])
    timed = [r for r in runs if r.samples]  # a process whose candidates all failed timed nothing
    used = [r for r in timed if not r.disturbed(protocol)]
    busy = None
    if len(used) < min(protocol.processes, len(timed)):
        busy = (f"host contention: other work took more than {protocol.max_contention:.0%} of the CPU time owed to "
                f"the timing in {len(timed) - len(used)} of {len(timed)} processes")
        used = timed  # nothing better to report; the record is unreliable
    worker = {"attempts": attempts, "processes": len(used), "repeat_attempts": repeat_attempts,
              "wall_s": time.perf_counter() - start, "worker_wall_s": sum(r.wall_s for r in runs),
              "timing_s": sum(r.timing_s for r in runs),
              "compile_s": sum((r.get("compile_s") or 0.0) for r in final.values()),
              "repeat_compile_s": sum(r.compile_s for r in runs[1:]),
              "contention_how": contention.HOW,
              "per_process": [{"wall_s": r.wall_s, "timing_s": r.timing_s, "compile_s": r.compile_s,
                               "attempts": r.attempts, "contention": r.contention, "placements": r.placements,
                               "used": any(r is u for u in used)}
                              for r in timed]}
    return build_record(host, problem, ids, final, [r.samples for r in used], used[-1].iters if used else {},
                        protocol, worker, [r.page_faults for r in used], busy)
