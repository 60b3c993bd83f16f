"""Autotune tables: the YAML format, its validation, and lookup at compile time.

A table is data: loaded with yaml.safe_load, validated field by field, every knob bounded
before it can reach generated C++. Format history (TABLE_SCHEMA):
  kernel-farm/table/1  first version (see README "Table format").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .candidates import ATEN, Candidate, CandidateError, check_bounds, parse
from .provenance import same_release
from .rule import Rule, RuleError, features, parse_rule, predict

TABLE_SCHEMA = "kernel-farm/table/1"
# A table of every LLM shape at every M bucket is ~100 KB; 8 MB bounds what we parse.
MAX_TABLE_BYTES = 8 << 20
OPS = ("int8", "int4")
DTYPES = ("bf16", "fp16", "fp32")
ISAS = ("amx", "avx512", "avx2", "default")


class TableError(ValueError):
    """A table that cannot be used, with the reason (path and field)."""


@dataclass(frozen=True)
class EntryKey:
    op: str
    dtype: str
    m: int
    n: int
    k: int
    group_size: int | None

    def family(self) -> tuple:
        return (self.op, self.dtype, self.n, self.k, self.group_size)


@dataclass
class Entry:
    key: EntryKey
    candidate: Candidate
    nearest_m_ok: bool
    stale: bool = False
    data: dict = field(default_factory=dict)


@dataclass
class Table:
    path: str
    header: dict
    entries: dict[EntryKey, Entry]
    rule: Rule | None = None  # for shapes without an entry (kernels/rule.py)

    @property
    def isa(self) -> str:
        return self.header["isa"]

    @property
    def threads(self) -> int:
        return self.header["threads"]

    def families(self) -> dict[tuple, list[Entry]]:
        out: dict[tuple, list[Entry]] = {}
        for entry in self.entries.values():
            out.setdefault(entry.key.family(), []).append(entry)
        return out


def _need(mapping: dict, name: str, kind, where: str, optional: bool = False):
    if name not in mapping:
        if optional:
            return None
        raise TableError(f"{where}: missing field {name!r}")
    value = mapping[name]
    if optional and value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise TableError(f"{where}.{name}: expected {'/'.join(k.__name__ for k in kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise TableError(f"{where}.{name}: expected {'/'.join(k.__name__ for k in kinds)}, got {type(value).__name__} {value!r}"[:200])
    return value


def _positive(mapping: dict, name: str, where: str, top: int = 1 << 20) -> int:
    value = _need(mapping, name, int, where)
    if not 1 <= value <= top:
        raise TableError(f"{where}.{name}: {value} is outside 1..{top}")
    return value


def _parse_header(doc: dict, where: str) -> dict:
    schema = doc.get("schema")
    if schema != TABLE_SCHEMA:
        raise TableError(f"{where}.schema: {schema!r} is not a supported table schema (expected {TABLE_SCHEMA!r})")
    isa = _need(doc, "isa", str, where)
    if isa not in ISAS:
        raise TableError(f"{where}.isa: unknown ISA class {isa!r}")
    _positive(doc, "threads", where, 1024)
    _need(doc, "torch", str, where)
    _need(doc, "template_hash", str, where)
    _need(doc, "emulated", bool, where)
    _need(doc, "entries", list, where)
    return {k: v for k, v in doc.items() if k not in ("entries", "rule")}


def _parse_entry(raw, where: str, threads: int, torch_version: str | None, template_hash: str | None) -> Entry:
    if not isinstance(raw, dict):
        raise TableError(f"{where}: expected a mapping, got {type(raw).__name__}")
    key_raw = _need(raw, "key", dict, where)
    kw = f"{where}.key"
    op, dtype = _need(key_raw, "op", str, kw), _need(key_raw, "dtype", str, kw)
    if op not in OPS:
        raise TableError(f"{kw}.op: unknown op {op!r}")
    if dtype not in DTYPES:
        raise TableError(f"{kw}.dtype: unknown dtype {dtype!r}")
    group = _need(key_raw, "group_size", int, kw, optional=True)
    if (op == "int4") != (group is not None):
        raise TableError(f"{kw}.group_size: int4 entries need a group size and int8 entries none")
    key = EntryKey(op, dtype, _positive(key_raw, "m", kw), _positive(key_raw, "n", kw), _positive(key_raw, "k", kw), group)
    winner = _need(raw, "winner", str, where)
    try:
        candidate = parse(winner)
        check_bounds(candidate, threads)
    except CandidateError as exc:
        raise TableError(f"{where}.winner: {exc}") from None
    speedup = _need(raw, "speedup_vs_aten", (int, float), where)
    if not (math.isfinite(speedup) and speedup > 0):
        raise TableError(f"{where}.speedup_vs_aten: {speedup} is not a positive number")
    prov = _need(raw, "provenance", dict, where)
    stale = (torch_version is not None and not same_release(prov.get("torch"), torch_version)) or (
        template_hash is not None and prov.get("template_hash") != template_hash)
    nearest = _need(raw, "nearest_m_ok", bool, where)
    return Entry(key, candidate, nearest, stale, raw)


def load(path: str, torch_version: str | None = None, template_hash: str | None = None) -> Table:
    """Read and validate a table; rows from another torch or template source are marked stale."""
    import yaml

    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise TableError(f"{path}: cannot read table ({exc.strerror})") from None
    if size > MAX_TABLE_BYTES:
        raise TableError(f"{path}: {size} bytes is larger than the {MAX_TABLE_BYTES} byte limit for a table")
    if size == 0:
        raise TableError(f"{path}: the table file is empty")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TableError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise TableError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    header = _parse_header(doc, path)
    entries: dict[EntryKey, Entry] = {}
    for index, raw in enumerate(doc["entries"]):
        entry = _parse_entry(raw, f"{path}: entries[{index}]", header["threads"], torch_version, template_hash)
        if entry.key in entries:
            raise TableError(f"{path}: entries[{index}]: duplicate key {entry.key}")
        entries[entry.key] = entry
    try:
        rule = parse_rule(doc.get("rule"), f"{path}: rule", header["threads"])
    except RuleError as exc:
        raise TableError(str(exc)) from None
    return Table(path, header, entries, rule)


def dump(doc: dict, path: str) -> None:
    """Write a table document (validated by load() right after, so a bad writer fails here)."""
    import yaml

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, sort_keys=False, width=120)
    load(path)


def incompatibilities(table: Table, isa: str, threads: int, torch_version: str, template_hash: str) -> list[str]:
    """Why this table must not be used by this process (empty: it may)."""
    problems = []
    if table.isa != isa:
        problems.append(f"it is for ISA class {table.isa}, this host is {isa}")
    if table.threads != threads:
        problems.append(f"it is for {table.threads} threads, this process runs {threads}")
    if not same_release(table.header["torch"], torch_version):  # the build tag (+cpu, +cu130) does not matter
        problems.append(f"it was measured with torch {table.header['torch']}, this is {torch_version}")
    if table.header["template_hash"] != template_hash:
        problems.append(f"its template source hash {table.header['template_hash']} is not this one ({template_hash}): stale")
    return problems


def _log_distance(a: int, b: int) -> float:
    return abs(math.log2(a) - math.log2(b))


def lookup(table: Table, op: str, dtype: str, m: int | None, n: int, k: int,
           group_size: int | None) -> tuple[Candidate | None, str, str]:
    """(candidate or None for Inductor's own, source, note). See README "Lookup policy":
    exact entry, nearest M where its regret was measured safe, the learned rule, Inductor."""
    family = [e for e in table.families().get((op, dtype, n, k, group_size), []) if not e.stale]
    if not family:
        return _by_rule(table, op, dtype, m, n, k, group_size, "no table entry")
    if m is None:
        winners = {e.candidate for e in family}
        if len(winners) == 1:
            only = next(iter(winners))
            if only.kind == ATEN or only.knobs.is_default():
                return only, "table:dynamic-m", f"all {len(family)} M buckets agree"
        return None, "inductor", "dynamic M: the M buckets disagree or need static blocking"
    exact = table.entries.get(EntryKey(op, dtype, m, n, k, group_size))
    if exact is not None:
        return (exact.candidate, "table", "") if not exact.stale else (None, "inductor", "stale entry")
    nearest = min(family, key=lambda e: (_log_distance(e.key.m, m), e.key.m))
    if nearest.nearest_m_ok:
        return nearest.candidate, "table:nearest-m", f"M={m} uses the M={nearest.key.m} entry"
    return _by_rule(table, op, dtype, m, n, k, group_size,
                    f"M={m} not in the table and the M={nearest.key.m} entry is not safe for other M")


def _by_rule(table: Table, op: str, dtype: str, m: int | None, n: int, k: int, group_size: int | None,
             why_not_entries: str) -> tuple[Candidate | None, str, str]:
    if table.rule is None or m is None:  # the rule's features need a static M
        return None, "inductor", why_not_entries
    if not table.rule.covers(op, dtype):
        return None, "inductor", f"{why_not_entries}; the rule was not trained on {op} x {dtype}"
    candidate, path = predict(table.rule, features(op, dtype, m, n, k, group_size))
    if candidate is None:
        return None, "inductor", f"{why_not_entries}; the rule is unsure here ({path})"
    return candidate, "table:rule", path
