"""farm bench decode on a tiny problem: every state is timed, the page sizes are what they claim."""

import pytest
import torch

from farm.bench.decode import STATES, PinnedPages, bench_problem


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


def test_pinned_pages_get_the_page_size_asked_for():
    if _thp_mode() == "never":
        pytest.skip("transparent huge pages are disabled on this host")
    huge, small = PinnedPages(8 << 20, huge=True), PinnedPages(8 << 20, huge=False)
    assert huge.address % (2 << 20) == 0
    assert small.huge_bytes() == 0
    if huge.huge_bytes() == 0:
        pytest.skip("this host's kernel gives no transparent huge pages (THP on, yet none faulted in)")
    assert huge.huge_bytes() >= 4 << 20  # most of 8 MiB in 2 MiB pages


@pytest.mark.parametrize("op", ["int8", "int4"])
def test_decode_bench_times_every_state_on_real_weights(op):
    row = bench_problem(op, 1, 64, 256, 128, llc_bytes=1 << 20, threads=torch.get_num_threads(), rounds=2)
    assert set(row["median_us"]) == set(STATES)
    assert all(us > 0 for us in row["median_us"].values())
    assert row["copies"] >= 3 and row["copies"] * row["weight_bytes"] > 2 * (1 << 20)
    assert row["pages_compared"] == (row["huge_page_share"]["model"] >= 0.5)
    for ratio in row["ratios"].values():
        assert ratio["ci95"][0] <= ratio["median"] <= ratio["ci95"][1]
