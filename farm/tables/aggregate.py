"""Measurement records -> one autotune table per (ISA class, CPU vendor, thread count). Pure functions.

Robust combination: each candidate's per-round paired speedups over ATen are pooled across
hosts of the same class and vendor (each round is paired within its host) and summarised by their
median with a bootstrap interval. Hosts that disagree are flagged, failed candidates never
win, a lead inside the noise is not a win, and stale rows are left out and counted.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

from kernels.candidates import AA_CONTROL, ATEN, LIBRARY_GEMM_KINDS, CandidateError, parse, transfers_across_threads
from kernels.provenance import threads_hash
from kernels.table import REGRET_THRESHOLD, TABLE_SCHEMA

from farm.measure import stats
from farm.measure.host import record_vendor
from farm.measure.record import (ALLOCATOR_MODES, beyond_noise, leads_in_processes, paired_by_process, process_leads,
                                 process_modes, process_offset, quorum)
from farm.measure.store import host_name

# A neighbour M bucket may borrow this entry's winner when it loses at most 3% against its
# own winner there: about the A/A noise measured on these hosts (2-5%). The same threshold
# gates thread transfer at compile time (kernels.table.REGRET_THRESHOLD).
DEFAULT_REGRET_THRESHOLD = REGRET_THRESHOLD


@dataclass
class Combined:
    """One candidate's statistics for one key, pooled over hosts."""

    id: str
    ok: bool
    speedup: float | None = None
    ci95: tuple[float, float] | None = None
    median_us: float | None = None
    ci95_us: tuple[float, float] | None = None
    samples: int = 0
    per_host: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # Per worker process of every record that kept them: did it lead beyond that process's noise?
    # Empty for records of one process written before issue 11 (they decide as before).
    process_leads: list[bool] = field(default_factory=list)
    # Paired ratios per worker process (record.process_groups) and each one's allocator mode.
    process_ratios: list[list[float]] = field(default_factory=list)
    allocator_modes: list[str | None] = field(default_factory=list)
    resamples: int = 2000

    # What one worker process measured: the geomean over processes of each one's median ratio
    # (stats.process_level), and its two-level interval. The pooled `speedup` weighs a process by
    # its rounds, and the settle rule gives more rounds to the processes that saw a closer call.
    # Derived on demand: only the winner's reach the table, and each is a bootstrap.
    @cached_property
    def _process_level(self) -> tuple[float, tuple[float, float]]:
        return stats.process_level(self.process_ratios, self.resamples)

    @property
    def by_process(self) -> float:
        return self._process_level[0]

    @property
    def by_process_ci95(self) -> tuple[float, float]:
        return self._process_level[1]

    @property
    def processes(self) -> int:
        return len(self.process_ratios)

    @cached_property
    def by_mode(self) -> dict[str, dict] | None:
        """Where the processes split between allocator modes (record.allocator_mode): per mode, the
        number of processes and their by_process figure; None where they did not split."""
        if not set(ALLOCATOR_MODES) <= set(self.allocator_modes):
            return None
        out = {}
        for mode in ALLOCATOR_MODES:
            mine = [g for g, m in zip(self.process_ratios, self.allocator_modes) if m == mode]
            out[mode] = {"processes": len(mine),
                         "speedup_by_process": round(stats.process_level(mine, self.resamples)[0], 4)}
        return out


def problem_key(problem: dict) -> tuple:
    return (problem["op"], problem["dtype"], problem["m"], problem["n"], problem["k"], problem["group_size"])


def is_stale(record: dict, torch_version: str, template_hash: str) -> bool:
    prov = record["provenance"]
    if prov["torch"] != torch_version or prov["template_hash"] != template_hash:
        return True
    # A record that timed an nt candidate also depends on how nt reaches the template.
    return _measured_nt(record) and prov.get("threads_hash") != threads_hash()


def _measured_nt(record: dict) -> bool:
    for cand in record["candidates"]:
        try:
            if parse(cand["id"]).knobs.threads is not None:
                return True
        except CandidateError:
            pass
    return False


def _host_name(record: dict) -> str:
    return host_name(record["host"])


