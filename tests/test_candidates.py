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


# --- nt: threads of one kernel (issue 12) -------------------------------------------------------


def test_nt_ids_parse_in_any_order_and_print_canonically():
    assert parse("cpp[nt=1]").knobs == Knobs(threads=1)
    assert parse("cpp[cb=1,16,64;nt=1]").id == "cpp[nt=1;cb=1,16,64]"
    assert parse("cpp[nt=2;tf=2,1,1]").knobs == Knobs(thread_factors=(2, 1, 1), threads=2)
    assert parse("cpp[nt=1]").knobs.as_dict()["nt"] == 1 and not parse("cpp[nt=1]").knobs.has_blocking()
    for bad in ("cpp[nt=x]", "cpp[nt=]", "cpp[nt=1;nt=1]"):
        with pytest.raises(CandidateError, match="nt"):
            parse(bad)


def test_nt_is_bounded_by_the_process_thread_count():
    check_bounds(parse("cpp[nt=1]"), 2)
    check_bounds(parse("cpp[nt=3;cb=1,16,64]"), 4)
    with pytest.raises(CandidateError, match=r"nt must be in 1\.\.1 .*nt=2 is plain cpp"):
        check_bounds(parse("cpp[nt=2]"), 2)  # the process's own count: refused, not normalised
    for nt in (0, -1, 3):
        with pytest.raises(CandidateError, match="nt must be in"):
            check_bounds(parse(f"cpp[nt={nt}]"), 2)
    with pytest.raises(CandidateError, match="needs a process of 2 threads or more"):
        check_bounds(parse("cpp[nt=1]"), 1)
    with pytest.raises(CandidateError, match="nt must be in 1..1024"):
        check_bounds(parse("cpp[nt=1025]"), 4096)


def test_with_nt_thread_factors_multiply_to_nt_not_to_the_process_count():
    check_bounds(parse("cpp[nt=2;tf=1,2,1]"), 4)
    with pytest.raises(CandidateError, match="multiply to 4, not to the kernel's nt 2"):
        check_bounds(parse("cpp[nt=2;tf=2,2,1]"), 4)
    with pytest.raises(CandidateError, match="multiply to 2, not to the kernel's nt 1"):
        check_bounds(parse("cpp[nt=1;tf=2,1,1]"), 2)


def test_grids_gain_a_few_thread_counts_below_the_process_count():
    from kernels.candidates import fewer_threads

    assert [fewer_threads(t) for t in (1, 2, 3, 4, 8, 12)] == [[], [1], [1], [2, 1], [4, 2, 1], [6, 3, 1]]
    nts = lambda threads, grid: [c.id for c in space(threads, grid) if c.knobs.threads is not None]  # noqa: E731
    assert nts(2, "pruned") == ["cpp[nt=1]"] and nts(1, "pruned") == [] and nts(1, "exhaustive") == []
    assert nts(8, "exhaustive") == ["cpp[nt=4]", "cpp[nt=2]", "cpp[nt=1]"]
    assert nts(2, "minimal") == []  # minimal stays CI-sized
    for threads in (2, 8):
        for cand in space(threads, "pruned"):
            check_bounds(cand, threads)
