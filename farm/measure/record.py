"""The measurement record: what `farm measure --json` prints and the store keeps.

Record format history (RECORD_SCHEMA_VERSION):
  1  first version: host, problem, candidates with statistics, winner, noise, protocol.
     Optional additions, readable by every reader of version 1 (issue 11): protocol.weight_state,
     processes (per worker process: rounds, A/A control, band), candidates[].per_process,
     unreliable and unreliable_reason (the A/A gate), candidates[].faults_per_call and
     candidates[].per_process[].faults_per_call (minor page faults per timed kernel call; records
     before 2026-11-28 lack them), host.vendor (intel, amd, other; earlier records' vendor is
     read from host.cpu, farm.measure.host.record_vendor), worker.per_process[].contention and .used
     (the CPU time other work took from each process's timing; a disturbed process's samples are not
     used; records before 2026-11-28's thirteenth session lack them), protocol.placements and
     worker.per_process[].placements (how many copies of the weights each process timed every
     candidate on, round r on copy r % placements; records before 2026-11-29 timed one). A record
     without per_process is one process.
     Pooling (the nightly's races) reads a stored record's processes back (process_samples) and
     pools only records that poolable() accepts; the records stay as measured, never rewritten.
"""

from __future__ import annotations

import datetime as dt

from kernels.candidates import AA_CONTROL, ATEN, CandidateError, dense_temp_bytes, parse
from kernels.provenance import template_hash, threads_hash, torch_version

from farm.measure import stats
from farm.measure.problem import Problem, stack_size
from farm.measure.protocol import Protocol
from farm.measure.timing import WEIGHT_STATES, aa_offset

RECORD_SCHEMA_VERSION = 1
STATUSES = ("ok", "compile_error", "crash", "timeout", "wrong_result", "unsupported")

_interval = {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
_number_or_null = {"type": ["number", "null"]}
RECORD_SCHEMA = {
    "type": "object",
    "required": ["schema", "host", "problem", "candidates", "winner", "noise", "protocol", "provenance"],
    "properties": {
        "schema": {"const": RECORD_SCHEMA_VERSION},
        "host": {
            "type": "object",
            "required": ["isa", "emulated", "capabilities", "cpu", "cores", "torch", "threads", "l3_bytes"],
            "properties": {"isa": {"enum": ["amx", "avx512", "avx2", "default"]}, "emulated": {"type": "boolean"},
                           "vendor": {"enum": ["intel", "amd", "other"]},
                           "cores": {"type": "integer", "minimum": 1}},
        },
        "problem": {
            "type": "object",
            "required": ["op", "dtype", "m", "n", "k", "group_size", "threads", "weights"],
            "properties": {"op": {"enum": ["int8", "int4"]}, "dtype": {"enum": ["bf16", "fp16", "fp32"]},
                           "m": {"type": "integer", "minimum": 1}, "n": {"type": "integer", "minimum": 1},
                           "k": {"type": "integer", "minimum": 1}, "group_size": {"type": ["integer", "null"]},
                           "threads": {"type": "integer", "minimum": 1}, "weights": {"enum": ["warm", "cold", "model"]}},
        },
        "candidates": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "status", "median_us", "ci95_us", "speedup_vs_aten", "speedup_ci95",
                             "compile_s", "error", "samples_us"],
                "properties": {"id": {"type": "string"}, "status": {"enum": list(STATUSES)},
                               "median_us": _number_or_null, "ci95_us": _interval,
                               "speedup_vs_aten": _number_or_null, "speedup_ci95": _interval,
                               "compile_s": _number_or_null, "error": {"type": ["string", "null"]},
                               "samples_us": {"type": "array", "items": {"type": "number"}},
                               "faults_per_call": _number_or_null,
                               "per_process": {"type": "array", "items": {
                                   "type": "object", "required": ["process", "speedup", "speedup_ci95"]}}},
            },
        },
        "processes": {"type": "array", "items": {"type": "object", "required": ["rounds", "band"]}},
        "unreliable": {"type": "boolean"},
        "unreliable_reason": {"type": ["string", "null"]},
        "winner": {"type": ["string", "null"]},
        "noise": {"type": "object", "required": ["band"]},
        "protocol": {"type": "object", "required": ["rounds"]},
        "provenance": {"type": "object", "required": ["torch", "template_hash", "measured_at"]},
    },
}


def validate_record(record: dict) -> None:
    """Raise jsonschema.ValidationError naming the field that is wrong."""
    import jsonschema  # only validation needs it, not the measuring path

    jsonschema.validate(record, RECORD_SCHEMA)


Samples = dict[str, list[float]]  # candidate id -> per-round seconds, in one worker process


def _speedups(process: Samples, cid: str) -> list[float]:
    return stats.paired_speedups(process[ATEN], process[cid]) if ATEN in process else []


