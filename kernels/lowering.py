"""Inductor lowerings for the weight-only-quantized matmuls that pick one candidate.

`register(policy)` puts these lowerings in place of Inductor's for
`aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu`. For each call the policy
gets the problem key and answers with a candidate (the lowering then builds that single
choice: no benchmarking) or None (Inductor's own lowering runs, under the user's config).

The farm measures candidates through exactly this code (a Forced policy), and users run it
with a table policy (kernels.install): what is measured is what ships.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

import torch

from .candidates import ATEN, DEQUANT, DTYPE_BYTES, Candidate, CandidateError, check_bounds, dense_temp_bytes, small_m_int8_path

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_GEMM_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
# dq's dense weight lives for one call; 1 GiB holds an fp32 4096x65536 weight (every projection
# of the 7-8B models the farm sweeps) and keeps a mis-set table from allocating an lm_head-sized
# temporary per token. Overridable with KERNEL_FARM_DQ_MAX_BYTES.
DQ_MAX_BYTES = 1 << 30
OP_TARGETS = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}
# What the farm measures: anything else is declined to Inductor's own lowering.
GROUP_SIZES = (32, 64, 128, 256)
_WEIGHT_DTYPES = {"int8": torch.int8, "int4": torch.uint8}


@dataclass(frozen=True)
class ProblemKey:
    op: str
    dtype: str
    m: int | None  # None: M is symbolic at compile time (dynamic shapes)
    n: int | None  # None only in a declined problem's key (symbolic N or K)
    k: int | None
    group_size: int | None
    threads: int


@dataclass(frozen=True)
class Decision:
    """What the lowering did for one quantized matmul (kept for inspection and tests)."""

    key: ProblemKey
    candidate: str | None  # None: handed to Inductor's own lowering
    source: str  # "forced", "table", "table:nearest-m", "inductor"
    note: str = ""

    def as_dict(self) -> dict:
        return {**asdict(self), "key": asdict(self.key)}


class Unsupported(RuntimeError):
    """The forced candidate does not exist for this problem on this host."""


class Policy(Protocol):
    def choose(self, key: ProblemKey) -> tuple[Candidate | None, str, str]:
        """(candidate or None for Inductor's own, source, note)."""


class Forced:
    """Measurement policy: every quantized matmul is lowered to one candidate, or fails."""

    def __init__(self, candidate: Candidate):
        self.candidate = candidate

    def choose(self, key: ProblemKey) -> tuple[Candidate | None, str, str]:
        return self.candidate, "forced", ""


class Sealed:
    """After the farm compiled its candidates: any further lowering is a recompile, an error."""

    def choose(self, key: ProblemKey) -> tuple[Candidate | None, str, str]:
        raise RecompiledError(
            f"a quantized matmul {key} was lowered after compilation was sealed: a compiled "
            "candidate recompiled (Dynamo cache reset or guard failure) and would time another kernel"
        )


class RecompiledError(RuntimeError):
    pass


# A farm lowering's answer for "Inductor's own lowering" (the recorded decision says why).
DECLINE = object()


_lock = threading.Lock()
_policy: Policy | None = None
_originals: dict[Any, Callable] = {}
_decisions: list[Decision] = []
_warned: set[str] = set()


def decisions() -> list[Decision]:
    """Decisions taken since the last clear_decisions(), oldest first."""
    return list(_decisions)


def clear_decisions() -> None:
    _decisions.clear()


def register(policy: Policy) -> None:
    """Route both ops through this module with `policy` (replaces any earlier policy)."""
    global _policy
    from torch._inductor import lowering as inductor_lowering

    with _lock:
        _policy = policy
        _warned.clear()  # a new policy reports its own failures
        if _originals:
            return
        aten = torch.ops.aten
        for packet, op, fn in ((aten._weight_int8pack_mm, "int8", _int8pack_mm),
                               (aten._weight_int4pack_mm_for_cpu, "int4", _int4pack_mm)):
            # Every overload explicitly: register_lowering skips overloads already lowered.
            targets = [packet, *(getattr(packet, name) for name in packet.overloads())]
            _originals.update({t: inductor_lowering.lowerings[t] for t in targets if t in inductor_lowering.lowerings})
            original = _originals[packet.default]
            inductor_lowering.register_lowering(targets, type_promotion_kind=None)(_boundary(op, fn, original))


def unregister() -> None:
    """Give both ops back to Inductor's own lowerings."""
    global _policy
    from torch._inductor import lowering as inductor_lowering

    with _lock:
        _policy = None
        inductor_lowering.lowerings.update(_originals)
        _originals.clear()


def active_policy() -> Policy | None:
    return _policy


def _measuring() -> bool:
    """The farm's own policies: their errors are measurement results and must propagate."""
    return isinstance(_policy, (Forced, Sealed))


def _boundary(op: str, fn: Callable, original: Callable) -> Callable:
    """The farm's lowering `fn` behind one boundary: DECLINE, or any exception from the farm's
    code (a torch that passes something unexpected, a bug here), goes to Inductor's `original`
    with one KernelFarmWarning per distinct message; a table never breaks the user's compile.
    Inductor's own lowering runs outside the try, so its errors stay its own."""

    @functools.wraps(fn)
    def lowering(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if _measuring():
                raise
            _failed(op, exc)
            result = DECLINE
        return original(*args, **kwargs) if result is DECLINE else result

    return lowering


def _failed(op: str, exc: Exception) -> None:
    from torch._inductor.utils import parallel_num_threads

    message = f"the {op} lowering failed ({type(exc).__name__}: {str(exc).strip()[:300]})"
    _decisions.append(Decision(ProblemKey(op, "?", None, None, None, None, parallel_num_threads()),
                               None, "inductor", message))
    if message not in _warned:
        _warned.add(message)
        from . import _warn

        _warn(message)


def _static(size: Any) -> int | None:
    """A size as an int, None when it is symbolic (dynamic shapes)."""
    try:
        return int(size)
    except TypeError:  # sympy: "Cannot convert symbols to int"
        return None


def _key(op: str, mat1: Any, mat2: Any, n: Any, k: Any, group_size: int | None) -> tuple[ProblemKey, str | None]:
    """The problem's key, and why the farm cannot serve it (None: it can). A declined key
    has None for the sizes that are symbolic; M alone may be symbolic in a served key."""
    from torch._inductor.utils import parallel_num_threads

    size = mat1.get_size()
    dtype = mat1.get_dtype()
    m = _static(size[0]) if len(size) == 2 else None
    key = ProblemKey(op, _DTYPE_NAMES.get(dtype, str(dtype)), m, _static(n), _static(k), group_size,
                     parallel_num_threads())
    return key, _unkeyable(key, mat1, mat2)


def _unkeyable(key: ProblemKey, mat1: Any, mat2: Any) -> str | None:
    """Why this problem is outside what the farm measures (None: inside)."""
    if len(mat1.get_size()) != 2 or len(mat2.get_size()) != 2:
        return f"activation rank {len(mat1.get_size())} / weight rank {len(mat2.get_size())}, not 2 / 2"
    if key.dtype not in _GEMM_DTYPES:
        return f"activation dtype {key.dtype} is not one the farm measures"
    if mat2.get_dtype() != _WEIGHT_DTYPES[key.op]:
        return f"weight dtype {mat2.get_dtype()} is not {_WEIGHT_DTYPES[key.op]}"
    if key.n is None or key.k is None:
        return "symbolic N or K (dynamic shapes): tables are keyed by static N and K"
    if key.op == "int4" and key.group_size not in GROUP_SIZES:
        return f"group size {key.group_size} is not one of {GROUP_SIZES}"
    if _static(mat1.get_stride()[-1]) != 1 or not mat2.get_layout().is_contiguous():
        return "a strided activation or non-contiguous weight (the farm measures row-major operands)"
    return None


def _decline(key: ProblemKey, reason: str) -> object:
    if isinstance(_policy, Forced):
        raise Unsupported(f"{key.op}: {reason}")
    if isinstance(_policy, Sealed):
        _policy.choose(key)  # raises: any lowering after sealing is a recompile
    _decisions.append(Decision(key, None, "inductor", reason))
    return DECLINE


def _choose(key: ProblemKey) -> Candidate | None:
    policy = _policy
    if policy is None:
        return None
    candidate, source, note = policy.choose(key)
    if candidate is not None and candidate.kind not in (ATEN, DEQUANT):
        try:
            check_bounds(candidate, key.threads)
        except CandidateError as exc:
            if source == "forced":
                raise
            _decisions.append(Decision(key, None, "inductor", f"rejected {candidate.id}: {exc}"))
            return None
    _decisions.append(Decision(key, candidate.id if candidate else None, source if candidate else "inductor", note))
    return candidate


def template_class(base: type, knobs) -> type:
    """Inductor's template class `base` bound to a candidate's knobs: tf/cb/ks by kernels.template,
    then nt by kernels.template_threads (two modules, two source hashes: see template_threads)."""
    import dataclasses

    from .template import bind
    from .template_threads import bind_threads

    return bind_threads(bind(base, dataclasses.replace(knobs, threads=None)), knobs.threads)


def _template_unsupported(layout, mat1, mat2, **kwargs) -> str | None:
    """Why Inductor's C++ template cannot run this problem here (None: it can)."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.utils import use_cpp_gemm_template

    # use_cpp_gemm_template also asks for max-autotune; only its other checks matter here.
    with config.patch(max_autotune=True):
        if use_cpp_gemm_template(layout, mat1, mat2, mat2_transposed=True, **kwargs):
            return None
    isa = pick_vec_isa()
    return (
        f"Inductor has no C++ GEMM template for {mat1.get_dtype()} x {mat2.get_dtype()} "
        f"on vec ISA {isa!s} (simdlen {getattr(isa, '_bit_width', '?')}), "
        "or the weight is not a frozen constant"
    )


def _fallback_or_raise(key: ProblemKey, candidate: Candidate, reason: str) -> object:
    if isinstance(_policy, Forced):
        raise Unsupported(f"{candidate.id}: {reason}")
    _decisions.append(Decision(key, None, "inductor", f"{candidate.id} unsupported here: {reason}"))
    return DECLINE


def _first(result):
    """autotune_select_algorithm returns (node, choice) in torch 2.13, the node alone before."""
    return result[0] if isinstance(result, tuple) else result


def _int8pack_mm(input, weight, scale, *, layout=None):
    from torch._inductor.codegen.cpp_gemm_template import CppGemmTemplate
    from torch._inductor.codegen.cpp_utils import create_epilogue_with_attr
    from torch._inductor.kernel.mm_common import mm_args
    from torch._inductor.lowering import expand
    from torch._inductor.quantized_lowerings import aten__weight_int8pack_mm
    from torch._inductor.select_algorithm import autotune_select_algorithm, realize_inputs


    m, n, k, out_layout, mat1, mat2 = mm_args(input, weight, layout=layout, mat2_transposed=True)
    key, why_not = _key("int8", mat1, mat2, n, k, None)
    if why_not:
        return _decline(key, why_not)
    candidate = _choose(key)
    if candidate is None:
        return DECLINE

    if candidate.kind == DEQUANT:
        too_big = _dequant_too_big(candidate, key)
        if too_big:
            return _fallback_or_raise(key, candidate, too_big)
        return _dequant_mm(input, weight, scale, candidate.gemm_dtype)
    choices: list = []
    if candidate.kind == ATEN:
        choices.append(aten__weight_int8pack_mm.bind((mat1, mat2, scale), out_layout))
    else:
        reason = _template_unsupported(out_layout, mat1, mat2)
        if reason is None and candidate.knobs.has_blocking() and key.m is not None \
                and small_m_int8_path(key.op, key.dtype, key.m):
            # Declined here with its reason; otherwise the template's first render (inside
            # add_choices) raises KnobsIgnored and the table's choice ends as a failed lowering.
            reason = ("tf, cb and ks have no effect: Inductor renders int8 x bf16 with M < 16 through "
                      "SMALL_M_GEMM_TEMPLATE, which has no thread or cache blocking (nt alone applies)")
        if reason:
            return _fallback_or_raise(key, candidate, reason)

        def mul_epilogue(buf):
            return create_epilogue_with_attr(buf, "mul", other=realize_inputs(expand(scale, out_layout.size)))

        template_class(CppGemmTemplate, candidate.knobs).add_choices(
            choices, out_layout, [mat1, mat2, scale], trans_w=True, epilogue_creator=mul_epilogue
        )
    return _first(autotune_select_algorithm("_weight_int8pack_mm", choices, [mat1, mat2, scale], out_layout))


def dequant_max_bytes() -> int:
    """The largest per-call dense weight dq may allocate (KERNEL_FARM_DQ_MAX_BYTES)."""
    import os

    raw = os.environ.get("KERNEL_FARM_DQ_MAX_BYTES", "")
    return int(raw) if raw.isdigit() else DQ_MAX_BYTES


def _dequant_too_big(candidate: Candidate, key: ProblemKey) -> str | None:
    """Why a table's dq must not run here (None: it may)."""
    if DTYPE_BYTES[candidate.gemm_dtype or key.dtype] < DTYPE_BYTES[key.dtype]:
        # The farm never measures it as a winner (it fails the fp32 tolerance); a table from
        # elsewhere must not quietly run an fp32 model's matmul in 16 bits.
        return f"its {candidate.gemm_dtype} GEMM is narrower than the {key.dtype} activations"
    size, limit = dense_temp_bytes(candidate, key.dtype, key.n, key.k), dequant_max_bytes()
    if size > limit:
        return (f"its dense {key.n}x{key.k} weight needs {size} bytes per call, over the {limit} byte bound "
                "(KERNEL_FARM_DQ_MAX_BYTES)")
    return None


def _dequant_mm(input, weight, scale, gemm_dtype: str | None):
    """x @ dequant(w).T * scale: the int8 weight converted to the GEMM dtype in each call
    (a pointwise kernel), then a dense GEMM through ATen/oneDNN (never autotuned), the scale
    applied in the GEMM dtype and the result cast back to the activation dtype."""
    from torch._inductor import config
    from torch._inductor.lowering import lowerings

    aten = torch.ops.aten
    convert = lowerings[torch.ops.prims.convert_element_type.default]
    act = input.get_dtype()
    gemm = _GEMM_DTYPES[gemm_dtype] if gemm_dtype else act
    with config.patch(max_autotune=False, max_autotune_gemm=False):
        dense = convert(weight, gemm)
        x = input if gemm == act else convert(input, gemm)
        out = lowerings[aten.mm.default](x, lowerings[aten.permute.default](dense, [1, 0]))
        if gemm == act:
            return lowerings[aten.mul.Tensor](out, scale)
        return convert(lowerings[aten.mul.Tensor](out, convert(scale, gemm)), act)


# The CPU int4 packings of ATen's weight_to_int4pack_kernel (aten/src/ATen/native/cpu/int4mm_kernel.cpp):
# the packed [N, K/2] uint8 weight holds N in blocks of BLOCK_N = 4 float vectors (64 on AVX512,
# 32 on AVX2 and the scalar x86 build, 16 with 128-bit vectors), each block k-major (K rows of
# nb_size/2 bytes). In a full block's row, AVX2/AVX512 put n in byte n % (BLOCK_N/2), the low
# nibble for the block's first half ("split"); other builds put it in byte n // 2, the low nibble
# for even n ("pairs"); a last, partial block (N % BLOCK_N) is always in pairs. A nibble q stands
# for (q - 8) * scale + zero, with qScaleAndZeros[k // group, n] = (scale, zero), in fp32.
_INT4_PACKINGS = tuple((block, split) for block in (64, 32, 16) for split in (True, False))


def _int4_full_position(n, k, depth: int, block: int, split: bool, div, mod):
    """(byte offset, nibble: 0 low, 1 high) of w[n, k] in a full N-block of a packed weight with
    K = depth; `div` and `mod` are floor division and modulo (ints in the probe, Inductor's sympy
    functions in the kernel)."""
    half = block // 2
    base = div(n, block) * (half * depth) + k * half
    if split:
        return base + mod(n, half), mod(div(n, half), 2)
    return base + div(mod(n, block), 2), mod(n, 2)


def _int4_tail_position(n, k, size: int, depth: int, block: int, div, mod):
    """The same in the partial last block (N % BLOCK_N rows, always in pairs)."""
    start = size // block * block
    return start * depth // 2 + k * ((size - start) // 2) + div(n - start, 2), mod(n, 2)


@functools.lru_cache(maxsize=None)
def _probe_int4_packing(capability: str) -> tuple[int, bool] | None:
    """The (BLOCK_N, split) packing that _convert_weight_to_int4pack_for_cpu uses in this process
    (ATen picks it by CPU capability, ATEN_CPU_CAPABILITY included): packs a small weight with a
    partial block and keeps the one packing that reads every value back; None when none does."""
    import operator

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    size, depth = 3 * 64 + 16, 4
    with unset_fake_temporarily(), torch.no_grad():
        w = torch.randint(0, 16, (size, depth), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        flat = torch._convert_weight_to_int4pack_for_cpu(w, 1).reshape(-1).tolist()
        values = w.tolist()
    found = []
    for block, split in _INT4_PACKINGS:
        def read(n, k):
            if n < size // block * block:
                offset, high = _int4_full_position(n, k, depth, block, split, operator.floordiv, operator.mod)
            else:
                offset, high = _int4_tail_position(n, k, size, depth, block, operator.floordiv, operator.mod)
            return flat[offset] >> 4 * high & 15 if 0 <= offset < len(flat) else -1
        if all(read(n, k) == values[n][k] for n in range(size) for k in range(depth)):
            found.append((block, split))
    return found[0] if len(found) == 1 else None


def _int4_packing() -> tuple[int, bool] | None:
    return _probe_int4_packing(torch.backends.cpu.get_cpu_capability())


def _dequant_int4_mm(input, weight, group_size: int, scales_and_zeros, gemm_dtype: str | None, key: ProblemKey,
                     packing: tuple[int, bool]):
    """x @ dequant(w).T for the CPU int4 packed weight: one pointwise kernel unpacks it to a dense
    [N, K] weight in the GEMM dtype in each call ((q - 8) * scale + zero in fp32, as ATen's kernel
    computes it), then a dense GEMM through ATen/oneDNN (never autotuned), cast to the activation dtype."""
    import sympy
    from torch._inductor import config, ir
    from torch._inductor.lowering import lowerings
    from torch._inductor.virtualized import ops
    from torch.utils._sympy.functions import FloorDiv, ModularIndexing

    aten = torch.ops.aten
    convert = lowerings[torch.ops.prims.convert_element_type.default]
    act = input.get_dtype()
    gemm = _GEMM_DTYPES[gemm_dtype] if gemm_dtype else act
    n, k, block, split = key.n, key.k, *packing
    start = n // block * block  # where the partial block begins (n when there is none)

    def div(a, b):
        return FloorDiv(a, b)

    def mod(a, b):
        return ModularIndexing(a, 1, b)

    with config.patch(max_autotune=False, max_autotune_gemm=False):
        load_byte = lowerings[aten.reshape.default](weight, [n * k // 2]).make_loader()
        load_sz = scales_and_zeros.make_loader()

        def f32(value):
            return ops.constant(value, torch.float32)

        def nibble(position):
            """The nibble as an fp32 in 0..15, in float arithmetic (exact on 0..255): Inductor's
            C++ backend has vector conversions for uint8 -> fp32 and fp32 -> bf16/fp16, while
            uint8 -> int32 x 2 and int32 -> fp32 x 2 go element by element through memory."""
            offset, high = position
            byte = ops.to_dtype(load_byte([offset]), torch.float32)
            hi = ops.floor(ops.mul(byte, f32(1 / 16)))
            lo = ops.sub(byte, ops.mul(hi, f32(16.0)))
            return ops.add(lo, ops.mul(ops.index_expr(sympy.sympify(high), torch.float32), ops.sub(hi, lo)))

        def inner_fn(index):
            nn, kk = index
            if start == n:
                q = nibble(_int4_full_position(nn, kk, k, block, split, div, mod))
            elif start == 0:
                q = nibble(_int4_tail_position(nn, kk, n, k, block, div, mod))
            else:  # a partial last block: each formula is read only where it is in bounds
                in_full = ops.lt(ops.index_expr(nn, torch.int64), ops.constant(start, torch.int64))
                in_tail = ops.ge(ops.index_expr(nn, torch.int64), ops.constant(start, torch.int64))
                full = ops.masked(in_full, lambda: nibble(_int4_full_position(nn, kk, k, block, split, div, mod)), 0.0)
                tail = ops.masked(in_tail, lambda: nibble(_int4_tail_position(nn, kk, n, k, block, div, mod)), 0.0)
                q = ops.where(in_full, full, tail)
            group = div(kk, group_size)
            scale = ops.to_dtype(load_sz([group, nn, sympy.Integer(0)]), torch.float32)
            zero = ops.to_dtype(load_sz([group, nn, sympy.Integer(1)]), torch.float32)
            return ops.to_dtype(ops.add(ops.mul(ops.sub(q, f32(8.0)), scale), zero), gemm)

        dense = ir.Pointwise.create(device=weight.get_device(), dtype=gemm, inner_fn=inner_fn,
                                    ranges=[sympy.Integer(n), sympy.Integer(k)])
        x = input if gemm == act else convert(input, gemm)
        out = lowerings[aten.mm.default](x, lowerings[aten.permute.default](dense, [1, 0]))
        return out if gemm == act else convert(out, act)


def _int4pack_mm(input, weight, qGroupSize, qScaleAndZeros, *, layout=None):
    from torch._inductor.codegen.cpp_gemm_template import CppWoqInt4GemmTemplate
    from torch._inductor.kernel.mm_common import mm_args
    from torch._inductor.quantized_lowerings import aten__weight_int4pack_mm_cpu
    from torch._inductor.select_algorithm import autotune_select_algorithm
    from torch._inductor.virtualized import V


    m, n, k, out_layout, mat1, mat2 = mm_args(
        input, weight, layout=layout, use_4x2_dim=True, mat2_transposed=True
    )
    key, why_not = _key("int4", mat1, mat2, n, k, _static(qGroupSize))
    if why_not:
        return _decline(key, why_not)
    candidate = _choose(key)
    if candidate is None:
        return DECLINE

    if candidate.kind == DEQUANT:
        packing = _int4_packing()
        reason = _dequant_too_big(candidate, key) or (None if packing else (
            "no known int4 packing reproduces what _convert_weight_to_int4pack_for_cpu writes on this host"))
        if reason:
            return _fallback_or_raise(key, candidate, reason)
        return _dequant_int4_mm(mat1, mat2, key.group_size, qScaleAndZeros, candidate.gemm_dtype, key, packing)
    group_size = V.graph.add_tensor_constant(torch.tensor(qGroupSize, dtype=torch.int64), name=None)
    inputs = [mat1, mat2, group_size, qScaleAndZeros]
    choices: list = []
    if candidate.kind == ATEN:
        choices.append(aten__weight_int4pack_mm_cpu.bind(tuple(inputs), out_layout))
    else:
        reason = _template_unsupported(out_layout, mat1, mat2, is_woq_int4=True, q_group_size=int(qGroupSize))
        if reason is None and not mat2.get_layout().is_contiguous():
            reason = "the packed int4 weight is not contiguous"
        if reason:
            return _fallback_or_raise(key, candidate, reason)
        template_class(CppWoqInt4GemmTemplate[int(qGroupSize)], candidate.knobs).add_choices(choices, out_layout, inputs)
    return _first(autotune_select_algorithm("_weight_int4pack_mm_for_cpu", choices, inputs, out_layout))
