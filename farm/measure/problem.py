"""A problem: one quantized matmul shape to measure, and the operands it runs on."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kernels.candidates import DTYPES, OPS

from farm.errors import UserError

WEIGHT_MODES = ("warm", "cold", "model")
# Sizes beyond these are typos, not LLM layers (the largest public FFN dims are ~10^5).
MAX_M = 1 << 16
MAX_NK = 1 << 18
# The model weight state's stack: one compiled module calls the kernel on this many weight
# copies in turn (about 64 MiB of them, 2 to 16), so the per-call price of a compiled module
# (Dynamo's guards and the wrapper: 50 us warm on a 2-core AVX2 VM, more after a flush, 1-4x a
# small layer's decode) is paid once per stack, as a model's graph pays it once per step.
MODEL_STACK_BYTES = 64 << 20
MODEL_STACK_MAX = 16
# Extra weight placements (Protocol.placements) may hold at most this much more memory: each one
# is a copy of the weights plus each candidate's own packed copy of them.
PLACEMENT_BYTES = 1 << 30
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Which activation dtypes each op's ATen kernel accepts on CPU (checked on torch 2.13).
OP_DTYPES = {"int8": ("bf16", "fp16", "fp32"), "int4": ("bf16", "fp16", "fp32")}


@dataclass(frozen=True)
class Problem:
    op: str
    dtype: str
    m: int
    n: int
    k: int
    group_size: int | None = None
    threads: int = 1
    weights: str = "warm"

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def flushed(self) -> bool:
        """Whether the timing evicts the weights before each call (cold and model)."""
        return self.weights != "warm"

    @classmethod
    def from_dict(cls, data: dict) -> "Problem":
        return cls(**{f: data[f] for f in cls.__dataclass_fields__ if f in data})

    @property
    def weight_bytes(self) -> int:
        return self.n * self.k if self.op == "int8" else self.n * self.k // 2

    def label(self) -> str:
        group = f" g{self.group_size}" if self.group_size else ""
        return f"{self.op} {self.dtype} M={self.m} N={self.n} K={self.k}{group} t{self.threads} {self.weights}"


def validate(p: Problem, where: str = "problem") -> Problem:
    """Raise UserError naming the first field that is wrong."""
    if p.op not in OPS:
        raise UserError(f"{where}.op: unknown op {p.op!r} (expected one of {', '.join(OPS)})")
    if p.dtype not in DTYPES or p.dtype not in OP_DTYPES[p.op]:
        raise UserError(f"{where}.dtype: {p.dtype!r} is not an activation dtype of {p.op} ({', '.join(OP_DTYPES[p.op])})")
    for name, value, top in (("m", p.m, MAX_M), ("n", p.n, MAX_NK), ("k", p.k, MAX_NK)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{where}.{name}: must be an integer, got {value!r}")
        if not 1 <= value <= top:
            raise UserError(f"{where}.{name}: {value} is outside 1..{top}")
    if not isinstance(p.threads, int) or not 1 <= p.threads <= 1024:
        raise UserError(f"{where}.threads: must be an integer in 1..1024, got {p.threads!r}")
    if p.weights not in WEIGHT_MODES:
        raise UserError(f"{where}.weights: {p.weights!r} is not one of {', '.join(WEIGHT_MODES)}")
    if p.op == "int4":
        if not isinstance(p.group_size, int) or p.group_size not in (32, 64, 128, 256):
            raise UserError(f"{where}.group_size: int4 needs a group size of 32, 64, 128 or 256, got {p.group_size!r}")
        if p.k % p.group_size:
            raise UserError(f"{where}.k: K={p.k} is not divisible by the group size {p.group_size}")
        if p.n % 16 or p.k % 2:  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
            raise UserError(f"{where}.n/k: int4 packing needs N divisible by 16 and K even (N={p.n}, K={p.k})")
    elif p.group_size is not None:
        raise UserError(f"{where}.group_size: only int4 takes a group size (op is {p.op})")
    return p


def stack_size(problem: Problem) -> int:
    """Kernel calls per call of the compiled module: 1, or the model state's stack."""
    if problem.weights != "model":
        return 1
    return max(2, min(MODEL_STACK_MAX, math.ceil(MODEL_STACK_BYTES / problem.weight_bytes)))


def placement_count(problem: Problem, wanted: int, candidates: int) -> int:
    """How many weight placements a process times each candidate on: `wanted` (Protocol.placements),
    fewer where the copies would pass PLACEMENT_BYTES, and 1 in the model state, whose stack
    already reads a copy of its own in every kernel call."""
    if problem.weights == "model":
        return 1
    per_placement = problem.weight_bytes * (1 + candidates)
    return max(1, min(wanted, 1 + PLACEMENT_BYTES // per_placement))


@dataclass
class Operands:
    x: "object"
    weight: "object"
    scales: "object"  # int8: per-channel scale [N]; int4: scales_and_zeros [K/group, N, 2]

    def call_eager(self, problem: Problem):
        import torch

        if problem.op == "int8":
            return torch._weight_int8pack_mm(self.x, self.weight, self.scales)
        return torch._weight_int4pack_mm_for_cpu(self.x, self.weight, problem.group_size, self.scales)

    def placed_copy(self) -> "Operands":
        """The same operands with the weights and scales in fresh memory: another placement."""
        return Operands(self.x, self.weight.clone(), self.scales.clone())


def make_operands(problem: Problem, seed: int = 0) -> Operands:
    """Deterministic operands with realistic magnitudes (outputs O(1), no overflow)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, TORCH_DTYPES[problem.dtype])
    x = torch.randn(problem.m, problem.k, generator=gen).to(dtype)
    if problem.op == "int8":
        w = torch.randint(-127, 128, (problem.n, problem.k), generator=gen, dtype=torch.int8)
        scales = (torch.rand(problem.n, generator=gen) * 0.5 + 0.5) / (127 * problem.k**0.5)
        return Operands(x, w, scales.to(dtype))
    w4 = torch.randint(0, 16, (problem.n, problem.k), generator=gen, dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(w4, 1)
    groups = problem.k // problem.group_size
    scale = (torch.rand(groups, problem.n, generator=gen) * 0.5 + 0.5) / (8 * problem.k**0.5)
    zero = torch.randn(groups, problem.n, generator=gen) * scale
    return Operands(x, packed, torch.stack([scale, zero], dim=-1).to(dtype).contiguous())