# A process whose candidate took at least this many minor page faults per timed call maps memory
# afresh in every call (1 MiB of it): a dq dense temporary above glibc's mmap threshold, which
# other processes of the same code may serve from a free heap chunk with none (int8 M=128
# 2048x8192 `dq`: 8193 faults a call at 1.2x over ATen, 0 at 2.2x). Other kernels count 0-10.
MAPS_PER_CALL_FAULTS = 256
ALLOCATOR_MODES = ("maps", "reuses")


def allocator_mode(faults_per_call: float | None) -> str | None:
    """'maps' (memory mapped afresh in every call), 'reuses', or None where not counted."""
    if faults_per_call is None:
        return None
    return "maps" if faults_per_call >= MAPS_PER_CALL_FAULTS else "reuses"


def process_modes(cand: dict, groups: int) -> list[str | None]:
    """The allocator mode of each of a record's process groups (process_groups) of one candidate."""
    per_process = cand.get("per_process") or []
    if len(per_process) != groups:
        return [None] * groups
    return [allocator_mode(p.get("faults_per_call")) for p in per_process]


def paired_by_process(aten: dict, cand: dict) -> tuple[list[float], list[list[float]]]:
    """A candidate's paired ratios over ATen in one record: pooled, and split by worker process."""
    speedups = stats.paired_speedups(aten["samples_us"], cand["samples_us"])
    return speedups, process_groups(speedups, cand)


def process_groups(speedups: list[float], cand: dict) -> list[list[float]]:
    """A record's paired ratios of one candidate split by worker process (samples_us is pooled in
    process order); one group where the record kept no per-process rounds or they do not add up."""
    rounds = [p["rounds"] for p in cand.get("per_process") or []]
    if not rounds or sum(rounds) != len(speedups):
        return [speedups]
    starts = [sum(rounds[:i]) for i in range(len(rounds))]
    return [speedups[s:s + n] for s, n in zip(starts, rounds)]


def _process_figures(index: int, process: Samples, cid: str, resamples: int,
                     page_faults: dict[str, float] | None = None) -> dict:
    """One process's figures for one candidate (kept in the record: repeats are evidence)."""
    speedups = _speedups(process, cid)
    return {"process": index, "rounds": len(process[cid]), "median_us": stats.median(process[cid]) * 1e6,
            "speedup": stats.median(speedups) if speedups else None,
            "speedup_ci95": list(stats.bootstrap_ci(speedups, resamples)) if speedups else None,
            "faults_per_call": (page_faults or {}).get(cid)}


def weight_state(problem: Problem) -> dict:
    """How the record's weight state was enforced (and, in the model state, the stack's size)."""
    return {"mode": problem.weights, "how": WEIGHT_STATES[problem.weights], "stack": stack_size(problem)}


def _candidate_entry(cid: str, result: dict, processes: list[Samples], iters: dict, resamples: int,
                     page_faults: list[dict[str, float]]) -> dict:
    entry = {"id": cid, "status": result.get("status", "crash"), "median_us": None, "ci95_us": None,
             "speedup_vs_aten": None, "speedup_ci95": None, "compile_s": result.get("compile_s"),
             "error": result.get("error"), "samples_us": [], "iters_per_sample": iters.get(cid),
             "max_rel_err": result.get("max_rel_err"), "kernel": result.get("kernel")}
    if "log_tail" in result:
        entry["log_tail"] = result["log_tail"]
    timed = [(i, p) for i, p in enumerate(processes) if p.get(cid)]
    if entry["status"] != "ok" or not timed:
        return entry
    # Pooled in process order: samples_us of every candidate stay paired round by round with ATen's.
    micro = [t * 1e6 for _, p in timed for t in p[cid]]
    entry.update(median_us=stats.median(micro), ci95_us=list(stats.bootstrap_ci(micro, resamples)), samples_us=micro)
    speedups = [s for _, p in timed for s in _speedups(p, cid)]
    if speedups:
        entry.update(speedup_vs_aten=stats.median(speedups),
                     speedup_ci95=list(stats.bootstrap_ci(speedups, resamples)))
    entry["per_process"] = [_process_figures(i, p, cid, resamples, page_faults[i] if i < len(page_faults) else {})
                            for i, p in timed]
    # Minor page faults per timed call, the median over processes (None where not counted):
    # how much of the call is the kernel mapping memory anew (a dq dense temporary above glibc's
    # mmap threshold pays one fault per 4 KiB page in every call).
    counted = [f["faults_per_call"] for f in entry["per_process"] if f["faults_per_call"] is not None]
    entry["faults_per_call"] = stats.median(counted) if counted else None
    return entry


def _temp_bytes(cid: str, problem: Problem) -> int:
    """Per-call temporary the candidate allocates beyond Inductor's own buffers (dq's dense weight)."""
    try:
        return dense_temp_bytes(parse(cid), problem.dtype, problem.n, problem.k)
    except CandidateError:  # fault-injection ids
        return 0


