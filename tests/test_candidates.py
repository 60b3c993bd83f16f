"""The choice space and candidate ids (pure)."""

import pytest

from kernels.candidates import (
    AA_CONTROL, ATEN, CandidateError, Candidate, Knobs, check_bounds, parse, space, thread_factorizations,
)


def test_ids_round_trip_for_every_candidate_of_both_grids():
    for grid in ("pruned", "exhaustive"):
        for cand in space(4, grid):
            assert parse(cand.id) == cand


def test_space_starts_with_aten_control_and_heuristic_and_has_no_duplicates():
    ids = [c.id for c in space(2, "pruned")]
    assert ids[:3] == [ATEN, AA_CONTROL, "cpp"]
    assert len(ids) == len(set(ids))
    assert len(space(2, "exhaustive")) > len(ids)


def test_every_factorization_of_the_thread_count_is_a_candidate():
    assert sorted(thread_factorizations(2)) == [(1, 1, 2), (1, 2, 1), (2, 1, 1)]
    assert len(thread_factorizations(12)) == 18
    tfs = {c.knobs.thread_factors for c in space(12, "pruned")}
    assert set(thread_factorizations(12)) <= tfs


@pytest.mark.parametrize("bad", ["cpp[tf=2,1]", "cpp[tf=a,b,c]", "cpp[zz=1]", "cpp[ks=x]", "triton", "cpp[tf=1,1,1;tf=1,1,1]"])
def test_malformed_ids_are_rejected_with_the_reason(bad):
    with pytest.raises(CandidateError, match="cpp|candidate"):
        parse(bad)


def test_bounds_thread_factors_must_multiply_to_threads():
    with pytest.raises(CandidateError, match="multiply to 4, not to the thread count 2"):
        check_bounds(parse("cpp[tf=2,2,1]"), 2)
    with pytest.raises(CandidateError, match="cache blocking"):
        check_bounds(Candidate("cpp", Knobs(cache_blocking=(0, 1, 1))), 2)
    with pytest.raises(CandidateError, match="k-slices"):
        check_bounds(parse("cpp[ks=-1]"), 2)
    check_bounds(parse("cpp[tf=2,1,1;cb=1,16,64;ks=1]"), 2)
