"""Compare two tables: winner flips, ties, significant speed changes, new failures. Pure.

A change counts only when the intervals say so: a speed change needs the two 95% intervals of
the winner's paired speedup over ATen apart and a relative change above the threshold; a winner change
between two candidates whose intervals overlap is a tie, not a flip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Below 3% the A/A control on these hosts cannot tell two runs apart.
DEFAULT_MIN_CHANGE = 0.03


@dataclass
class Change:
    key: str
    kind: str  # regression | improvement | flip | tie | new_failure | added | removed | unchanged
    old_winner: str | None
    new_winner: str | None
    old_us: float | None
    new_us: float | None
    ratio: float | None  # new time / old time (>1: slower)
    old_speedup: float | None
    new_speedup: float | None
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def key_text(key: dict) -> str:
    group = f" g{key['group_size']}" if key.get("group_size") else ""
    return f"{key['op']} {key['dtype']} M={key['m']} N={key['n']} K={key['k']}{group}"


def _apart(a, b) -> bool:
    return a is not None and b is not None and (a[1] < b[0] or b[1] < a[0])


def _speed_change(old: dict, new: dict, min_change: float) -> tuple[str, float]:
    """Judged on the paired speedup over ATen, not on absolute time: two runs on a shared host
    drift together (ATen included), and only a ratio measured within one run means anything.
    Returns (kind, new time / old time) - the time ratio is shown, not judged."""
    ratio = new["median_us"] / old["median_us"]
    change = new["speedup_vs_aten"] / old["speedup_vs_aten"]
    if _apart(old.get("speedup_ci95"), new.get("speedup_ci95")) and abs(change - 1) > min_change:
        return ("regression" if change < 1 else "improvement"), ratio
    return "unchanged", ratio


def _flip_or_tie(old: dict, new: dict) -> tuple[str, str]:
    """Two winners within noise of each other (in either table) are a tie."""
    if old["winner"] in (new.get("within_noise") or []):
        return "tie", f"{old['winner']} is within noise of {new['winner']} in the new table"
    if new["winner"] in (old.get("within_noise") or []):
        return "tie", f"{new['winner']} was within noise of {old['winner']} in the old table"
    if new.get("runner_up") == old["winner"] and not _apart(new["speedup_ci95"], new.get("runner_up_ci95")):
        return "tie", f"{old['winner']} is within noise of {new['winner']} in the new table"
    if old.get("runner_up") == new["winner"] and not _apart(old["speedup_ci95"], old.get("runner_up_ci95")):
        return "tie", f"{new['winner']} was within noise of {old['winner']} in the old table"
    return "flip", f"{old['winner']} -> {new['winner']}"


def compare_entries(old: dict | None, new: dict | None, min_change: float = DEFAULT_MIN_CHANGE) -> Change:
    ref = new or old
    key = key_text(ref["key"])
    if old is None:
        return Change(key, "added", None, new["winner"], None, new["median_us"], None, None, new["speedup_vs_aten"])
    if new is None:
        return Change(key, "removed", old["winner"], None, old["median_us"], None, None, old["speedup_vs_aten"], None)
    kind, ratio = _speed_change(old, new, min_change)
    detail = ""
    if old["winner"] != new["winner"]:
        flip, detail = _flip_or_tie(old, new)
        # A slower new table is a regression whatever its winner; otherwise the flip is the news.
        kind = kind if kind == "regression" else flip
    newly_failed = sorted(set(new.get("failed") or []) - set(old.get("failed") or []))
    if newly_failed and kind in ("unchanged", "tie"):
        kind, detail = "new_failure", "newly failing: " + ", ".join(newly_failed)
    elif newly_failed:
        detail = (detail + "; " if detail else "") + "newly failing: " + ", ".join(newly_failed)
    return Change(key, kind, old["winner"], new["winner"], old["median_us"], new["median_us"], ratio,
                  old["speedup_vs_aten"], new["speedup_vs_aten"], detail)


def _index(doc: dict) -> dict[tuple, dict]:
    return {tuple(sorted(e["key"].items(), key=lambda kv: kv[0])): e for e in doc.get("entries", [])}


def diff_tables(old: dict, new: dict, min_change: float = DEFAULT_MIN_CHANGE) -> list[Change]:
    """Changes from `old` to `new`, regressions first, then by size of the change."""
    old_i, new_i = _index(old), _index(new)
    changes = [compare_entries(old_i.get(k), new_i.get(k), min_change) for k in sorted(set(old_i) | set(new_i), key=str)]
    order = {"regression": 0, "new_failure": 1, "flip": 2, "improvement": 3, "tie": 4, "added": 5, "removed": 6, "unchanged": 7}
    return sorted(changes, key=lambda c: (order[c.kind], -abs((c.ratio or 1) - 1)))


def summary(changes: list[Change]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in changes:
        out[c.kind] = out.get(c.kind, 0) + 1
    return out
