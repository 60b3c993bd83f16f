"""A learned rule for shapes a table never measured: a small decision tree shipped as data.

In the spirit of Inductor's AutoHeuristic: trained on the farm side (farm/tables/rule.py, with
scikit-learn) from the farm's records, shipped inside the table as plain YAML (never code or a
pickle), validated on load like every other field, and evaluated here with no dependency. A
leaf names a candidate only where every training problem that reached it had that candidate
within noise of its best and none slower than ATen beyond noise; otherwise the leaf is unsure
(None) and Inductor decides. A leaf that names another candidate than ATen carries the M range
of its training problems (`m: [lo, hi]`) and answers only inside it: a tree splits where its
training problems differ, so a leaf fitted on M=16 reached M=1 too, where that candidate (the
template splitting M over threads, cpp[tf=2,1,1]) ran int4 decode at 0.60x of the default.

    rule:
      features: [log2_m, log2_n, log2_k, int4, act_bytes, log2_group, weight_mib, intensity]
      nodes:                                   # node 0 is the root; children come later
        - {feature: log2_m, threshold: 4.5, left: 1, right: 2}
        - {leaf: cpp, samples: 6, m: [1, 16]}  # answers for M 1..16 only
        - {leaf: null, samples: 3}              # unsure
      validation: {...}                        # leave-one-family-out numbers (see the farm)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .candidates import Candidate, CandidateError, check_bounds, parse

FEATURES = ("log2_m", "log2_n", "log2_k", "int4", "act_bytes", "log2_group", "weight_mib", "intensity")
# A depth-8 tree has at most 511 nodes; more than a few dozen would be fitting noise anyway.
MAX_DEPTH = 8
MAX_NODES = 511
_ACT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class RuleError(ValueError):
    """A rule that cannot be used, naming the field that is wrong."""


@dataclass(frozen=True)
class Node:
    feature: str | None = None  # None: a leaf
    threshold: float = 0.0
    left: int = 0
    right: int = 0
    leaf: Candidate | None = None  # a leaf's answer; None with feature None: unsure
    m_range: tuple[int, int] | None = None  # a leaf's training problems' M range (None: any M)


@dataclass(frozen=True)
class Rule:
    nodes: tuple[Node, ...]
    validation: dict
    # (op, activation dtype) pairs it was trained on: it answers for nothing else, as
    # AutoHeuristic's generated heuristics check their preconditions before answering.
    domain: frozenset[tuple[str, str]] = frozenset()

    def covers(self, op: str, dtype: str) -> bool:
        return (op, dtype) in self.domain


def features(op: str, dtype: str, m: int, n: int, k: int, group_size: int | None) -> dict[str, float]:
    """Shape features of one quantized matmul (the same on the farm and at compile time)."""
    weight = n * k * (0.5 if op == "int4" else 1.0)
    act = _ACT_BYTES[dtype]
    moved = weight + act * (m * k + m * n)
    return {
        "log2_m": math.log2(m), "log2_n": math.log2(n), "log2_k": math.log2(k),
        "int4": 1.0 if op == "int4" else 0.0, "act_bytes": float(act),
        "log2_group": math.log2(group_size) if group_size else 0.0,
        "weight_mib": weight / (1 << 20), "intensity": 2.0 * m * n * k / moved,
    }


def predict(rule: Rule, feats: dict[str, float]) -> tuple[Candidate | None, str]:
    """(candidate or None when unsure, the path taken, for the decision's note)."""
    index, path = 0, []
    while True:
        node = rule.nodes[index]
        if node.feature is None:
            where = " ".join(path) or "root leaf"
            if node.leaf is not None and node.m_range is not None and not in_m_range(feats["log2_m"], node.m_range):
                lo, hi = node.m_range
                return None, f"{where}: {node.leaf.id} was measured at M {lo}..{hi} only"
            return node.leaf, where
        go_left = feats[node.feature] <= node.threshold
        path.append(f"{node.feature}{'<=' if go_left else '>'}{node.threshold:g}")
        index = node.left if go_left else node.right


def in_m_range(log2_m: float, m_range) -> bool:
    """Is M (as the log2_m feature) inside a leaf's measured [lo, hi]?"""
    lo, hi = m_range
    return math.log2(lo) - 1e-9 <= log2_m <= math.log2(hi) + 1e-9


def _m_range(raw, where: str) -> tuple[int, int] | None:
    if raw is None:
        return None
    if (not isinstance(raw, list) or len(raw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in raw)
            or not 1 <= raw[0] <= raw[1] <= 1 << 20):
        raise RuleError(f"{where}.m: expected [lo, hi] with 1 <= lo <= hi <= {1 << 20}, got {raw!r}"[:200])
    return raw[0], raw[1]


def _number(raw: dict, name: str, where: str) -> float:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RuleError(f"{where}.{name}: expected a finite number, got {value!r}")
    return float(value)


def _index(raw: dict, name: str, where: str, own: int, count: int) -> int:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not own < value < count:
        raise RuleError(f"{where}.{name}: expected a node index in {own + 1}..{count - 1}, got {value!r}")
    return value


def _node(raw, where: str, own: int, count: int, threads: int) -> Node:
    if not isinstance(raw, dict):
        raise RuleError(f"{where}: expected a mapping, got {type(raw).__name__}")
    if "leaf" in raw:
        if set(raw) - {"leaf", "samples", "m"}:
            raise RuleError(f"{where}: a leaf has only 'leaf', 'samples' and 'm', got {sorted(raw)}")
        m_range = _m_range(raw.get("m"), where)
        if raw["leaf"] is None:
            return Node()
        if not isinstance(raw["leaf"], str):
            raise RuleError(f"{where}.leaf: expected a candidate id or null, got {raw['leaf']!r}")
        try:
            candidate = parse(raw["leaf"])
            check_bounds(candidate, threads)
        except CandidateError as exc:
            raise RuleError(f"{where}.leaf: {exc}") from None
        return Node(leaf=candidate, m_range=m_range)
    if set(raw) - {"feature", "threshold", "left", "right"}:
        raise RuleError(f"{where}: unknown field(s) {sorted(set(raw) - {'feature', 'threshold', 'left', 'right'})}")
    if raw.get("feature") not in FEATURES:
        raise RuleError(f"{where}.feature: unknown feature {raw.get('feature')!r} (expected one of {', '.join(FEATURES)})")
    return Node(raw["feature"], _number(raw, "threshold", where), _index(raw, "left", where, own, count),
                _index(raw, "right", where, own, count))


def _depth(nodes: list[Node]) -> int:
    depth = {0: 0}
    for i, node in enumerate(nodes):  # children always follow their parent
        if i not in depth:
            raise RuleError(f"nodes[{i}]: not reachable from the root")
        if node.feature is not None:
            depth[node.left] = depth[node.right] = depth[i] + 1
    return max(depth.values())


def parse_rule(raw, where: str, threads: int) -> Rule | None:
    """Validate a table's `rule` field (None or absent: no rule)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RuleError(f"{where}: expected a mapping, got {type(raw).__name__}")
    if raw.get("features") != list(FEATURES):
        raise RuleError(f"{where}.features: expected {list(FEATURES)}, got {raw.get('features')!r}")
    nodes_raw = raw.get("nodes")
    if not isinstance(nodes_raw, list) or not 1 <= len(nodes_raw) <= MAX_NODES:
        raise RuleError(f"{where}.nodes: expected a list of 1..{MAX_NODES} nodes")
    nodes = [_node(n, f"{where}.nodes[{i}]", i, len(nodes_raw), threads) for i, n in enumerate(nodes_raw)]
    depth = _depth(nodes)
    if depth > MAX_DEPTH:
        raise RuleError(f"{where}.nodes: depth {depth} exceeds {MAX_DEPTH}")
    validation = raw.get("validation", {})
    if not isinstance(validation, dict):
        raise RuleError(f"{where}.validation: expected a mapping")
    return Rule(tuple(nodes), validation, _domain(raw.get("domain"), f"{where}.domain"))


def _domain(raw, where: str) -> frozenset[tuple[str, str]]:
    from .candidates import DTYPES, OPS

    if not isinstance(raw, list) or not raw:
        raise RuleError(f"{where}: expected a non-empty list of [op, dtype] pairs, got {raw!r}"[:200])
    pairs = set()
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and item[0] in OPS and item[1] in DTYPES):
            raise RuleError(f"{where}: {item!r} is not an [op, dtype] pair of {OPS} x {DTYPES}"[:200])
        pairs.add((item[0], item[1]))
    return frozenset(pairs)
