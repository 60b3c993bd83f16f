"""Train and validate the learned rule that a table ships for shapes it never measured.

The runtime side (kernels/rule.py) only evaluates a small tree stored as data; this module
builds that tree from the farm's records with scikit-learn and validates it by leaving one
model family out at a time, as Inductor's AutoHeuristic trains its GPU heuristics offline.

Safety, not accuracy, decides what a leaf says: a leaf names the candidate that was within
noise of the best, and not slower than ATen beyond noise, on *every* training problem that
reached it; where no candidate is, the leaf is unsure and Inductor decides. A rule that loses
to the default beyond noise on any held-out family is not shipped.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from kernels.candidates import AA_CONTROL, ATEN
from kernels.rule import FEATURES, MAX_DEPTH, features, in_m_range

from farm.measure import stats

# Tree shapes tried per op (int8 and int4 are separate subtrees, validated one by one): every
# depth up to the runtime's bound crossed with every smallest leaf. Of those with no held-out
# loss, the one capturing the most held-out gain ships (then the most decided, then the deeper
# and finer: at equal held-out results it decides more of the shapes nobody measured). How deep
# pays depends on how many problems the records hold: on 62 2-thread AVX2 int8 problems depth 4
# captured 90% of the held-out gain; on 97 (with the 7-8B layers) depth 4 captured 72% and
# decided 69, depth 7 with leaves of 2 captured 89% and decided 92, with no held-out loss at any
# depth. A deep tree on so few problems is also unstable: one more record near the M=512
# dq-vs-template boundary moved 90 zoo decisions (docs/RESULTS.md, seventh session). Depth 1 is
# a stump (decode vs prefill, say): the last resort before an op leaves the domain. The held-out
# numbers shipped are those of the shape chosen on them: mildly optimistic, which is why new rule
# decisions are also compiled end to end before a table ships.
DEPTHS = tuple(range(MAX_DEPTH - 1, 0, -1))  # per op: the root node splits on the op
MIN_LEAVES = (1, 2, 3, 4)
DEFAULT_DEPTH = 4
MIN_SAMPLES_LEAF = 2
# Held-out families a rule must be validated on before it ships.
MIN_FAMILIES = 2
# Problems an op's subtree needs (two families at the zoo's six M buckets): on fewer, a tree
# memorises one leaf per problem. The AMD AVX512 1-thread records (6 int8, 4 int4 problems)
# validated such a tree, whose unsure leaves then kept the 1-thread process from the 2-thread
# decisions that transfer with 0% measured regret.
MIN_PROBLEMS_PER_OP = 12
# A leaf names a non-ATen candidate only where it gained at least this much beyond the noise
# band on every training problem in the leaf. Leave-one-family-out over the AVX512 records
# (80 problems, 3 families): without the margin, candidates that merely tied in training lost
# 6-20% on held-out problems (2-4 losses); with 5%, none at depth 3.
GAIN_MARGIN = 0.05
# An op's subtree ships only if, held out, it captured at least this share of the oracle's gain
# over the default. A weak subtree is unsure almost everywhere, and an unsure rule at a measured
# thread count keeps that count from borrowing the other counts' decisions: the AMD EPYC's
# 1-thread int8 subtree (15 problems: 4 decided held out, 19% of the gain) took the 1-thread
# zoo coverage from 94.0% to 76.4%. The shipped rules capture 60-88%.
MIN_GAIN_CAPTURED = 0.5


@dataclass
class Sample:
    """One measured problem: its features, each ok candidate's median paired speedup, and the
    table entry's winner (the farm's decision: a lead beyond the noise in enough processes)."""

    key: tuple
    family: str
    feats: dict[str, float]
    speedups: dict[str, float]
    band: float
    winner: str = ATEN

    def best(self) -> float:
        return max(self.speedups.values())

    def safe(self, cid: str) -> bool:
        """Within noise of this problem's best, and not slower than ATen beyond noise."""
        s = self.speedups.get(cid)
        return s is not None and s * (1 + self.band) >= self.best() and s >= 1 - self.band


def family_of(label: str | None) -> str:
    """'Llama-3.2-1B.qkv_proj' -> 'Llama'; 'Qwen2.5-0.5B.o_proj' -> 'Qwen'."""
    match = re.match(r"[A-Za-z]+", label or "")
    return match.group(0) if match else "unknown"


