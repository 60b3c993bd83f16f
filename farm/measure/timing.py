"""The timing loop: calibrated batches, shuffled rounds, more rounds while the top two overlap, the
A/A control is off, or a lead worth having cannot yet be told from this process's noise."""

from __future__ import annotations

import random
import resource
import time
from typing import Callable

from kernels.candidates import AA_CONTROL, ATEN

from farm.measure import stats
from farm.measure.protocol import Protocol

Emit = Callable[..., None]


# How each weight state is enforced; build_record writes the sentence into the record.
WEIGHT_STATES = {
    "warm": "one untimed call of the same candidate on the same weights right before each timed batch",
    "cold": "a write of twice the LLC (at least 64 MiB) before each timed call, not timed",
    "model": ("a write of twice the LLC (at least 64 MiB), then one timed call of a compiled module that runs the "
              "kernel on L weight copies in turn (L = 64 MiB / weight bytes, 2 to 16; protocol.weight_state.stack), "
              "divided by L: every call reads evicted weights; the code path and the module's wrapper are paid "
              "once per L calls, as a model's graph pays them once per step"),
}


def minor_faults() -> int:
    """This process's minor page faults so far, all threads: one per 4 KiB page that is mapped
    anew, e.g. a dense temporary glibc serves with a fresh mmap in every call (farm bench alloc)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time_warm(fn: Callable, x, iters: int) -> tuple[float, int]:
    """Seconds per call of a warm batch, and the page faults of its timed calls."""
    # The untimed call makes "warm" true whatever the call's length: without it, a call longer
    # than a batch would follow another candidate's call over other weights (DESIGN, fidelity).
    fn(x)
    faults = minor_faults()
    start = time.perf_counter_ns()
    for _ in range(iters):
        fn(x)
    elapsed = time.perf_counter_ns() - start
    return elapsed / iters / 1e9, minor_faults() - faults


def _time_cold(fn: Callable, x, iters: int, flush: Callable[[], None]) -> tuple[float, int]:
    total, faults = 0, 0
    for _ in range(iters):
        flush()  # evicts the weights from every cache level; not timed
        before = minor_faults()
        start = time.perf_counter_ns()
        fn(x)
        total += time.perf_counter_ns() - start
        faults += minor_faults() - before
    return total / iters / 1e9, faults


def make_flush(llc_bytes: int) -> Callable[[], None]:
    """Write a buffer of twice the last-level cache, as a model's other layers would."""
    import torch

    # At least 64 MiB when the LLC size is unknown; at most 1 GiB to bound wall time.
    size = min(max(2 * llc_bytes, 64 << 20), 1 << 30)
    scratch = torch.zeros(size // 4, dtype=torch.float32)
    return lambda: scratch.add_(1.0)


def calibrate(fn: Callable, x, protocol: Protocol) -> int:
    """Iterations per batch so that a warm batch lasts about protocol.batch_s."""
    deadline = time.perf_counter() + protocol.warmup_s
    calls = 0
    while time.perf_counter() < deadline or calls < 2:
        fn(x)
        calls += 1
    per_call, _ = _time_warm(fn, x, 1)
    return max(1, min(protocol.max_iters, round(protocol.batch_s / max(per_call, 1e-9))))


def _vs_aten(samples: dict[str, list[float]], cid: str, resamples: int = 500) -> tuple[float, tuple[float, float]]:
    """`cid`'s median paired speedup over ATen in these rounds, and its interval."""
    speedups = stats.paired_speedups(samples[ATEN], samples[cid])
    return stats.median(speedups), stats.bootstrap_ci(speedups, resamples=resamples)


def _ranked(samples: dict[str, list[float]], resamples: int = 500) -> list[tuple[float, tuple[float, float]]]:
    """Every timed candidate but ATen and its control, as (median speedup, interval), fastest first."""
    return sorted((_vs_aten(samples, cid, resamples) for cid, times in samples.items()
                   if cid not in (ATEN, AA_CONTROL) and times), key=lambda item: item[0], reverse=True)


def decided(samples: dict[str, list[float]]) -> bool:
    """True when the two best candidates' speedup intervals over ATen are apart."""
    if ATEN not in samples:
        return True
    ranked = sorted(_ranked(samples) + [(1.0, (1.0, 1.0))], key=lambda item: item[0], reverse=True)  # ATen itself
    return len(ranked) < 2 or not stats.overlap(ranked[0][1], ranked[1][1])


def lead_settled(samples: dict[str, list[float]], settle_lead: float, resamples: int = 500) -> bool:
    """False while the fastest candidate leads ATen by at least `settle_lead` (median) and this
    process cannot yet show that lead as the record will judge it: its interval above 1 and above
    1 + the control's offset, its median beyond the control's band (farm.measure.record's
    leads_in_process and choose_winner). Such a close call is what flipped between independent runs
    at 11 rounds (a 1.15-1.29x decode lead against A/A bands of 0.16-0.35); rounds, not chance,
    should decide it. Leads under `settle_lead` are not worth the rounds."""
    if ATEN not in samples:
        return True
    ranked = _ranked(samples, resamples)
    if not ranked or ranked[0][0] < 1.0 + settle_lead:
        return True
    (best, (low, _)), band, offset = ranked[0], 0.0, 0.0
    if samples.get(AA_CONTROL):
        control, control_ci = _vs_aten(samples, AA_CONTROL, resamples)
        band, offset = stats.noise_band(control_ci, control), aa_offset(control_ci)
    return low > 1.0 + offset and best > 1.0 + band  # offset >= 0: the interval is above 1 too


def aa_offset(ci: tuple[float, float] | list[float]) -> float:
    """How far the A/A control's speedup interval lies from 1 (0 when it contains 1)."""
    return max(ci[0] - 1.0, 1.0 - ci[1], 0.0)


def aa_off(samples: dict[str, list[float]], tolerance: float) -> bool:
    """True when twice the same kernel differ beyond `tolerance`: the rounds so far are suspect."""
    if ATEN not in samples or AA_CONTROL not in samples:
        return False
    return aa_offset(_vs_aten(samples, AA_CONTROL)[1]) > tolerance


def run_rounds(fns: dict[str, Callable | list[Callable]], x, protocol: Protocol, emit: Emit,
               flush: Callable[[], None] | None = None,
               stack: int = 1) -> tuple[dict[str, list[float]], dict[str, int], dict[str, float]]:
    """Per-call seconds for each candidate, one sample per round; the same rounds for all; and
    each candidate's minor page faults per timed kernel call over all its rounds.
    No flush: warm; a flush: cold; a flush and modules of `stack` kernel calls each: model.
    A candidate given as a list of callables (its weight placements) is timed on placement
    r % len in round r: the rounds sample every placement at the timing cost of one."""
    if not fns:
        return {}, {}, {}
    placed = {cid: fn if isinstance(fn, list) else [fn] for cid, fn in fns.items()}
    iters = {cid: calibrate(copies[0], x, protocol) for cid, copies in placed.items()}
    if flush is not None:
        iters = {cid: protocol.cold_iters for cid in fns}
    samples: dict[str, list[float]] = {cid: [] for cid in fns}
    faults = {cid: 0 for cid in fns}
    rng = random.Random(protocol.seed)
    target, rounds = protocol.min_rounds, 0
    while True:
        order = list(fns)
        rng.shuffle(order)
        for cid in order:
            emit(ev="run", cand=cid)  # lets the manager name the culprit of a crash or hang
            fn = placed[cid][rounds % len(placed[cid])]
            if flush is None:
                seconds, batch_faults = _time_warm(fn, x, iters[cid])
            else:
                seconds, batch_faults = _time_cold(fn, x, iters[cid], flush)
            samples[cid].append(seconds / stack)
            faults[cid] += batch_faults
        rounds += 1
        emit(ev="round", r=rounds, times={cid: samples[cid][-1] for cid in order})
        if rounds >= target:
            # More rounds while the top two overlap, the A/A control is off (the gate's first step),
            # or a lead worth having is not yet beyond this process's noise.
            if rounds >= protocol.max_rounds or (decided(samples) and not aa_off(samples, protocol.aa_tolerance)
                                                 and lead_settled(samples, protocol.settle_lead)):
                per_call = {cid: faults[cid] / (rounds * iters[cid] * stack) for cid in fns}
                return samples, iters, per_call
            target = min(rounds + protocol.extra_rounds_step, protocol.max_rounds)
