"""Racing the nightly's close calls (issue 11).

A key whose earlier records leave its decision inside the noise (the winner within noise of
the runner-up, its processes disagreeing) or unreliable (the A/A gate) is measured first, and
its samples are pooled with the earlier records of the same key until the decision is beyond
the noise in enough processes, or the race budget is spent. Only records that
`farm.measure.record.poolable` accepts are pooled; every pooled and refused record is named.

The decision is the table's own (farm.tables.aggregate: combine, decide, reliable_only), so
a raced key's new entry is what the pool decides. Pure functions and a small state holder;
the driver runs the passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kernels.candidates import AA_CONTROL

from farm.measure import stats
from farm.measure.record import beyond_noise, leads_in_process, poolable, process_offsets, process_samples, quorum
from farm.measure.store import host_name
from farm.tables.aggregate import combine, decide, noise_band, reliable_only

# Half an hour: on one host per class, about 60 measurements of ~30 s (19 s for one process
# in the issue, 1.5x for two: Protocol.processes), i.e. three passes over twenty close calls.
# A nightly CI job is bounded in hours; racing must not take the whole of it.
DEFAULT_RACE_BUDGET_S = 1800.0
# A key's pool holds at most this many records (earlier nights' and tonight's passes): with four
# times the rounds of one record the interval is about half as wide (1/sqrt(4)). A lead still
# inside the noise then is a tie, which the table already names (within_noise); racing it on
# would spend every night's budget on it. A new torch or template starts a new pool.
MAX_POOLED = 5
UNRELIABLE_REASON = "shipped entry came from unreliable records (A/A gate)"
# Confidence is recomputed after every pass for every raced key: 1000 resamples keep the
# interval's ends stable to about 0.002 on these sample counts, at a few ms per key.
RESAMPLES = 1000


def _code(records: list[dict]) -> dict[str, str]:
    """Candidate id -> the hash of the code it generated (two ids with one code are one kernel)."""
    out: dict[str, str] = {}
    for record in records:
        for cand in record["candidates"]:
            sha = (cand.get("kernel") or {}).get("code_sha")
            if sha and cand["status"] == "ok":
                out.setdefault(cand["id"], sha)
    return out


def confidence(records: list[dict], resamples: int = RESAMPLES) -> dict | None:
    """How decided a key is on these records, pooled. The leader L and second S are the two
    fastest candidates (ATen included; a candidate that generated L's very code is L, not a
    rival); the lead is L's paired speedup over S per round (t_S / t_L) with its 95% interval,
    and the processes are those where L leads S beyond that process's own A/A offset. Decided:
    beyond the interval and the band, in enough processes (the winner rule), on reliable
    records. `winner` is the table's decision on the same records. None without records."""
    if not records:
        return None
    used, unreliable = reliable_only(records)
    base = {"records": len(used), "unreliable": unreliable, "winner": None, "leader": None, "second": None,
            "same_code": [], "lead": None, "lead_ci95": None, "band": None, "processes": 0, "processes_agree": 0,
            "share": None, "rounds": 0}
    try:
        combined = combine(used, resamples)
        band = noise_band(used)
        winner, _, rule = decide(combined, band, unreliable)
    except ValueError as exc:  # ATen failed: nothing a race can decide
        return {**base, "decided": False, "rule": str(exc)}
    ranked = sorted((c for c in combined.values() if c.ok and c.id != AA_CONTROL), key=lambda c: c.speedup, reverse=True)
    code = _code(used)
    leader = ranked[0]
    same = [c.id for c in ranked[1:] if code.get(c.id) and code.get(c.id) == code.get(leader.id)]
    second = next((c for c in ranked[1:] if c.id not in same), None)
    base.update(winner=winner.id, leader=leader.id, second=second.id if second else None, same_code=same,
                band=band, rule=rule)
    if second is None:
        return {**base, "decided": not unreliable}
    pooled, agree, processes = [], 0, 0
    for record in used:
        offsets = process_offsets(record)
        for index, samples in sorted(process_samples(record).items()):
            if leader.id not in samples or second.id not in samples:
                continue
            ratios = stats.paired_speedups(samples[second.id], samples[leader.id])
            if not ratios:
                continue
            pooled += ratios
            processes += 1
            agree += leads_in_process(stats.median(ratios), list(stats.bootstrap_ci(ratios, resamples)), offsets.get(index, 0.0))
    if not pooled:
        return {**base, "decided": False}
    lead, ci = stats.median(pooled), stats.bootstrap_ci(pooled, resamples)
    decided = not unreliable and beyond_noise(lead, ci, band) and agree >= quorum(processes)
    return {**base, "lead": lead, "lead_ci95": list(ci), "processes": processes, "processes_agree": agree,
            "share": agree / processes, "rounds": len(pooled), "decided": decided}


def why_race(reason: str, before: dict | None) -> str | None:
    """Why a key is raced tonight (None: it is not). `reason`: why select() measures it."""
    if reason == UNRELIABLE_REASON:
        return "the shipped entry came from unreliable records (A/A gate)"
    if before is None or before["leader"] is None or before["decided"] or before["records"] >= MAX_POOLED:
        return None  # nothing earlier, decided, or a tie already raced to the limit
    if before["unreliable"]:
        return "its earlier records are unreliable (A/A gate)"
    if before["lead"] is None:
        return f"{before['leader']} and {before['second']} were never timed in the same rounds"
    lead = (f"{before['leader']} over {before['second']} {before['lead']:.3f} "
            f"[{before['lead_ci95'][0]:.3f}, {before['lead_ci95'][1]:.3f}]")
    if beyond_noise(before["lead"], before["lead_ci95"], before["band"]):
        return (f"its processes disagree: {lead} pooled, beyond the noise in {before['processes_agree']} of "
                f"{before['processes']} processes (needs {quorum(before['processes'])})")
    return f"winner within noise of the runner-up: {lead}, band {before['band']:.3f}"


