import os

import pytest

# Ray 2.60 turns token auth on for later clusters after a local ray.init() unless told not to.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from farm.measure.protocol import Protocol  # noqa: E402


@pytest.fixture
def quick_protocol() -> Protocol:
    """Few, short rounds in one process: tests check behaviour, benchmarks check speed (the
    tests of repeats ask for more processes themselves)."""
    return Protocol(min_rounds=3, max_rounds=5, extra_rounds_step=2, batch_s=0.002, warmup_s=0.01, timeout_s=120,
                    processes=1, placements=2)  # two copies exercise the rotation at a third less compile
