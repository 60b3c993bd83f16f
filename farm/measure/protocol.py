"""The timing protocol's settings, recorded with every measurement."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from farm.errors import UserError


@dataclass(frozen=True)
class Protocol:
    # 11 rounds is the least that gives a bootstrap median interval of useful width;
    # 41 bounds the cost of a contested pair (a round of ~12 candidates is ~0.2 s warm).
    min_rounds: int = 11
    max_rounds: int = 41
    extra_rounds_step: int = 10
    # A batch of ~10 ms amortises the timer and Python dispatch (~us) to well below 1%.
    batch_s: float = 0.01
    warmup_s: float = 0.05
    max_iters: int = 10_000
    # Cold weights: at least this many flush+call samples per batch (each flush is ms).
    cold_iters: int = 3
    timeout_s: float = 300.0
    bootstrap_resamples: int = 2000
    seed: int = 0
    # A lead over ATen of at least this much (median) is timed on, up to max_rounds, until the
    # process can show it beyond its own A/A noise (timing.lead_settled): at 11 rounds, two cold
    # decode keys led 1.06-1.29x in every process yet were claimed in one run of two and not in the
    # other (AVX512 EPYC, bench/fidelity-12.yaml). 5%: the fidelity target's own tolerance.
    settle_lead: float = 0.05
    # Independent worker processes (fresh allocations, reusing the first one's Inductor cache).
    # One process is one sample of memory placement: ATen's median moved 758 -> 1286 us between
    # processes (DESIGN, fidelity). Measured on a 2-core host (int8 8x1024x1024, 4 candidates):
    # a repeat costs 11.5 s against 23.8 s for the first process (no compile: 2.4 s of cache hits
    # against 9.0 s), so 2 processes cost 1.5x the wall of one (the bound) and catch the
    # single-process flips seen there; 3 would cost 2x.
    processes: int = 2
    # Weight placements per process: each candidate is compiled this many times in a process, each
    # on its own copy of the weights (a repeat compile is an FX-graph-cache hit, about 0.1 s), and
    # the rounds rotate through them, so the timing cost stays that of one. Where the weights land
    # moves a cold decode call within a process about half as much as between processes: int8 M=1
    # 512x2048 `cpp`, four compiles in one process ran 1.22-1.29x and 1.16-1.24x over ATen (AVX512
    # EPYC), against 1.11-1.28x over 40 processes of one compile each. Two more copies cost 1.7 s per problem
    # (19.5 -> 21.2 s, minimal grid, 2 processes). The model state's stack reads its own copies: 1 there.
    placements: int = 3
    # The A/A gate: the control's interval may miss 1 by at most this much (2%: the low end of the
    # A/A noise measured on these hosts, 2-5%); beyond it, measure more, then mark the record unreliable.
    aa_tolerance: float = 0.02
    # Extra processes the A/A gate may add after the rounds of every process are spent.
    aa_extra_processes: int = 1
    # A process whose timing lost more than this share of its owed CPU time to other work (run-queue
    # wait plus steal, farm.measure.contention) is disturbed: its samples are not used and another
    # process replaces it, at most contention_extra_processes times; then the record is unreliable.
    # Measured on a 2-core EPYC, 2-thread timings: 0.6-1.7% lost on a quiet host; 3-8% beside the
    # daemons of a local multi-node Ray cluster, with the A/A control intact (the paired rounds
    # absorb it); 30-50% beside a busy neighbour on the same CPUs (the test's; a test run beside a
    # fidelity run took 47.9% from one process).
    max_contention: float = 0.15
    contention_extra_processes: int = 2

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "protocol") -> "Protocol":
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
        proto = cls(**data)
        for name in ("min_rounds", "max_rounds", "extra_rounds_step", "max_iters", "cold_iters", "bootstrap_resamples",
                     "placements"):
            value = getattr(proto, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{where}.{name}: must be a positive integer, got {value!r}")
        for name in ("batch_s", "warmup_s", "timeout_s"):
            value = getattr(proto, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{where}.{name}: must be a positive number, got {value!r}")
        if not isinstance(proto.processes, int) or isinstance(proto.processes, bool) or proto.processes < 1:
            raise UserError(f"{where}.processes: must be a positive integer, got {proto.processes!r}")
        for name in ("aa_extra_processes", "contention_extra_processes"):
            value = getattr(proto, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"{where}.{name}: must be an integer >= 0, got {value!r}")
        if (not isinstance(proto.max_contention, (int, float)) or isinstance(proto.max_contention, bool)
                or not 0 < proto.max_contention <= 1):
            raise UserError(f"{where}.max_contention: must be a share in (0, 1], got {proto.max_contention!r}")
        for name in ("aa_tolerance", "settle_lead"):
            value = getattr(proto, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
                raise UserError(f"{where}.{name}: must be a finite number >= 0, got {value!r}")
        if proto.max_rounds < proto.min_rounds:
            raise UserError(f"{where}.max_rounds: {proto.max_rounds} is below min_rounds {proto.min_rounds}")
        if proto.min_rounds < 3:
            raise UserError(f"{where}.min_rounds: at least 3 rounds are needed for an interval")
        return proto
