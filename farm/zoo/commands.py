"""`farm shapes` and `farm coverage`: thin command lines over farm.zoo.shapes and farm.zoo.coverage."""

from __future__ import annotations

from kernels.table import VENDORS

from farm.zoo import coverage, shapes


def register(sub) -> None:
    p = sub.add_parser("shapes", help="a zoo model's (or a local config.json's) quantized matmul problems")
    p.add_argument("model", nargs="?", help="a zoo id (see --list) or a path to a Hugging Face config.json")
    p.add_argument("--list", action="store_true", help="list the zoo")
    p.add_argument("--threads", type=int, default=2)
    shapes.add_model_args(p)
    p.set_defaults(fn=shapes.cmd_shapes)

    p = sub.add_parser("coverage", help="what a table decides for each of a model's quantized matmuls, and why")
    p.add_argument("model", nargs="?", help="a zoo id or a path to a Hugging Face config.json")
    p.add_argument("--all", action="store_true", help="every zoo model: coverage per model and overall")
    p.add_argument("--table", default=None, help="default: this host's shipped table")
    p.add_argument("--threads", type=int, default=None, help="the process's thread count (default: this one's)")
    p.add_argument("--isa", default=None, help="the host's ISA class (default: the table's own)")
    p.add_argument("--vendor", default=None, choices=VENDORS,
                   help="the host's CPU vendor, for a directory of tables (default: this host's)")
    p.add_argument("--against", default=None, metavar="OLD",
                   help="also list what OLD (the table or directory the new one replaces) decides differently")
    p.add_argument("--check-spec", default=None, metavar="FILE",
                   help="with --against: write a `farm bench kernels --shapes` spec of the changed problems to check")
    p.add_argument("--per-change", type=int, default=2,
                   help="with --check-spec: problems per kind of change, the most-used first (default 2)")
    p.add_argument("--sample-spec", default=None, metavar="FILE",
                   help="write a `farm bench kernels --shapes` spec of problems drawn at random from the models' "
                        "matmuls, each matmul equally likely, per op and M")
    p.add_argument("--sample", type=int, default=4, help="with --sample-spec: problems per op and M (default 4)")
    p.add_argument("--seed", type=int, default=0, help="with --sample-spec: the draw's seed (default 0)")
    p.add_argument("--sample-max-weights", type=float, default=None, metavar="MILLIONS",
                   help="with --sample-spec: leave out problems above this many million weights")
    shapes.add_model_args(p)
    p.set_defaults(fn=coverage.cmd_coverage)
