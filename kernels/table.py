"""Autotune tables: the YAML format, its validation, and lookup at compile time.

A table is data: loaded with yaml.safe_load, validated field by field, every knob bounded
before it can reach generated C++. Format history (TABLE_SCHEMA):
  kernel-farm/table/1  first version (see README "Table format"); the optional `transfer`
                       field (measured regret between thread counts) came later, in place, and
                       so did the optional `vendor` (the CPU vendor of the hosts measured; a
                       table without one, written before, answers on any vendor's hosts).

A table set is the tables of one ISA class and vendor in a directory, one per thread count: a process
whose thread count has a table uses it; otherwise choices whose meaning does not depend on the
thread count transfer from the measured counts where they agree (lookup_set).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .candidates import ATEN, DEQUANT, Candidate, CandidateError, check_bounds, dense_temp_bytes, parse, transfers_across_threads
from .provenance import same_release, threads_hash
from .rule import Rule, RuleError, features, parse_rule, predict

TABLE_SCHEMA = "kernel-farm/table/1"
# A table of every LLM shape at every M bucket is ~100 KB; 8 MB bounds what we parse.
MAX_TABLE_BYTES = 8 << 20
OPS = ("int8", "int4")
DTYPES = ("bf16", "fp16", "fp32")
ISAS = ("amx", "avx512", "avx2", "default")
# CPU vendors (kernels.vendor_of). One ISA class, two vendors, opposite answers: on the farm's
# AVX512 hosts the template ran int8 M=128 at about 1.1x of ATen on an Intel Xeon and 0.6x on
# an AMD EPYC (docs/RESULTS.md), so a table with a `vendor` answers on that vendor's hosts only.
VENDORS = ("intel", "amd", "other")
# The regret a borrowed decision may cost against the measured winner: about the A/A noise
# measured on the farm's hosts (2-5%). Nearest-M (farm/tables/aggregate.py) and thread
# transfer use the same threshold.
REGRET_THRESHOLD = 0.03


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


@dataclass(frozen=True)
class Transfer:
    """How the winners measured at `from_threads` did at this table's thread count, over the
    keys measured at both (farm/tables/aggregate.py transfer_regret). Regrets are fractions
    lost against this count's own winner (0.02: 2% slower), over the transferable keys."""

    from_threads: int
    keys: int
    transferable: int
    agree: int
    regret_geomean: float | None
    regret_worst: float | None


@dataclass
class Table:
    path: str
    header: dict
    entries: dict[EntryKey, Entry]
    rule: Rule | None = None  # for shapes without an entry (kernels/rule.py)
    transfer: dict[int, Transfer] = field(default_factory=dict)  # by from_threads
    _families: dict[tuple, list[Entry]] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def isa(self) -> str:
        return self.header["isa"]

    @property
    def threads(self) -> int:
        return self.header["threads"]

    @property
    def vendor(self) -> str | None:
        """The CPU vendor of the hosts measured (None: a table from before vendors, any host)."""
        return self.header.get("vendor")

    def serves(self, isa: str, vendor: str | None) -> bool:
        return self.isa == isa and (self.vendor is None or vendor is None or self.vendor == vendor)

    def families(self) -> dict[tuple, list[Entry]]:
        """Entries by (op, dtype, n, k, group). Built on first use and kept: a loaded table is
        never changed, and every lookup that misses its exact key asks for this."""
        if self._families is None:
            self._families = {}
            for entry in self.entries.values():
                self._families.setdefault(entry.key.family(), []).append(entry)
        return self._families

    def largest_dq_win(self, op: str, max_m: int | None = None) -> int:
        """The largest per-call dense weight of any `op` entry a dq candidate won (0: none), of
        entries at M <= max_m only when given (dq gains with M: it amortises one dequantization)."""
        return max((dense_temp_bytes(e.candidate, e.key.dtype, e.key.n, e.key.k) for e in self.entries.values()
                    if e.key.op == op and e.candidate.kind == DEQUANT and not e.stale
                    and (max_m is None or e.key.m <= max_m)), default=0)


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
    vendor = _need(doc, "vendor", str, where, optional=True)
    if vendor is not None and vendor not in VENDORS:
        raise TableError(f"{where}.vendor: unknown CPU vendor {vendor!r} (expected one of {', '.join(VENDORS)})")
    _need(doc, "entries", list, where)
    return {k: v for k, v in doc.items() if k not in ("entries", "rule", "transfer")}


