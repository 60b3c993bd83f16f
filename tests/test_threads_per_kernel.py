"""nt: the C++ GEMM template on fewer threads than the process, the rest of the graph untouched (issue 12)."""

import os
import re

import pytest
import torch
import yaml
from torch._inductor import config

import kernels
from farm.measure.compiled import TOLERANCE, _run_and_get_code, relative_error
from farm.measure.host import native_isa
from farm.measure.problem import Problem, make_operands
from kernels import lowering
from kernels.table import TableError, load
from tablekit import entry, table_doc

THREADS = 2
# Big enough that Inductor parallelises the pointwise kernel (the GEMMs are tiny).
POINTWISE_NUMEL = 1 << 16


# --- tables (fast) ------------------------------------------------------------------------------


@pytest.mark.parametrize("winner, reason", [
    ("cpp[nt=2]", r"nt must be in 1\.\.1 .*nt=2 is plain cpp"),
    ("cpp[nt=0]", r"nt must be in 1\.\.1"),
    ("cpp[nt=64]", r"nt must be in 1\.\.1"),
    ("cpp[nt=one]", "nt must be an integer"),
    ("cpp[nt=1;tf=2,1,1]", "multiply to 2, not to the kernel's nt 1"),
])
def test_a_table_with_a_bad_nt_is_refused_naming_the_entry(tmp_path, winner, reason):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(table_doc([entry("int8", "bf16", 1, 64, 128, None, winner)], threads=THREADS)))
    with pytest.raises(TableError, match=rf"entries\[0\]\.winner: .*{reason}"):
        load(str(path))


def test_a_table_with_nt_below_its_thread_count_loads(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(table_doc([entry("int8", "bf16", 1, 64, 128, None, "cpp[nt=1]")], threads=THREADS)))
    (only,) = load(str(path)).entries.values()
    assert only.candidate.id == "cpp[nt=1]"


# --- real compiles (slow) -----------------------------------------------------------------------


def _kernels(code: str) -> dict[str, str]:
    """The C++ kernels of a Python wrapper, by name."""
    return dict(re.findall(r"(\w+) = async_compile\.cpp_pybinding\(\[.*?\], r'''(.*?)'''", code, re.S))


def _pragmas(source: str) -> list[str]:
    return re.findall(r"#\s*pragma omp parallel[^\n]*", source)


def _process_pragma_ok(pragmas: list[str]) -> bool:
    """Inductor writes num_threads(T) for the process's T threads, or a bare pragma (the OpenMP
    default, which torch set to T) when T equals os.cpu_count()."""
    allowed = {f"#pragma omp parallel num_threads({THREADS})"}
    if os.cpu_count() == THREADS:
        allowed.add("#pragma omp parallel")
    return bool(pragmas) and set(pragmas) <= allowed


def _module(src: str, tag: str, **buffers) -> torch.nn.Module:
    namespace = {"torch": torch}
    exec(compile(src, f"<nt-{tag}>", "exec"), namespace)  # a code object of its own (Dynamo caches per code)
    module = type(f"NT_{tag}", (torch.nn.Module,), {"forward": namespace["forward"]})()
    for name, value in buffers.items():
        module.register_buffer(name, value)
    return module.eval()


def _compile(tmp_path, module, entries, *args):
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(table_doc(entries, threads=THREADS)))
    with torch.no_grad():
        reference = module(*args)
    lowering.clear_decisions()
    with kernels.installed(str(path), strict=True), torch.no_grad(), \
            config.patch(freezing=True, force_disable_caches=True):
        out, sources = _run_and_get_code(torch.compile(module), *args)
    return out, reference, _kernels("\n".join(sources)), lowering.decisions()


