"""The `farm` command line. Each subcommand parses its arguments and calls one run(...)
function that works without a command line; UserError becomes a message and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys

from farm.errors import UserError
from farm.measure.problem import WEIGHT_MODES


def _add_problem_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", required=True, choices=["int8", "int4"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("-m", type=int, required=True)
    p.add_argument("-n", type=int, required=True)
    p.add_argument("-k", type=int, required=True)
    p.add_argument("--group-size", type=int, default=None, help="int4 quantization group (default 128 for int4)")
    p.add_argument("--threads", type=int, default=None, help="default: this host's physical cores")
    p.add_argument("--weights", default="warm", choices=WEIGHT_MODES,
                   help="cold: evict the weights from every cache level before each timed call; model: the "
                        "same, then time a module calling the kernel on ~64 MiB of weight copies, per call (the "
                        "module's own per-call price paid once per stack, as in a model's graph)")


def cmd_host(args: argparse.Namespace) -> int:
    from farm.measure.host import apply_emulation, profile

    apply_emulation(None)
    prof = profile().as_dict()
    if args.json:
        print(json.dumps(prof, indent=2))
    else:
        caps = prof.pop("capabilities")
        for key, value in prof.items():
            print(f"{key:16} {value}")
        print(f"{'capabilities':16} {' '.join(sorted(k for k, v in caps.items() if v))}")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from farm.measure.host import profile
    from farm.measure.manager import measure
    from farm.measure.problem import Problem
    from farm.measure.protocol import Protocol
    from farm.render import print_record

    threads = args.threads or profile().cores
    group = args.group_size if args.group_size is not None else (128 if args.op == "int4" else None)
    problem = Problem(args.op, args.dtype, args.m, args.n, args.k, group, threads, args.weights)
    overrides = {"timeout_s": args.timeout} if args.timeout else {}
    if args.rounds:
        overrides.update(min_rounds=args.rounds, max_rounds=max(args.rounds, Protocol().max_rounds))
    if args.placements is not None:  # 0 or less: the protocol's own error
        overrides["placements"] = args.placements
    record = measure(problem, grid=args.grid, protocol=Protocol.from_dict(overrides), isa=args.isa,
                     only=args.candidates.split() if args.candidates else None)
    if args.json:
        print(json.dumps(record))
    else:
        print_record(record)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("host", help="this host's profile: ISA class, capabilities, cores, caches, torch")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_host)

    p = sub.add_parser("measure", help="measure every candidate of one problem on this host")
    _add_problem_args(p)
    p.add_argument("--isa", default=None, help="measure as this ISA class (avx2 is emulated on AVX512 hosts)")
    p.add_argument("--grid", default="pruned", choices=["minimal", "pruned", "exhaustive"])
    p.add_argument("--candidates", default=None, help="space-separated candidate ids instead of the grid")
    p.add_argument("--rounds", type=int, default=None, help="minimum rounds (default from the protocol)")
    p.add_argument("--placements", type=int, default=None,
                   help="copies of the weights each process times every candidate on (default from the protocol)")
    p.add_argument("--timeout", type=float, default=None, help="seconds without progress before a candidate is killed")
    p.add_argument("--json", action="store_true", help="print the record as one JSON object")
    p.set_defaults(fn=cmd_measure)

    # each stage's command module adds its own subcommands
    from farm.bench import ops as bench_commands
    from farm.cluster import node
    from farm.nightly import driver as nightly_driver
    from farm.sweep import driver as sweep_driver
    from farm.tables import commands as table_commands
    from farm.zoo import commands as zoo_commands

    for module in (table_commands, sweep_driver, node, nightly_driver, bench_commands, zoo_commands):
        module.register(sub)
    return parser


def run_entry_point(prog: str, doc: str | None, add_arguments, main_args, argv: list[str] | None = None,
                    adjust=None) -> int:
    """A `python -m jobs.X` entry point: the subcommand's own arguments and runner, with the
    same UserError handling as `farm`; `adjust(args)` sets entry-point defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if adjust:
        adjust(args)
    try:
        return main_args(args)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as exc:
        print(f"farm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