def samples_from(by_key: dict[tuple, list[dict]], combined: dict[tuple, dict]) -> list[Sample]:
    """One sample per key: the statistics its table entry was decided on (`combined`, from
    farm.tables.aggregate; keys without an entry have no ATen baseline and are left out)."""
    from farm.tables.aggregate import decide, noise_band, reliable_only

    out = []
    for key, records in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        speedups = {cid: c.speedup for cid, c in combined.get(key, {}).items() if c.ok and cid != AA_CONTROL}
        if ATEN not in speedups:
            continue
        op, dtype, m, n, k, group = key
        band = noise_band(records)
        winner = decide(combined[key], band, reliable_only(records)[1])[0].id
        out.append(Sample(key, family_of(records[0].get("label")), features(op, dtype, m, n, k, group),
                          speedups, band, winner))
    return out


def _clear_gains(s: Sample, margin: float = GAIN_MARGIN) -> set[str]:
    """The non-ATen candidates a leaf could name for this problem alone: safe on it and a clear
    gain (at least `margin` beyond its noise band), where the farm decided a non-ATen winner (a
    median lead that did not hold in enough processes is no gain)."""
    if s.winner == ATEN:
        return set()
    return {cid for cid in s.speedups if cid != ATEN and s.safe(cid) and s.speedups[cid] >= 1 + s.band + margin}


def _leaf_choice(members: list[Sample], margin: float = GAIN_MARGIN) -> str | None:
    """A non-ATen candidate that is a clear, safe gain on every member (the best geomean among
    them); else ATen where ATen itself was within noise of the best on every member (the farm
    measured that nothing beats the default there, or the farm's entries chose ATen on every
    member, as the table itself would: ATen is the default, so such a leaf can miss a gain but
    never lose one); else None (unsure)."""
    gains = set.intersection(*(_clear_gains(s, margin) for s in members))
    if gains:
        return max(sorted(gains), key=lambda cid: stats.geomean([s.speedups[cid] for s in members]))
    return ATEN if all(s.safe(ATEN) or s.winner == ATEN for s in members) else None


def training_labels(samples: list[Sample]) -> list[str]:
    """What the tree is fitted to: what a leaf could say on each problem alone. The farm's winner
    where its lead is a clear gain, ATen where nothing beats it, and "unsure" where the winner
    leads too little for a rule to repeat it, so the tree splits such a problem off instead of
    leaving its neighbours' leaf unsure. Fitted to the farm's winners, one marginal key (2-thread
    AVX2 int8 M=4 2048x8192: cpp 1.157x where 1.159x was needed) shared the one-class small-M
    leaf and made it unsure for every M <= 8 of a held-out family: 39 of 62 int8 problems decided
    leaving one family out, 54 with these labels."""
    labels = []
    for s in samples:
        if s.winner in _clear_gains(s):
            labels.append(s.winner)
        else:
            labels.append(ATEN if s.winner == ATEN or s.safe(ATEN) else "unsure")
    return labels


def _op(s: Sample) -> str:
    return s.key[0]


def train(samples: list[Sample], depth: int | dict[str, int] = DEFAULT_DEPTH,
          min_leaf: int | dict[str, int] = MIN_SAMPLES_LEAF) -> list[dict]:
    """The op first, then a tree per op (`depth` and `min_leaf` may be given per op): int8 and
    int4 run different kernels (on AVX2 the template has no int4 path at all), and a greedy tree
    of bounded depth trained on both would spend its splits on one op and leave mixed, hence
    unsure, leaves for the other."""
    by_op: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_op[_op(s)].append(s)
    depth_of = depth if isinstance(depth, dict) else defaultdict(lambda: depth)
    leaf_of = min_leaf if isinstance(min_leaf, dict) else defaultdict(lambda: min_leaf)
    if len(by_op) < 2:
        op = next(iter(by_op), None)
        return _train_one(samples, depth_of[op], leaf_of[op]) if by_op else [{"leaf": None, "samples": 0}]
    nodes: list[dict] = [{"feature": "int4", "threshold": 0.5}]
    for side, op in (("left", "int8"), ("right", "int4")):
        sub = _train_one(by_op[op], depth_of[op], leaf_of[op])
        offset = len(nodes)
        nodes[0][side] = offset
        nodes += [{**n, "left": n["left"] + offset, "right": n["right"] + offset} if "leaf" not in n else n for n in sub]
    return nodes