def emulation_blind(record: dict, cand_id: str) -> bool:
    """A candidate measured on an emulated class whose kernel is a library GEMM that picks its
    own ISA: its timing is the host's real ISA, not the class's (see LIBRARY_GEMM_KINDS)."""
    if not record["host"].get("emulated"):
        return False
    try:
        return parse(cand_id).kind in LIBRARY_GEMM_KINDS
    except CandidateError:
        return False


def combine(records: list[dict], resamples: int = 2000) -> dict[str, Combined]:
    """Pool the records of one key (one per host or run) candidate by candidate."""
    out: dict[str, Combined] = {}
    pooled: dict[str, list[float]] = defaultdict(list)
    times: dict[str, list[float]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (_host_name(r), r["provenance"]["measured_at"])):
        aten = next((c for c in record["candidates"] if c["id"] == ATEN and c["status"] == "ok"), None)
        for cand in record["candidates"]:
            entry = out.setdefault(cand["id"], Combined(cand["id"], ok=True, resamples=resamples))
            if cand["status"] != "ok" or aten is None or emulation_blind(record, cand["id"]):
                entry.ok = False
                status = "emulation_blind" if cand["status"] == "ok" and aten is not None else cand["status"]
                entry.errors.append(f"{_host_name(record)}: {status}")
                continue
            speedups, split = paired_by_process(aten, cand)
            pooled[cand["id"]] += speedups
            entry.process_ratios += split
            entry.allocator_modes += process_modes(cand, len(split))
            times[cand["id"]] += cand["samples_us"]
            entry.per_host[_host_name(record)] = stats.median(speedups)
            entry.process_leads += _record_leads(record, cand)
    for cid, entry in out.items():
        if entry.ok and pooled[cid]:
            entry.speedup = stats.median(pooled[cid])
            entry.ci95 = stats.bootstrap_ci(pooled[cid], resamples)
            entry.median_us = stats.median(times[cid])
            entry.ci95_us = stats.bootstrap_ci(times[cid], resamples)
            entry.samples = len(pooled[cid])
        else:
            entry.ok = False
    return out


def _record_leads(record: dict, cand: dict) -> list[bool]:
    """The candidate's per-process leads in a record of several processes ([] otherwise)."""
    if not cand.get("per_process") or len(cand["per_process"]) < 2:
        return []
    return process_leads(cand["per_process"], [process_offset(p) for p in record.get("processes") or []])


def reliable_only(records: list[dict]) -> tuple[list[dict], bool]:
    """(records that decide the key, True when only unreliable ones exist): an unreliable record
    (A/A gate) never decides a non-ATen entry; it is used only where nothing else was measured."""
    reliable = [r for r in records if not r.get("unreliable")]
    return (reliable, False) if reliable else (records, True)


def noise_band(records: list[dict]) -> float:
    return max((r["noise"]["band"] for r in records), default=0.0)


def decide(combined: dict[str, Combined], band: float, unreliable: bool = False) -> tuple[Combined, Combined | None, str]:
    """(winner, runner-up, rule) with the same rule as a single measurement: beyond the pooled
    interval and A/A band, in enough worker processes, never from unreliable records only."""
    ranked = sorted((c for c in combined.values() if c.ok and c.id != AA_CONTROL), key=lambda c: c.speedup, reverse=True)
    if not ranked or combined.get(ATEN) is None or not combined[ATEN].ok:
        raise ValueError("ATen did not measure ok: no table entry")
    best = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    if best.id == ATEN:
        return best, runner, "ATen is fastest"
    if unreliable:
        return combined[ATEN], best, f"{best.id} leads in unreliable records only (A/A gate): the default wins"
    if not beyond_noise(best.speedup, best.ci95, band):
        return combined[ATEN], best, f"{best.id} leads inside the noise: the default wins"
    if best.process_leads and not leads_in_processes(best.process_leads):
        return combined[ATEN], best, (f"{best.id} leads beyond the noise in {sum(best.process_leads)} of "
                                      f"{len(best.process_leads)} processes (needs {quorum(len(best.process_leads))}): "
                                      "the default wins")
    return best, runner, "lead beyond the interval and the A/A noise band"