_TRANSFER_FIELDS = ("from_threads", "keys", "transferable", "agree", "regret_geomean", "regret_worst")


def _parse_transfer(raw, where: str, threads: int) -> dict[int, Transfer]:
    """Validate the optional `transfer` field: one record per other measured thread count."""
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise TableError(f"{where}: expected a list of records, got {type(raw).__name__}")
    out: dict[int, Transfer] = {}
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise TableError(f"{at}: expected a mapping, got {type(item).__name__}")
        if set(item) != set(_TRANSFER_FIELDS):
            raise TableError(f"{at}: expected the fields {', '.join(_TRANSFER_FIELDS)}, got {', '.join(map(str, item))}"[:200])
        source = _positive(item, "from_threads", at, 1024)
        if source == threads or source in out:
            raise TableError(f"{at}.from_threads: {source} is this table's own or a repeated thread count")
        keys = _need(item, "keys", int, at)
        if not 0 <= keys <= 1 << 20:
            raise TableError(f"{at}.keys: {keys} is outside 0..{1 << 20}")
        counts = {}
        for name in ("transferable", "agree"):
            counts[name] = _need(item, name, int, at)
            if not 0 <= counts[name] <= keys:
                raise TableError(f"{at}.{name}: {counts[name]} is outside 0..{keys} (the keys measured at both)")
        regrets = {name: _need(item, name, (int, float), at, optional=True) for name in ("regret_geomean", "regret_worst")}
        for name, value in regrets.items():
            if (value is None) != (counts["transferable"] == 0) or (value is not None and not (math.isfinite(value) and value > -1)):
                raise TableError(f"{at}.{name}: expected a finite number above -1 when keys transfer (null when none do), got {value!r}")
        if regrets["regret_worst"] is not None and regrets["regret_worst"] < regrets["regret_geomean"] - 1e-3:
            raise TableError(f"{at}.regret_worst: {regrets['regret_worst']} is below the geomean {regrets['regret_geomean']}")
        out[source] = Transfer(source, keys, counts["transferable"], counts["agree"], regrets["regret_geomean"], regrets["regret_worst"])
    return out


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
        template_hash is not None and prov.get("template_hash") != template_hash) or (
        template_hash is not None and candidate.knobs.threads is not None and prov.get("threads_hash") != threads_hash())
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
            # libyaml's safe loader where PyYAML has it: the pure-Python one took 1 s of every
            # compile process for a 60-entry table (the same safe constructor, the same result).
            doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
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
    return Table(path, header, entries, rule, _parse_transfer(doc.get("transfer"), f"{path}: transfer", header["threads"]))


def dump(doc: dict, path: str) -> None:
    """Write a table document (validated by load() right after, so a bad writer fails here)."""
    import yaml

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, sort_keys=False, width=120)
    load(path)


def incompatibilities(table: Table, isa: str, threads: int | None, torch_version: str, template_hash: str,
                      vendor: str | None = None) -> list[str]:
    """Why this table must not be used by this process (empty: it may); threads None: any
    count, vendor None: any vendor."""
    problems = []
    if table.isa != isa:
        problems.append(f"it is for ISA class {table.isa}, this host is {isa}")
    elif not table.serves(isa, vendor):
        problems.append(f"it was measured on {table.vendor} {isa} hosts, this host is {vendor}: "
                        "hosts of one class and another vendor have picked opposite winners")
    if threads is not None and table.threads != threads:
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
    nearest, why_not = _nearest_m(family, m)
    if nearest is not None:
        return nearest.candidate, "table:nearest-m", f"M={m} uses the M={nearest.key.m} entry"
    return _by_rule(table, op, dtype, m, n, k, group_size, why_not)


