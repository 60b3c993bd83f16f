"""`farm bench decode`: where a decode matmul's time goes, one suspect at a time, side by side.

A decode step streams every layer's weights once, so its bound is weight bytes / read
bandwidth. The farm's decode winners reach a fraction of it; this benchmark times the same
ATen kernel (Inductor's default lowering calls it) on the same weights in states that differ
in exactly one thing, interleaved per round in one process, so each ratio isolates one suspect:

- model:     calls rotate over copies of the weight that together exceed the LLC twice, so
             each call reads weights the other calls evicted, as a model's layers do; nothing
             else runs between calls. 2 MiB pages where the host gives them.
- model-4k:  the same with the weights in a mapping madvised MADV_NOHUGEPAGE (4 KiB pages:
             one TLB walk per 4 KiB of weight), against `model`: the TLB suspect.
- cold:      the farm's `cold` state: a write of twice the LLC, then one call. The written
             lines are dirty, so the call's weight reads also pay their write-back.
- cold-read: the same eviction by reading (clean lines), against `cold`: the flush artefact.
- warm:      the same weights again, cache-resident where they fit (the overhead floor).
- model-1t:  `model` on one thread, against `model`: what the second thread buys.
And per-call overhead: the op on a 1x16x64 problem (dispatch, thread wake-up, no data).

The bound uses the read bandwidth (a sum over 4x the LLC) at the thread count of the call.
Each suspect is reported as a ratio of medians with a paired-round interval; efficiency is
bound / time.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import random
import time

import torch
from rich.console import Console
from rich.table import Table

from farm.measure import stats

HUGE = 2 << 20
STATES = ("model", "model-4k", "cold", "cold-read", "warm", "model-1t")


class PinnedPages:
    """An anonymous mapping madvised for 2 MiB or 4 KiB pages, as a uint8 tensor."""

    def __init__(self, nbytes: int, huge: bool):
        self.map = mmap.mmap(-1, nbytes + HUGE)
        self.map.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.offset = (-base) % HUGE  # start on a 2 MiB boundary so whole huge pages fit
        self.address = base + self.offset
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=self.offset)
        self.bytes.fill_(0)  # fault every page in now, not during a timed call

    def huge_bytes(self) -> int:
        """AnonHugePages of this mapping in /proc/self/smaps: what the kernel really gave."""
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split()[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= self.address < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
        return 0


def _weights(op: str, n: int, k: int, group: int, copies: int, huge: bool, gen: torch.Generator):
    """`copies` distinct weights of one problem laid out in one mapping."""
    if op == "int8":
        one = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        one = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32), 1)
    size = one.numel() * one.element_size()
    pages = PinnedPages(size * copies, huge)
    out = []
    for i in range(copies):
        w = pages.bytes[i * size:(i + 1) * size].view(one.dtype).view(one.shape)
        w.copy_(one)
        out.append(w)
    return pages, out, size


def _op(op: str, n: int, k: int, group: int, gen: torch.Generator):
    if op == "int8":
        scales = ((torch.rand(n, generator=gen) + 0.5) / 127).to(torch.bfloat16)
        return lambda x, w: torch.ops.aten._weight_int8pack_mm(x, w, scales)
    scale = (torch.rand(k // group, n, generator=gen) + 0.5) / 8
    sz = torch.stack([scale, 8 * scale], -1).to(torch.bfloat16)
    return lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, sz)


def read_bandwidth(llc_bytes: int, threads: int, repeats: int = 5) -> float:
    """Bytes per second of a streaming read (a sum over 4x the LLC) on `threads` threads."""
    buf = torch.ones(max(4 * llc_bytes, 256 << 20) // 4, dtype=torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return buf.numel() * 4 / best


def _per_call(fn, calls: int) -> float:
    start = time.perf_counter_ns()
    fn(calls)
    return (time.perf_counter_ns() - start) / calls / 1e9


def bench_problem(op: str, m: int, n: int, k: int, group: int, llc_bytes: int, threads: int,
                  rounds: int = 15, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mm = _op(op, n, k, group, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    size = n * k if op == "int8" else n * k // 2
    copies = max(3, math.ceil(2 * llc_bytes / size) + 1)
    big_pages, big, _ = _weights(op, n, k, group, copies, True, gen)
    small_pages, small, _ = _weights(op, n, k, group, copies, False, gen)
    dirty = torch.zeros(max(2 * llc_bytes, 64 << 20) // 4, dtype=torch.float32)
    clean = torch.ones_like(dirty)

    def rotate(ws):
        def run(calls):
            for i in range(calls):
                mm(x, ws[i % len(ws)])
        return run

    def evicted(evict):
        def run(calls):  # one call per eviction; only the calls are timed
            total = 0
            for _ in range(calls):
                evict()
                start = time.perf_counter_ns()
                mm(x, big[0])
                total += time.perf_counter_ns() - start
            return total
        return run

    def on_one_thread(run):
        def wrapped(calls):
            torch.set_num_threads(1)
            try:
                run(calls)
            finally:
                torch.set_num_threads(threads)
        return wrapped

    fns = {
        "model": rotate(big), "model-4k": rotate(small), "warm": lambda calls: [mm(x, big[0]) for _ in range(calls)],
        "model-1t": on_one_thread(rotate(big)),
    }
    evictions = {"cold": lambda: dirty.add_(1.0), "cold-read": lambda: clean.sum()}
    torch.set_num_threads(threads)
    for fn in fns.values():
        fn(copies)  # warm-up: first-touch, thread pool, dispatch caches
    samples: dict[str, list[float]] = {s: [] for s in STATES}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(STATES)
        rng.shuffle(order)
        for state in order:
            if state in evictions:
                samples[state].append(evicted(evictions[state])(3) / 3 / 1e9)
            else:
                samples[state].append(_per_call(fns[state], 2 * copies))
    result = {"op": op, "m": m, "n": n, "k": k, "group_size": group if op == "int4" else None, "threads": threads,
              "weight_bytes": size, "copies": copies,
              "huge_page_share": {"model": big_pages.huge_bytes() / (size * copies),
                                  "model-4k": small_pages.huge_bytes() / (size * copies)},
              "median_us": {s: stats.median(v) * 1e6 for s, v in samples.items()}}

    def ratio(slow: str, fast: str) -> dict:
        r = stats.paired_speedups(samples[slow], samples[fast])  # slow time / fast time per round
        return {"median": stats.median(r), "ci95": stats.bootstrap_ci(r, resamples=1000)}

    # Some kernels give no transparent huge pages at all (this project's Firecracker VMs:
    # thp_fault_alloc stays 0 with THP "always"); then both states run on 4 KiB pages and the
    # ratio says nothing about the TLB, so the report marks it.
    result["pages_compared"] = result["huge_page_share"]["model"] >= 0.5
    result["ratios"] = {
        "4k_pages_over_2m": ratio("model-4k", "model"),
        "cold_write_over_cold_read": ratio("cold", "cold-read"),
        "cold_over_model": ratio("cold", "model"),
        "one_thread_over_two": ratio("model-1t", "model"),
    }
    return result


def bench(problems: list[tuple], rounds: int = 15) -> dict:
    from farm.measure.host import profile

    host = profile()
    threads = torch.get_num_threads()
    bandwidth = {t: read_bandwidth(host.l3_bytes, t) for t in sorted({1, threads})}
    overhead = {}
    for op in ("int8", "int4"):
        row = bench_problem(op, 1, 16, 64 if op == "int8" else 128, 64, 0, threads, rounds)
        overhead[op] = row["median_us"]["warm"]
    rows = []
    for op, m, n, k, group in problems:
        row = bench_problem(op, m, n, k, group, host.l3_bytes, threads, rounds)
        for state, us in row["median_us"].items():
            bw = bandwidth[1 if state == "model-1t" else threads]
            row.setdefault("bound_us", {})[state] = row["weight_bytes"] / bw * 1e6
        row["efficiency"] = {s: row["bound_us"][s] / us for s, us in row["median_us"].items()}
        row["overhead_us"] = overhead[op]
        rows.append(row)
        Console(stderr=True).print(f"decode {op} M={m} N={n} K={k}: model {row['median_us']['model']:.0f} us, "
                                   f"bound {row['bound_us']['model']:.0f} us")
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()
    return {"host": {"isa": host.isa, "cpu": host.cpu, "cores": host.cores, "l3_bytes": host.l3_bytes},
            "threads": threads, "thp": thp, "read_bandwidth_gbs": {t: b / 1e9 for t, b in bandwidth.items()},
            "overhead_us": overhead, "rows": rows, "summary": summarize(rows),
            "method": __doc__.split("\n\n", 1)[1].strip()}


def summarize(rows: list[dict]) -> dict:
    med = lambda values: stats.median(values) if values else None  # noqa: E731
    return {
        "efficiency_median": {s: med([r["efficiency"][s] for r in rows]) for s in STATES},
        "ratio_median": {name: med([r["ratios"][name]["median"] for r in rows
                                    if name != "4k_pages_over_2m" or r["pages_compared"]]) for name in rows[0]["ratios"]} if rows else {},
        "overhead_share_median": med([r["overhead_us"] / r["median_us"]["model"] for r in rows]),
    }


def _problems(models: list[str], ops: list[str], m: int) -> list[tuple]:
    from farm.zoo.shapes import layers

    out = []
    for model in models:
        for layer in layers(model):
            for op in ops:
                if op == "int4" and (layer.k % 128 or layer.n % 16):
                    continue
                if (op, m, layer.n, layer.k, 128) not in out:
                    out.append((op, m, layer.n, layer.k, 128))
    return out


def render(report: dict, console: Console) -> None:
    bw = ", ".join(f"{t} thread(s) {b:.1f} GB/s" for t, b in report["read_bandwidth_gbs"].items())
    console.print(f"read bandwidth {bw}; THP {report['thp']}; per-call overhead (1x16 problem) "
                  + ", ".join(f"{op} {us:.1f} us" for op, us in report["overhead_us"].items()))
    table = Table(title="decode: time per call (us) and efficiency (bound/time) per state", title_justify="left")
    for col in ("problem", "bound", *STATES, "4k/2m", "cold/model", "1t/2t"):
        table.add_column(col)
    for r in report["rows"]:
        table.add_row(f"{r['op']} M={r['m']} N={r['n']} K={r['k']}", f"{r['bound_us']['model']:.0f}",
                      *(f"{r['median_us'][s]:.0f} ({100 * r['efficiency'][s]:.0f}%)" for s in STATES),
                      f"{r['ratios']['4k_pages_over_2m']['median']:.2f}" if r["pages_compared"] else "no THP",
                      *(f"{r['ratios'][name]['median']:.2f}" for name in ("cold_over_model", "one_thread_over_two")))
    console.print(table)
    console.print_json(json.dumps(report["summary"]))


def cmd_decode(args) -> int:
    from farm.render import emit

    problems = _problems(args.model, args.ops, args.m)[: args.limit]
    emit(bench(problems, args.rounds), args.json, render)
    return 0


def register(sub) -> None:
    p = sub.add_parser("decode", help="where a decode matmul's time goes: pages, eviction, threads, overhead")
    p.add_argument("--model", nargs="+", default=["Llama-3.2-1B", "Qwen2.5-0.5B"], help="zoo models whose layers to bench")
    p.add_argument("--ops", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    p.add_argument("-m", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_decode)