def disagreement(combined: dict[str, Combined], winner: Combined) -> str | None:
    """Hosts disagree when their own best candidates differ by more than the pooled interval."""
    if len(winner.per_host) < 2:
        return None
    bests = {}
    for host in winner.per_host:
        bests[host] = max((c for c in combined.values() if c.ok and host in c.per_host and c.id != AA_CONTROL),
                          key=lambda c: c.per_host[host]).id
    if len(set(bests.values())) > 1:
        return "hosts pick different winners: " + ", ".join(f"{h}: {w}" for h, w in sorted(bests.items()))
    spread = [winner.per_host[h] for h in sorted(winner.per_host)]
    if winner.ci95 and (min(spread) < winner.ci95[0] or max(spread) > winner.ci95[1]):
        return f"host speedups of {winner.id} ({', '.join(f'{s:.3f}' for s in spread)}) fall outside the pooled interval"
    return None


def _choose_weights(records: list[dict], prefer: str) -> list[dict]:
    # The preferred state, else the nearest to what a model sees: model, cold, then warm.
    modes = {r["problem"]["weights"] for r in records}
    mode = next(m for m in (prefer, "model", "cold", "warm", *sorted(modes)) if m in modes)
    return [r for r in records if r["problem"]["weights"] == mode]


def _entry(key: tuple, measured: list[dict], resamples: int) -> tuple[dict, dict[str, Combined]]:
    records, unreliable = reliable_only(measured)
    combined = combine(records, resamples)
    band = noise_band(records)
    winner, runner, rule = decide(combined, band, unreliable)
    op, dtype, m, n, k, group = key
    latest = max(r["provenance"]["measured_at"] for r in records)
    entry = {
        "key": {"op": op, "dtype": dtype, "m": m, "n": n, "k": k, "group_size": group},
        "winner": winner.id,
        "knobs": parse(winner.id).knobs.as_dict() if winner.id != ATEN else None,
        "median_us": round(winner.median_us, 3),
        "ci95_us": [round(v, 3) for v in winner.ci95_us],
        "speedup_vs_aten": round(winner.speedup, 4),
        "speedup_ci95": [round(v, 4) for v in winner.ci95],
        # What one process of the farm measured (farm fidelity compares it with the delivered one).
        "speedup_by_process": round(winner.by_process, 4),
        "speedup_by_process_ci95": [round(v, 4) for v in winner.by_process_ci95],
        "processes": winner.processes,
        # Processes that split between allocator modes (a dq temporary mapped afresh every call in
        # some, reused from the heap in others): each mode's figure. null where they did not.
        "allocator_modes": winner.by_mode,
        "runner_up": runner.id if runner else None,
        "runner_up_speedup": round(runner.speedup, 4) if runner else None,
        "runner_up_ci95": [round(v, 4) for v in runner.ci95] if runner else None,
        "margin": round(winner.speedup / runner.speedup, 4) if runner else None,
        "noise_band": round(band, 4),
        # Candidates statistically tied with the winner: a later flip to one of them is a tie.
        "within_noise": sorted(c.id for c in combined.values() if c.ok and c.id not in (winner.id, AA_CONTROL)
                               and c.ci95[0] <= winner.ci95[1] and winner.ci95[0] <= c.ci95[1]),
        "rule": rule,
        "samples": winner.samples,
        "hosts": sorted(winner.per_host),
        "weights": records[0]["problem"]["weights"],
        "disagreement": disagreement(combined, winner),
        "unreliable": unreliable,
        "unreliable_records": sum(1 for r in measured if r.get("unreliable")),
        "failed": sorted(c.id for c in combined.values() if not c.ok and c.errors),
        "nearest_m_ok": False,
        "nearest_m_regret": None,
        "provenance": {"torch": records[0]["provenance"]["torch"],
                       "template_hash": records[0]["provenance"]["template_hash"],
                       **({"threads_hash": records[0]["provenance"]["threads_hash"]}
                          if records[0]["provenance"].get("threads_hash") else {}), "measured_at": latest,
                       "run_ids": sorted({r["provenance"].get("run_id") for r in records if r["provenance"].get("run_id")})},
    }
    return entry, combined