def beyond_noise(speedup: float, ci95: list[float] | tuple[float, float], band: float) -> bool:
    """A lead over ATen: the interval above 1 and the median beyond the A/A band."""
    return ci95[0] > 1.0 and speedup > 1.0 + band


def quorum(processes: int) -> int:
    """In how many processes a winner must lead: all, or all but one from 5 processes on (among
    many, one off process is host noise; among fewer, one process is too large a share to ignore)."""
    return processes - 1 if processes >= 5 else processes


def leads_in_processes(leads: list[bool]) -> bool:
    """The repeat rule: a candidate wins only where it leads beyond the noise in enough processes."""
    return sum(leads) >= quorum(len(leads))


def leads_in_process(speedup: float | None, ci95: list[float] | None, offset: float) -> bool:
    """One process supports a lead when its own interval lies above 1 + that process's A/A offset.

    The offset is how far the process's control (ATen's kernel compiled twice) sits from 1 beyond
    its interval: a systematic bias of that process, which a lead must clear. The control's
    sampling width is not added again: the candidate's own interval already carries that
    process's sampling noise, and the pooled lead must still clear the whole A/A band."""
    return speedup is not None and ci95 is not None and ci95[0] > 1.0 + offset


def process_offset(row: dict) -> float:
    """A process's A/A offset from its `processes` row (0 where it timed no control)."""
    return aa_offset(row["aa_ci95"]) if row.get("aa_ci95") else 0.0


def process_leads(per_process: list[dict], offsets: list[float]) -> list[bool]:
    """Per process: does the candidate lead beyond that process's own A/A offset?"""
    offset_of = dict(enumerate(offsets))
    return [leads_in_process(p["speedup"], p["speedup_ci95"], offset_of.get(p["process"], 0.0)) for p in per_process]


def aa_gate(control: dict | None, tolerance: float) -> str | None:
    """Why the record is unreliable, or None: the A/A control's interval misses 1 by more than
    `tolerance` (twice the same kernel measured apart: the other ratios cannot be trusted)."""
    if control is None or not control.get("speedup_ci95"):
        return None
    low, high = control["speedup_ci95"]
    off = aa_offset((low, high))
    if off <= tolerance:
        return None
    return (f"A/A control {control['speedup_vs_aten']:.3f} [{low:.3f}, {high:.3f}] misses 1 by {off:.3f} "
            f"(tolerance {tolerance}) after {len(control['samples_us'])} rounds")


def choose_winner(entries: list[dict], band: float, offsets: list[float] | None = None,
                  unreliable: str | None = None) -> tuple[str | None, str | None, str]:
    """(winner, runner-up, rule). A non-default wins only beyond ATen and beyond the A/A band
    pooled, and in enough processes beyond each one's A/A offset (`offsets`), never in an
    unreliable record."""
    ranked = sorted((e for e in entries if e["status"] == "ok" and e["speedup_vs_aten"] is not None
                     and e["id"] != AA_CONTROL), key=lambda e: e["speedup_vs_aten"], reverse=True)
    if not ranked:
        return None, None, "no candidate measured ok against ATen"
    best, runner = ranked[0], (ranked[1]["id"] if len(ranked) > 1 else None)
    if best["id"] == ATEN:
        return ATEN, runner, "ATen is fastest"
    if unreliable:
        return ATEN, best["id"], f"unreliable record ({unreliable}): the default wins"
    if not beyond_noise(best["speedup_vs_aten"], best["speedup_ci95"], band):
        return ATEN, best["id"], f"{best['id']} leads inside the noise (band {band:.3f}): the default wins"
    leads = process_leads(best.get("per_process") or [], offsets or [])
    if leads and not leads_in_processes(leads):
        return ATEN, best["id"], (f"{best['id']} leads beyond the noise in {sum(leads)} of {len(leads)} processes "
                                  f"(needs {quorum(len(leads))}): the default wins")
    return best["id"], runner, "lead over ATen beyond the interval and the A/A noise band" + (
        f" in {sum(leads)} of {len(leads)} processes" if len(leads) > 1 else "")


def _process_noise(processes: list[Samples], resamples: int) -> list[dict]:
    """Each process's rounds and A/A control (its band decides that process's leads)."""
    out = []
    for i, process in enumerate(processes):
        rounds = len(next(iter(process.values()))) if process else 0
        row = {"process": i, "rounds": rounds, "aa_speedup": None, "aa_ci95": None, "band": 0.0}
        if process.get(AA_CONTROL) and ATEN in process:
            figures = _process_figures(i, process, AA_CONTROL, resamples)
            row.update(aa_speedup=figures["speedup"], aa_ci95=figures["speedup_ci95"],
                       band=stats.noise_band(tuple(figures["speedup_ci95"]), figures["speedup"]))
        out.append(row)
    return out


