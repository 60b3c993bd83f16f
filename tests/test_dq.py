"""dq with the GEMM dtype as a knob (issue 15), and emulation that refuses what it cannot restrict (issue 10)."""

import copy
import re
import warnings

import pytest
import torch
import yaml
from torch._inductor import config

import kernels
from farm.measure.compiled import TOLERANCE, _run_and_get_code, relative_error
from farm.measure.host import native_isa
from farm.measure.problem import Problem, make_operands
from farm.tables.aggregate import aggregate
from kernels import lowering
from kernels.candidates import CandidateError, parse, space
from kernels.provenance import template_hash, torch_version
from tablekit import entry, noisy, record, table_doc

THREADS = 2
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- ids, grids, tables (fast) -----------------------------------------------------------------


def test_dq_ids_round_trip_and_unknown_gemm_dtypes_are_refused():
    for cid in ("dq", "dq[fp32]", "dq[bf16]", "dq[fp16]"):
        assert parse(cid).id == cid
    assert parse("dq[fp32]").gemm_dtype == "fp32" and parse("dq").gemm_dtype is None
    for bad in ("dq[fp64]", "dq[]", "dq[int8]"):
        with pytest.raises(CandidateError, match="unknown GEMM dtype"):
            parse(bad)


def test_the_dense_temporary_is_counted_in_the_gemm_dtype():
    from farm.measure.record import build_record
    from farm.measure.protocol import Protocol
    from kernels.candidates import dense_temp_bytes

    assert dense_temp_bytes(parse("dq[fp32]"), "bf16", 48, 64) == 48 * 64 * 4
    assert dense_temp_bytes(parse("dq"), "bf16", 48, 64) == 48 * 64 * 2
    assert dense_temp_bytes(parse("cpp"), "bf16", 48, 64) == 0
    rec = build_record(None, Problem("int8", "bf16", 8, 48, 64, threads=THREADS), ["aten", "dq[fp32]"],
                       {"aten": {"status": "ok"}, "dq[fp32]": {"status": "ok"}}, {}, {}, Protocol(), {})
    assert {c["id"]: c["temp_bytes"] for c in rec["candidates"]} == {"aten": 0, "dq[fp32]": 48 * 64 * 4}


def test_every_int8_grid_measures_dq_in_the_activation_dtype_and_in_fp32():
    for grid in ("minimal", "pruned", "exhaustive"):
        ids = [c.id for c in space(THREADS, grid, "int8")]
        assert "dq" in ids and "dq[fp32]" in ids
        assert not any(c.startswith("dq") for c in (c.id for c in space(THREADS, grid, "int4")))


