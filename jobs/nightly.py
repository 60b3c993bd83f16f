"""Entry point of the nightly for CI and `ray job submit`:

    python -m jobs.nightly jobs/sweeps/llm.yaml --tables kernels/tables --out nightly/DATE [--address ...]

With --address http://HEAD:8265 it submits itself through the Jobs API and fetches the
report; with HOST:6379 or auto it drives the cluster directly; with none, a local cluster.
Exit codes: 0 nothing significant, 10 significant regressions, 20 failures, 2 bad input.
"""

import sys

from farm.cli import run_entry_point
from farm.nightly.driver import add_arguments, main_args


def main(argv: list[str] | None = None) -> int:
    return run_entry_point("python -m jobs.nightly", __doc__, add_arguments, main_args, argv)


if __name__ == "__main__":
    sys.exit(main())