def _nearest_m(family: list[Entry], m: int) -> tuple[Entry | None, str]:
    """(the nearest-M entry that may serve M, or None and why not). Only between the family's
    smallest and largest measured M: `nearest_m_ok` was measured against the neighbouring M
    buckets, which says nothing past the last one (an int4 family measured at M 128 and 512,
    `dq[fp32]` at both, would otherwise send decode, where `dq` runs at 0.3x, to `dq`)."""
    nearest = min(family, key=lambda e: (_log_distance(e.key.m, m), e.key.m))
    if not nearest.nearest_m_ok:
        return None, f"M={m} not in the table and the M={nearest.key.m} entry is not safe for other M"
    ms = sorted(e.key.m for e in family)
    if not ms[0] <= m <= ms[-1]:
        return None, f"M={m} not in the table and outside its measured M range ({ms[0]}..{ms[-1]})"
    return nearest, ""


def _by_rule(table: Table, op: str, dtype: str, m: int | None, n: int, k: int, group_size: int | None,
             why_not_entries: str) -> tuple[Candidate | None, str, str]:
    if table.rule is None or m is None:  # the rule's features need a static M
        return None, "inductor", why_not_entries
    if not table.rule.covers(op, dtype):
        return None, "inductor", f"{why_not_entries}; the rule was not trained on {op} x {dtype}"
    candidate, path = predict(table.rule, features(op, dtype, m, n, k, group_size))
    if candidate is None:
        return None, "inductor", f"{why_not_entries}; the rule is unsure here ({path})"
    if candidate.kind == DEQUANT:
        # A tree answers the same beyond its largest training problem; dq's cost grows with its
        # per-call dense weight, so the rule may not send dq past the largest one seen to win.
        temp, measured = dense_temp_bytes(candidate, dtype, n, k), table.largest_dq_win(op)
        if temp > measured:
            return None, "inductor", (f"{why_not_entries}; the rule says {candidate.id} ({path}), whose {temp >> 20} MiB "
                                      f"dense weight per call exceeds the largest {op} dq winner measured ({measured >> 20} MiB)")
    return candidate, "table:rule", path


# --- table sets: one table per thread count, and thread transfer -----------------------------

@dataclass
class TableSet:
    """The tables of one ISA class that a process may use, by thread count. From a directory,
    a thread count without its own table may borrow from the others (thread transfer); one
    file answers at its own thread count only."""

    path: str
    tables: dict[int, Table]
    directory: bool

    @property
    def entries(self) -> int:
        return sum(len(t.entries) for t in self.tables.values())

    def transfer_closed(self) -> str | None:
        """Why the measured thread counts may not lend their choices to another count (None: they may).

        Every ordered pair of measured counts must carry its measured transfer regret and its worst
        case must be within the noise threshold: with two counts, that regret is exactly what
        transfer would have cost each of them had it been left out (leave one count out), so it
        is the measured evidence that this class's winners do not depend on the thread count
        beyond noise. A single count has no such evidence and transfers nothing."""
        if not self.directory:
            return f"{self.path} is one table file (a directory of tables may transfer between thread counts)"
        counts = sorted(self.tables)
        if len(counts) < 2:
            return f"only {counts[0]} threads measured: no transfer regret between thread counts to go on"
        for to in counts:
            for source in counts:
                record = self.tables[to].transfer.get(source)
                if source == to:
                    continue
                if record is None or record.regret_worst is None:
                    return f"no measured transfer regret from {source} to {to} threads in {self.tables[to].path}"
                if record.regret_worst > REGRET_THRESHOLD:
                    return (f"{source}-thread winners lost up to {100 * record.regret_worst:.1f}% at {to} threads "
                            f"(more than the {100 * REGRET_THRESHOLD:g}% noise threshold)")
        return None