def test_a_table_naming_an_unknown_gemm_dtype_is_refused_with_one_warning(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(table_doc([entry("int8", "bf16", 32, 64, 128, None, "dq[fp64]")], threads=THREADS)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = kernels.install(str(path))
    kernels.uninstall()
    farm_warnings = [w for w in caught if issubclass(w.category, kernels.KernelFarmWarning)]
    assert not result.active and len(farm_warnings) == 1
    assert "entries[0].winner" in str(farm_warnings[0].message) and "fp64" in str(farm_warnings[0].message)


# --- emulation fidelity in aggregation (fast, replayed rows) -------------------------------------


def _emulated(rec):
    rec = copy.deepcopy(rec)
    rec["host"].update(emulated=True, hostname="big-host")
    return rec


def test_an_emulated_dq_never_wins_and_is_reported():
    # dq looks 1.4x faster on an AVX512 host restricted to AVX2, as the shipped emulated table once said.
    fast_dq = record("big-host", "int8", 128, {"aten": noisy(100), "aten~aa": noisy(100, seed=1),
                                               "dq": noisy(70, seed=2), "cpp": noisy(98, seed=3)}, isa="avx2")
    result = aggregate([_emulated(fast_dq)], torch_version(), template_hash())
    (only,) = result.tables[("avx2", 2)]["entries"]
    assert only["winner"] != "dq" and "dq" in only["failed"]
    assert len(result.emulation_blind) == 1 and "dq" in result.emulation_blind[0]


def test_a_native_record_replaces_emulated_ones_and_agreement_is_counted():
    emulated = _emulated(record("big-host", "int8", 128, {"aten": noisy(100), "aten~aa": noisy(100, seed=1),
                                                          "cpp": noisy(80, seed=3)}, isa="avx2"))
    native = record("epyc", "int8", 128, {"aten": noisy(100), "aten~aa": noisy(100, seed=1), "cpp": noisy(99, seed=3),
                                          "dq[fp32]": noisy(60, seed=4)}, isa="avx2")
    agreeing = [_emulated(record("big-host", "int8", 1, {"aten": noisy(100), "aten~aa": noisy(100, seed=1),
                                                        "cpp": noisy(70, seed=3)}, isa="avx2")),
                record("epyc", "int8", 1, {"aten": noisy(100), "aten~aa": noisy(100, seed=1), "cpp": noisy(75, seed=3)},
                       isa="avx2")]
    result = aggregate([emulated, native, *agreeing], torch_version(), template_hash())
    table = result.tables[("avx2", 2)]
    assert table["emulated"] is False and set(table["hosts"]) == {"epyc"}
    winners = {e["key"]["m"]: e["winner"] for e in table["entries"]}
    assert winners == {1: "cpp", 128: "dq[fp32]"}
    assert sorted((row["key"][2], row["native"], row["emulated"], row["agree"]) for row in result.agreement) == [
        (1, "cpp", "cpp", True), (128, "dq[fp32]", "cpp", False)]


# --- real compiles (slow) -----------------------------------------------------------------------


def _module(problem: Problem, seed: int, tag: str):
    """A frozen int8 layer with a code object and file name of its own (Dynamo caches per code)."""
    ops = make_operands(problem, seed)
    src = "def forward(self, x):\n    return torch._weight_int8pack_mm(x, self.w, self.s)\n"
    namespace = {"torch": torch}
    exec(compile(src, f"<dq-{tag}>", "exec"), namespace)
    cls = type(f"DQ_{re.sub(r'[^A-Za-z0-9]', '_', tag)}", (torch.nn.Module,), {"forward": namespace["forward"]})
    module = cls()
    module.register_buffer("w", ops.weight)
    module.register_buffer("s", ops.scales)
    return module, ops


def _mm_out_dtype(code: str) -> str:
    """The dtype of the buffer that the dense GEMM (extern_kernels.mm) writes."""
    out = re.search(r"extern_kernels\.mm\(.*out=(buf\d+)\)", code).group(1)
    return re.search(rf"{out} = empty_strided_cpu\(.*, torch\.(\w+)\)", code).group(1)


def _compile_with(tmp_path, winner: str, problem: Problem, tag: str):
    path = tmp_path / f"{tag}.yaml"
    key = (problem.op, problem.dtype, problem.m, problem.n, problem.k, None)
    path.write_text(yaml.safe_dump(table_doc([entry(*key, winner)], threads=THREADS)))
    module, ops = _module(problem, 3, tag)
    with torch.no_grad():
        reference = module(ops.x)
    lowering.clear_decisions()
    with kernels.installed(str(path), strict=True), torch.no_grad(), \
            config.patch(freezing=True, force_disable_caches=True):
        out, sources = _run_and_get_code(torch.compile(module), ops.x)
    return out, reference, "\n".join(sources), lowering.decisions()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_both_dq_variants_compile_match_eager_and_run_their_gemm_dtype(tmp_path, dtype):
    torch.set_num_threads(THREADS)
    problem = Problem("int8", dtype, 8, 48, 64, threads=THREADS)
    for winner, gemm in (("dq", dtype), ("dq[fp32]", "fp32")):
        tag = f"{dtype}-{winner}"
        out, reference, code, decisions = _compile_with(tmp_path, winner, problem, tag)
        assert [(d.candidate, d.source) for d in decisions] == [(winner, "table")]
        assert out.dtype == TORCH_DTYPES[dtype]  # the activation dtype, whatever the GEMM ran in
        assert relative_error(out, reference) <= TOLERANCE[dtype], tag
        assert _mm_out_dtype(code) == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[gemm], tag


@pytest.mark.slow
def test_dq_over_the_temporary_bound_is_declined_to_inductor(tmp_path, monkeypatch):
    torch.set_num_threads(THREADS)
    problem = Problem("int8", "bf16", 8, 48, 64, threads=THREADS)
    monkeypatch.setenv("KERNEL_FARM_DQ_MAX_BYTES", str(48 * 64 * 4 - 1))  # one byte short of fp32 48x64
    out, reference, code, decisions = _compile_with(tmp_path, "dq[fp32]", problem, "bound")
    assert [(d.candidate, d.source) for d in decisions][-1] == (None, "inductor")
    assert "KERNEL_FARM_DQ_MAX_BYTES" in decisions[-1].note
    assert "extern_kernels.mm(" not in code and relative_error(out, reference) <= TOLERANCE["bf16"]


@pytest.mark.slow
@pytest.mark.skipif(native_isa() not in ("avx512", "amx"), reason="emulating AVX2 needs an AVX512 host")
def test_emulated_avx2_reports_dq_unsupported_instead_of_timing_the_hosts_own_gemm(quick_protocol):
    from farm.measure.manager import measure

    rec = measure(Problem("int8", "bf16", 32, 256, 256, threads=THREADS), protocol=quick_protocol, isa="avx2",
                  only=["dq", "dq[fp32]"])
    cands = {c["id"]: c for c in rec["candidates"]}
    for cid in ("dq", "dq[fp32]"):
        assert cands[cid]["status"] == "unsupported" and "oneDNN" in cands[cid]["error"]
