"""The measurement record: what `farm measure --json` prints and the store keeps.

Record format history (RECORD_SCHEMA_VERSION):
  1  first version: host, problem, candidates with statistics, winner, noise, protocol.
"""

from __future__ import annotations

import datetime as dt

from kernels.candidates import AA_CONTROL, ATEN, CandidateError, dense_temp_bytes, parse
from kernels.provenance import template_hash, torch_version

from farm.measure import stats
from farm.measure.problem import Problem
from farm.measure.protocol import Protocol
from farm.measure.timing import WEIGHT_STATES

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
                           "cores": {"type": "integer", "minimum": 1}},
        },
        "problem": {
            "type": "object",
            "required": ["op", "dtype", "m", "n", "k", "group_size", "threads", "weights"],
            "properties": {"op": {"enum": ["int8", "int4"]}, "dtype": {"enum": ["bf16", "fp16", "fp32"]},
                           "m": {"type": "integer", "minimum": 1}, "n": {"type": "integer", "minimum": 1},
                           "k": {"type": "integer", "minimum": 1}, "group_size": {"type": ["integer", "null"]},
                           "threads": {"type": "integer", "minimum": 1}, "weights": {"enum": ["warm", "cold"]}},
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
                               "samples_us": {"type": "array", "items": {"type": "number"}}},
            },
        },
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


def _candidate_entry(cid: str, result: dict, samples: dict[str, list[float]], iters: dict, resamples: int) -> dict:
    entry = {"id": cid, "status": result.get("status", "crash"), "median_us": None, "ci95_us": None,
             "speedup_vs_aten": None, "speedup_ci95": None, "compile_s": result.get("compile_s"),
             "error": result.get("error"), "samples_us": [], "iters_per_sample": iters.get(cid),
             "max_rel_err": result.get("max_rel_err"), "kernel": result.get("kernel")}
    if "log_tail" in result:
        entry["log_tail"] = result["log_tail"]
    times = samples.get(cid)
    if entry["status"] != "ok" or not times:
        return entry
    micro = [t * 1e6 for t in times]
    entry.update(median_us=stats.median(micro), ci95_us=list(stats.bootstrap_ci(micro, resamples)), samples_us=micro)
    if ATEN in samples:
        speedups = stats.paired_speedups(samples[ATEN], times)
        entry.update(speedup_vs_aten=stats.median(speedups),
                     speedup_ci95=list(stats.bootstrap_ci(speedups, resamples)))
    return entry


def _temp_bytes(cid: str, problem: Problem) -> int:
    """Per-call temporary the candidate allocates beyond Inductor's own buffers (dq's dense weight)."""
    try:
        return dense_temp_bytes(parse(cid), problem.dtype, problem.n, problem.k)
    except CandidateError:  # fault-injection ids
        return 0


def choose_winner(entries: list[dict], band: float) -> tuple[str | None, str | None, str]:
    """(winner, runner-up, rule). A non-default wins only beyond ATen and beyond the A/A noise."""
    ranked = sorted((e for e in entries if e["status"] == "ok" and e["speedup_vs_aten"] is not None
                     and e["id"] != AA_CONTROL), key=lambda e: e["speedup_vs_aten"], reverse=True)
    if not ranked:
        return None, None, "no candidate measured ok against ATen"
    best, runner = ranked[0], (ranked[1]["id"] if len(ranked) > 1 else None)
    if best["id"] == ATEN:
        return ATEN, runner, "ATen is fastest"
    if best["speedup_ci95"][0] > 1.0 and best["speedup_vs_aten"] > 1.0 + band:
        return best["id"], runner, "lead over ATen beyond the interval and the A/A noise band"
    return ATEN, best["id"], f"{best['id']} leads inside the noise (band {band:.3f}): the default wins"


def build_record(host: dict | None, problem: Problem, ids: list[str], final: dict[str, dict],
                 samples: dict[str, list[float]], iters: dict[str, int], protocol: Protocol, worker: dict) -> dict:
    entries = [_candidate_entry(cid, final.get(cid, {"status": "crash", "error": "no result"}), samples, iters,
                                protocol.bootstrap_resamples) for cid in ids]
    for entry in entries:
        entry["temp_bytes"] = _temp_bytes(entry["id"], problem)
    control = next((e for e in entries if e["id"] == AA_CONTROL and e["speedup_ci95"]), None)
    band = stats.noise_band(tuple(control["speedup_ci95"]), control["speedup_vs_aten"]) if control else 0.0
    winner, runner_up, rule = choose_winner(entries, band)
    rounds = len(next(iter(samples.values()))) if samples else 0
    return {
        "schema": RECORD_SCHEMA_VERSION,
        "host": host or {},
        "problem": problem.as_dict(),
        "candidates": entries,
        "winner": winner,
        "runner_up": runner_up,
        "winner_rule": rule,
        "noise": {"control": AA_CONTROL, "speedup": control["speedup_vs_aten"] if control else None,
                  "ci95": control["speedup_ci95"] if control else None, "band": band},
        "protocol": {**protocol.as_dict(), "rounds": rounds, "weights": problem.weights,
                     "weight_state": {"mode": problem.weights, "how": WEIGHT_STATES[problem.weights]},
                     "timer": "time.perf_counter_ns", "order": "shuffled per round", "ratio": "paired per round vs aten"},
        "provenance": {"torch": torch_version(), "template_hash": template_hash(),
                       "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "run_id": None},
        "worker": worker,
    }
