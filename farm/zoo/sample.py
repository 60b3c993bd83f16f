"""`farm coverage --all --sample-spec FILE`: a `farm bench kernels` spec of zoo problems drawn at
random, so that a benchmark's geomeans speak for the zoo's matmuls rather than for the keys a table
happens to change.

Per op and M bucket (a stratum), the draw takes distinct problems with a probability proportional
to how many zoo matmuls are that problem (a layer shape shared by many models counts as often as it
is used), whatever the table decides for them: the problems the table sends to Inductor are drawn as
often as the ones it decides. `--sample-max-weights` leaves out problems above a weight count (a
2-core host needs minutes for one 500 M-weight prefill); the spec's header says how many zoo matmuls
that leaves out.

    farm coverage --all --m 1 128 --sample-spec zoo-sample.yaml --sample 4 --seed 0
    farm bench kernels --shapes zoo-sample.yaml --grid minimal --json
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass

import yaml

from kernels.table import EntryKey

from farm.zoo.changes import bench_spec, say
from farm.zoo.coverage import ModelCoverage, TableView


@dataclass(frozen=True)
class Drawn:
    """One drawn problem: a model and layer that runs it, how many zoo matmuls are it, and what the
    table decides for it."""

    key: EntryKey
    model: str
    layer: str
    matmuls: int
    source: str
    choice: str | None


@dataclass
class Stratum:
    op: str
    m: int
    matmuls: int  # zoo matmuls of this op and M
    left_out: int  # of them, above the weight cap
    drawn: list[Drawn]


def draw(results: list[ModelCoverage], per_stratum: int, seed: int = 0,
         max_weights: int | None = None) -> list[Stratum]:
    """Per (op, M): up to `per_stratum` distinct problems, each zoo matmul equally likely (successive
    draws without replacement, weighted by use), problems above `max_weights` weights left out."""
    uses: dict[EntryKey, list] = defaultdict(list)
    for r in results:
        for d in r.decisions:
            uses[EntryKey(d.op, d.dtype, d.m, d.n, d.k, d.group_size)].append((r.model, d))
    rng = random.Random(seed)
    strata = []
    for op, m in sorted({(key.op, key.m) for key in uses}):
        keys = [key for key in uses if (key.op, key.m) == (op, m)]
        allowed = [key for key in keys if max_weights is None or key.n * key.k <= max_weights]
        matmuls = [key for key in allowed for _ in uses[key]]
        rng.shuffle(matmuls)  # the first occurrence order of a shuffled multiset is a weighted draw
        picked = list(dict.fromkeys(matmuls))[:per_stratum]
        drawn = []
        for key in picked:
            model, d = uses[key][0]
            drawn.append(Drawn(key, model, d.layer, len(uses[key]), d.source, d.choice))
        strata.append(Stratum(op, m, sum(len(uses[k]) for k in keys),
                              sum(len(uses[k]) for k in keys if k not in allowed), drawn))
    return strata


def write_sample_spec(path: str, strata: list[Stratum], view: TableView, seed: int, max_weights: int | None) -> None:
    lines = [f"# A random draw of zoo problems (farm coverage --sample-spec, seed {seed}): per op and M, distinct",
             "# problems, each zoo matmul equally likely" + (f"; problems above {max_weights:,} weights left out" if max_weights else "") + ".",
             f"# The decisions shown are {os.path.relpath(view.path)}'s ({view.isa}, threads {view.threads}) when drawn.",
             f"#   farm bench kernels --shapes {path} --threads {view.threads} --grid minimal --json"]
    for s in strata:
        lines.append(f"# {s.op} M={s.m}: {len(s.drawn)} drawn of {s.matmuls} zoo matmuls"
                     + (f" ({s.left_out} above the weight cap, left out)" if s.left_out else ""))
        for d in s.drawn:
            lines.append(f"#   {d.key.n}x{d.key.k} {d.model} {d.layer}: {d.matmuls} matmuls; {say((d.source, d.choice))}")
    spec = bench_spec([(d.key, d.model, d.layer) for s in strata for d in s.drawn], view, "zoo-sample")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
        yaml.safe_dump(spec, f, sort_keys=False, default_flow_style=None)