def load_set(path: str, isa: str, torch_version: str | None = None, template_hash: str | None = None,
             vendor: str | None = None) -> TableSet:
    """A table file: that one table. A directory: every table of ISA class `isa` and CPU vendor
    `vendor` in it (None: any; a table without a vendor serves every vendor). Every *.yaml
    must be a valid table; two for one thread count are an error naming both."""
    if not os.path.isdir(path):
        table = load(path, torch_version, template_hash)
        return TableSet(path, {table.threads: table}, False)
    tables: dict[int, Table] = {}
    seen = []
    for name in sorted(os.listdir(path)):
        if not name.endswith(".yaml"):
            continue
        table = load(os.path.join(path, name), torch_version, template_hash)
        seen.append(f"{table.isa}{'/' + table.vendor if table.vendor else ''} {table.threads}t")
        if not table.serves(isa, vendor):
            continue
        if table.threads in tables:
            raise TableError(f"{path}: two tables for {isa} at {table.threads} threads: {tables[table.threads].path} and {table.path}")
        tables[table.threads] = table
    if not tables:
        on = f" on {vendor} hosts" if vendor else ""
        raise TableError(f"{path}: no table for ISA class {isa}{on} (found: {', '.join(seen) or 'no tables'})")
    return TableSet(path, dict(sorted(tables.items())), True)


def set_problems(tables: TableSet, isa: str, threads: int, torch_version: str, template_hash: str,
                 vendor: str | None = None) -> list[str]:
    """Why this set must not be used by a process of this class, vendor and thread count (empty: it may)."""
    if not tables.directory:
        table = next(iter(tables.tables.values()))
        problems = incompatibilities(table, isa, threads, torch_version, template_hash, vendor)
        return [f"{table.path}: not used: " + "; ".join(problems)] if problems else []
    problems = [f"{t.path}: not used: {p}" for t in tables.tables.values()
                for p in incompatibilities(t, isa, None, torch_version, template_hash, vendor)]
    if threads not in tables.tables:
        closed = tables.transfer_closed()
        if closed:
            problems.append(f"{tables.path}: no table for {threads} threads (measured: "
                            f"{', '.join(map(str, tables.tables))}) and no thread transfer: {closed}")
    return problems


def lookup_set(tables: TableSet, threads: int, op: str, dtype: str, m: int | None, n: int, k: int,
               group_size: int | None) -> tuple[Candidate | None, str, str]:
    """The table of this thread count answers as lookup() does; without one, thread transfer.
    Where this count's table has nothing to say about the key (no entry at this M, none at
    another M that may serve it, and no rule for the op: a sparse table), the other counts may
    lend their agreed choice on the same terms as to an unmeasured count, the gate being the
    measured transfer regret between the counts. An entry at this M, the M buckets of a dynamic
    M, or an unsure rule at this count are evidence, so they stand; an entry at another M that
    may not serve this one says nothing about it."""
    own = tables.tables.get(threads)
    if own is not None:
        choice, source, note = lookup(own, op, dtype, m, n, k, group_size)
        others = [t for t in tables.tables.values() if t.threads != threads]
        measured_here = (own.families().get((op, dtype, n, k, group_size)) if m is None
                         else EntryKey(op, dtype, m, n, k, group_size) in own.entries)
        silent = not measured_here and not (own.rule and own.rule.covers(op, dtype))
        if choice is not None or not silent or not others or tables.transfer_closed():
            return choice, source, note
        lent, lent_source, lent_note = transfer(others, op, dtype, m, n, k, group_size)
        if lent is None:
            return choice, source, f"{note}; nothing lent: {lent_note}"
        if lent.kind == DEQUANT:
            # Whether dq wins depends on the thread count (measured on the AMD EPYC: int8 M=32
            # 4096x4096 dq 1.51x at 2 threads, 0.59x at 1), so a lent dq needs this count's own
            # records to have seen dq win at least as large a dense weight at no larger M.
            # A dynamic M has no bound to compare with: nothing lent.
            temp, measured = dense_temp_bytes(lent, dtype, n, k), own.largest_dq_win(op, m) if m is not None else 0
            if temp > measured:
                at = f"at M<={m}" if m is not None else "for a dynamic M"
                return choice, source, (f"{note}; the other counts agree on {lent.id}, but at {threads} threads no {op} dq "
                                        f"winner {at} was measured with a dense weight of {temp >> 20} MiB or more")
        return lent, lent_source, f"the {threads}-thread table decides nothing here ({note}); {lent_note}"
    closed = tables.transfer_closed()
    if closed:
        return None, "inductor", f"no table for {threads} threads; {closed}"
    return transfer(list(tables.tables.values()), op, dtype, m, n, k, group_size)


