"""Compile one candidate of one problem through the shipped lowering, as a real model would.

Each candidate gets a module class built from its own code object: Dynamo caches compiled
code per code object and its guards ignore Inductor's config, so two wrappers of one class
compiled under different candidates in one process would share one graph (INDUCTOR_NOTES).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import time
from dataclasses import dataclass, field

import torch

from kernels import lowering
from kernels.candidates import Candidate

from farm.measure.problem import Operands, Problem, stack_size

_CALLS = {
    "int8": "torch._weight_int8pack_mm(x, self.weight{i}, self.scales{i})",
    "int4": "torch._weight_int4pack_mm_for_cpu(x, self.weight{i}, self.group_size, self.scales{i})",
}
_BLOCKING_RE = re.compile(r"constexpr int64_t (num_threads|Mr|Nr|Kr|Mt_blocks|Nt_blocks|Kt_blocks|Mc_blocks|Nc_blocks|Kc_blocks) = (\d+);")
_counter = itertools.count()


@dataclass
class CompiledCandidate:
    candidate: Candidate
    fn: object
    compile_s: float
    output: torch.Tensor
    kernel: dict = field(default_factory=dict)
    decisions: list = field(default_factory=list)


def fresh_module(problem: Problem, operands: Operands, wrong: bool = False) -> torch.nn.Module:
    """A module whose forward is a brand-new code object (see module docstring). In the model
    weight state it returns a tuple: the kernel on each of stack_size() weight copies in turn
    (the first the operands' own weights), each read after the others evicted it.

    `wrong` scales the output by 1.05: only the fault injector asks for it."""
    tag = next(_counter)
    copies = stack_size(problem)
    calls = [_CALLS[problem.op].format(i=i or "") + (" * 1.05" if wrong else "") for i in range(copies)]
    body = calls[0] if copies == 1 else "(" + ", ".join(calls) + ",)"
    source = f"def forward(self, x):\n    return {body}\n"
    namespace: dict = {"torch": torch}
    exec(compile(source, f"<kernel-farm candidate {tag}>", "exec"), namespace)
    cls = type(f"WoqLinear{tag}", (torch.nn.Module,), {"forward": namespace["forward"]})
    module = cls()
    # Buffers, so that freezing turns them into constants as in a deployed model.
    for i in range(copies):
        module.register_buffer(f"weight{i or ''}", operands.weight if i == 0 else operands.weight.clone())
        module.register_buffer(f"scales{i or ''}", operands.scales if i == 0 else operands.scales.clone())
    module.group_size = problem.group_size
    return module.eval()


def first_output(output):
    """The stacked module's first call (on the operands' own weights), or the output itself."""
    return output[0] if isinstance(output, tuple) else output


def kernel_summary(sources: list[str]) -> dict:
    """What really got generated: template or extern call, and the blocking constants."""
    code = "\n".join(sources)
    blocking = {name: int(v) for name, v in _BLOCKING_RE.findall(code)}
    return {
        "template": "cpp_CppMicroGemm" in code or bool(blocking),
        # A call of ATen's kernel, not a name in comments or kernel names ("cpp_fused__weight_...").
        "extern_aten": bool(re.search(r"extern_kernels\.\w*(int8pack_mm|int4pack_mm|int4mm_packed)\w*\(|"
                                      r"torch\.ops\.(aten|quantized)\.\w*(int4mm_packed|int4pack_mm)\w*\.default\(", code)),
        "small_m_path": "Handle one output M * Nr block in each thread" in code,
        "blocking": blocking,
        "code_sha": hashlib.sha256(code.encode()).hexdigest()[:16],
    }


def compile_candidate(problem: Problem, operands: Operands, candidate: Candidate, cache_dir: str,
                      wrong: bool = False) -> CompiledCandidate:
    """Compile `candidate` for `problem` in isolation (own code object, own Inductor cache).

    The first process gives each candidate a fresh cache directory (a miss: the lowering runs
    and its decisions are recorded); a repeat process passes the same directory and hits the
    FX graph cache, so it compiles little, but records no decisions (INDUCTOR_NOTES): the
    caller checks a repeat by its generated code and its output instead."""
    from torch._inductor import config

    os.makedirs(cache_dir, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    module = fresh_module(problem, operands, wrong)
    lowering.register(lowering.Forced(candidate))
    lowering.clear_decisions()
    start = time.perf_counter()
    with torch.no_grad(), config.patch(freezing=True, force_disable_caches=False, fx_graph_cache=True):
        fn = torch.compile(module, fullgraph=True, dynamic=False)
        output, sources = _run_and_get_code(fn, operands.x)
    output = first_output(output)
    compile_s = time.perf_counter() - start
    decisions = [d.as_dict() for d in lowering.decisions()]
    # Any later lowering means something recompiled outside this function: fail loudly
    # rather than time a kernel built under another candidate.
    lowering.register(lowering.Sealed())
    return CompiledCandidate(candidate, fn, compile_s, output, kernel_summary(sources), decisions)


def _run_and_get_code(fn, *args):
    """Like torch._inductor.utils.run_and_get_code, without its torch._dynamo.reset(): a reset
    would make every earlier candidate's wrapper recompile, under whatever policy is current."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    sources: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", sources.append):
        output = fn(*args)
    return output, sources


def graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process (to prove none is compiled while timing)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error normalised by the reference's max magnitude (robust to near-zero entries)."""
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


# Dtype-aware tolerances: bf16 keeps 8 mantissa bits (2^-8 = 0.4%), and K-long fp32
# accumulations in a different order differ by a few ulps of the output dtype.
TOLERANCE = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 1e-4}
