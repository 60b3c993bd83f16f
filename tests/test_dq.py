"""dq with the GEMM dtype as a knob (issue 15), dq for int4 (issue 12), and emulation that refuses what it
cannot restrict (issue 10)."""

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


def test_every_int8_and_int4_grid_measures_dq_in_the_activation_dtype_and_in_fp32():
    for grid in ("minimal", "pruned", "exhaustive"):
        for op in ("int8", "int4"):
            ids = [c.id for c in space(THREADS, grid, op)]
            assert [c for c in ids if c.startswith("dq")] == ["dq", "dq[fp32]"], (grid, op)


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
    (only,) = result.tables[("avx2", "other", 2)]["entries"]
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
    table = result.tables[("avx2", "other", 2)]
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


# --- dq for int4 (issue 12) ------------------------------------------------------------------------


def _pack_like_aten(w: torch.Tensor, block: int, split: bool) -> torch.Tensor:
    """weight_to_int4pack_kernel (aten/src/ATen/native/cpu/int4mm_kernel.cpp) transcribed: N in
    blocks of `block` rows, each block k-major; a full block in lanes (AVX512: 0|2 and 1|3 of four
    16-row lanes, AVX2: 0|1 of two), the scalar build and any partial block in pairs."""
    n_rows, depth = w.shape
    v = w.tolist()
    out = [0] * (n_rows * depth // 2)
    for b in range(0, n_rows, block):
        size, dst = min(block, n_rows - b), b * depth // 2
        for k in range(depth):
            if size == block and split and block == 64:
                for d in range(16):
                    out[dst + k * 32 + d] = v[b + d + 32][k] << 4 | v[b + d][k]
                    out[dst + k * 32 + 16 + d] = v[b + d + 48][k] << 4 | v[b + d + 16][k]
            elif size == block and split and block == 32:
                for d in range(16):
                    out[dst + k * 16 + d] = v[b + d + 16][k] << 4 | v[b + d][k]
            else:
                for n in range(0, size, 2):
                    out[dst + k * size // 2 + n // 2] = v[b + n + 1][k] << 4 | v[b + n][k]
    return torch.tensor(out, dtype=torch.uint8).reshape(n_rows, depth // 2)


ATEN_PACKINGS = {"AVX512": (64, True), "AVX2": (32, True), "DEFAULT": (32, False)}


@pytest.mark.parametrize("build", sorted(ATEN_PACKINGS))
def test_the_int4_probe_reads_back_each_of_atens_packings(monkeypatch, build):
    packing = ATEN_PACKINGS[build]
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", lambda w, tiles: _pack_like_aten(w, *packing))
    assert lowering._probe_int4_packing.__wrapped__(build) == packing
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", lambda w, tiles: w[:, ::2].to(torch.uint8))
    assert lowering._probe_int4_packing.__wrapped__(build) is None  # an unknown packing: dq declines


def test_this_hosts_int4_packing_is_atens_as_transcribed():
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ATEN_PACKINGS:
        pytest.skip(f"no transcription of ATen's int4 packing for CPU capability {capability}")
    assert lowering._int4_packing() == ATEN_PACKINGS[capability]
    w = torch.randint(0, 16, (80, 6), dtype=torch.int32, generator=torch.Generator().manual_seed(1))  # 64 + a 16 tail
    assert torch.equal(torch._convert_weight_to_int4pack_for_cpu(w, 1), _pack_like_aten(w, *ATEN_PACKINGS[capability]))


def test_an_emulated_int4_dq_is_reported_unsupported(monkeypatch):
    from farm.measure import manager

    monkeypatch.setattr(manager, "native_isa", lambda: "avx512")
    out = manager._pre_unsupported(Problem("int4", "bf16", 32, 256, 256, 64, threads=THREADS),
                                   ["aten", "dq", "dq[fp32]", "cpp"], isa="avx2")
    assert sorted(out) == ["dq", "dq[fp32]"] and all(r["status"] == "unsupported" for r in out.values())


@pytest.fixture
def num_threads():
    """torch.set_num_threads for one test, given back after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _compile_int4(tmp_path, winner: str, problem: Problem, tag: str):
    from farm.measure.compiled import fresh_module

    path = tmp_path / f"{tag}.yaml"
    key = (problem.op, problem.dtype, problem.m, problem.n, problem.k, problem.group_size)
    path.write_text(yaml.safe_dump(table_doc([entry(*key, winner)], threads=problem.threads)))
    ops = make_operands(problem, 5)
    module = fresh_module(problem, ops)
    with torch.no_grad():
        reference = ops.call_eager(problem)
    lowering.clear_decisions()
    with kernels.installed(str(path), strict=True), torch.no_grad(), \
            config.patch(freezing=True, force_disable_caches=True):
        out, sources = _run_and_get_code(torch.compile(module), ops.x)
    return out, reference, "\n".join(sources), lowering.decisions()


def _kernels_reading_the_packed_weight(code: str) -> list[str]:
    """The calls in the generated wrapper that take the frozen uint8 (packed int4) weight."""
    (weight,) = re.findall(r"^(_frozen_param\d+) = None  # device\(type='cpu'\) torch\.uint8", code, re.M)
    return re.findall(rf"^\s+(\S+)\(.*\b{weight}\b.*\)$", code.split("def call(", 1)[1], re.M)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,threads", [("bf16", 1), ("bf16", 2), ("fp16", 1), ("fp32", 2)])
def test_int4_dq_compiles_unpacks_in_one_kernel_and_matches_eager(tmp_path, num_threads, dtype, threads):
    from farm.measure.compiled import kernel_summary

    num_threads(threads)
    problem = Problem("int4", dtype, 8, 64, 128, 32, threads=threads)
    for winner, gemm in (("dq", dtype), ("dq[fp32]", "fp32")):
        tag = f"int4-{dtype}-t{threads}-{winner}"
        out, reference, code, decisions = _compile_int4(tmp_path, winner, problem, tag)
        assert [(d.candidate, d.source) for d in decisions] == [(winner, "table")], tag
        assert out.dtype == TORCH_DTYPES[dtype] and relative_error(out, reference) <= TOLERANCE[dtype], tag
        # One generated kernel unpacks the weight, one dense GEMM in the GEMM dtype, no ATen int4 kernel.
        readers = _kernels_reading_the_packed_weight(code)
        assert len(readers) == 1 and readers[0].startswith("cpp_fused"), (tag, readers)
        assert code.count("extern_kernels.mm(") == 1 and not kernel_summary([code])["extern_aten"], tag
        assert _mm_out_dtype(code) == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[gemm], tag
        assert ("#pragma omp parallel" in code) == (threads > 1), tag  # compiled for the thread count asked


@pytest.mark.slow
def test_int4_dq_reads_a_partial_last_block_of_the_packing(tmp_path, num_threads):
    # N = 80: 64 rows in full blocks and a 16-row partial block (packed in pairs) on AVX2 and AVX512.
    num_threads(1)
    problem = Problem("int4", "bf16", 4, 80, 64, 32, threads=1)
    out, reference, code, decisions = _compile_int4(tmp_path, "dq[fp32]", problem, "int4-tail")
    assert [(d.candidate, d.source) for d in decisions] == [("dq[fp32]", "table")]
    assert relative_error(out, reference) <= TOLERANCE["bf16"]


@pytest.mark.slow
def test_int4_dq_over_the_temporary_bound_is_declined_to_inductor(tmp_path, monkeypatch, num_threads):
    num_threads(THREADS)
    problem = Problem("int4", "bf16", 8, 64, 128, 32, threads=THREADS)
    monkeypatch.setenv("KERNEL_FARM_DQ_MAX_BYTES", str(64 * 128 * 4 - 1))  # one byte short of fp32 64x128
    out, reference, code, decisions = _compile_int4(tmp_path, "dq[fp32]", problem, "int4-bound")
    assert [(d.candidate, d.source) for d in decisions][-1] == (None, "inductor")
    assert "KERNEL_FARM_DQ_MAX_BYTES" in decisions[-1].note
    assert "extern_kernels.mm(" not in code and relative_error(out, reference) <= TOLERANCE["bf16"]


@pytest.mark.slow
def test_int4_dq_is_measured_like_any_candidate(quick_protocol):
    from farm.measure.manager import measure

    problem = Problem("int4", "bf16", 4, 64, 128, 32, threads=THREADS)
    rec = measure(problem, protocol=quick_protocol, only=["dq", "dq[fp32]"])
    cands = {c["id"]: c for c in rec["candidates"]}
    for cid, width in (("dq", 2), ("dq[fp32]", 4)):
        row = cands[cid]
        assert row["status"] == "ok", row
        assert row["max_rel_err"] <= TOLERANCE["bf16"] and row["median_us"] > 0
        assert len(row["samples_us"]) == rec["protocol"]["rounds"]
        assert not row["kernel"]["extern_aten"] and not row["kernel"]["template"]
        assert row["kernel"]["code_sha"] != cands["aten"]["kernel"]["code_sha"]
        assert row["temp_bytes"] == problem.n * problem.k * width
