"""`farm coverage --all --against OLD`: what a new table set decides differently from the one it
replaces, over the zoo, and (`--check-spec FILE`) a `farm bench kernels` spec of the keys to
compile end to end before it ships.

A table's entries are checked end to end when they are measured; its rule decides shapes the farm
never measured, so a retrained rule changes decisions nobody timed. This lists each change
(before -> after, with the matmuls and models it touches) and picks, per change to a candidate,
the keys most zoo models share:

    farm coverage --all --table NEW --against kernels/tables --threads 2 --check-spec check.yaml
    farm bench kernels --shapes check.yaml --threads 2 --grid minimal --table NEW
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import yaml

from kernels.table import EntryKey

from farm.zoo.coverage import INDUCTOR, ModelCoverage, TableView


@dataclass
class Change:
    """One problem whose decision differs between the two table sets, with every zoo matmul it is."""

    key: EntryKey
    before: tuple[str, str | None]  # (source, choice)
    after: tuple[str, str | None]
    uses: list[tuple[str, str]] = field(default_factory=list)  # (model, layer)

    @property
    def models(self) -> list[str]:
        return sorted({model for model, _ in self.uses})

    def kind(self) -> str:
        return f"{say(self.before)} -> {say(self.after)}"

    def as_dict(self) -> dict:
        return {**asdict(self.key), "before": list(self.before), "after": list(self.after), "matmuls": len(self.uses),
                "models": self.models}


def say(decision: tuple[str, str | None]) -> str:
    """A (source, choice) decision as the reports print it."""
    source, choice = decision
    return INDUCTOR if source == INDUCTOR else f"{choice} ({source})"


def changes(old: list[ModelCoverage], new: list[ModelCoverage]) -> list[Change]:
    """The problems decided differently (choice or source), most-used first. Both lists cover the
    same models with the same planning (one `model_coverage` per table view)."""
    found: dict[tuple, Change] = {}
    for before, after in zip(old, new):
        if before.model != after.model or len(before.decisions) != len(after.decisions):
            raise ValueError(f"coverage of {before.model} and {after.model} do not line up")
        for a, b in zip(before.decisions, after.decisions):
            if (a.source, a.choice) == (b.source, b.choice):
                continue
            key = EntryKey(b.op, b.dtype, b.m, b.n, b.k, b.group_size)
            ident = (key, (a.source, a.choice), (b.source, b.choice))
            if ident not in found:
                found[ident] = Change(*ident)
            found[ident].uses.append((after.model, b.layer))
    return sorted(found.values(), key=lambda c: (-len(c.uses), c.kind(), c.key.op, c.key.m, c.key.n, c.key.k))


def by_kind(found: list[Change]) -> dict[str, dict]:
    """Per kind of change: the matmuls and distinct problems it touches."""
    out: dict[str, dict] = defaultdict(lambda: {"matmuls": 0, "problems": 0})
    for c in found:
        out[c.kind()]["matmuls"] += len(c.uses)
        out[c.kind()]["problems"] += 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["matmuls"]))


def to_check(found: list[Change], per_kind: int) -> list[Change]:
    """Per kind of change to a candidate (a change to Inductor or to ATen cannot be slower than
    the default), the `per_kind` problems most zoo matmuls use."""
    picked: dict[str, list[Change]] = defaultdict(list)
    for c in found:  # most-used first
        source, choice = c.after
        if source == INDUCTOR or choice in (None, "aten"):
            continue
        if len(picked[c.kind()]) < per_kind:
            picked[c.kind()].append(c)
    return [c for kind in picked.values() for c in kind]


# The order in which aggregation prefers a key's weight states (farm aggregate --prefer-weights'
# default): what a model sees first.
STATE_ORDER = ("model", "cold", "warm")


def weight_state(view: TableView, op: str, m: int) -> str:
    """The weight state the new table's entries of this op were decided in at the nearest M (the
    first of STATE_ORDER among them), so the check compares like with like; `warm` without any."""
    entries = [e for t in view.tables.tables.values() for e in t.entries.values() if e.key.op == op]
    if not entries:
        return "warm"
    distance = min(abs(math.log2(e.key.m) - math.log2(m)) for e in entries)
    states = {e.data.get("weights") for e in entries if abs(math.log2(e.key.m) - math.log2(m)) == distance}
    return next((s for s in STATE_ORDER if s in states), "warm")


def bench_spec(items: list[tuple[EntryKey, str, str]], view: TableView, name: str) -> dict:
    """A sweep spec (the format `farm bench kernels --shapes` reads) of (problem, model, layer) items,
    each in the weight state the table's entries of its op and M were decided in."""
    problems = []
    for key, model, layer in items:
        problem = {"model": model, "layers": {layer: [key.n, key.k]}, "ops": [key.op], "dtypes": [key.dtype],
                   "m": [key.m], "weights": [weight_state(view, key.op, key.m)]}
        if key.group_size is not None:
            problem["group_size"] = key.group_size
        problems.append(problem)
    return {"name": name, "isa": [view.isa], "threads": [view.threads], "space": "minimal", "worker_memory_gb": 8,
            "problems": problems}


def write_check_spec(path: str, picked: list[Change], view: TableView, against: str) -> None:
    kinds = sorted({c.kind() for c in picked})
    header = (f"# What {view.path} decides differently from {against} ({view.isa}, {view.threads} threads), to compile\n"
              f"# end to end before it ships, per kind of change the problems most zoo models use:\n"
              + "".join(f"#   {k}\n" for k in kinds)
              + f"#   farm bench kernels --shapes {path} --threads {view.threads} --grid minimal --table {view.path}\n")
    with open(path, "w") as f:
        f.write(header)
        spec = bench_spec([(c.key, *c.uses[0]) for c in picked], view, "coverage-changes")
        yaml.safe_dump(spec, f, sort_keys=False, default_flow_style=None)