def _counts(tables) -> str:
    return ", ".join(str(t.threads) for t in tables) + " threads"


def _agreed(answers: dict[int, Candidate | None], what: str) -> tuple[Candidate | None, str]:
    """(the one transferable choice every measured count made, or None with why not)."""
    choices = set(answers.values())
    if None in choices:
        unsure = [str(t) for t, c in answers.items() if c is None]
        return None, f"{what} at {', '.join(unsure)} threads decide nothing"
    if len(choices) > 1:
        return None, f"{what} disagree (" + ", ".join(f"{t}: {c.id}" for t, c in answers.items()) + ")"
    only = choices.pop()
    if not transfers_across_threads(only):
        return None, f"{what} chose {only.id}, whose meaning depends on the thread count"
    return only, ""


def transfer(tables: list[Table], op: str, dtype: str, m: int | None, n: int, k: int,
             group_size: int | None) -> tuple[Candidate | None, str, str]:
    """Thread transfer (README "Lookup policy"), in lookup's order: the exact entries of every
    measured count that has the key; else the nearest-M entries of every count with the shape
    (each nearest_m_ok); else every count's rule. Each step answers only with one choice that
    all of them made and whose meaning does not depend on the thread count."""
    families = {t.threads: [e for e in t.families().get((op, dtype, n, k, group_size), []) if not e.stale] for t in tables}
    with_family = [t for t in tables if families[t.threads]]
    if m is None:  # dynamic M: every count with the shape must have a dynamic-M answer
        answers = {t.threads: lookup(t, op, dtype, None, n, k, group_size) for t in with_family}
        usable = {th: (c if src == "table:dynamic-m" else None) for th, (c, src, _) in answers.items()}
        choice, why = _agreed(usable, "dynamic-M answers") if usable else (None, "no table entry")
        return (choice, "table:transfer", f"dynamic M: the {_counts(with_family)} tables agree") if choice else (None, "inductor", why)
    key = EntryKey(op, dtype, m, n, k, group_size)
    exact = {t.threads: t.entries[key] for t in tables if key in t.entries and not t.entries[key].stale}
    if exact:
        choice, why = _agreed({th: e.candidate for th, e in exact.items()}, "the exact entries")
        if choice is None:
            return None, "inductor", why
        return choice, "table:transfer", f"the exact entries at {', '.join(map(str, exact))} threads agree"
    notes = ["no table entry"]
    if with_family:
        nearest = {t.threads: _nearest_m(families[t.threads], m)[0] for t in with_family}
        where = ", ".join(f"{th}: M={e.key.m}" if e else f"{th}: none" for th, e in nearest.items())
        choice, why = _agreed({th: e.candidate if e else None for th, e in nearest.items()},
                              f"the nearest-M entries ({where})")
        if choice is not None:
            return choice, "table:transfer", f"M={m}: the nearest-M entries of {_counts(with_family)} agree ({where})"
        notes = [why]
    rules = {t.threads: _by_rule(t, op, dtype, m, n, k, group_size, "") for t in tables}
    choice, why = _agreed({th: c for th, (c, _, _) in rules.items()}, "the rules")
    if choice is None:
        return None, "inductor", "; ".join(notes + [why])
    return choice, "table:transfer", f"the rules of {_counts(tables)} agree (" + \
        ", ".join(f"{th}: {note}" for th, (_, _, note) in rules.items()) + ")"
