"""Each benchmark runs on a tiny problem and gives well-formed, numerically checked output.
(Benchmarks are not timed tests: no speed is asserted here.) `farm bench model`: tests/test_bench_model.py."""

import pytest
import torch
import yaml

from farm.bench.ops import VARIANTS, bench_problem, summarize
from farm.measure.compiled import TOLERANCE
from farm.measure.problem import Problem
from farm.measure.protocol import Protocol
from tablekit import entry, table_doc

pytestmark = pytest.mark.slow
QUICK = Protocol(min_rounds=3, max_rounds=3, batch_s=0.002, warmup_s=0.01)


@pytest.fixture
def table(tmp_path):
    torch.set_num_threads(2)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(table_doc([entry("int8", "bf16", 8, 256, 256, None, "cpp", nearest_m_ok=True)], threads=2)))
    return str(path)


def test_bench_kernels_has_all_four_variants_checked(table):
    import glob
    import tempfile

    def left():
        return set(glob.glob(f"{tempfile.gettempdir()}/farm-bench-*"))
    before = left()
    # Two problems in one process: the first one's removed cache directory must not break the second's compiles.
    other = bench_problem(Problem("int8", "bf16", 8, 512, 256, threads=2), table, "minimal", QUICK)
    assert all(v["max_rel_err"] <= TOLERANCE["bf16"] for v in other["variants"].values())
    row = bench_problem(Problem("int8", "bf16", 8, 256, 256, threads=2), table, "minimal", QUICK)
    assert left() <= before  # each problem's caches went with it
    assert set(row["variants"]) == set(VARIANTS)
    for v in row["variants"].values():
        assert v["max_rel_err"] <= TOLERANCE["bf16"] and v["median_us"] > 0 and v["compile_s"] > 0
        assert v["speedup_ci95"][0] <= v["speedup_vs_default"] <= v["speedup_ci95"][1]
    assert row["table_choice"] == ["cpp"]  # the table's winner really was compiled
    assert row["oracle"]["id"] in row["candidates"]
    assert row["variants"]["default"]["speedup_vs_default"] == 1.0
    assert row["oracle_vs_max_autotune_ci95"][0] <= row["oracle_vs_max_autotune"] <= row["oracle_vs_max_autotune_ci95"][1]
    summary = summarize([row])
    assert summary["problems"] == 1 and 0 <= summary["share_within_noise_of_oracle"] <= 1
    assert summary["geomean_oracle_vs_max_autotune"] == pytest.approx(row["oracle_vs_max_autotune"])
    assert "by_group" not in summary  # one op and M
    other = {**row, "problem": {**row["problem"], "m": 128}}
    assert list(summarize([other, row])["by_group"]) == ["int8 M=8", "int8 M=128"]


def test_bench_roofline_reports_bandwidth_peak_and_efficiencies(table):
    from farm.bench.roofline import roofline

    report = roofline(table)
    assert report["bandwidth_gbs"] > 0.5 and report["peak_gflops"] > 1
    assert report["peak_gflops"] == max(report["peak_bf16_gflops"], report["peak_fp32_gflops"])
    row = report["rows"][0]
    assert row["bound"] in ("memory", "compute") and row["efficiency"] > 0
