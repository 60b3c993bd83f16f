"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.sweep SPEC --out DIR`.

Under `ray job submit` the driver runs on the cluster, so the address defaults to `auto`.
"""

import argparse
import sys

from farm.errors import UserError
from farm.sweep import add_arguments, main_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.address = args.address or "auto"
    try:
        return main_args(args)
    except UserError as exc:
        print(f"jobs.sweep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
