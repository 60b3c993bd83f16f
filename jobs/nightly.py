"""Entry point of the nightly for CI and `ray job submit`:

    python -m jobs.nightly jobs/sweeps/llm.yaml --tables kernels/tables --out nightly/DATE [--address ...]

With --address http://HEAD:8265 it submits itself through the Jobs API and fetches the
report; with HOST:6379 or auto it drives the cluster directly; with none, a local cluster.
Exit codes: 0 nothing significant, 10 significant regressions, 20 failures, 2 bad input.
"""

import argparse
import sys

from farm.errors import UserError
from farm.nightly import add_arguments, main_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.nightly", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main_args(args)
    except UserError as exc:
        print(f"jobs.nightly: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