@pytest.mark.slow
def test_int8_nt1_runs_its_gemms_on_one_thread_and_the_rest_of_the_graph_on_the_process_count(tmp_path):
    """One graph: an M=32 GEMM (Inductor's blocked template), an M=4 GEMM (its small-M template,
    which has no blocking but takes nt), an M=4 GEMM asking for cache blocking there (declined
    to Inductor's lowering at lowering time), and a pointwise kernel on the process's threads."""
    torch.set_num_threads(THREADS)
    ops = make_operands(Problem("int8", "bf16", 32, 64, 128, threads=THREADS), 0)
    wide = make_operands(Problem("int8", "bf16", 4, 128, 128, threads=THREADS), 1)
    src = ("def forward(self, x, xs, z):\n"
           "    return (torch._weight_int8pack_mm(x, self.w, self.s), torch._weight_int8pack_mm(xs, self.w, self.s),\n"
           "            torch._weight_int8pack_mm(xs, self.w2, self.s2), torch.sin(z) * 2)\n")
    module = _module(src, "int8", w=ops.weight, s=ops.scales, w2=wide.weight, s2=wide.scales)
    entries = [entry("int8", "bf16", 32, 64, 128, None, "cpp[nt=1]"), entry("int8", "bf16", 4, 64, 128, None, "cpp[nt=1]"),
               entry("int8", "bf16", 4, 128, 128, None, "cpp[nt=1;cb=1,1,16]")]
    out, reference, generated, decisions = _compile(
        tmp_path, module, entries, ops.x, ops.x[:4].clone(), torch.randn(POINTWISE_NUMEL))

    by_m_n = {(d.key.m, d.key.n): d for d in decisions}
    assert (by_m_n[32, 64].candidate, by_m_n[4, 64].candidate) == ("cpp[nt=1]", "cpp[nt=1]")
    assert by_m_n[4, 128].candidate is None and "SMALL_M_GEMM_TEMPLATE" in by_m_n[4, 128].note
    for got, want in zip(out[:3], reference[:3]):
        assert relative_error(got, want) <= TOLERANCE["bf16"]
    gemms = {name: src for name, src in generated.items() if "constexpr int64_t num_threads" in src}
    others = {name: src for name, src in generated.items() if name not in gemms}
    assert len(gemms) == 2, sorted(generated)
    for name, source in gemms.items():
        assert re.findall(r"constexpr int64_t num_threads = (\d+);", source) == ["1"], name
        small_m = "Handle one output M * Nr block in each thread" in source
        # The blocked template has no parallel region at one thread; the small-M one gets num_threads(1).
        assert _pragmas(source) == (["#pragma omp parallel num_threads(1)"] if small_m else []), name
    assert sum("Handle one output M * Nr block" in s for s in gemms.values()) == 1
    pointwise = [s for s in others.values() if "std::sin" in s or "sin(" in s]
    assert len(pointwise) == 1 and _process_pragma_ok(_pragmas(pointwise[0])), [_pragmas(s) for s in others.values()]


@pytest.mark.slow
@pytest.mark.skipif(native_isa() not in ("avx512", "amx"), reason="Inductor's int4 template needs AVX512 (INDUCTOR_NOTES)")
def test_int4_nt1_runs_its_gemm_on_one_thread_and_the_rest_of_the_graph_on_the_process_count(tmp_path):
    torch.set_num_threads(THREADS)
    problem = Problem("int4", "bf16", 8, 64, 128, group_size=32, threads=THREADS)
    ops = make_operands(problem, 0)
    src = ("def forward(self, x, z):\n"
           "    return torch._weight_int4pack_mm_for_cpu(x, self.w, 32, self.s), torch.sin(z) * 2\n")
    module = _module(src, "int4", w=ops.weight, s=ops.scales)
    out, reference, generated, decisions = _compile(
        tmp_path, module, [entry("int4", "bf16", 8, 64, 128, 32, "cpp[nt=1]")], ops.x, torch.randn(POINTWISE_NUMEL))

    assert [(d.candidate, d.source) for d in decisions] == [("cpp[nt=1]", "table")]
    assert relative_error(out[0], reference[0]) <= TOLERANCE["bf16"]
    (gemm,) = [s for s in generated.values() if "constexpr int64_t num_threads" in s]
    assert re.findall(r"constexpr int64_t num_threads = (\d+);", gemm) == ["1"] and _pragmas(gemm) == []
    (pointwise,) = [s for s in generated.values() if "constexpr int64_t num_threads" not in s]
    assert _process_pragma_ok(_pragmas(pointwise))
