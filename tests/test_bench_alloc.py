"""`farm bench alloc`: bad input is refused before any process starts; the two allocator settings
really differ in what a dq call faults in (a benchmark: no speed is asserted)."""

import os
import subprocess
import sys

import pytest

from farm.bench.alloc import _run_child, parse_shape
from farm.errors import UserError


@pytest.mark.parametrize("text", ["int8:128:4096", "int3:1:64:64", "int8:0:64:64", "int8:1:64:x"])
def test_bad_shapes_are_refused_naming_the_shape(text):
    with pytest.raises(UserError, match="OP:M:N:K"):
        parse_shape(text)


def test_bad_candidate_is_a_user_error_before_any_process():
    out = subprocess.run([sys.executable, "-m", "farm.cli", "bench", "alloc", "--shapes", "int8:1:64:64",
                          "--candidates", "cpp[tf=2,1]"], capture_output=True, text=True)
    assert out.returncode == 2 and "--candidates" in out.stderr + out.stdout


@pytest.mark.slow
def test_a_dense_temporary_over_the_mmap_limit_faults_per_call_under_glibc_only(tmp_path):
    # dq[fp32] of a 4096 x 2304 int8 weight: a 36 MiB fp32 temporary in every call, above glibc's
    # 32 MiB ceiling for its mmap threshold, so each call maps it anew: 9216 pages of 4 KiB.
    args = {"op": "int8", "m": 1, "n": 4096, "k": 2304, "group": None, "candidate": "dq[fp32]", "threads": 2,
            "cache_dir": str(tmp_path / "cache"), "samples": 4, "min_sample_s": 0.0}
    glibc = _run_child("glibc", args)
    retained = _run_child("retained", args)
    pages = 4096 * 2304 * 4 // 4096
    assert glibc["faults_per_call"] >= 0.9 * pages, glibc
    assert retained["faults_per_call"] < 0.1 * pages, retained  # what else a call allocates may fault now and then
    assert glibc["kernel"]["code_sha"] == retained["kernel"]["code_sha"]  # the same kernel, from the shared cache
    assert os.listdir(args["cache_dir"])


def test_the_timing_loop_counts_each_candidates_page_faults_per_timed_call(quick_protocol):
    # What the farm's records carry as faults_per_call: one callable maps a 36 MiB buffer anew in
    # every call (above glibc's 32 MiB mmap ceiling, as dq's dense weight), the other allocates
    # nothing; the untimed warm-up call of each batch is not counted.
    import torch

    from farm.measure.timing import run_rounds

    nbytes = 36 << 20
    out = torch.zeros(4)
    fns = {"aten": lambda x: torch.add(x, 1, out=out), "alloc": lambda x: torch.ones(nbytes // 4)}
    samples, iters, faults = run_rounds(fns, torch.zeros(4), quick_protocol, lambda **_: None)
    pages = nbytes // os.sysconf("SC_PAGE_SIZE")
    assert set(faults) == {"aten", "alloc"} and len(samples["alloc"]) >= quick_protocol.min_rounds
    assert faults["alloc"] >= 0.9 * pages, faults
    assert faults["aten"] < 1, faults