def _mark_nearest_m(entries: list[dict], combined: dict[tuple, dict[str, Combined]], threshold: float) -> None:
    """An entry may serve unmeasured M when its winner, used at each neighbouring measured M,
    loses at most `threshold` against that M's own winner (the regret, where both were measured)."""
    families: dict[tuple, list[dict]] = defaultdict(list)
    for e in entries:
        k = e["key"]
        families[(k["op"], k["dtype"], k["n"], k["k"], k["group_size"])].append(e)
    for family in families.values():
        family.sort(key=lambda e: e["key"]["m"])
        for i, entry in enumerate(family):
            regrets = []
            for j in (i - 1, i + 1):
                if not 0 <= j < len(family):
                    continue
                neighbour = family[j]
                there = combined[_key_of(neighbour)]
                mine = there.get(entry["winner"])
                if mine is None or not mine.ok:
                    regrets.append(float("inf"))
                    continue
                regrets.append(neighbour["speedup_vs_aten"] / mine.speedup - 1.0)
            if regrets:
                worst = max(regrets)
                entry["nearest_m_regret"] = round(worst, 4) if worst != float("inf") else None
                entry["nearest_m_ok"] = worst <= threshold


def _key_of(entry: dict) -> tuple:
    return problem_key(entry["key"])


def table_paths(out: str, keys) -> dict[tuple[str, str, int], str]:
    """<isa>-<vendor>-t<threads>.yaml per (ISA class, vendor, thread count): the name is for
    people; a table's class, vendor and thread count are read from its header, never its name."""
    import os

    return {(isa, v, t): os.path.join(out, f"{isa}-{v}-t{t}.yaml") for isa, v, t in sorted(set(keys))}


def table_name(key: tuple[str, str, int]) -> str:
    """avx512/amd/2t: how reports and logs name the table of (ISA class, vendor, thread count)."""
    isa, vendor, threads = key
    return f"{isa}/{vendor}/{threads}t"


def transfer_regret(entries: list[dict], combined: dict[tuple, dict[str, Combined]], other_entries: list[dict],
                    other_threads: int) -> dict:
    """What thread transfer from `other_threads` would have cost at this table's thread count (its
    `entries`, decided on `combined`), over the keys
    measured at both: each key's other-count winner, where it transfers (its meaning does not
    depend on the thread count, and it measured ok here), against this count's own winner,
    both from this count's records. Regrets are fractions lost (0.02: 2% slower)."""
    theirs = {_key_of(e): e["winner"] for e in other_entries}
    keys = agree = 0
    ratios = []
    for entry in entries:
        key = _key_of(entry)
        other = theirs.get(key)
        if other is None:
            continue
        keys += 1
        agree += other == entry["winner"]
        here = combined[key].get(other)
        if here is None or not here.ok or not transfers_across_threads(parse(other)):
            continue  # does not transfer
        ratios.append(combined[key][entry["winner"]].speedup / here.speedup)
    return {"from_threads": other_threads, "keys": keys, "transferable": len(ratios), "agree": agree,
            "regret_geomean": round(stats.geomean(ratios) - 1, 4) if ratios else None,
            "regret_worst": round(max(ratios) - 1, 4) if ratios else None}


@dataclass
class AggregateResult:
    tables: dict[tuple[str, str, int], dict]  # by (ISA class, vendor, thread count)
    stale: int
    skipped: list[str]
    # emulated rows of library-GEMM candidates that looked ok: excluded, never winners
    emulation_blind: list[str] = field(default_factory=list)
    # keys measured both natively and emulated: {"isa", "vendor", "threads", "key", "native", "emulated", "agree"}
    agreement: list[dict] = field(default_factory=list)


def _prefer_native(records: list[dict]) -> list[dict]:
    """A native measurement of a key replaces emulated ones of the same class."""
    native = [r for r in records if not r["host"].get("emulated")]
    return native or records


def _winner(key: tuple, records: list[dict], prefer_weights: str, resamples: int) -> str | None:
    try:
        chosen = _choose_weights(records, prefer_weights)
        return decide(combine(chosen, resamples), noise_band(chosen))[0].id
    except ValueError:
        return None