def build_record(host: dict | None, problem: Problem, ids: list[str], final: dict[str, dict],
                 samples: Samples | list[Samples], iters: dict[str, int], protocol: Protocol, worker: dict,
                 page_faults: list[dict[str, float]] | None = None, contended: str | None = None) -> dict:
    """The record of one problem; `samples` is one process's samples or a list, one per process;
    `page_faults`, per process, each candidate's minor page faults per timed call; `contended`, why
    the host's other work makes the record unreliable (None: it did not)."""
    processes = samples if isinstance(samples, list) else [samples]
    entries = [_candidate_entry(cid, final.get(cid, {"status": "crash", "error": "no result"}), processes, iters,
                                protocol.bootstrap_resamples, page_faults or []) for cid in ids]
    for entry in entries:
        entry["temp_bytes"] = _temp_bytes(entry["id"], problem)
    control = next((e for e in entries if e["id"] == AA_CONTROL and e["speedup_ci95"]), None)
    band = stats.noise_band(tuple(control["speedup_ci95"]), control["speedup_vs_aten"]) if control else 0.0
    noise_rows = _process_noise(processes, protocol.bootstrap_resamples)
    unreliable = "; ".join(r for r in (contended, aa_gate(control, protocol.aa_tolerance)) if r) or None
    winner, runner_up, rule = choose_winner(entries, band, [process_offset(r) for r in noise_rows], unreliable)
    rounds_each = [r["rounds"] for r in noise_rows]
    rounds = sum(rounds_each)
    return {
        "schema": RECORD_SCHEMA_VERSION,
        "host": host or {},
        "problem": problem.as_dict(),
        "candidates": entries,
        "winner": winner,
        "runner_up": runner_up,
        "winner_rule": rule,
        "unreliable": unreliable is not None,
        "unreliable_reason": unreliable,
        "processes": noise_rows,
        "noise": {"control": AA_CONTROL, "speedup": control["speedup_vs_aten"] if control else None,
                  "ci95": control["speedup_ci95"] if control else None, "band": band},
        "protocol": {**protocol.as_dict(), "rounds": rounds, "rounds_per_process": rounds_each, "weights": problem.weights,
                     "weight_state": weight_state(problem),
                     "timer": "time.perf_counter_ns", "order": "shuffled per round", "ratio": "paired per round vs aten"},
        "provenance": {"torch": torch_version(), "template_hash": template_hash(), "threads_hash": threads_hash(),
                       "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "run_id": None},
        "worker": worker,
    }


def process_samples(record: dict) -> dict[int, dict[str, list[float]]]:
    """Each worker process's per-round times (us) by candidate, read back from a record:
    samples_us holds the processes' rounds in process order, per_process says how many each.
    A record without per-process round counts (one process, or written before issue 11) is
    one process, index 0."""
    out: dict[int, dict[str, list[float]]] = {}
    for cand in record["candidates"]:
        if cand["status"] != "ok" or not cand.get("samples_us"):
            continue
        parts = cand.get("per_process") or []
        if not parts or any("rounds" not in p for p in parts) or sum(p["rounds"] for p in parts) != len(cand["samples_us"]):
            parts = [{"process": 0, "rounds": len(cand["samples_us"])}]
        start = 0
        for part in parts:
            out.setdefault(part["process"], {})[cand["id"]] = cand["samples_us"][start:start + part["rounds"]]
            start += part["rounds"]
    return out


def process_offsets(record: dict) -> dict[int, float]:
    """Each process's own A/A offset (0 for a record that kept no per-process rows)."""
    return {r.get("process", i): process_offset(r) for i, r in enumerate(record.get("processes") or [])}


def _weight_state(record: dict) -> tuple:
    return record["problem"]["weights"], ((record.get("protocol") or {}).get("weight_state") or {}).get("how")


# What two records must share for their samples to be pooled: a pool mixes rounds, so anything
# that changes what a round measures (the kernel, the ISA, the weight state) refuses the merge.
POOL_CHECKS = (
    ("problem", lambda r: {k: r["problem"].get(k) for k in ("op", "dtype", "m", "n", "k", "group_size", "threads", "weights")}),
    ("host class", lambda r: (r["host"].get("isa"), bool(r["host"].get("emulated")))),
    ("torch", lambda r: r["provenance"]["torch"]),
    ("template source", lambda r: (r["provenance"]["template_hash"], r["provenance"].get("threads_hash"))),
    ("weight state", _weight_state),
)


def poolable(reference: dict, other: dict) -> str | None:
    """Why `other`'s samples may not be pooled with `reference`'s, or None when they may."""
    for name, read in POOL_CHECKS:
        if read(reference) != read(other):
            return f"other {name} ({read(other)} vs {read(reference)})"
    return None