def moved(before: dict | None, after: dict | None) -> dict | None:
    """How the decision's confidence moved: the lead's lower bound and the share of processes."""
    if not before or not after or before["lead"] is None or after["lead"] is None:
        return None
    same = (before["leader"], before["second"]) == (after["leader"], after["second"])
    return {"lead_low": after["lead_ci95"][0] - before["lead_ci95"][0] if same else None,
            "share": after["share"] - before["share"], "winner_changed": before["winner"] != after["winner"],
            "decided": [before["decided"], after["decided"]]}


def reference(record: dict, source: str, why: str | None = None) -> dict:
    """A pooled (or refused) record, named so that it can be found in the store."""
    ref = {"source": source, "run_id": record["provenance"].get("run_id"), "host": host_name(record["host"]),
           "measured_at": record["provenance"]["measured_at"], "processes": len(record.get("processes") or [0]),
           "rounds": (record.get("protocol") or {}).get("rounds"), "unreliable": bool(record.get("unreliable"))}
    return {**ref, "why": why} if why else ref


@dataclass
class Race:
    """One raced key: its earlier records, tonight's passes, the pool and its confidence."""

    isa: str
    key: str
    label: str
    why: str
    earlier: list[dict]
    before: dict | None
    passes: list[dict] = field(default_factory=list)
    pool: list[dict] = field(default_factory=list)  # poolable records, earlier and tonight's
    pooled: list[dict] = field(default_factory=list)  # references of the records that decide
    left_out: list[dict] = field(default_factory=list)  # references of those refused, with why
    after: dict | None = None
    outcome: str = "not measured"

    @property
    def open(self) -> bool:
        return self.outcome == "racing"

    def add_pass(self, record: dict | None) -> None:
        """Pool tonight's record of pass len(passes)+1 (None: the pass gave no record)."""
        if record is None:
            self.outcome = f"no record from pass {len(self.passes) + 1} (see failures)"
            return
        self.passes.append(record)
        sources = [("earlier", r) for r in self.earlier] + [(f"pass {i + 1}", r) for i, r in enumerate(self.passes)]
        first = self.passes[0]  # tonight's: what the pool must be like
        self.pool = [r for _, r in sources if poolable(first, r) is None]
        self.left_out = [reference(r, s, why) for s, r in sources if (why := poolable(first, r))]
        used, _ = reliable_only(self.pool)
        self.pooled = [reference(r, s) for s, r in sources if any(r is u for u in used)]
        self.left_out += [reference(r, s, "unreliable (A/A gate): counted, not pooled, while reliable records exist")
                          for s, r in sources if any(r is p for p in self.pool) and not any(r is u for u in used)]
        self.after = confidence(self.pool)
        if self.after and self.after["decided"]:
            self.outcome = "decided"
        elif len(used) >= MAX_POOLED:
            self.outcome = f"undecided with {len(used)} records pooled: a tie within the noise"
        else:
            self.outcome = "racing"

    def as_dict(self) -> dict:
        return {"isa": self.isa, "key": self.key, "label": self.label, "why": self.why, "passes": len(self.passes),
                "pooled": self.pooled, "left_out": self.left_out, "before": self.before, "after": self.after,
                "moved": moved(self.before, self.after), "outcome": self.outcome}


def plan(selections: list, earlier: dict[tuple[str, str], list[dict]], budget_s: float) -> tuple[list, dict]:
    """(selections with the raced keys marked and first, {(isa, key): Race}). Pure. A key is
    raced when racing is on (budget_s > 0) and why_race() names a reason; it is then measured
    even where select() found it fresh."""
    races: dict[tuple[str, str], Race] = {}
    out = []
    for s in selections:
        records = earlier.get((s.isa, s.key), [])
        before = confidence(records)
        why = why_race(s.reason, before) if budget_s > 0 else None
        if why:
            races[(s.isa, s.key)] = Race(s.isa, s.key, s.label, why, records, before)
            s = replace(s, measure=True, race=why, reason=s.reason if s.measure else f"close call: {why}")
        out.append(s)
    return sorted(out, key=lambda s: s.race is None), races  # stable: select()'s order otherwise


def stop_reason(elapsed_s: float, last_pass_s: float, last_count: int, undecided: int, budget_s: float) -> str | None:
    """Why no further pass is run over the `undecided` keys (None: run one). The next pass is
    estimated from the last one, per key; it must fit in what is left of the budget."""
    if not undecided:
        return None
    estimate = last_pass_s * undecided / max(last_count, 1)
    if elapsed_s + estimate > budget_s:
        return (f"race budget spent: {elapsed_s:.0f} s of {budget_s:g} s used, "
                f"the next pass would take about {estimate:.0f} s")
    return None


def check_budget(value) -> float:
    """The race budget, validated: seconds >= 0 (0 turns racing off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        from farm.errors import UserError

        raise UserError(f"race_budget_s (--race-budget-s): must be a number of seconds >= 0, got {value!r}")
    return float(value)