def _train_one(samples: list[Sample], depth: int, min_leaf: int) -> list[dict]:
    """Fit a tree on what a leaf could say per problem; relabel its leaves by the safety rule."""
    from sklearn.tree import DecisionTreeClassifier

    X = [[s.feats[f] for f in FEATURES] for s in samples]
    labels = training_labels(samples)
    if len(set(labels)) == 1:  # one class: a single leaf, still subject to the safety rule
        return [_leaf(samples)]
    tree = DecisionTreeClassifier(max_depth=min(depth, MAX_DEPTH), min_samples_leaf=min_leaf, random_state=0)
    tree.fit(X, labels)
    members: dict[int, list[Sample]] = defaultdict(list)
    for sample, leaf in zip(samples, tree.apply(X)):
        members[int(leaf)].append(sample)
    return _export(tree.tree_, members)


def _leaf(members: list[Sample]) -> dict:
    """A leaf node: its choice (kernels/rule.py) and, for a choice other than the default, the
    M range its training problems span, outside which it answers nothing (the tree may route M=1
    to a leaf fitted on M=16 alone; what a candidate does with M is what changes most across it)."""
    choice = _leaf_choice(members) if members else None
    node = {"leaf": choice, "samples": len(members)}
    if choice is not None and choice != ATEN:
        ms = [s.key[2] for s in members]
        node["m"] = [min(ms), max(ms)]
    return node


def _export(t, members: dict[int, list[Sample]]) -> list[dict]:
    """sklearn's arrays -> the shipped node list (root first, children after their parent)."""
    nodes: list[dict] = []

    def visit(i: int) -> int:
        index = len(nodes)
        nodes.append({})
        if t.children_left[i] == -1:
            nodes[index] = _leaf(members[i])
            return index
        left, right = visit(int(t.children_left[i])), visit(int(t.children_right[i]))
        nodes[index] = {"feature": FEATURES[int(t.feature[i])], "threshold": round(float(t.threshold[i]), 6),
                        "left": left, "right": right}
        return index

    visit(0)
    return nodes


def _predict(nodes: list[dict], feats: dict[str, float]) -> str | None:
    """As kernels.rule.predict, on the node list before it is shipped (the leaf's M range included)."""
    i = 0
    while "leaf" not in nodes[i]:
        i = nodes[i]["left"] if feats[nodes[i]["feature"]] <= nodes[i]["threshold"] else nodes[i]["right"]
    leaf = nodes[i]
    if leaf.get("m") and not in_m_range(feats["log2_m"], leaf["m"]):
        return None
    return leaf["leaf"]


def validate(samples: list[Sample], depth: int | dict[str, int] = DEFAULT_DEPTH,
             min_leaf: int | dict[str, int] = MIN_SAMPLES_LEAF) -> dict:
    """Leave one model family out: train on the others, decide the held-out family's problems."""
    families = sorted({s.family for s in samples})
    regrets, losses, decided, held_out = [], [], 0, 0
    got_all, best_all = [], []  # every held-out problem: the rule's speedup (1 where unsure), the oracle's
    for family in families:
        train_set = [s for s in samples if s.family != family]
        if not train_set:
            continue
        nodes = train(train_set, depth, min_leaf)
        for s in (s for s in samples if s.family == family):
            held_out += 1
            choice = _predict(nodes, s.feats)
            best_all.append(max(s.best(), 1.0))
            got = 1.0 if choice is None else s.speedups.get(choice)
            got_all.append(got if got is not None else 1.0)
            if choice is None:
                continue
            decided += 1
            if got is None or got < 1 - s.band:  # not measured there, or slower than the default
                losses.append(f"{family} {s.key}: {choice} at {got if got is None else round(got, 3)}")
                continue
            regrets.append(s.best() / got)
    ordered = sorted(regrets)
    rule_gain, oracle_gain = (stats.geomean(xs) if xs else 1.0 for xs in (got_all, best_all))
    return {
        "method": "leave one model family out", "families": families, "held_out_problems": held_out,
        "decided": decided, "losses_vs_default": len(losses), "loss_detail": losses[:10],
        "regret_geomean": round(stats.geomean(regrets), 4) if regrets else None,
        "regret_p95": round(ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)], 4) if ordered else None,
        "regret_worst": round(ordered[-1], 4) if ordered else None,
        # Over every held-out problem, Inductor's default where the rule is unsure: the share of
        # the oracle's geomean gain over the default that the rule captured (issue 9: >= 80%).
        "speedup_geomean": round(rule_gain, 4), "oracle_geomean": round(oracle_gain, 4),
        "gain_captured": round(math.log(rule_gain) / math.log(oracle_gain), 4) if oracle_gain > 1 else None,
    }


