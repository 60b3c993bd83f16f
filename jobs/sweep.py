"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.sweep SPEC --out DIR`.

Under `ray job submit` the driver runs on the cluster, so the address defaults to `auto`.
"""

import sys

from farm.cli import run_entry_point
from farm.sweep.driver import add_arguments, main_args


def _on_the_cluster(args) -> None:
    args.address = args.address or "auto"


def main(argv: list[str] | None = None) -> int:
    return run_entry_point("python -m jobs.sweep", __doc__, add_arguments, main_args, argv, _on_the_cluster)


if __name__ == "__main__":
    sys.exit(main())
