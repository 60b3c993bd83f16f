"""Fidelity: an enforced weight state, independent repeats, the A/A gate (issue 11).

Fast tier: pure functions over hand-made samples and records. Slow tier: real measurements.
"""

import pytest

from farm.measure.manager import measure
from farm.measure.problem import Problem
from farm.measure.record import validate_record
from farm.measure.timing import WEIGHT_STATES


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["warm", "cold"])
def test_each_weight_state_is_enforced_and_recorded(weights, quick_protocol):
    record = measure(Problem("int8", "bf16", 4, 256, 256, threads=2, weights=weights), protocol=quick_protocol,
                     only=["cpp"])
    validate_record(record)
    state = record["protocol"]["weight_state"]
    assert state == {"mode": weights, "how": WEIGHT_STATES[weights]}
    assert record["problem"]["weights"] == weights
    assert all(c["status"] in ("ok", "unsupported") for c in record["candidates"])