def choose_shape(samples: list[Sample], depths: tuple[int, ...] = DEPTHS
                 ) -> tuple[tuple[int, int] | None, list[str], dict | None]:
    """((depth, smallest leaf) of one op's subtree, or None; why the others failed; the chosen
    shape's held-out validation): of the shapes with no held-out loss that decide something, the
    one capturing the most held-out gain (then deciding the most, then the deeper and the finer)."""
    best, tried = None, []
    for depth in depths:
        for min_leaf in MIN_LEAVES:
            v = validate(samples, depth, min_leaf)
            if v["losses_vs_default"] == 0 and v["decided"]:
                score = (v["gain_captured"] or 0.0, v["decided"], depth, -min_leaf)
                if best is None or score > best[0]:
                    best = (score, (depth, min_leaf), v)
            elif min_leaf == MIN_SAMPLES_LEAF:
                tried.append(f"depth {depth}: {v['losses_vs_default']} held-out loss(es), {v['decided']} decided"
                             + (f" ({v['loss_detail'][0]})" if v["loss_detail"] else ""))
    return (best[1], tried, best[2]) if best else (None, tried, None)


def build_rule(by_key: dict[tuple, list[dict]], combined: dict[tuple, dict],
               depths: tuple[int, ...] = DEPTHS) -> tuple[dict | None, str]:
    """(the table's `rule` field or None, why). Ships, per op, the tree shape that captured the
    most gain on held-out families without ever losing to the default beyond noise there."""
    samples = samples_from(by_key, combined)
    families = {s.family for s in samples}
    if len(families) < MIN_FAMILIES:
        return None, f"records of {len(families)} model family(ies): a rule needs {MIN_FAMILIES} to be validated"
    # (op, dtype) pairs it answers for: only those with records of MIN_FAMILIES families, the
    # ones leaving a family out validated. A pair measured in one family (int4 of one model, say)
    # would let leaves trained on the other op answer for it unchecked: the tree need not split
    # on `int4` where the training set has one family's int4 keys.
    pair_families: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in samples:
        pair_families[(s.key[0], s.key[1])].add(s.family)
    domain = sorted(pair for pair, fams in pair_families.items() if len(fams) >= MIN_FAMILIES)
    if not domain:
        return None, f"no (op, dtype) with records of {MIN_FAMILIES} model families: nothing the rule could be validated on"
    samples = [s for s in samples if (s.key[0], s.key[1]) in set(domain)]  # trained and validated on what it answers
    # Each op's subtree is trained on that op's samples only, so leaving a family out validates
    # each op on its own: per op, the tree shape with no held-out loss that captured the most
    # gain; an op with a loss at every shape leaves the domain (Inductor decides it) instead of
    # sinking the other op's rule.
    depth_of, leaf_of, excluded = {}, {}, []
    for op in sorted({_op(s) for s in samples}):
        count = sum(1 for s in samples if _op(s) == op)
        if count < MIN_PROBLEMS_PER_OP:
            excluded.append(f"{op}: {count} problem(s), a rule needs {MIN_PROBLEMS_PER_OP}")
            continue
        op_samples = [s for s in samples if _op(s) == op]
        shape, tried, held_out = choose_shape(op_samples, depths)
        if shape is None:
            excluded.append(f"{op}: " + "; ".join(tried))
            continue
        captured = held_out["gain_captured"]
        if captured is not None and captured < MIN_GAIN_CAPTURED:
            excluded.append(f"{op}: its best subtree (depth {shape[0]}, leaves >= {shape[1]}) captured "
                            f"{100 * captured:.0f}% of the held-out gain, a rule needs {100 * MIN_GAIN_CAPTURED:.0f}%")
            continue
        depth_of[op], leaf_of[op] = shape
    if not depth_of:
        return None, "not shipped: " + " | ".join(excluded)
    domain = [pair for pair in domain if pair[0] in depth_of]
    samples = [s for s in samples if _op(s) in depth_of]
    validation = validate(samples, depth_of, leaf_of)
    nodes = train(samples, depth_of, leaf_of)
    status = "validated at " + ", ".join(f"{op} depth {depth_of[op]} leaves >= {leaf_of[op]}" for op in sorted(depth_of))
    return {"features": list(FEATURES), "nodes": nodes,
            "validation": {**validation, "depth": max(depth_of.values()), "depth_by_op": depth_of,
                           "min_leaf_by_op": leaf_of, "excluded": excluded},
            "domain": [list(pair) for pair in domain],
            "trained_on": {"problems": len(samples), "families": sorted({s.family for s in samples})}}, \
        status + (f"; left out: {' | '.join(excluded)}" if excluded else "")