def emulation_agreement(by_key: dict[tuple, list[dict]], prefer_weights: str, resamples: int) -> list[dict]:
    """For keys measured natively and emulated: does the emulated winner match the native one?"""
    out = []
    for key, records in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        native = [r for r in records if not r["host"].get("emulated")]
        emulated = [r for r in records if r["host"].get("emulated")]
        if native and emulated:
            a, b = _winner(key, native, prefer_weights, resamples), _winner(key, emulated, prefer_weights, resamples)
            out.append({"key": key, "native": a, "emulated": b, "agree": a == b})
    return out


def aggregate(records: list[dict], torch_version: str, template_hash: str, prefer_weights: str = "model",
              regret_threshold: float = DEFAULT_REGRET_THRESHOLD, resamples: int = 2000) -> AggregateResult:
    """Build one table document per (ISA class, CPU vendor, threads) from fresh records, each with
    the learned rule for shapes it has no entry for (farm/tables/rule.py) where one validates.
    Vendors are never pooled: two hosts of one class and another vendor have picked opposite
    winners on the same keys, so each table holds one vendor's evidence and answers on its hosts."""
    from farm.tables.rule import build_rule

    fresh = [r for r in records if not is_stale(r, torch_version, template_hash)]
    groups: dict[tuple[str, str, int], dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in fresh:
        group = (record["host"]["isa"], record_vendor(record["host"]), record["problem"]["threads"])
        groups[group][problem_key(record["problem"])].append(record)
    tables, skipped, blind, agreement = {}, [], [], []
    decided: dict[tuple[str, str, int], tuple[list[dict], dict]] = {}
    for (isa, vendor, threads), by_key in sorted(groups.items()):
        name = table_name((isa, vendor, threads))
        agreement += [{"isa": isa, "vendor": vendor, "threads": threads, **row}
                      for row in emulation_agreement(by_key, prefer_weights, resamples)]
        entries, combined, hosts, used = [], {}, {}, {}
        for key in sorted(by_key, key=lambda k: tuple((v is None, v) for v in k)):
            chosen = used[key] = _choose_weights(_prefer_native(by_key[key]), prefer_weights)
            blind += sorted({f"{name} {key}: {c['id']} (emulated on {_host_name(r)})" for r in chosen
                             for c in r["candidates"] if c["status"] == "ok" and emulation_blind(r, c["id"])})
            try:
                entry, combined[key] = _entry(key, chosen, resamples)
            except ValueError as exc:
                skipped.append(f"{name} {key}: {exc}")
                continue
            entries.append(entry)
            for r in chosen:
                hosts[_host_name(r)] = {"cpu": r["host"].get("cpu"), "emulated": r["host"].get("emulated"), "cores": r["host"].get("cores")}
        _mark_nearest_m(entries, combined, regret_threshold)
        rule, rule_status = build_rule(used, combined)  # the entries' own statistics, not computed again
        all_records = [r for rs in by_key.values() for r in rs]
        decided[(isa, vendor, threads)] = (entries, combined)
        tables[(isa, vendor, threads)] = {
            "schema": TABLE_SCHEMA,
            "isa": isa,
            "vendor": vendor,
            "threads": threads,
            "emulated": any(h["emulated"] for h in hosts.values()),
            "torch": torch_version,
            "template_hash": template_hash,
            "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "hosts": hosts,
            "run_ids": sorted({r["provenance"].get("run_id") for r in all_records if r["provenance"].get("run_id")}),
            # Records the A/A gate marked unreliable: counted, never deciding a non-ATen entry.
            "unreliable_records": sum(1 for r in all_records if r.get("unreliable")),
            "policy": {"nearest_m_regret_threshold": regret_threshold, "prefer_weights": prefer_weights,
                       "dynamic_m": "the winner when every M bucket agrees and it needs no static blocking, else Inductor"},
            "entries": entries,
            "rule": rule,
            "rule_status": rule_status,
        }
    for (isa, vendor, threads), (entries, combined) in decided.items():  # every pair of counts of one class and vendor
        tables[(isa, vendor, threads)]["transfer"] = [
            transfer_regret(entries, combined, other[0], t) for (i, v, t), other in sorted(decided.items())
            if (i, v) == (isa, vendor) and t != threads]
    return AggregateResult(tables, len(records) - len(fresh), skipped, blind, agreement)
