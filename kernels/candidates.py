"""The farm's choice space: every lowering choice of a weight-only-quantized matmul.

A candidate is one lowering choice with its knobs, named by a stable id:

    aten                              ATen's extern kernel (Inductor's default)
    dq                                dequantize the weight (int8, or the CPU int4 packing with
                                      its group scales and zeros) to the activation dtype once per
                                      call in one generated kernel, then a dense GEMM (oneDNN);
                                      pays at prefill
    dq[fp32]                          the same with the GEMM in fp32 (or dq[bf16], dq[fp16]):
                                      bf16 GEMMs crawl on hosts without bf16 instructions (AVX2)
    aten~aa                           ATen compiled a second time: the A/A noise control
    cpp                               Inductor's C++ GEMM template, its own blocking heuristic
    cpp[tf=2,1,1;cb=1,16,64;ks=1]     the template with explicit knobs (any subset of them)
    cpp[nt=1]                         the template on 1 thread; the rest of the graph keeps the
                                      process's thread count (cpp[nt=2;tf=2,1,1] etc.)

Knobs (Inductor's config.cpp names, applied to one kernel only):
    nt  threads of this one GEMM kernel (the template's num_threads), 1 <= nt < the process's
        thread count (Inductor's parallel_num_threads()); nt equal to it is refused: it is
        plain `cpp`. For small problems where waking threads costs more than they give.
        Template only: ATen's extern kernel takes the process-global ATen/OpenMP thread
        count, which one call cannot change without touching every other op (kernels.template)
    tf  thread factors over (M, N, K); their product is the kernel's thread count: nt when
        given, else the process's (gemm_thread_factors)
    cb  cache blocking (Mc, Nc, Kc) in register blocks (gemm_cache_blocking)
    ks  maximum K-slices of the heuristic thread blocking (gemm_max_k_slices; 0 = unlimited)
On int8 x bf16 with M < 16 (small_m_int8_path) Inductor has no blocking: tf, cb and ks have
no effect there and are refused; nt alone applies (its parallel region gets nt threads).

This module is pure Python: it is imported at compile time and by the farm's driver.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

OPS = ("int8", "int4")
DTYPES = ("bf16", "fp16", "fp32")
ATEN = "aten"
DEQUANT = "dq"
# Kinds whose kernel is a library GEMM (oneDNN, or the BLAS behind aten.mm) that picks its ISA
# from CPUID: ATEN_CPU_CAPABILITY and Inductor's simdlen do not restrict them, so an emulated
# ISA class cannot measure them (on a real AVX2 host, dq in bf16 was 0.24x where an AVX512 host
# "restricted to AVX2" measured 1.41x).
LIBRARY_GEMM_KINDS = (DEQUANT,)
# GEMM dtypes of dq; None = the activation dtype.
GEMM_DTYPES = ("fp32", "bf16", "fp16")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
AA_CONTROL = "aten~aa"

# Bounds every knob must respect before it reaches generated C++ (tables are data).
MAX_THREADS = 1024
MAX_CACHE_BLOCKS = 4096
MAX_K_SLICES = 1024

# The pruned grid: cache blockings (register blocks) chosen to span the L1/L2 regimes of
# the template's heuristic on AVX512/AVX2 hosts (Kr=1..16, Nr=16..32 elements); 1,16,64 is
# the setting that took bf16 x int8 M=32 N=K=4096 from 41 ms to 15 ms in DESIGN.md.
PRUNED_CACHE_BLOCKINGS = ((1, 16, 64), (2, 8, 32), (4, 4, 128))
EXHAUSTIVE_MC = (1, 2, 4, 8)
EXHAUSTIVE_NC = (1, 4, 16, 64)
EXHAUSTIVE_KC = (16, 64, 256)
EXHAUSTIVE_K_SLICES = (0, 1, 2)
GRIDS = ("minimal", "pruned", "exhaustive")


class CandidateError(ValueError):
    """A candidate id or knob that is malformed or out of bounds."""


@dataclass(frozen=True)
class Knobs:
    thread_factors: tuple[int, int, int] | None = None
    cache_blocking: tuple[int, int, int] | None = None
    k_slices: int | None = None
    threads: int | None = None  # nt: this kernel's thread count (None: the process's)

    def is_default(self) -> bool:
        return self == Knobs()

    def has_blocking(self) -> bool:
        """Any of tf, cb, ks: knobs of the blocking that the small-M int8 path does not have."""
        return (self.thread_factors, self.cache_blocking, self.k_slices) != (None, None, None)

    def as_dict(self) -> dict:
        return {
            "tf": list(self.thread_factors) if self.thread_factors else None,
            "cb": list(self.cache_blocking) if self.cache_blocking else None,
            "ks": self.k_slices,
            "nt": self.threads,
        }


@dataclass(frozen=True)
class Candidate:
    kind: str  # "aten" or "cpp"
    knobs: Knobs = field(default_factory=Knobs)
    control: bool = False  # the A/A control: a second, separately compiled ATen
    gemm_dtype: str | None = None  # dq only: the dense GEMM's dtype (None: the activation's)

    @property
    def id(self) -> str:
        if self.kind == ATEN:
            return AA_CONTROL if self.control else ATEN
        if self.kind == DEQUANT:
            return DEQUANT + (f"[{self.gemm_dtype}]" if self.gemm_dtype else "")
        parts = []
        if self.knobs.threads is not None:
            parts.append(f"nt={self.knobs.threads}")
        if self.knobs.thread_factors:
            parts.append("tf=" + ",".join(map(str, self.knobs.thread_factors)))
        if self.knobs.cache_blocking:
            parts.append("cb=" + ",".join(map(str, self.knobs.cache_blocking)))
        if self.knobs.k_slices is not None:
            parts.append(f"ks={self.knobs.k_slices}")
        return "cpp" + (f"[{';'.join(parts)}]" if parts else "")

    def __str__(self) -> str:
        return self.id


_ID_RE = re.compile(r"^cpp(?:\[(?P<body>[^\]]*)\])?$")
_DQ_RE = re.compile(r"^dq\[(?P<dtype>[^\]]*)\]$")


def _triple(name: str, text: str, cand_id: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CandidateError(f"{cand_id!r}: {name} must be three integers, got {text!r}") from None
    if len(values) != 3:
        raise CandidateError(f"{cand_id!r}: {name} must have 3 values (m,n,k), got {len(values)}")
    return values  # type: ignore[return-value]


def parse(cand_id: str) -> Candidate:
    """Parse a candidate id; raises CandidateError naming what is wrong."""
    if not isinstance(cand_id, str):
        raise CandidateError(f"candidate id must be a string, got {type(cand_id).__name__}")
    if cand_id == ATEN:
        return Candidate(ATEN)
    if cand_id == AA_CONTROL:
        return Candidate(ATEN, control=True)
    if cand_id == DEQUANT:
        return Candidate(DEQUANT)
    dq = _DQ_RE.match(cand_id)
    if dq:
        if dq.group("dtype") not in GEMM_DTYPES:
            raise CandidateError(f"{cand_id!r}: unknown GEMM dtype {dq.group('dtype')!r} "
                                 f"(expected one of {', '.join(GEMM_DTYPES)})")
        return Candidate(DEQUANT, gemm_dtype=dq.group("dtype"))
    match = _ID_RE.match(cand_id)
    if not match:
        raise CandidateError(f"unknown candidate id {cand_id!r} (expected aten, dq, dq[...], cpp or cpp[...])")
    tf = cb = ks = nt = None
    body = match.group("body")
    for part in filter(None, (body or "").split(";")):
        key, _, value = part.partition("=")
        if key == "tf" and tf is None:
            tf = _triple("tf", value, cand_id)
        elif key == "cb" and cb is None:
            cb = _triple("cb", value, cand_id)
        elif key == "ks" and ks is None:
            try:
                ks = int(value)
            except ValueError:
                raise CandidateError(f"{cand_id!r}: ks must be an integer, got {value!r}") from None
        elif key == "nt" and nt is None:
            try:
                nt = int(value)
            except ValueError:
                raise CandidateError(f"{cand_id!r}: nt must be an integer, got {value!r}") from None
        else:
            raise CandidateError(f"{cand_id!r}: unknown or repeated knob {key!r}")
    return Candidate("cpp", Knobs(tf, cb, ks, nt))


def check_bounds(candidate: Candidate, threads: int) -> None:
    """Reject knob values that would reach generated C++ out of range."""
    knobs = candidate.knobs
    cid = candidate.id
    if knobs.threads is not None:
        # nt == threads is plain `cpp` under a second id (measured twice, and a table could
        # name one kernel two ways): refused, not normalised, so every id names one kernel.
        if not 1 <= knobs.threads < min(threads, MAX_THREADS + 1):
            raise CandidateError(
                f"{cid!r}: nt must be in 1..{min(threads, MAX_THREADS + 1) - 1} (fewer than the "
                f"process's {threads} threads; nt={threads} is plain cpp)" if threads > 1 else
                f"{cid!r}: nt needs a process of 2 threads or more (this one has {threads})"
            )
    if knobs.thread_factors is not None:
        kernel_threads = knobs.threads if knobs.threads is not None else threads
        what = "the kernel's nt" if knobs.threads is not None else "the thread count"
        if any(f < 1 or f > MAX_THREADS for f in knobs.thread_factors):
            raise CandidateError(f"{cid!r}: thread factors must be in 1..{MAX_THREADS}")
        if math.prod(knobs.thread_factors) != kernel_threads:
            raise CandidateError(
                f"{cid!r}: thread factors multiply to {math.prod(knobs.thread_factors)}, "
                f"not to {what} {kernel_threads}"
            )
    if knobs.cache_blocking is not None:
        if any(b < 1 or b > MAX_CACHE_BLOCKS for b in knobs.cache_blocking):
            raise CandidateError(f"{cid!r}: cache blocking must be in 1..{MAX_CACHE_BLOCKS}")
    if knobs.k_slices is not None and not 0 <= knobs.k_slices <= MAX_K_SLICES:
        raise CandidateError(f"{cid!r}: k-slices must be in 0..{MAX_K_SLICES}")


def thread_factorizations(threads: int) -> list[tuple[int, int, int]]:
    """Every ordered (m, n, k) with m*n*k == threads."""
    out = []
    for m in range(1, threads + 1):
        if threads % m:
            continue
        for n in range(1, threads // m + 1):
            if (threads // m) % n == 0:
                out.append((m, n, threads // m // n))
    return out


def fewer_threads(threads: int) -> list[int]:
    """The nt values a grid measures: halvings of the thread count while it stays even, then 1
    (2 -> [1], 8 -> [4, 2, 1], 12 -> [6, 3, 1]): a logarithmic few, since nt is for problems
    too small to feed every thread, where the question is how many to wake, not which split."""
    out, nt = [], threads
    while nt % 2 == 0 and nt > 2:
        nt //= 2
        out.append(nt)
    return out + [1] if threads > 1 else []


def space(threads: int, grid: str = "pruned", op: str | None = None) -> list[Candidate]:
    """The candidates a sweep measures, ATen and its A/A control first. Every op has the same
    space (dq included, for int8 and int4 alike); `op` is kept for callers that name it."""
    if grid not in GRIDS:
        raise CandidateError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    base = [Candidate(ATEN), Candidate(ATEN, control=True), Candidate("cpp")]
    factors = thread_factorizations(threads)
    if grid == "minimal":  # CI-sized: the heuristic and one explicit thread blocking
        knobbed = [Knobs(thread_factors=factors[-1])]
    elif grid == "pruned":
        # Each knob alone around the heuristic: thread factors, then cache blockings. Their
        # combinations were never better than the better of the two alone on the first
        # AVX512 sweeps (int8/int4 bf16, N=K=4096, M=32 and 128), so only exhaustive has them.
        knobbed = [Knobs(thread_factors=tf) for tf in factors]
        knobbed += [Knobs(cache_blocking=cb) for cb in PRUNED_CACHE_BLOCKINGS]
    else:
        blockings = [None, *itertools.product(EXHAUSTIVE_MC, EXHAUSTIVE_NC, EXHAUSTIVE_KC)]
        knobbed = [Knobs(tf, cb) for tf in factors for cb in blockings]
        knobbed += [Knobs(cache_blocking=cb, k_slices=ks) for cb in blockings for ks in EXHAUSTIVE_K_SLICES]
    if grid != "minimal":  # minimal stays CI-sized
        knobbed += [Knobs(threads=nt) for nt in fewer_threads(threads)]
    # dq in the activation dtype and in fp32: which GEMM dtype wins is a property of the host
    # (bf16 GEMMs need AVX512-BF16 or AMX to be fast), so every host measures both.
    extra = [Candidate(DEQUANT), Candidate(DEQUANT, gemm_dtype="fp32")]
    return base + extra + [Candidate("cpp", k) for k in knobbed if not k.is_default()]


def dense_temp_bytes(candidate: Candidate, act_dtype: str, n: int, k: int) -> int:
    """Bytes of the dense N x K weight a dq candidate materialises in each call, int8 or int4
    alike (0 for others)."""
    if candidate.kind != DEQUANT:
        return 0
    return n * k * DTYPE_BYTES[candidate.gemm_dtype or act_dtype]


def small_m_int8_path(op: str, dtype: str, m: int) -> bool:
    """Inductor renders int8 x bf16 with M < 16 through SMALL_M_GEMM_TEMPLATE, which has no
    thread or cache blocking: knobs have no effect there (checked again at render time)."""
    return op == "int8" and dtype == "bf16" and m < 16


# Knobs whose meaning is the same at any thread count (blocking sizes, not a split of threads).
THREAD_INDEPENDENT_KNOBS = ("cb", "ks")


def transfers_across_threads(candidate: Candidate) -> bool:
    """Whether a choice means the same kernel at any thread count, so a table measured at other
    thread counts may offer it: ATen, dq, the template's own heuristic, cache blocking and
    k-slices do; thread factors and a per-kernel thread count (and any knob added later) do not."""
    if candidate.kind != "cpp":
        return True
    return all(value is None for name, value in candidate.knobs.as_dict().items() if name not in THREAD_INDEPENDENT_KNOBS)
